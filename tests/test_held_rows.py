"""A row outlives every copy of its message (MessageLog.held_until, README "A row outlives every copy of its
message"): requeue, delete, purge, run now, cleanup and the admin, against the real RabbitMQ and database,
counting how often each task ran. Each test is an attack that once ran a task twice, or ran one that had been
cancelled or purged: the copy in the delay levels (or prefetched by a worker) found no row and was taken for
a message from another publisher."""
from datetime import timedelta

import pytest
from django.utils import timezone

from carrot.helper_tasks import cleanup
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, queue_depth, run_consumer
from tests.harness import wait_for
from tests.test_claim import ConsumerThread, lines
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def labels(path) -> list[str]:
    return [line.split()[0] for line in lines(path)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('how', ['one', 'bulk'])
def test_a_cancelled_delayed_task_requeued_runs_once_now_and_its_delayed_copy_never(admin_client, tmp_path, how):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'once', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/cancel/').status_code == 200
    if how == 'one':
        response = admin_client.post(f'/carrot/api/messages/{log.uuid}/requeue/')
        assert response.status_code == 200 and response.json()['uuid'] == log.uuid, response.content
    else:
        response = admin_client.post('/carrot/api/failed/requeue/', {'uuid': log.uuid})
        assert response.status_code == 200 and response.json()['count'] == 1, response.content
    log.refresh_from_db()
    # Requeued in place: its own uuid, its outcome cleared, still held for the copy in the levels.
    assert log.status == 'PUBLISHED' and not log.exception and log.is_held()
    run_consumer(max_messages=2, idle_timeout=8)  # the requeued run, then the copy out of the levels
    assert labels(target) == ['once']
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert MessageLog.objects.count() == 1


@pytest.mark.timeout(60)
def test_a_task_run_now_keeps_its_row_until_the_delayed_copy_is_out(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=4)
    held_until = MessageLog.objects.get(pk=log.pk).held_until
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=3)
    log.refresh_from_db()
    assert log.status == 'COMPLETED' and log.held_until == held_until > timezone.now()
    response = admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/')
    assert response.status_code == 409 and 'delay levels' in response.json()['error']
    assert cleanup(days=1e-9, failed_days=1e-9) == 0  # cleanup keeps it too
    run_consumer(max_messages=1, idle_timeout=8)  # the delayed copy: acked as a duplicate
    assert labels(target) == ['now']
    wait_for(lambda: not MessageLog.objects.get(pk=log.pk).is_held(), 5, 'the hold to end')
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200


@pytest.mark.timeout(60)
def test_a_purge_after_run_now_keeps_the_delayed_copy_from_running(admin_client, raw_channel, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'purged', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    assert queue_depth('default') == 1
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged')
    run_consumer(max_messages=1, idle_timeout=8)  # the copy out of the levels finds it FAILED
    assert not target.exists()
    assert len(dead_letters(raw_channel)) == 1
    assert MessageLog.objects.count() == 1


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


@pytest.mark.timeout(30)
def test_the_admin_does_not_delete_a_held_row(admin_client):
    held = publish_message(tasks.add, 1, 2, countdown=600)
    done = MessageLog.objects.create(uuid='done', status='COMPLETED', task='tests.testapp.tasks.add',
                                     queue='default', task_args='[1, 2]', content='{}',
                                     publish_time=timezone.now() - timedelta(minutes=1))
    assert admin_client.get(f'/admin/carrot/messagelog/{held.pk}/delete/').status_code == 403
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'delete_selected', '_selected_action': [held.pk, done.pk], 'post': 'yes'}, follow=True)
    assert response.status_code == 200
    assert 'were not deleted' in response.content.decode()
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == [held.uuid]
