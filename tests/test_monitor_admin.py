"""ScheduledTask validation (the model's clean(), shared by the admin and the monitor) and the admin."""
import pytest
from django.core.exceptions import ValidationError

from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import publish_message
from tests.conftest import queue_depth
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def schedule(**fields):
    values = dict(task_name='s', task='tests.testapp.tasks.echo', interval_type='minutes', interval_count=5,
                  task_args='[1]', content='{"a": 1}', queue='default')
    values.update(fields)
    return ScheduledTask(**values)


def errors_of(item):
    with pytest.raises(ValidationError) as caught:
        item.full_clean()
    return caught.value.message_dict


def test_a_good_schedule_validates():
    schedule().full_clean()
    schedule(task_args='', content='', queue='').full_clean()
    schedule(interval_type='days', interval_count=3650).full_clean()


@pytest.mark.parametrize('fields, field, text', [
    ({'task': 'os.system'}, 'task', 'not registered'),
    ({'task': 'tests.testapp.tasks._private_or_missing'}, 'task', 'not registered'),
    ({'task_args': '(1, 2)'}, 'task_args', 'not valid JSON'),
    ({'task_args': '"x"'}, 'task_args', 'must be a JSON list'),
    ({'task_args': '[' * 5000 + ']' * 5000}, 'task_args', 'nested too deeply'),
    ({'content': '{"a": 1'}, 'content', 'not valid JSON'),
    ({'content': 'null'}, 'content', 'must be a JSON object'),
    ({'interval_type': 'days', 'interval_count': 3651}, 'interval_count', 'at most 3650 days'),
    ({'interval_type': 'seconds', 'interval_count': 10 ** 9}, 'interval_count', 'at most 315360000 seconds'),
    ({'interval_count': 0}, 'interval_count', 'at least 1'),
    ({'interval_type': 'fortnights'}, 'interval_type', 'not a valid choice'),
    ({'queue': 'nope'}, 'queue', "There is no queue called 'nope'"),
])
def test_a_bad_schedule_is_refused_with_the_reason_on_its_field(fields, field, text):
    errors = errors_of(schedule(**fields))
    assert field in errors and text in ' '.join(errors[field]), errors
    assert len(errors[field]) == 1, errors  # one problem, one message


def test_message_logs_are_not_added_by_hand(admin_client):
    assert admin_client.get('/admin/carrot/messagelog/add/').status_code == 403
    assert 'Add message log' not in admin_client.get('/admin/carrot/messagelog/').content.decode()


def test_the_admin_form_shows_inline_errors_and_saves_nothing(admin_client):
    page = admin_client.get('/admin/carrot/scheduledtask/add/').content.decode()
    assert '<option value="tests.testapp.tasks.echo">' in page
    response = admin_client.post('/admin/carrot/scheduledtask/add/', {
        'task_name': 'bad', 'task': 'tests.testapp.tasks.echo', 'queue': 'default', 'interval_type': 'days',
        'interval_count': '9999', 'task_args': '[1,', 'content': '{}', 'active': 'on'})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'errorlist' in html and 'not valid JSON' in html and 'at most 3650 days' in html
    assert not ScheduledTask.objects.filter(task_name='bad').exists()
    response = admin_client.post('/admin/carrot/scheduledtask/add/', {
        'task_name': 'good', 'task': 'tests.testapp.tasks.echo', 'queue': 'other', 'interval_type': 'hours',
        'interval_count': '2', 'task_args': '[1]', 'content': '{}', 'active': 'on'})
    assert response.status_code == 302
    assert ScheduledTask.objects.get(task_name='good').interval_display == 'Every 2 hours'


def test_admin_actions_run_now_activate_and_deactivate(admin_client):
    item = schedule(queue='other')
    item.save()
    ids = [item.pk]
    response = admin_client.post('/admin/carrot/scheduledtask/', {'action': 'run_now', '_selected_action': ids},
                                 follow=True)
    assert '1 scheduled task(s) published now' in response.content.decode()
    assert MessageLog.objects.get().task == 'tests.testapp.tasks.echo' and queue_depth('other') == 1
    admin_client.post('/admin/carrot/scheduledtask/', {'action': 'deactivate', '_selected_action': ids})
    assert not ScheduledTask.objects.get(pk=item.pk).active
    admin_client.post('/admin/carrot/scheduledtask/', {'action': 'activate', '_selected_action': ids})
    assert ScheduledTask.objects.get(pk=item.pk).active
    listing = admin_client.get('/admin/carrot/scheduledtask/?active__exact=1').content.decode()
    assert 'Every 5 minutes' in listing and 'By active' in listing


def test_admin_requeue_and_search_by_arguments(admin_client):
    failed = publish_message(tasks.echo, 'findme')
    MessageLog.objects.filter(pk=failed.pk).update(status='FAILED')
    assert 'tests.testapp.tasks.echo' in admin_client.get('/admin/carrot/messagelog/?q=findme').content.decode()
    admin_client.post('/admin/carrot/messagelog/', {'action': 'requeue', '_selected_action': [failed.pk]})
    assert MessageLog.objects.get().status == 'PUBLISHED' and queue_depth('default') == 2
