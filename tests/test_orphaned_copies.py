"""A copy whose row is gone never runs, and a purge stops every copy of what it purged (README, "A copy whose
row is gone never runs"): requeue, delete, purge, run now, cleanup and the admin, against the real RabbitMQ
and database, counting how often each task ran. Each test is an attack that once ran a task twice, or ran
one that had been cancelled or purged: a copy in the delay levels (or prefetched by a worker) found no row
and was taken for a message from another publisher."""
import threading
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from carrot.consume.processor import RETRY_BASE
from carrot.helper_tasks import cleanup
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth, run_consumer
from tests.harness import wait_for
from tests.test_claim import ConsumerThread, lines
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def labels(path) -> list[str]:
    return [line.split()[0] for line in lines(path)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('how', ['one', 'bulk'])
def test_a_cancelled_delayed_task_requeued_runs_once_and_its_delayed_copy_never(admin_client, raw_channel,
                                                                                 tmp_path, how):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'once', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/cancel/').status_code == 200
    if how == 'one':
        response = admin_client.post(f'/carrot/api/messages/{log.uuid}/requeue/')
    else:
        response = admin_client.post('/carrot/api/failed/requeue/', {'uuid': log.uuid})
    assert response.status_code == 200 and response.json()['count'] == 1, response.content
    run_consumer(max_messages=2, idle_timeout=8)  # the requeued copy, then the original out of the levels
    assert labels(target) == ['once']
    copy, = MessageLog.objects.all()
    assert (copy.status, copy.attempts, copy.origin) == ('COMPLETED', 1, log.uuid)
    assert len(dead_letters(raw_channel)) == 1  # the original's copy, unrun


@pytest.mark.timeout(60)
def test_a_task_run_now_and_deleted_does_not_run_again_when_its_delayed_copy_comes(admin_client, raw_channel,
                                                                                    tmp_path, caplog):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=3)
    assert MessageLog.objects.get(pk=log.pk).status == 'COMPLETED'
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=8)  # the delayed copy
    assert labels(target) == ['now']
    assert not MessageLog.objects.exists()  # no row written again for it
    assert len(dead_letters(raw_channel)) == 1
    assert 'came out of the delay levels, but its log row is gone' in caplog.text


@pytest.mark.timeout(60)
def test_cleanup_of_a_finished_task_whose_delayed_copy_is_still_out_runs_nothing_again(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=3)
    assert cleanup(days=1e-9, failed_days=1e-9) == 1
    run_consumer(max_messages=1, idle_timeout=8)
    assert labels(target) == ['now'] and not MessageLog.objects.exists()


@pytest.mark.timeout(60)
def test_a_copy_parked_while_its_task_ran_does_not_run_again_once_the_row_is_deleted(admin_client, tmp_path):
    """The delayed copy comes while the run-now copy runs: it is parked (busy) and comes out again later,
    after the task finished and its row was deleted."""
    target = tmp_path / 'runs'
    log = publish_message(tasks.append_and_sleep, str(target), 'once', RETRY_BASE + 1, countdown=1)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    consumers = [ConsumerThread(f'default#{n}', idle_timeout=RETRY_BASE + 6).start() for n in (1, 2)]
    try:
        wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', 20, 'the task to finish')
        assert delay_depth() >= 1  # the delayed copy, parked while the task ran
        assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200
    finally:
        for consumer in consumers:
            consumer.join(timeout=60)
    assert lines(target) == ['once']
    assert not MessageLog.objects.exists()


