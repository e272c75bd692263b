"""A consumer that holds more than one delivery (a queue's 'prefetch', 8 by default), against the real RabbitMQ
and database: a result written without waiting for the disk is acked only once a flush has taken it, a stop
flushes and acks what waits, a long task neither keeps the results before it unacked nor the deliveries
behind it from idle consumers, and every task still runs once.
"""
import logging
import threading
import time
from unittest.mock import patch

import pytest
from django.conf import settings
from django.db import DatabaseError, connection, connections, transaction
from django.utils import timezone

from carrot.amqp.disposition import Action
from carrot.amqp.session import ConsumeSession
from carrot.config import get_config
from carrot.consume import claim
from carrot.consume.logrows import write_completion
from carrot.consume.processor import DefaultHooks, MessageProcessor
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import queue_depth, rabbitmqctl, run_consumer
from tests.harness import wait_for
from tests.test_processing import incoming, processor
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def executions(path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def wal_syncs() -> int:
    """The server's WAL flushes so far (every commit that waits for the disk makes one)."""
    with connection.cursor() as cursor:
        cursor.execute('SELECT wal_sync FROM pg_stat_wal')
        return cursor.fetchone()[0]


def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of queue `name`, as RabbitMQ counts them."""
    listing = rabbitmqctl('list_queues', '-q', '-p', settings.VHOST, 'name', 'messages_ready',
                          'messages_unacknowledged').stdout
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f'no queue {name!r} in {listing!r}')


def test_a_run_of_short_tasks_flushes_far_less_than_once_a_task_and_acks_every_message(tmp_path):
    if connection.vendor != 'postgresql':
        pytest.skip('commits that skip the disk exist on PostgreSQL only (CARROT_TEST_DB=postgres)')
    record = tmp_path / 'runs'
    for n in range(60):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}')
    before = wal_syncs()
    run_consumer(max_messages=60)
    flushes = wal_syncs() - before
    # Every message acked: unacked ones would be back in the queue once the consumer's channel closed.
    assert queue_depth('default') == 0
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 60
    assert sorted(executions(record)) == [f'm{n:02d}' for n in range(60)]
    # One flush per task would be 60 (a result waiting for the disk each time); runs of 8 share theirs.
    assert flushes < 30, f'{flushes} WAL flushes for 60 tasks'


def test_a_run_flushed_together_is_acked_in_one_frame_and_every_message_is_acked(tmp_path):
    """The deliveries whose results one flush made durable are acked with one `multiple` ack -- which takes
    every delivery up to its tag, so a wrong one would ack a delivery still held or running, and that one
    would be lost (acked, never run) or its result left unflushed."""
    if connection.vendor != 'postgresql':
        pytest.skip('commits that skip the disk exist on PostgreSQL only (CARROT_TEST_DB=postgres)')
    record = tmp_path / 'runs'
    for n in range(60):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}')
    acked_up_to = []
    real = ConsumeSession.ack_up_to

    def ack_up_to(session, delivery_tag):
        acked_up_to.append(delivery_tag)
        real(session, delivery_tag)
    with patch.object(ConsumeSession, 'ack_up_to', ack_up_to):
        run_consumer(max_messages=60)
    assert acked_up_to == sorted(acked_up_to) and len(acked_up_to) >= 60 // 8 - 1
    assert queue_counts('default') == (0, 0)
    assert sorted(executions(record)) == [f'm{n:02d}' for n in range(60)]
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 60


def test_a_stop_acks_the_results_in_hand_and_returns_the_held_deliveries(tmp_path, caplog):
    record = tmp_path / 'runs'
    for n in range(20):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}')
    run_consumer(max_messages=5)  # stops with results waiting for a flush and deliveries held
    done = MessageLog.objects.filter(status='COMPLETED').count()
    assert done >= 5
    # What completed was acked (flushed first); what was only held is back in the queue.
    assert queue_depth('default') == 20 - done
    run_consumer(max_messages=20 - done)
    assert executions(record) == [f'm{n:02d}' for n in range(20)]  # once each, in order
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 20
    assert 'already COMPLETED' not in caplog.text  # no completed message was delivered again


@pytest.mark.timeout(90)
def test_a_long_task_lets_the_results_before_it_be_acked_and_gives_the_held_ones_back(start_supervisor, tmp_path):
    """A backlog of 3 short tasks, one of 6 s and 4 short ones, on one consumer holding 8: while the long
    task runs, the three before it are acked (flushed from the lease thread) and the four behind it are
    back in the queue, ready for any consumer; then each of the eight runs once."""
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f'short{n}') for n in range(3)]
    logs.append(publish_message(tasks.record_execution, str(record), 'long', 6))
    logs += [publish_message(tasks.record_execution, str(record), f'later{n}') for n in range(4)]
    supervisor = start_supervisor(extra="CARROT['queues'] = [{'name': 'default', 'concurrency': 1}]\n")
    supervisor.wait_ready(['consumer default#1'])
    wait_for(lambda: MessageLog.objects.filter(pk=logs[3].pk, status='IN_PROGRESS').exists(), 15,
             'the long task to start', supervisor.tail)
    wait_for(lambda: queue_counts('default') == (4, 1), 4, 'the long task alone unacked, four ready',
             supervisor.tail, interval=0.2)
    assert executions(record) == ['short0', 'short1', 'short2']
    supervisor.wait_log(r'4 messages waited .* behind .*record_execution', timeout=1)
    for row in MessageLog.objects.filter(pk__in=[log.pk for log in logs[:3]]):
        assert row.status == 'COMPLETED'
    wait_for(lambda: MessageLog.objects.filter(pk__in=[log.pk for log in logs], status='COMPLETED').count() == 8,
             20, 'all eight COMPLETED', supervisor.tail)
    assert sorted(executions(record)) == sorted(['short0', 'short1', 'short2', 'long', 'later0', 'later1',
                                                 'later2', 'later3'])
    assert queue_counts('default') == (0, 0)


def test_a_consumer_that_stops_after_one_message_holds_no_other(tmp_path):
    """max_messages (a child's max_tasks_per_child) below the prefetch bounds what the consumer holds: after
    one message, the rest were never delivered, so none comes back marked redelivered (on a quorum queue
    each return would count towards its delivery limit)."""
    from tests.conftest import raw_connection
    record = tmp_path / 'runs'
    for n in range(10):
        publish_message(tasks.record_execution, str(record), f'm{n}')
    run_consumer(max_messages=1)
    assert executions(record) == ['m0']
    connection = raw_connection()
    try:
        channel = connection.channel()
        redelivered = []
        while True:
            method, _, _ = channel.basic_get('default', auto_ack=True)
            if method is None:
                break
            redelivered.append(method.redelivered)
    finally:
        connection.close()
    assert redelivered == [False] * 9


# -- runs: the task thread goes on to the next held delivery by itself (carrot.consume.loop._run_from) -----

def counting_starts():
    """Patch Consumer._start (the connection thread handing a delivery over) to count its calls."""
    from carrot.consumer import Consumer
    starts = []
    real = Consumer._start

    def start(consumer, delivery, session):
        starts.append(delivery.delivery_tag)
        real(consumer, delivery, session)
    return starts, patch.object(Consumer, '_start', start)


def test_a_backlog_is_run_by_the_task_thread_going_on_by_itself_each_task_once_in_order(tmp_path):
    # Before runs, the connection thread handed over every delivery: 48 starts for 48 tasks.
    record = tmp_path / 'runs'
    for n in range(48):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}')
    starts, patched = counting_starts()
    with patched:
        consumer = run_consumer(idle_timeout=2)
    assert executions(record) == [f'm{n:02d}' for n in range(48)]
    assert len(starts) <= 48 // 2, starts
    assert consumer.messages_settled == 48 and queue_counts('default') == (0, 0)
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 48


def test_a_run_stops_at_max_messages_and_gives_the_rest_back(tmp_path):
    """A run counts what it has run and not yet settled: it never goes past max_messages (a child's
    max_tasks_per_child), and what it held goes back to the queue unrun."""
    record = tmp_path / 'runs'
    for n in range(30):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}')
    run_consumer(max_messages=13)
    assert executions(record) == [f'm{n:02d}' for n in range(13)]
    assert queue_counts('default') == (17, 0)
    run_consumer(idle_timeout=2)
    assert executions(record) == [f'm{n:02d}' for n in range(30)]


def test_failures_retries_and_strangers_in_the_middle_of_a_run_are_settled_in_order(tmp_path, raw_channel):
    """Deliveries settled at once (a dead-letter, a retry parked in the delay levels, a foreign message's
    dead-letter) among results that wait for a flush: each is settled, none acked before it ran, and the
    run goes on."""
    import pika
    record = tmp_path / 'runs'
    expected, flaky = [], []
    for n in range(24):
        if n % 8 == 3:
            publish_message(tasks.explode, f'boom {n}')
        elif n % 8 == 6:  # fails once, parked for a second in the delay levels, then completes
            flaky.append((publish_message(tasks.flaky, str(tmp_path / f'flaky-{n}'), 1), tmp_path / f'flaky-{n}'))
        elif n % 8 == 5:
            raw_channel.basic_publish('', 'default', b'not json', pika.BasicProperties(
                headers={'type': 'tests.testapp.tasks.add'}, message_id=f'stranger-{n}'))
        else:
            publish_message(tasks.record_execution, str(record), f'm{n:02d}')
            expected.append(f'm{n:02d}')
    run_consumer(idle_timeout=4)  # long enough for the retries to come back
    assert executions(record) == expected
    assert queue_counts('default') == (0, 0)
    assert queue_depth('default.dead') == 6
    assert MessageLog.objects.filter(status='COMPLETED').count() == len(expected) + len(flaky)
    assert MessageLog.objects.filter(status='FAILED').count() == 6
    for log, runs in flaky:
        log.refresh_from_db()
        assert (log.status, log.attempts, len(runs.read_text().splitlines())) == ('COMPLETED', 2, 2)


def test_a_stop_in_the_middle_of_a_run_ends_it_after_the_task_in_hand(tmp_path):
    """stop() while the task thread goes from one held delivery to the next: the task in hand finishes and
    is acked, the run takes no other, and the held ones go back; every task runs once in all."""
    from tests.test_claim import ConsumerThread
    record = tmp_path / 'runs'
    for n in range(40):
        publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.02)
    worker = ConsumerThread('default#run', idle_timeout=5).start()
    try:
        wait_for(lambda: len(executions(record)) >= 6, 20, 'a run to be under way')
        worker.consumer.stop()
    finally:
        worker.join(timeout=30)
    ran = executions(record)
    assert 6 <= len(ran) < 40
    assert queue_counts('default') == (40 - len(ran), 0)  # nothing unacked, nothing acked unrun
    assert MessageLog.objects.filter(status='COMPLETED').count() == len(ran)
    run_consumer(idle_timeout=2)
    assert executions(record) == [f'm{n:02d}' for n in range(40)]


def test_a_run_counts_what_is_being_settled_and_never_passes_max_messages(tmp_path):
    """helper-18: the connection thread took the run's finished deliveries and settled them one by one (a
    dead-letter's socket write can take a while); meanwhile the task thread counted neither them nor their
    settlement, and ran a fifth task for max_messages=4."""
    record = tmp_path / 'runs'
    for n in range(12):
        publish_message(tasks.record_then_fail, str(record), f'f{n:02d}', 0.05)
    real = ConsumeSession.settle

    def slow_settle(session, delivery_tag, disposition, message):
        real(session, delivery_tag, disposition, message)
        if disposition.action is Action.DEAD_LETTER:
            time.sleep(0.125)
    with patch.object(ConsumeSession, 'settle', slow_settle):
        consumer = run_consumer(max_messages=4, idle_timeout=3)
    assert executions(record) == ['f00', 'f01', 'f02', 'f03'] and consumer.messages_settled == 4
    assert queue_counts('default') == (8, 0) and queue_depth('default.dead') == 4


@pytest.mark.timeout(60)
def test_a_time_limit_that_fires_as_the_task_ends_starts_no_other_task(tmp_path):
    """helper-18: on a quorum queue (held deliveries are not given back) the time limit fired on B, and
    while B's failure was being recorded (slow: a lock on the log table) B ended and the run went on to C,
    which the process then abandoned half-run. The run must end with the task the limit fired on."""
    from carrot.consumer import Consumer
    from carrot.exceptions import TaskTimeLimitExceeded
    from django.test import override_settings
    record = tmp_path / 'runs'
    with override_settings(CARROT={**settings.CARROT, 'queues': [{'name': 'default', 'queue_type': 'quorum'}]}):
        publish_message(tasks.append_and_sleep, str(record), 'B', 1.6)
        publish_message(tasks.append_and_sleep, str(record), 'C', 2.0)
        publish_message(tasks.append_and_sleep, str(record), 'D', 0.0)
        real = Consumer._fail_overrun_row

        def slow(consumer, *args):
            time.sleep(1.0)
            return real(consumer, *args)
        queue = get_config().queue('default')
        consumer = Consumer(queue.broker, queue, logging.getLogger('carrot.consumer'), 'default#limit')
        consumer.task_time_limit = 1.0
        with patch.object(Consumer, '_fail_overrun_row', slow), pytest.raises(TaskTimeLimitExceeded):
            consumer.run(idle_timeout=4)
    assert record.read_text().split() == ['B']
    assert MessageLog.objects.filter(status='IN_PROGRESS').count() == 0
    # A supervised child would be gone by now, and its database sessions and holds with it: here the
    # abandoned task thread ends, B's row (its result kept for a next claim that never came) is no longer
    # held, and the sessions left by the threads of this consumer are ended for the teardown.
    for thread in list(consumer._thread._executor._threads):
        thread.join(timeout=10)
    claim._held.clear()
    if connection.vendor == 'postgresql':
        with connection.cursor() as cursor:
            cursor.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                           'WHERE datname = current_database() AND pid <> pg_backend_pid()')


# -- a result deferred to the next claim (carrot.consume.unflushed), on the processor itself ---------------

class _NextInHand(DefaultHooks):
    """The processor's hooks as a consumer holding the next delivery (prefetch above 1) gives them."""

    def another_message_waits(self) -> bool:
        return True


def in_a_run():
    if connection.vendor != 'postgresql':
        pytest.skip('results skip the disk (and are deferred) on PostgreSQL only (CARROT_TEST_DB=postgres)')
    config = get_config()
    worker = MessageProcessor(config.queue('default'), config, logging.getLogger('carrot.consumer'), 'default#unit')
    worker.hooks = _NextInHand(worker)
    return worker


def published(*args):
    log = publish_message(tasks.add, *args, on_commit=False)
    return log, incoming(args=list(args), message_id=log.uuid)


def commits_of_this_session() -> int:
    """Transactions committed in this database so far (the test's own reads count too)."""
    with connection.cursor() as cursor:
        cursor.execute('SELECT pg_stat_clear_snapshot()')
        cursor.execute('SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()')
        return cursor.fetchone()[0]


def test_a_result_deferred_to_the_next_claim_is_written_with_it_and_acked_after_a_flush():
    worker = in_a_run()
    first, first_message = published(1, 2)
    second, second_message = published(3, 4)
    disposition = worker.process(first_message)
    assert disposition.action is Action.ACK and not disposition.on_disk  # acked only after a flush
    number = worker.unflushed_number
    first.refresh_from_db()
    assert first.status == 'IN_PROGRESS'  # not written yet: it goes with the next claim
    assert worker.results.verdict(number) is None
    worker.hooks = DefaultHooks(worker)  # the second is the last of the run: its result waits for the disk
    assert worker.process(second_message).on_disk
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.output, first.attempts) == ('COMPLETED', '3', 1)
    assert (second.status, second.output) == ('COMPLETED', '7')
    assert worker.results.verdict(number) is True  # the second's commit flushed the first's
    assert not worker.results.pending


def test_a_run_of_deferred_results_takes_about_one_commit_a_task():
    """Without deferring, a task took two commits (its claim, its result); with it, one."""
    worker = in_a_run()
    messages = [published(n, n)[1] for n in range(40)]
    before = commits_of_this_session()
    for message in messages:
        assert worker.process(message).action is Action.ACK
    worker.results.flush()
    commits = commits_of_this_session() - before
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 40
    assert commits < 50, f'{commits} commits for 40 tasks'


def _flush_as_the_lease_thread(worker, failures: list, started: threading.Event | None = None,
                               lock_timeout: str | None = None) -> None:
    """The consumer's lease thread flushing (on a connection whose lock_timeout gives up on a locked row)."""
    if lock_timeout:
        with connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = '{lock_timeout}'")
    if started is not None:
        started.set()
    try:
        worker.results.flush()
    except BaseException as exc:
        failures.append(exc)
    finally:
        connections.close_all()


def test_a_deferred_result_is_written_by_a_flush_from_another_thread():
    """A stop, a lost connection or a long wait for the next delivery: the lease thread's flush writes it."""
    worker = in_a_run()
    log, message = published(5, 5)
    worker.process(message)
    number = worker.unflushed_number
    failures = []
    thread = threading.Thread(target=_flush_as_the_lease_thread, args=(worker, failures))
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and not failures
    log.refresh_from_db()
    assert (log.status, log.output) == ('COMPLETED', '10')
    assert worker.results.verdict(number) is True
    assert not worker.results.deferred and not worker.results.pending
    worker.results.flush()  # nothing left: nothing written twice
    assert not claim._held  # the row is no longer held by this process


@pytest.mark.parametrize('next_one', ['bad', 'unregistered', 'no_message_id', 'own_copy', 'foreign'])
def test_a_deferred_result_is_written_whatever_the_next_delivery_is(next_one):
    """The next delivery may take any way but the one-statement claim: the deferred result is written first,
    and a copy of the task itself is acked as a duplicate, never run again."""
    worker = in_a_run()
    log, message = published(2, 2)
    worker.process(message)
    number = worker.unflushed_number
    following = {
        'bad': lambda: incoming(body=b'{not json'),
        'unregistered': lambda: incoming(task='tests.testapp.tasks.not_there'),
        'no_message_id': lambda: incoming(args=[1, 1], message_id=None),
        'own_copy': lambda: incoming(args=[2, 2], message_id=log.uuid, redelivered=True),
        'foreign': lambda: incoming(args=[1, 1]),
    }[next_one]()
    outcome = worker.process(following)
    log.refresh_from_db()
    assert (log.status, log.output, log.attempts) == ('COMPLETED', '4', 1)
    if next_one == 'own_copy':
        assert outcome.action is Action.ACK
    if outcome.on_disk:
        assert worker.results.verdict(number) is True
    else:
        worker.results.flush()
        assert worker.results.verdict(number) is True
    assert MessageLog.objects.filter(uuid=log.uuid).count() == 1


def test_a_deferred_result_whose_row_is_deleted_is_not_written_again_and_the_next_runs():
    worker = in_a_run()
    log, message = published(1, 1)
    second, second_message = published(2, 2)
    worker.process(message)
    number = worker.unflushed_number
    MessageLog.objects.filter(pk=log.pk).delete()  # deleted in the monitor while it waited
    worker.hooks = DefaultHooks(worker)
    assert worker.process(second_message).action is Action.ACK
    assert not MessageLog.objects.filter(uuid=log.uuid).exists()
    second.refresh_from_db()
    assert second.status == 'COMPLETED'
    assert worker.results.verdict(number) is True  # nothing of it to flush: its delivery is acked


def test_a_deferred_result_is_written_apart_when_the_claim_with_it_is_refused(caplog):
    """The one statement refused (here: its prepared form dropped and the plain one broken on purpose):
    the result is written on its own, and the next task is still claimed and run once."""
    worker = in_a_run()
    log, message = published(3, 3)
    second, second_message = published(4, 4)
    worker.process(message)
    with patch.object(claim, 'complete_then_take', side_effect=DatabaseError('refused on purpose')):
        worker.hooks = DefaultHooks(worker)
        assert worker.process(second_message).on_disk
    log.refresh_from_db()
    second.refresh_from_db()
    assert (log.status, second.status, second.attempts) == ('COMPLETED', 'COMPLETED', 1)
    assert 'could not go in one statement' in caplog.text


def test_a_copy_of_a_task_whose_result_is_deferred_is_not_taken_over_in_the_same_process():
    """Another consumer thread of this process meets a copy of the task while its result waits for the next
    claim: the row is IN_PROGRESS under this live process, so the copy waits -- not a dead worker's row to
    take over and run again."""
    worker = in_a_run()
    log, message = published(6, 6)
    worker.process(message)
    other = processor('default#other')
    outcome = other.process(incoming(args=[6, 6], message_id=log.uuid, redelivered=True))
    assert outcome.action is Action.RETRY_LATER
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('IN_PROGRESS', 1)
    worker.results.flush()
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)


