"""Claiming ahead (carrot.consume.ahead), against the real RabbitMQ and PostgreSQL: the deliveries held behind
the running one are claimed with it, run without a statement of their own, and written together; and every
way a held delivery can go back unrun -- a long task in front, a stop, a lost connection, a worker killed,
a task that kills its worker -- gives its claim back or lets it be taken over without counting an attempt,
runs every task, and fails a poison task for good.
"""
import os
import signal
import socket
from datetime import timedelta
from unittest.mock import patch

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

import carrot
from carrot.amqp.disposition import Action
from carrot.consume import ahead
from carrot.models import MessageLog, TaskAttempt
from carrot.utilities import publish_message
from tests.conftest import rabbitmqctl, run_consumer
from tests.harness import wait_for
from tests.test_prefetch import executions, queue_counts
from tests.test_processing import incoming, processor
from tests.testapp import tasks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def on_postgresql():
    if connection.vendor != 'postgresql':
        pytest.skip('claims ahead are made on PostgreSQL only (CARROT_TEST_DB=postgres)')


class Windows:
    """What take_window was asked to claim ahead, call by call (a spy: the real statement runs)."""

    def __init__(self):
        self.behind: list[list[str]] = []
        self.real = ahead.take_window

    def __call__(self, done, calls, worker, lease):
        self.behind.append([call[0] for call in calls[1:]])
        return self.real(done, calls, worker, lease)

    @property
    def claimed_ahead(self) -> set[str]:
        return {message_id for behind in self.behind for message_id in behind}


def test_a_backlog_is_claimed_a_window_at_a_time_and_every_task_runs_once_with_its_start(tmp_path):
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}') for n in range(40)]
    windows = Windows()
    with patch.object(ahead, 'take_window', windows):
        run_consumer(idle_timeout=2)
    assert executions(record) == [f'm{n:02d}' for n in range(40)]
    assert queue_counts('default') == (0, 0)
    # Most deliveries were claimed with an earlier one: a statement for a window, not for a task.
    assert len(windows.claimed_ahead) >= 20, windows.behind
    assert len(windows.behind) <= 15, windows.behind
    for row in MessageLog.objects.filter(pk__in=[log.pk for log in logs]):
        assert (row.status, row.attempts, row.worker) == ('COMPLETED', 1, f'{socket.gethostname()}:{os.getpid()}')
        # Its real start, kept in memory while it was claimed ahead and written with the result.
        assert row.started_time is not None and row.publish_time <= row.started_time <= row.completion_time
    assert not TaskAttempt.objects.exists()


def test_a_claim_ahead_given_back_is_published_again_with_its_attempt_taken_back():
    first, behind = publish_message(tasks.add, 1, 1), [publish_message(tasks.add, n, n) for n in range(2, 5)]
    messages = [incoming(args=[n, n], message_id=log.uuid) for n, log in zip(range(2, 5), behind)]
    worker = processor()
    worker.hooks.messages_in_hand = lambda: messages
    worker._claims_ahead = True
    assert worker.process(incoming(args=[1, 1], message_id=first.uuid)).action is Action.ACK
    def claimed():
        return MessageLog.objects.filter(pk__in=[log.pk for log in behind])
    assert {(row.status, row.attempts, row.started_time) for row in claimed()} == {('IN_PROGRESS', 1, None)}
    assert worker.give_back_claims_ahead(messages[1:]) == 2
    assert {row.pk: (row.status, row.attempts, row.worker, row.lease_expires is None) for row in claimed()} == {
        behind[0].pk: ('IN_PROGRESS', 1, worker.worker, False),
        behind[1].pk: ('PUBLISHED', 0, '', True), behind[2].pk: ('PUBLISHED', 0, '', True)}
    # The one still claimed ahead runs without another claim; the others are claimed as any delivery.
    worker.hooks.messages_in_hand = lambda: []
    for message in messages:
        assert worker.process(message).action is Action.ACK
    worker.write_deferred_results()
    assert {(row.status, row.attempts) for row in claimed()} == {('COMPLETED', 1)}


