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


# -- a task that leaves the database connection in a transaction (issue 14) ---------------------------
# Processor level (no broker, the task runs in this thread on this thread's connection, as in a worker's
# task thread): whatever the task left open, its result is recorded and committed, the next message is
# recorded too, and the row says what the task left behind.

def _processor():
    import logging

    from carrot.config import get_config
    from carrot.consume.processor import MessageProcessor
    config = get_config()
    return MessageProcessor(config.queue('default'), config, logging.getLogger('carrot.consumer'), 'default#tx')


def _incoming(task, *args):
    import json
    import uuid
    from types import SimpleNamespace

    from carrot.amqp.wire import decode_delivery
    from carrot.config import get_config
    method = SimpleNamespace(redelivered=False, exchange='', routing_key='default', delivery_tag=1)
    properties = SimpleNamespace(headers={'type': task}, message_id=str(uuid.uuid4()), priority=0)
    body = json.dumps({'args': list(args), 'kwargs': {}}).encode()
    return decode_delivery(method, properties, body, get_config().max_message_size)


def _committed_elsewhere(uuid):
    """The row as another connection sees it: what was committed, not what this thread's transaction
    shows."""
    import threading

    from django.db import connections

    from carrot.models import MessageLog
    seen = {}

    def read():
        try:
            seen['row'] = MessageLog.objects.filter(uuid=uuid).values('status', 'output', 'log').first()
        finally:
            connections.close_all()
    thread = threading.Thread(target=read)
    thread.start()
    thread.join(30)
    return seen.get('row')


@pytest.mark.no_broker
@pytest.mark.parametrize('kind', ['begin', 'atomic', 'nested', 'autocommit', 'broken', 'interrupted'])
def test_a_task_leaving_a_transaction_open_has_its_result_recorded_and_the_next_one_too(kind):
    from django.contrib.auth.models import User

    from carrot.amqp.disposition import Action
    processor = _processor()
    message = _incoming('tests.testapp.tasks.leaves_transaction', kind, f'left-{kind}')
    assert processor.process(message).action is Action.ACK
    row = _committed_elsewhere(message.message_id)
    assert row is not None and row['status'] == 'COMPLETED', row
    assert row['output'] == f'"{kind}"'
    assert 'left the database connection' in row['log'] and 'in a transaction' in row['log'], row['log']
    # What the task did not commit is rolled back, as a disconnect would.
    assert not User.objects.filter(username=f'left-{kind}').exists()
    # The next message on the same worker thread is recorded and committed as usual.
    following = _incoming('tests.testapp.tasks.add', 2, 3)
    assert processor.process(following).action is Action.ACK
    assert _committed_elsewhere(following.message_id)['status'] == 'COMPLETED'
    assert 'transaction' not in (_committed_elsewhere(following.message_id)['log'] or '')


@pytest.mark.no_broker
def test_a_task_that_commits_its_own_work_is_left_alone():
    from django.contrib.auth.models import User

    from carrot.amqp.disposition import Action
    processor = _processor()
    message = _incoming('tests.testapp.tasks.leaves_transaction', 'begin', 'committed')
    # Same task, but a well-behaved caller commits: no note, the user row stays.
    from django.db import connection
    processor.run = _committing(processor.run, connection)
    assert processor.process(message).action is Action.ACK
    row = _committed_elsewhere(message.message_id)
    assert row['status'] == 'COMPLETED' and 'transaction' not in (row['log'] or '')
    assert User.objects.filter(username='committed').exists()


def _committing(run, connection):
    def wrapped(func, args, kwargs, log_limit=None):
        outcome = run(func, args, kwargs, log_limit=log_limit)
        connection.cursor().execute('COMMIT')
        return outcome
    return wrapped


# -- a task that raises a BaseException that is not an Exception (issue 14) ---------------------------