def _row_locked(pk, locked: threading.Event, release: threading.Event) -> None:
    """Hold a lock on row `pk` (another session's SELECT FOR UPDATE) until `release`."""
    with transaction.atomic():
        MessageLog.objects.select_for_update().get(pk=pk)
        locked.set()
        release.wait(30)
    connections.close_all()


class _FlushThatFails:
    """A flush on another thread that has taken the deferred result of `row` and fails on its lock."""

    def __init__(self, worker, row):
        self.locked, self.release, self.started, self.failures = (threading.Event(), threading.Event(),
                                                                 threading.Event(), [])
        self.lock = threading.Thread(target=_row_locked, args=(row.pk, self.locked, self.release))
        self.lock.start()
        assert self.locked.wait(10)
        self.flush = threading.Thread(target=_flush_as_the_lease_thread,
                                      args=(worker, self.failures, self.started, '1500ms'))
        self.flush.start()
        assert self.started.wait(10)
        time.sleep(0.3)  # the flush has taken the result and waits on the lock

    def end(self):
        self.flush.join(10)
        self.release.set()
        self.lock.join(10)
        assert self.failures, 'the flush was meant to fail on the lock'


def test_a_flush_that_fails_while_the_next_result_is_deferred_loses_neither():
    """(helper-16) The lease thread's flush took the deferred result A and failed on a lock while the task
    thread ran B and deferred B's: giving A back dropped B, never written and never acked."""
    worker = in_a_run()
    a, a_message = published(1, 1)
    b, b_message = published(2, 2)
    worker.process(a_message)
    a_number = worker.unflushed_number
    failing = _FlushThatFails(worker, a)
    assert worker.process(b_message).on_disk is False  # B claimed alone (A was in the flush's hands), deferred
    b_number = worker.unflushed_number
    failing.end()
    worker.results.flush()
    a.refresh_from_db()
    b.refresh_from_db()
    assert (a.status, b.status) == ('COMPLETED', 'COMPLETED')
    assert (worker.results.verdict(a_number), worker.results.verdict(b_number)) == (True, True)
    assert not worker.results.pending and not worker.results.deferred
    assert a.uuid not in claim._held and b.uuid not in claim._held