@pytest.mark.parametrize('started, attempts, lost', [(None, 1, 0), ('started', 2, 1)])
def test_a_dead_workers_claim_ahead_is_taken_over_without_a_lost_attempt(started, attempts, lost):
    """Its row IN_PROGRESS under a dead process with no start: claimed ahead and never run. One with a start
    was running: that attempt is kept as LOST and counted."""
    message = incoming(args=[1, 2])
    MessageLog.objects.create(
        uuid=message.message_id, status=MessageLog.IN_PROGRESS, task=message.task, task_args='[1, 2]', content='{}',
        queue='default', worker=f'{socket.gethostname()}:999999999', attempts=1,
        started_time=timezone.now() if started else None, lease_expires=timezone.now() + timedelta(seconds=60))
    assert processor().process(message).action is Action.ACK
    row = MessageLog.objects.get(uuid=message.message_id)
    assert (row.status, row.attempts) == ('COMPLETED', attempts)
    assert TaskAttempt.objects.filter(message_log=row, outcome=TaskAttempt.LOST).count() == lost


def test_a_claim_ahead_held_past_a_third_of_the_lease_is_claimed_again_not_trusted():
    first, second = publish_message(tasks.add, 1, 1), publish_message(tasks.add, 2, 2)
    message = incoming(args=[2, 2], message_id=second.uuid)
    worker = processor()
    worker.hooks.messages_in_hand = lambda: [message]
    worker._claims_ahead = True
    worker.process(incoming(args=[1, 1], message_id=first.uuid))
    worker.hooks.messages_in_hand = lambda: []
    with patch.object(ahead, 'fresh_for', return_value=0):  # as if it had waited a third of the lease
        assert worker.process(message).action is Action.ACK
    worker.write_deferred_results()
    second.refresh_from_db()
    assert (second.status, second.attempts) == ('COMPLETED', 1)  # taken over from itself, uncounted
    assert not TaskAttempt.objects.exists()


def claimed_ahead_now() -> int:
    """Rows claimed in a window and not started: the deliveries a consumer holds behind the running one."""
    return MessageLog.objects.filter(status='IN_PROGRESS', started_time__isnull=True).count()


def test_a_stop_in_the_middle_of_a_window_gives_the_held_claims_back(tmp_path):
    from tests.test_claim import ConsumerThread
    record = tmp_path / 'runs'
    for n in range(40):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.1)
    worker = ConsumerThread('default#stop', idle_timeout=5).start()
    try:
        wait_for(lambda: claimed_ahead_now() >= 3, 20, 'deliveries claimed ahead')
        worker.consumer.stop()
    finally:
        worker.join(timeout=30)
    ran = executions(record)
    assert 1 <= len(ran) < 40
    # Nothing left claimed: what did not run is PUBLISHED again, its attempt taken back, and in the queue.
    assert MessageLog.objects.filter(status='IN_PROGRESS').count() == 0
    assert MessageLog.objects.filter(status='PUBLISHED', attempts=0).count() == 40 - len(ran)
    assert queue_counts('default') == (40 - len(ran), 0)
    run_consumer(idle_timeout=2)
    assert sorted(executions(record)) == [f'm{n:02d}' for n in range(40)]
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 40


def test_a_lost_connection_in_the_middle_of_a_window_gives_the_held_claims_back(tmp_path):
    """The connection closed by the broker while a window runs: before the consumer connects again, the
    rows of the deliveries it held are PUBLISHED again (another worker's copy would otherwise wait for
    their lease, a minute); then every task runs, none blamed."""
    from carrot.consume import loop
    from tests.test_claim import ConsumerThread
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.1) for n in range(40)]
    with patch.object(loop, 'RECONNECT_BASE', 6.0):  # a while between the loss and the next connection
        worker = ConsumerThread('default#lost', idle_timeout=4).start()
        try:
            wait_for(lambda: claimed_ahead_now() >= 3, 20, 'deliveries claimed ahead')
            rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'closed by the test')
            wait_for(lambda: claimed_ahead_now() == 0, 3, 'the claims ahead given back')
            ran = len(executions(record))
            assert MessageLog.objects.filter(status='PUBLISHED', attempts=0).count() >= 40 - ran - 1
            wait_for(lambda: MessageLog.objects.filter(pk__in=[log.pk for log in logs], status='COMPLETED').count()
                     == 40, 40, 'every task COMPLETED')
        finally:
            worker.join(timeout=30)
    ran = executions(record)
    assert sorted(set(ran)) == [f'm{n:02d}' for n in range(40)]
    # The task in hand finishes; a result not yet written when the connection went may run once more.
    assert len(ran) - 40 <= get_prefetch(), ran
    assert not TaskAttempt.objects.filter(outcome=TaskAttempt.LOST).exists()