@pytest.mark.parametrize('kinds', [('KeyboardInterrupt', 'GeneratorExit', 'SystemExit', 'custom')])
def test_a_task_raising_a_base_exception_fails_once_with_its_own_reason_and_the_consumer_lives(
        start_supervisor, tmp_path, kinds):
    from carrot.models import MessageLog
    from tests.harness import wait_for
    sup = start_supervisor('--queues', 'default')
    consumer = sup.wait_ready(['consumer default#1'])['consumer default#1']
    record = tmp_path / 'executions.txt'
    ids = {kind: publish_raw('default', 'tests.testapp.tasks.raises_base', kind, str(record)) for kind in kinds}
    after = publish_raw('default', 'tests.testapp.tasks.add', 1, 2)

    def settled():
        rows = {row.uuid: row for row in MessageLog.objects.filter(uuid__in=[*ids.values(), after])}
        return rows if len(rows) == len(kinds) + 1 and all(
            row.status in ('FAILED', 'COMPLETED') for row in rows.values()) else None
    rows = wait_for(settled, 60, 'every message to be settled', sup.tail)
    expected = {'KeyboardInterrupt': 'KeyboardInterrupt: pressed in a task',
                'GeneratorExit': 'GeneratorExit: closed in a task', 'SystemExit': 'SystemExit: 3',
                'custom': 'NotAnException: a BaseException of its own'}
    for kind, uuid in ids.items():
        row = rows[uuid]
        assert (row.status, row.attempts) == ('FAILED', 1), (kind, row.status, row.attempts, row.exception)
        assert row.exception.startswith(expected[kind]), (kind, row.exception)
        assert 'worker lost' not in row.exception
    assert rows[after].status == 'COMPLETED'
    assert sorted(lines(record)) == sorted(f'{kind} {consumer.pid}' for kind in kinds)  # each ran once
    assert sup.by_slot()['consumer default#1'].pid == consumer.pid, 'the consumer was replaced'
    assert 'exited with' not in sup.log()


# -- a task that starts processes and returns (issue 14): nothing it starts outlives its slot ----------

def _pids(path):
    return [int(line) for line in lines(path) if line.strip().isdigit()]


def _living(pids):
    from tests.harness import alive
    return [pid for pid in pids if alive(pid)]


@pytest.mark.parametrize('how', ['fork', 'daemon', 'exec', 'both'])
def test_processes_a_task_leaves_behind_are_killed_when_it_returns(start_supervisor, tmp_path, how):
    from carrot.models import MessageLog
    from tests.harness import wait_for
    sup = start_supervisor('--queues', 'default')
    consumer = sup.wait_ready(['consumer default#1'])['consumer default#1']
    record = tmp_path / 'started.txt'
    uuid = publish_raw('default', 'tests.testapp.tasks.fork_and_return', str(record), 300, how)
    row = wait_for(lambda: MessageLog.objects.filter(uuid=uuid, status='COMPLETED').first(), 30,
                   'the task to complete', sup.tail)
    started = _pids(record)
    assert started, 'the task started no process'
    wait_for(lambda: not _living(started), 10, f'the processes the task left ({started}) to be killed', sup.tail)
    # The task's own result, recorded once, by the worker (a forked copy returning from the task is not
    # a second worker).
    if how in ('fork', 'both'):
        assert row.output == str(started[0]), row.output
    assert MessageLog.objects.filter(uuid=uuid).count() == 1
    assert sup.by_slot()['consumer default#1'].pid == consumer.pid
    if how != 'both':
        sup.wait_log(r'the task left \d+ process\(es\) running; killed')
    # The worker goes on taking messages.
    after = publish_raw('default', 'tests.testapp.tasks.add', 2, 2)
    wait_for(lambda: MessageLog.objects.filter(uuid=after, status='COMPLETED').exists(), 20, 'the next task')


def test_processes_left_by_a_killed_worker_are_killed_by_the_master(start_supervisor, tmp_path):
    from tests.harness import wait_for
    sup = start_supervisor('--queues', 'default')
    consumer = sup.wait_ready(['consumer default#1'])['consumer default#1']
    record = tmp_path / 'started.txt'
    publish_raw('default', 'tests.testapp.tasks.fork_and_work', str(record), 300, 300)
    wait_for(lambda: _pids(record), 20, 'the task to fork', sup.tail)
    os.kill(consumer.pid, signal.SIGKILL)  # an OOM kill, mid-task: its forked copy is the master's now
    started = _pids(record)
    wait_for(lambda: not _living(started), 25, f'the master to kill what the dead worker left ({started})',
             sup.tail)
    sup.wait_log(r'killing pid \d+ .*left behind by a child that is gone')