def test_a_result_deferred_while_a_failed_flush_gives_one_back_is_recorded_not_failed():
    """(helper-16) The failed flush gave its result back just before the task thread deferred the next one:
    that raised, and a task that had succeeded was recorded FAILED."""
    worker = in_a_run()
    a, a_message = published(1, 1)
    b, b_message = published(2, 2)
    worker.process(a_message)
    failing = _FlushThatFails(worker, a)
    real_hold, holds = claim.hold, []

    def hold(message_id):  # B's second hold is _record_success's, just before it defers B
        holds.append(message_id)
        if holds.count(b.uuid) == 2:
            failing.end()  # the flush fails and gives A back here
        real_hold(message_id)
    with patch.object(claim, 'hold', hold):
        outcome = worker.process(b_message)
    assert outcome.action is Action.ACK
    worker.results.flush()
    a.refresh_from_db()
    b.refresh_from_db()
    assert (a.status, b.status, b.output) == ('COMPLETED', 'COMPLETED', '4')
    assert a.uuid not in claim._held and b.uuid not in claim._held


def test_a_flush_that_writes_a_deferred_result_vouches_only_for_what_was_committed_before_it():
    """(helper-16) A commit that returned while the flush's own commit was on its way is not flushed by it."""
    worker = in_a_run()
    log, message = published(1, 1)
    other, _ = published(3, 3)
    worker.process(message)
    numbers = []
    write_durably = worker.results._write_durably

    def write_then_another_commit_returns(row):
        written = write_durably(row)

        def task_thread():  # another result, written without waiting, returns only now
            other.status, other.completion_time, other.output, other.log = 'COMPLETED', timezone.now(), '6', ''
            _, started = write_completion(other, wait_for_disk=False)
            numbers.append(worker.results.wrote_unflushed(started))
            connections.close_all()
        thread = threading.Thread(target=task_thread)
        thread.start()
        thread.join(10)
        return written
    worker.results._write_durably = write_then_another_commit_returns
    worker.results.flush()
    assert worker.results.verdict(numbers[0]) is None  # not vouched for: a later flush settles it
    worker.results._write_durably = write_durably
    worker.results.flush()
    assert worker.results.verdict(numbers[0]) is True