def get_prefetch() -> int:
    from carrot.config import get_config
    return get_config().queue('default').prefetch


@pytest.mark.timeout(150)
def test_a_child_killed_in_the_middle_of_a_window_loses_nothing_and_counts_no_task_it_held(start_supervisor,
                                                                                         tmp_path):
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.1) for n in range(60)]
    supervisor = start_supervisor(extra="CARROT['queues'] = [{'name': 'default', 'concurrency': 1}]\n")
    supervisor.wait_ready(['consumer default#1'])
    wait_for(lambda: claimed_ahead_now() >= 3, 30, 'deliveries claimed ahead', supervisor.tail)
    victim = supervisor.by_slot()['consumer default#1'].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: MessageLog.objects.filter(pk__in=[log.pk for log in logs], status='COMPLETED').count() == 60,
             60, 'every task COMPLETED after the kill', supervisor.tail)
    ran = executions(record)
    assert sorted(set(ran)) == [f'm{n:02d}' for n in range(60)]
    assert len(ran) - 60 <= get_prefetch(), ran  # only what the dead child ran and had not written
    # The held tasks the child never ran are not counted: at most the one it was running is.
    assert TaskAttempt.objects.filter(outcome=TaskAttempt.LOST).count() <= 1
    assert MessageLog.objects.filter(pk__in=[log.pk for log in logs], attempts__gt=1).count() <= 1


@pytest.mark.timeout(180)
def test_a_task_that_kills_its_worker_in_a_window_fails_for_good_and_the_others_run(start_supervisor, tmp_path):
    """Among short tasks, one that kills its worker each time: wherever it sits in a window, it is failed
    as worker-lost after at most max_attempts + 1 deaths (the claim ahead of its first run is not counted
    when it dies), and every other task completes."""
    from carrot.config import get_config
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.02) for n in range(30)]
    poison = publish_message(tasks.record_and_die, str(record), 'poison')
    logs += [publish_message(tasks.record_execution, str(record), f'n{n:02d}', 0.02) for n in range(30)]
    supervisor = start_supervisor(extra="CARROT['queues'] = [{'name': 'default', 'concurrency': 1}]\n")
    supervisor.wait_ready(['consumer default#1'])
    wait_for(lambda: MessageLog.objects.filter(pk=poison.pk, status='FAILED').exists(), 120,
             'the poison task FAILED', supervisor.tail)
    wait_for(lambda: MessageLog.objects.filter(pk__in=[log.pk for log in logs], status='COMPLETED').count() == 60,
             60, 'every other task COMPLETED', supervisor.tail)
    poison.refresh_from_db()
    assert poison.exception.startswith('worker lost after')
    deaths = executions(record).count('poison')
    assert 1 <= deaths <= get_config().max_attempts + 1, deaths
    assert sorted({token for token in executions(record) if token != 'poison'}) == \
        sorted([f'm{n:02d}' for n in range(30)] + [f'n{n:02d}' for n in range(30)])
    # No other task was blamed for the poison's deaths.
    assert not TaskAttempt.objects.filter(outcome=TaskAttempt.LOST).exclude(message_log=poison).exists()


# -- found by an attack on claiming ahead (helper-19)

@carrot.task
def creates_a_user(username):
    from django.contrib.auth.models import User
    User.objects.create(username=username)