@pytest.mark.parametrize('stop', ['graceful', 'fast'])
def test_the_supervisors_stop_leaves_no_process_a_task_started(start_supervisor, tmp_path, stop):
    from tests.harness import wait_for
    sup = start_supervisor('--queues', 'default', '--graceful-timeout', '20')
    sup.wait_ready(['consumer default#1'])
    record = tmp_path / 'started.txt'
    publish_raw('default', 'tests.testapp.tasks.fork_and_work', str(record), 300, 2)
    wait_for(lambda: _pids(record), 20, 'the task to fork', sup.tail)
    sup.signal(signal.SIGTERM if stop == 'graceful' else signal.SIGQUIT)
    assert sup.wait_exit(30) == 0, sup.tail()
    started = _pids(record)
    wait_for(lambda: not _living(started), 5, f'no process the task started ({started}) to be left', sup.tail)


def test_a_task_whose_log_calls_cannot_be_formatted_succeeds_and_its_log_says_so(admin_client, subprocess_env):
    from carrot.models import MessageLog
    from carrot.utilities import publish_message
    from tests.test_consumer import consume_in_subprocess
    from tests.testapp import tasks

    log = publish_message(tasks.logs_badly)
    # In a process of its own, as a worker runs: pytest's log capture would raise the logging error itself.
    run = consume_in_subprocess(subprocess_env, max_messages=1, idle_timeout=5)
    assert run.returncode == 0, run.stderr
    log = MessageLog.objects.get(pk=log.pk)
    assert (log.status, log.output) == ('COMPLETED', '"done"'), log.exception
    kept = log.log.splitlines()
    assert 'first fine line' in kept[0] and 'last fine line' in kept[-1]
    assert len(kept) == 5 and sum('could not be formatted: TypeError' in line for line in kept) == 1
    assert sum('could not be formatted: RuntimeError' in line for line in kept) == 2
    assert admin_client.get(f'/carrot/api/messages/{log.uuid}/').status_code == 200


@pytest.mark.parametrize('kind', ['nan', 'inf', 'list', 'decimal'])
def test_a_result_that_is_not_strict_json_is_kept_as_text_and_the_api_stays_json(admin_client, kind):
    import json

    from carrot.models import MessageLog
    from carrot.utilities import publish_message
    from tests.conftest import run_consumer
    from tests.testapp import tasks

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} in a JSON document'))

    log = publish_message(tasks.returns_not_json, kind)
    # A row written before outputs were strict: NaN stored as if it were JSON.
    older = MessageLog.objects.create(uuid=f'older-{kind}', status='COMPLETED', task=log.task, queue='default',
                                      task_args='[]', content='{}', output='[NaN, Infinity]')
    run_consumer(max_messages=1, idle_timeout=5)
    log = MessageLog.objects.get(pk=log.pk)
    assert log.status == 'COMPLETED' and log.output == str(tasks.returns_not_json(kind))
    for row in (log, older):
        response = admin_client.get(f'/carrot/api/messages/{row.uuid}/')
        assert strict(response.content)['output'] == row.output  # shown as the text it is
    assert strict(admin_client.get('/carrot/api/messages/?tab=completed').content)


def test_arguments_json_cannot_hold_from_another_publisher_keep_the_api_strict_json(admin_client, raw_channel):
    """A foreign publisher's body may say 1e999 (Python reads it as inf) or NaN; the task runs with them."""
    import json

    from carrot.models import MessageLog
    from tests.conftest import run_consumer
    from tests.test_consumer import raw_publish

    message_id = raw_publish(raw_channel, b'{"args": [1e999, NaN, -1e999], "kwargs": {"x": 1e400}}',
                             headers={'type': 'tests.testapp.tasks.echo'})
    run_consumer(max_messages=1, idle_timeout=5)
    log = MessageLog.objects.get(uuid=message_id)
    assert log.status == 'COMPLETED', log.exception
    for url in (f'/carrot/api/messages/{message_id}/', '/carrot/api/messages/?tab=completed'):
        response = admin_client.get(url)
        assert response.status_code == 200
        json.loads(response.content, parse_constant=lambda name: pytest.fail(f'{name} in {url}'))


@pytest.mark.parametrize('args', ['[1e999]', '[NaN]', '[-Infinity]'])
def test_a_schedule_with_arguments_json_cannot_hold_is_refused_when_saved(admin_client, args):
    from carrot.models import ScheduledTask

    before = ScheduledTask.objects.count()
    response = admin_client.post('/carrot/api/scheduled/', {
        'task': 'tests.testapp.tasks.add', 'queue': 'default', 'interval_count': 5, 'interval_type': 'seconds',
        'task_args': args, 'content': '{}', 'active': 'on'})
    assert response.status_code == 400 and 'not valid JSON' in response.content.decode(), response.content
    assert ScheduledTask.objects.count() == before