@pytest.mark.timeout(60)
def test_a_purge_after_run_now_keeps_the_delayed_copy_from_running(admin_client, raw_channel, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'purged', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    assert queue_depth('default') == 1
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged') and log.worker == ''
    run_consumer(max_messages=1, idle_timeout=8)  # the copy out of the levels finds it FAILED
    assert not target.exists()
    assert len(dead_letters(raw_channel)) == 1
    assert MessageLog.objects.count() == 1


@pytest.mark.timeout(60)
def test_a_purge_stops_a_delayed_task_whose_copy_had_reached_the_queue(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'purged', countdown=1)
    wait_for(lambda: queue_depth('default') == 1, 10, 'the copy to come out of the delay levels')
    assert MessageLog.objects.get(pk=log.pk).status == 'SCHEDULED'  # a row is claimed, not told it arrived
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged')  # so the sweep never sends it again


@pytest.mark.timeout(90)
def test_a_purge_keeps_the_deliveries_a_worker_had_prefetched_from_running(admin_client, tmp_path):
    target = tmp_path / 'runs'
    publish_message(tasks.append_and_sleep, str(target), 'slow', 3)
    for n in range(5):
        publish_message(tasks.append_and_sleep, str(target), f'queued{n}', 0)
    consumer = ConsumerThread('default#prefetch', idle_timeout=3).start()
    try:
        wait_for(lambda: lines(target) == ['slow'], 20, 'the slow task to start')
        assert queue_depth('default') == 0  # the five behind it are the consumer's, prefetched
        response = admin_client.post('/carrot/api/queues/default/purge/')
        assert response.status_code == 200 and response.json()['count'] == 0
    finally:
        consumer.join(timeout=60)
    assert lines(target) == ['slow']
    statuses = sorted(MessageLog.objects.values_list('status', flat=True))
    assert statuses == ['COMPLETED'] + ['FAILED'] * 5  # no row written again for a prefetched copy


@pytest.mark.timeout(60)
def test_a_message_sent_after_the_purge_began_is_not_marked_purged_and_runs(admin_client, tmp_path, monkeypatch):
    """Its row was written before the purge, in a transaction that committed (and so sent it) while
    RabbitMQ was being emptied. (PostgreSQL only: on SQLite the purge's first write waits for that
    transaction to end, so the message is sent either before the purge chose its rows or after it ended.)"""
    from django.db import connection

    from carrot.amqp import declare

    if connection.vendor != 'postgresql':
        pytest.skip('the purge cannot overlap a writing transaction on SQLite (CARROT_TEST_DB=postgres)')
    target = tmp_path / 'runs'
    written, emptied, committed = threading.Event(), threading.Event(), threading.Event()
    purge = declare.purge

    def purge_then_let_the_publisher_commit(broker, name):
        count = purge(broker, name)
        emptied.set()
        assert committed.wait(20)
        return count

    monkeypatch.setattr(declare, 'purge', purge_then_let_the_publisher_commit)
    published = {}

    def publish_in_a_transaction():
        from django.db import connection
        try:
            with transaction.atomic():
                published['log'] = publish_message(tasks.stamp, str(target), 'late')
                written.set()
                assert emptied.wait(20)
            committed.set()
        finally:
            connection.close()

    publisher = threading.Thread(target=publish_in_a_transaction)
    publisher.start()
    assert written.wait(10), 'the row was not written'
    response = admin_client.post('/carrot/api/queues/default/purge/')
    publisher.join(30)
    assert response.status_code == 200, response.content
    log = MessageLog.objects.get(pk=published['log'].pk)
    assert log.status == 'PUBLISHED', log.exception
    run_consumer(max_messages=1, idle_timeout=3)
    assert labels(target) == ['late']


@pytest.mark.timeout(30)
def test_a_running_task_is_not_requeued_in_the_admin_or_in_code(admin_client):
    from carrot.exceptions import StillRunning

    running = MessageLog.objects.create(uuid='running', status='IN_PROGRESS', task='tests.testapp.tasks.add',
                                        queue='default', task_args='[1, 2]', content='{}', worker='host:1',
                                        publish_time=timezone.now() - timedelta(minutes=1))
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'requeue', '_selected_action': [running.pk]}, follow=True)
    assert 'it can be requeued once it has finished' in response.content.decode()
    with pytest.raises(StillRunning):
        running.requeue()
    assert list(MessageLog.objects.values_list('uuid', 'status')) == [('running', 'IN_PROGRESS')]
    assert queue_depth('default') == 0


@pytest.mark.timeout(60)
def test_a_retry_whose_row_was_deleted_in_the_admin_is_not_run_as_a_new_task(admin_client, raw_channel, tmp_path):
    runs = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(runs), 5)
    run_consumer(idle_timeout=0.5)  # the first run fails: retry 1 scheduled, its copy in the delay levels
    assert MessageLog.objects.get(pk=log.pk).status == 'SCHEDULED'
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'delete_selected', '_selected_action': [log.pk], 'post': 'yes'}, follow=True)
    assert response.status_code == 200 and not MessageLog.objects.exists()
    run_consumer(max_messages=1, idle_timeout=8)  # the retry's copy: dead-lettered, not a fresh first run
    assert len(lines(runs)) == 1 and not MessageLog.objects.exists()
    assert len(dead_letters(raw_channel)) == 1
