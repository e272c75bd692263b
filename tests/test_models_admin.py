"""Models, migrations, the cleanup task, scheduled-task helpers and the admin."""
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import IntegrityError
from django.test import override_settings
from django.utils import timezone

from carrot import helper_tasks
from carrot.models import MessageLog, ScheduledTask
from carrot.publish.arguments import load_scheduled
from carrot.schedule.builtin import sync_cleanup_schedule
from carrot.utilities import create_scheduled_task, publish_message
from tests.conftest import queue_depth
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def test_migrations_are_checked_in():
    out = StringIO()
    call_command('makemigrations', 'carrot', '--check', '--dry-run', stdout=out)
    assert 'No changes detected' in out.getvalue()


def test_requeue_publishes_a_copy_and_removes_the_failed_row():
    original = publish_message(tasks.echo, 1, key='v', priority=2)
    MessageLog.objects.filter(pk=original.pk).update(status='FAILED')
    original.refresh_from_db()
    copy = original.requeue()
    assert copy.uuid != original.uuid
    assert (copy.task, copy.positionals, copy.keywords, copy.priority, copy.status) == \
        ('tests.testapp.tasks.echo', [1], {'key': 'v'}, 2, 'PUBLISHED')
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == [copy.uuid]
    assert queue_depth('default') == 2


def test_1x_positional_arguments_are_still_readable():
    log = MessageLog(task='x', task_args="(1, 'two')")
    assert log.positionals == [1, 'two']


def make_completed(days_ago):
    return MessageLog.objects.create(uuid=f'old-{days_ago}', task='t', status='COMPLETED',
                                     completion_time=timezone.now() - timedelta(days=days_ago))


def test_cleanup_deletes_completed_logs_older_than_the_setting():
    make_completed(5), make_completed(1)
    failed = MessageLog.objects.create(uuid='failed-old', task='t', status='FAILED',
                                       failure_time=timezone.now() - timedelta(days=10))  # FAILED: kept 30 days
    assert helper_tasks.cleanup() == 1
    assert set(MessageLog.objects.values_list('uuid', flat=True)) == {'old-1', failed.uuid}
    with override_settings(CARROT={'cleanup_after_days': 0.5}):
        assert helper_tasks.cleanup() == 1


def test_cleanup_can_be_turned_off_and_its_schedule_follows():
    schedule = ScheduledTask.objects.get(task_name=helper_tasks.CLEANUP_TASK_NAME)
    assert schedule.active and schedule.task == 'carrot.helper_tasks.cleanup'
    assert (schedule.interval_type, schedule.interval_count) == ('hours', 1)
    make_completed(10)
    with override_settings(CARROT={'cleanup_after_days': None, 'cleanup_failed_after_days': None}):
        assert helper_tasks.cleanup() == 0
        sync_cleanup_schedule()
    assert MessageLog.objects.count() == 1
    assert not ScheduledTask.objects.get(pk=schedule.pk).active
    sync_cleanup_schedule()
    assert ScheduledTask.objects.get(pk=schedule.pk).active


def test_create_scheduled_task():
    schedule = create_scheduled_task(tasks.echo, {'seconds': 5}, task_name='echo every 5s', queue='other',
                                     task_args=[1], flag=True)
    assert (schedule.task, schedule.interval_type, schedule.interval_count, schedule.queue) == \
        ('tests.testapp.tasks.echo', 'seconds', 5, 'other')
    assert load_scheduled(schedule.task_args, schedule.content) == ((1,), {'flag': True})
    assert schedule.interval == timedelta(seconds=5)
    assert schedule.interval_display == 'Every 5 seconds'
    with pytest.raises(IntegrityError, match='already exists'):
        create_scheduled_task(tasks.echo, {'seconds': 5}, task_name='echo every 5s')
    for bad in ({'weeks': 1}, {'seconds': 0}, {'seconds': 1, 'hours': 1}, 5):
        with pytest.raises(ValueError):
            create_scheduled_task(tasks.echo, bad, task_name=f'bad {bad}')
    log = schedule.publish()
    assert (log.queue, log.task, json.loads(log.content)) == ('other', schedule.task, {'flag': True})


def test_admin_lists_filters_and_requeues(admin_client):
    failed = publish_message(tasks.add, 1, 2)
    MessageLog.objects.filter(pk=failed.pk).update(status='FAILED')
    page = admin_client.get('/admin/carrot/messagelog/?status__exact=FAILED')
    assert page.status_code == 200
    content = page.content.decode()
    assert 'tests.testapp.tasks.add' in content and 'By status' in content and 'By queue' in content
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'requeue', '_selected_action': [failed.pk]}, follow=True)
    assert '1 message(s) requeued' in response.content.decode()
    assert not MessageLog.objects.filter(pk=failed.pk).exists()
    assert MessageLog.objects.get().status == 'PUBLISHED'
    assert admin_client.get('/admin/carrot/scheduledtask/').status_code == 200


@pytest.mark.timeout(240)
def test_migrating_carrot_backwards_and_forwards_works(tmp_path, monkeypatch):
    """post_migrate creates the cleanup schedule with the model as the migrations left it: after
    `migrate carrot 0001` the table lacks the newer columns (found by review: it crashed there)."""
    from tests.test_config import run_project

    monkeypatch.setenv('CARROT_TEST_DB', 'sqlite')  # a throwaway file, whatever the suite runs on
    database = str(tmp_path / 'migrations.sqlite3')
    for argv in (['migrate'], ['migrate', 'carrot', '0001'], ['migrate', 'carrot', 'zero'], ['migrate']):
        result = run_project(database, *argv)
        assert result.returncode == 0, f'{argv}: {result.output}'
