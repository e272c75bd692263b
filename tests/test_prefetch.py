"""A consumer that holds more than one delivery (a queue's 'prefetch', 8 by default), against the real RabbitMQ
and database: a result written without waiting for the disk is acked only once a flush has taken it, a stop
flushes and acks what waits, a long task neither keeps the results before it unacked nor the deliveries
behind it from idle consumers, and every task still runs once.
"""
import pytest
from django.conf import settings
from django.db import connection

from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import queue_depth, rabbitmqctl, run_consumer
from tests.harness import wait_for
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