@pytest.mark.parametrize('name', ['carrot', 'carrot.consumer', 'carrot.consumer.mine', 'carrot.something'])
def test_a_task_logging_under_the_workers_own_logger_keeps_its_debug_lines(name):
    """(helper-17) Keeping the worker's own debug line from being made for nothing once set 'carrot.consumer'
    to the worker's level: a task logging under it lost its lines below that level."""
    log = publish_message(tasks.log_to, name, 'marker-17')
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'COMPLETED'
    assert 'DEBUG debug marker-17' in log.log and 'INFO info marker-17' in log.log


def test_a_database_fault_while_asking_whether_results_may_skip_the_disk_is_not_the_tasks_failure():
    """helper-19: the first result of a worker asks the database whether it may flush (UnflushedResults.usable),
    outside the retry of the write; a connection lost just then marked a task that had run FAILED. It is
    written waiting for the disk instead, and asked again with the next result."""
    from django.db import OperationalError
    from carrot.consume import unflushed
    worker = in_a_run()
    log, message = published(5, 6)
    real, calls = unflushed.flush_to_disk, []

    def lost_once(using='default'):
        calls.append(using)
        if len(calls) == 1:
            raise OperationalError('server closed the connection unexpectedly')
        return real(using)
    with patch.object(unflushed, 'flush_to_disk', lost_once):
        assert worker.process(message).action is Action.ACK
        log.refresh_from_db()
        assert (log.status, log.attempts) == ('COMPLETED', 1)
        assert worker.results.usable()  # asked again, and the server answers now
    assert len(calls) >= 2
