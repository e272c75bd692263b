"""A queue's tracking level ('track': 'all' | 'failures' | 'none'): what its tasks write to MessageLog.

'failures': a success writes no row (neither the publish nor the run), a failure is logged in full, a
retry writes the row it counts on, and a message that must wait for the broker keeps a WAITING row for
the relay. 'none': not even failures. Both run what they are given, on a real broker and database.
"""
import pika
import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from carrot.amqp.declare import declare_queue
from carrot.exceptions import CarrotConfigException
from carrot.config import get_config
from carrot.models import MessageLog, TaskAttempt
from carrot.utilities import publish_message
from tests.conftest import dead_letters, queue_depth, raw_connection, run_consumer
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def tracking(level, **queue):
    return override_settings(CARROT={**settings.CARROT, 'queues': [{'name': 'default', 'track': level, **queue}]})


def runs(path):
    return path.read_text().splitlines() if path.exists() else []


def test_failures_level_writes_no_row_for_a_success_and_runs_every_task_once(tmp_path):
    record = tmp_path / 'runs'
    with tracking('failures'):
        for n in range(20):
            log = publish_message(tasks.record_execution, str(record), f't{n}')
            assert log.pk is None and log.status == 'PUBLISHED' and log.uuid  # the unsaved row, for the caller
        run_consumer(max_messages=20)
    assert sorted(line.split()[0] for line in runs(record)) == sorted(f't{n}' for n in range(20))
    assert MessageLog.objects.count() == 0
    assert queue_depth('default') == 0


def test_failures_level_logs_a_failure_in_full_and_dead_letters_it(raw_channel):
    with tracking('failures'):
        log = publish_message(tasks.explode, 'kept in full')
        run_consumer(max_messages=1)
    row = MessageLog.objects.get(uuid=log.uuid)
    assert row.status == 'FAILED' and 'kept in full' in row.exception and 'ValueError' in row.traceback
    assert (row.attempts, row.task, row.task_args) == (1, 'tests.testapp.tasks.explode', '["kept in full"]')
    attempt = TaskAttempt.objects.get(message_log=row)
    assert attempt.outcome == TaskAttempt.FAILED and attempt.number == 1
    assert len(dead_letters(raw_channel)) == 1


def test_failures_level_retries_through_a_row_and_ends_completed(tmp_path):
    record = tmp_path / 'runs'
    with tracking('failures'):
        log = publish_message(tasks.flaky, str(record), 1)
        run_consumer(max_messages=1, idle_timeout=1)  # fails, and is parked for the retry
        row = MessageLog.objects.get(uuid=log.uuid)
        assert (row.status, row.retries) == ('SCHEDULED', 1)
        run_consumer(max_messages=1, idle_timeout=10)  # the retry comes back after about a second
    row = MessageLog.objects.get(uuid=log.uuid)
    assert row.status == 'COMPLETED' and len(runs(record)) == 2
    assert list(TaskAttempt.objects.filter(message_log=row).values_list('outcome', flat=True)) == [TaskAttempt.RETRIED]


def test_none_level_writes_no_row_even_for_a_failure(raw_channel):
    with tracking('none'):
        publish_message(tasks.explode, 'not kept')
        publish_message(tasks.add, 1, 2)
        run_consumer(max_messages=2)
    assert MessageLog.objects.count() == 0
    assert len(dead_letters(raw_channel)) == 1  # the failure is still in <queue>.dead


def test_a_message_published_inside_a_transaction_is_sent_on_commit_and_never_after_a_rollback(tmp_path):
    record = tmp_path / 'runs'
    with tracking('failures'):
        with transaction.atomic():
            publish_message(tasks.record_execution, str(record), 'committed')
            assert queue_depth('default') == 0  # not before the commit
        assert queue_depth('default') == 1
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                publish_message(tasks.record_execution, str(record), 'rolled back')
                raise RuntimeError
        assert queue_depth('default') == 1
        run_consumer(max_messages=1)
    assert [line.split()[0] for line in runs(record)] == ['committed']


def test_a_message_that_waits_for_the_broker_keeps_a_row_for_the_relay():
    unreachable = {**settings.CARROT, 'default_broker': 'amqp://guest:guest@127.0.0.1:1/',
                   'queues': [{'name': 'default', 'track': 'failures'}], 'confirm_timeout': 2}
    with override_settings(CARROT=unreachable):
        log = publish_message(tasks.add, 1, 2)
    row = MessageLog.objects.get(uuid=log.uuid)
    assert row.status == 'WAITING' and log.pk == row.pk  # the relay sends it when the broker is back


def test_a_redelivered_untracked_message_without_a_row_runs_again(tmp_path):
    """No row, no claim: a copy of a message runs again (at least once), as README.rst says."""
    record = tmp_path / 'runs'
    with tracking('failures'):
        log = publish_message(tasks.record_execution, str(record), 'twice')
        connection = raw_connection()
        channel = connection.channel()
        method, properties, body = channel.basic_get('default')
        channel.basic_publish('', 'default', body, properties)  # a duplicate, as a second publisher might
        channel.basic_nack(method.delivery_tag, requeue=True)  # and the original redelivered
        connection.close()
        run_consumer(max_messages=2)
    assert [line.split()[0] for line in runs(record)] == ['twice', 'twice']
    assert not MessageLog.objects.filter(uuid=log.uuid).exists()


def test_an_unknown_level_is_a_config_error():
    with override_settings(CARROT={**settings.CARROT, 'queues': [{'name': 'default', 'track': 'some'}]}):
        with pytest.raises(CarrotConfigException, match=r"\['track'\] must be 'all' or 'failures' or 'none'"):
            get_config()


def test_a_hostile_body_on_an_untracked_queue_is_refused_with_a_row(raw_channel):
    with tracking('failures'):
        declare_queue(raw_channel, get_config().queue('default'))
        raw_channel.basic_publish('', 'default', b'{not json', pika.BasicProperties(
            headers={'type': 'tests.testapp.tasks.add'}, message_id='hostile-1', content_type='application/json'))
        run_consumer(max_messages=1)
    assert MessageLog.objects.get().status == 'FAILED'