def test_a_session_left_read_only_by_a_task_does_not_fail_the_tasks_claimed_behind_it():
    """Before claiming ahead, carrot's claim of the next task met the read-only session and replaced it;
    a task claimed ahead has no statement before it, so the session is checked after every task."""
    for n in range(3):
        publish_message(tasks.add, n, n)
    setter = publish_message(tasks.sets_session_read_only)
    writers = [publish_message(creates_a_user, f'user{n}') for n in range(4)]
    windows = Windows()
    with patch.object(ahead, 'take_window', windows):
        run_consumer(idle_timeout=3)
    assert {log.uuid for log in writers} & windows.claimed_ahead
    assert {row.status for row in MessageLog.objects.filter(pk__in=[log.pk for log in writers])} == {'COMPLETED'}
    setter.refresh_from_db()
    assert 'read-only' in setter.log and 'fresh connection' in setter.log


def test_a_result_written_through_the_orm_keeps_the_start_of_a_task_claimed_ahead(tmp_path):
    """A receiver of MessageLog's post_save has results written by Model.save(): the start too."""
    from django.db.models import signals
    record = tmp_path / 'runs'
    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance.status)
    signals.post_save.connect(receiver, sender=MessageLog, weak=False)
    try:
        logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}') for n in range(24)]
        run_consumer(idle_timeout=2)
    finally:
        signals.post_save.disconnect(receiver, sender=MessageLog)
    assert sorted(executions(record)) == [f'm{n:02d}' for n in range(24)] and 'COMPLETED' in seen
    rows = MessageLog.objects.filter(pk__in=[log.pk for log in logs])
    assert {row.status for row in rows} == {'COMPLETED'}
    assert not [row.uuid for row in rows if row.started_time is None]


def test_a_window_whose_answer_is_lost_gives_back_what_it_may_have_claimed_ahead():
    """The statement committed, then the connection dropped before its answer: which rows it claimed is
    unknown, so every one it may have claimed ahead is given back (not left to its lease)."""
    from django.db import OperationalError
    first = publish_message(tasks.add, 1, 1)
    behind = [publish_message(tasks.add, n, n) for n in range(2, 6)]
    messages = [incoming(args=[n, n], message_id=log.uuid) for n, log in zip(range(2, 6), behind)]
    worker = processor()
    worker.hooks.messages_in_hand = lambda: messages
    real = ahead.take_window

    def commits_then_loses_the_answer(*args):
        real(*args)
        raise OperationalError('server closed the connection unexpectedly')
    with patch.object(ahead, 'take_window', commits_then_loses_the_answer):
        assert worker.process(incoming(args=[1, 1], message_id=first.uuid)).action is Action.ACK
    first.refresh_from_db()
    assert (first.status, first.attempts) == ('COMPLETED', 1)
    assert {(row.status, row.attempts) for row in MessageLog.objects.filter(pk__in=[log.pk for log in behind])} \
        == {('PUBLISHED', 0)}


def test_a_purge_marks_what_waits_and_a_task_marked_purged_never_runs(tmp_path):
    """README, Purge: deliveries a worker claimed ahead count as taken and run; every row the purge marks
    never runs, and nothing is left claimed."""
    from carrot.monitor.actions import purge_queue
    from tests.test_claim import ConsumerThread
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.2) for n in range(30)]
    worker = ConsumerThread('default#purge', idle_timeout=3).start()
    try:
        wait_for(lambda: claimed_ahead_now() >= 3, 20, 'deliveries claimed ahead')
        purge_queue('default')
    finally:
        worker.join(timeout=60)
    ran = executions(record)
    rows = {row.task_args: row for row in MessageLog.objects.filter(pk__in=[log.pk for log in logs])}
    purged = {args for args, row in rows.items() if row.status == 'FAILED' and row.exception.startswith('Purged')}
    assert purged and len(ran) == len(set(ran))
    assert not [token for token in ran if any(f'"{token}"' in args for args in purged)]
    assert {row.status for row in rows.values()} <= {'COMPLETED', 'FAILED'}
    assert len(ran) + len(purged) == 30
