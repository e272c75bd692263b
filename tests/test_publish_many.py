"""publish_messages: many calls of one task, rows written together and confirms awaited together.

Every call is checked before anything is written; the messages reach a real RabbitMQ (each run once by a
real consumer); inside a transaction nothing is sent before the commit; a broker that cannot take them
leaves WAITING rows for the relay; a queue that tracks only failures gets no rows.
"""
import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from carrot.exceptions import InvalidCall, TaskNotRegistered
from carrot.models import MessageLog
from carrot.publish import outbox
from carrot.utilities import publish_messages
from tests.conftest import queue_depth, run_consumer
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def runs(path):
    return path.read_text().splitlines() if path.exists() else []


def test_every_call_is_published_logged_and_run_once(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, 'BATCH_SIZE', 7)  # several batches, the last one short
    record = tmp_path / 'runs'
    calls = [((str(record), f'c{n}'), {}) for n in range(30)]
    rows = publish_messages(tasks.record_execution, calls, queue='other', priority=3)
    assert [r.task_args for r in rows] == [f'["{record}", "c{n}"]' for n in range(30)]  # the order of calls
    assert {r.status for r in rows} == {'PUBLISHED'} and all(r.pk for r in rows)
    assert MessageLog.objects.filter(status='PUBLISHED', queue='other', priority=3).count() == 30
    assert queue_depth('other') == 30
    run_consumer(queue='other', max_messages=30)
    assert sorted(line.split()[0] for line in runs(record)) == sorted(f'c{n}' for n in range(30))
    assert MessageLog.objects.filter(status='COMPLETED').count() == 30


@pytest.mark.parametrize('calls, problem', [
    ([((1, 2), {}), ((1,), {})], r"task tests\.testapp\.tasks\.add: "),        # a call the task cannot take
    ([((1, 2), {}), [1, 2]], r'calls\[1\] must be an \(args, kwargs\) pair'),  # not a pair
    ([((1, 2), {}), ((object(), 2), {})], r'JSON'),                            # not serialisable
])
def test_a_bad_call_anywhere_writes_and_sends_nothing(calls, problem):
    with pytest.raises((InvalidCall, TypeError), match=problem):
        publish_messages(tasks.add, calls)
    assert MessageLog.objects.count() == 0 and queue_depth('default') == 0


def test_an_unregistered_task_is_refused():
    with pytest.raises(TaskNotRegistered):
        publish_messages('os.system', [(('true',), {})])
    assert MessageLog.objects.count() == 0


def test_inside_a_transaction_nothing_is_sent_before_the_commit_and_nothing_after_a_rollback():
    with transaction.atomic():
        rows = publish_messages(tasks.add, [((n, n), {}) for n in range(5)])
        assert queue_depth('default') == 0 and {r.status for r in rows} == {'WAITING'}
    assert queue_depth('default') == 5
    assert MessageLog.objects.filter(status='PUBLISHED').count() == 5
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            publish_messages(tasks.add, [((n, n), {}) for n in range(5)])
            raise RuntimeError
    assert queue_depth('default') == 5 and MessageLog.objects.count() == 5


def test_a_broker_that_cannot_take_them_leaves_waiting_rows_for_the_relay():
    unreachable = {**settings.CARROT, 'default_broker': 'amqp://guest:guest@127.0.0.1:1/'}
    with override_settings(CARROT=unreachable):
        rows = publish_messages(tasks.add, [((n, n), {}) for n in range(4)])
    assert {r.status for r in rows} == {'WAITING'}
    assert MessageLog.objects.filter(status='WAITING').count() == 4


def test_a_queue_that_tracks_only_failures_gets_no_rows_but_every_message(tmp_path):
    record = tmp_path / 'runs'
    tracking = {**settings.CARROT, 'queues': [{'name': 'default', 'track': 'failures'}]}
    with override_settings(CARROT=tracking):
        rows = publish_messages(tasks.record_execution, [((str(record), f'u{n}'), {}) for n in range(10)])
        assert all(r.pk is None for r in rows) and MessageLog.objects.count() == 0
        run_consumer(max_messages=10)
    assert len(runs(record)) == 10 and MessageLog.objects.count() == 0


def test_no_calls_is_nothing():
    assert publish_messages(tasks.add, []) == []



def test_a_connection_rabbitmq_closes_once_every_confirm_is_in_leaves_the_batch_published(monkeypatch):
    """RabbitMQ closes the publishing connection (close_all_connections) between the last confirm of a
    batch and the close of the batch's channel: every message is on the queue, so the call returns them
    PUBLISHED rather than raising the close, and the next publish opens a new connection."""
    from carrot.amqp import pika_compat
    from carrot.amqp.publisher import publisher_for
    from carrot.config import get_config
    from tests.conftest import rabbitmqctl
    wait = pika_compat.ConfirmedBatch.wait

    def wait_then_close_all(batch, seconds):
        outcome = wait(batch, seconds)
        rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'closed once confirmed')
        return outcome

    monkeypatch.setattr(pika_compat.ConfirmedBatch, 'wait', wait_then_close_all)
    rows = publish_messages(tasks.add, [((n, 0), {}) for n in range(20)])
    assert {row.status for row in rows} == {'PUBLISHED'}
    assert MessageLog.objects.filter(status='PUBLISHED').count() == 20
    assert queue_depth('default') == 20
    assert publisher_for(get_config().queue('default').broker).connection is None  # forgotten
    monkeypatch.setattr(pika_compat.ConfirmedBatch, 'wait', wait)
    assert {row.status for row in publish_messages(tasks.add, [((1, 1), {})])} == {'PUBLISHED'}
    assert queue_depth('default') == 21
