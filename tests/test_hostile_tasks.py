"""Tasks that misbehave towards their worker (attack, beyond issue 6's list): a task that forks a child
which outlives it. The child inherits the worker's broker and database sockets, so the broker may not see
the worker's connection close when the worker dies, and the message in hand is then not redelivered
until the child exits -- the at-least-once promise silently waits on a stray process.
"""
import os
import signal
import time

import pytest

from tests.harness import publish_raw

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_a_worker_killed_while_its_tasks_forked_child_lives_still_gets_its_message_redelivered(
        start_supervisor, tmp_path):
    sup = start_supervisor('--queues', 'default')
    kids = sup.wait_ready(['consumer default#1'])
    consumer = kids['consumer default#1']
    record = tmp_path / 'executions.txt'
    # The task forks a child that sleeps 120 s, records its execution, then works for 60 s more.
    publish_raw('default', 'tests.testapp.tasks.spawn_lingering_child', str(record), 'once', 120, 60)
    sup.wait_for(lambda: len(lines(record)) == 1, 30, 'the task to start and record its execution')
    os.kill(consumer.pid, signal.SIGKILL)  # only the worker dies, as an OOM kill would do it
    # The replacement consumer should get the unacked message back within seconds (the broker sees the
    # connection drop), not after the forked child's 120 s.
    started = time.monotonic()
    sup.wait_for(lambda: len(lines(record)) >= 2, 40,
                 'the message to be redelivered after its worker was killed (the forked child still holds '
                 'the dead worker\'s broker socket open, so RabbitMQ still counts the delivery as in hand)')
    print(f'FIGURE redelivery_after_kill={time.monotonic() - started:.1f}s')
