"""The monitor's pages, JSON API and actions, through Django's test client, against the real database
and the real RabbitMQ (publishes, purges and passive declares are real)."""
import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.utils import timezone

from carrot.models import MessageLog, ScheduledTask
from carrot.publish.arguments import load_scheduled
from carrot.monitor import broker_stats
from carrot.utilities import publish_message
from tests.conftest import queue_depth, raw_connection
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

XSS = '<script>alert(1)</script>'


@pytest.fixture(autouse=True)
def fresh_broker_stats():
    broker_stats.forget()
    yield
    broker_stats.forget()


@pytest.fixture
def staff(client):
    user = User.objects.create_user('staff', password='pw', is_staff=True)
    client.force_login(user)
    return client


def make_log(uuid, status='COMPLETED', task='tests.testapp.tasks.add', queue='default', minutes_ago=1, **fields):
    when = timezone.now() - timedelta(minutes=minutes_ago)
    times = {'COMPLETED': 'completion_time', 'FAILED': 'failure_time'}
    values = dict(uuid=uuid, status=status, task=task, queue=queue, routing_key=queue, publish_time=when,
                  task_args='[1, 2]', content='{}')
    if status in times:
        values[times[status]] = when
        values['started_time'] = when - timedelta(seconds=2)
    values.update(fields)
    return MessageLog.objects.create(**values)


# -- who may see it ------------------------------------------------------------------------------

PAGES = ['/carrot/', '/carrot/failed/', '/carrot/completed/', '/carrot/waiting/', '/carrot/later/',
         '/carrot/scheduled/',
         '/carrot/workers/', '/carrot/scheduled/new/']
API = ['/carrot/api/messages/', '/carrot/api/overview/', '/carrot/api/workers/', '/carrot/api/scheduled/']


def test_anonymous_users_are_sent_to_log_in_and_the_api_refuses_them(client):
    for url in PAGES:
        response = client.get(url)
        assert response.status_code == 302 and '/admin/login/' in response['Location'], url
    for url in API:
        assert client.get(url).status_code == 403, url
    make_log('f1', 'FAILED')
    assert client.post('/carrot/task/f1/delete/').status_code == 302
    assert client.post('/carrot/api/messages/f1/delete/').status_code == 403
    assert MessageLog.objects.filter(uuid='f1').exists()


def test_logged_in_users_who_are_not_staff_are_refused(client):
    client.force_login(User.objects.create_user('someone', password='pw'))
    assert client.get('/carrot/').status_code == 302
    assert client.get('/carrot/api/messages/').status_code == 403


def test_staff_users_see_every_page(staff):
    make_log('c1')
    for url in PAGES + API + ['/carrot/task/c1/', '/carrot/api/messages/c1/']:
        assert staff.get(url).status_code == 200, url


def test_monitor_authentication_lists_the_projects_own_decorators(client):
    client.force_login(User.objects.create_user('someone', password='pw'))
    auth = {'monitor_authentication': ['django.contrib.auth.decorators.login_required']}
    with override_settings(CARROT=auth):
        assert client.get('/carrot/').status_code == 200
        assert client.get('/carrot/api/messages/').status_code == 200
        client.logout()
        response = client.get('/carrot/')
        assert response.status_code == 302 and 'login' in response['Location']


def test_the_monitor_is_public_only_by_explicit_opt_in(client):
    with override_settings(CARROT={'monitor_authentication': ['carrot.monitor.access.public']}):
        assert client.get('/carrot/').status_code == 200
        assert client.get('/carrot/api/workers/').status_code == 200
    with override_settings(CARROT={'monitor_authentication': []}):  # empty means the default, not public
        assert client.get('/carrot/').status_code == 302


def test_gets_change_nothing_and_posts_need_the_csrf_token():
    make_log('f1', 'FAILED')
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(User.objects.create_user('staff', password='pw', is_staff=True))
    for url in ['/carrot/task/f1/requeue/', '/carrot/task/f1/delete/', '/carrot/api/messages/f1/delete/',
                '/carrot/api/failed/delete/', '/carrot/api/queues/default/purge/']:
        assert strict.get(url).status_code == 405, url
        assert strict.post(url).status_code == 403, url  # no CSRF token
    page = strict.get('/carrot/bulk/delete-failed/')  # GET asks to confirm
    assert page.status_code == 200 and b'Yes, delete failed tasks' in page.content
    assert MessageLog.objects.filter(uuid='f1', status='FAILED').exists()
    token = strict.cookies['csrftoken'].value
    response = strict.post('/carrot/api/messages/f1/delete/', HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200 and response.json()['count'] == 1
    assert not MessageLog.objects.filter(uuid='f1').exists()


# -- lists -------------------------------------------------------------------------------------------

def test_tabs_show_their_statuses_newest_first_with_counts(staff):
    make_log('p1', 'PUBLISHED', minutes_ago=3)
    make_log('r1', 'IN_PROGRESS', minutes_ago=2)
    make_log('f1', 'FAILED', exception='ValueError: boom')
    make_log('c1', 'COMPLETED', minutes_ago=5)
    make_log('c2', 'COMPLETED', minutes_ago=1)
    make_log('w1', 'WAITING')
    make_log('s1', 'SCHEDULED', run_after=timezone.now() + timedelta(hours=2))
    make_log('s2', 'SCHEDULED', run_after=timezone.now() + timedelta(hours=1))
    data = staff.get('/carrot/api/messages/?tab=queued').json()
    assert [r['uuid'] for r in data['results']] == ['r1', 'p1']
    assert data['counts'] == {'queued': 2, 'failed': 1, 'completed': 2, 'waiting': 1, 'later': 2,
                              'scheduled': 1}
    assert [r['uuid'] for r in staff.get('/carrot/api/messages/?tab=later').json()['results']] == ['s2', 's1']
    assert [r['uuid'] for r in staff.get('/carrot/api/messages/?tab=completed').json()['results']] == ['c2', 'c1']
    assert [r['uuid'] for r in staff.get('/carrot/api/messages/?tab=waiting').json()['results']] == ['w1']
    page = staff.get('/carrot/failed/').content.decode()
    assert 'ValueError: boom' in page and 'Failed <span class="count" data-count="failed">1</span>' in page
    assert staff.get('/carrot/api/messages/?tab=nope').status_code == 400
    assert staff.get('/carrot/api/messages/?page=x').status_code == 400


def test_list_rows_have_stable_field_names(staff):
    make_log('c1', output='3', worker='host:1', attempts=1)
    row, = staff.get('/carrot/api/messages/?tab=completed').json()['results']
    assert set(row) == {'uuid', 'task', 'queue', 'status', 'priority', 'args', 'kwargs', 'publish_time',
                        'run_after', 'started_time', 'completion_time', 'failure_time', 'duration', 'age',
                        'attempts', 'retries', 'worker', 'exception'}
    assert (row['args'], row['kwargs'], row['duration'], row['worker']) == ([1, 2], {}, 2.0, 'host:1')


def test_search_by_task_or_arguments_and_filter_by_queue(staff):
    make_log('a', task='tests.testapp.tasks.add', content='{"order": 4242}')
    make_log('b', task='tests.testapp.tasks.echo', queue='other')
    make_log('c', task='tests.testapp.tasks.chatty', task_args='["needle"]')

    def found(query):
        return sorted(r['uuid'] for r in staff.get('/carrot/api/messages/?tab=completed&' + query).json()['results'])

    assert found('q=echo') == ['b']
    assert found('q=4242') == ['a']
    assert found('q=NEEDLE') == ['c']
    assert found('queue=other') == ['b']
    assert found('q=tasks&queue=default') == ['a', 'c']
    html = staff.get('/carrot/completed/?q=echo').content.decode()
    assert 'tests.testapp.tasks.echo' in html and 'tests.testapp.tasks.chatty' not in html


def test_a_search_reads_the_newest_rows_of_a_list_and_finds_an_id_anywhere(staff, monkeypatch):
    """With a million rows a word that matches few would read them all on every refresh: a search reads
    the newest SEARCH_WINDOW rows of the list (3 here), in the page and in the counts; an id is found
    wherever it is."""
    from carrot.monitor import queries
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', 3)
    for n in range(6):
        make_log(f'w{n}', minutes_ago=n, content='{"needle": 1}')
    make_log('x9', minutes_ago=1, task='tests.testapp.tasks.echo', status='FAILED')

    def found(query):
        document = staff.get('/carrot/api/messages/?tab=completed&' + query).json()
        return sorted(r['uuid'] for r in document['results']), document['counts']

    assert found('q=needle') == (['w0', 'w1', 'w2'], found('q=needle')[1])
    assert found('q=needle')[1]['completed'] == 3 and found('q=needle')[1]['failed'] == 0
    assert found('q=w5')[0] == ['w5']  # the oldest, by its id
    assert found('q=echo')[1]['failed'] == 1  # each list has its own window
    html = staff.get('/carrot/completed/?q=needle').content.decode()
    assert '/task/w2/' in html and '/task/w3/' not in html  # the rows' links (not a random token's text)


def test_lists_are_paginated_and_a_page_past_the_end_shows_the_last(staff):
    for n in range(30):
        make_log(f'c{n:02}', minutes_ago=n)
    first = staff.get('/carrot/api/messages/?tab=completed').json()
    assert (first['count'], first['pages'], first['page_size'], len(first['results'])) == (30, 2, 25, 25)
    assert first['results'][0]['uuid'] == 'c00'
    second = staff.get('/carrot/api/messages/?tab=completed&page=2').json()
    assert [r['uuid'] for r in second['results']] == [f'c{n}' for n in range(25, 30)]
    assert staff.get('/carrot/api/messages/?tab=completed&page=9').json()['page'] == 2
    assert len(staff.get('/carrot/api/messages/?tab=completed&page_size=500').json()['results']) == 30
    html = staff.get('/carrot/completed/?page=2').content.decode()
    assert 'Page 2 of 2' in html and 'c29' in html and 'c00' not in html


# -- detail ------------------------------------------------------------------------------------------

def test_detail_shows_everything_escaped_and_never_the_password(staff):
    log = make_log('f1', 'FAILED', task_args=json.dumps([XSS, 2]), content=json.dumps({'who': XSS}),
                   output=json.dumps(XSS), exception=f'ValueError: {XSS}', traceback=f'Traceback\n{XSS}',
                   log=f'2026-11-21 20:00:00,000 DEBUG detail {XSS}\n2026-11-21 20:00:01,000 INFO hello\n'
                       f'2026-11-21 20:00:02,000 WARNING careful\nsecond line', attempts=2, worker='h:9',
                   priority=3)
    html = staff.get('/carrot/task/f1/').content.decode()
    assert XSS not in html
    assert html.count('&lt;script&gt;alert(1)&lt;/script&gt;') >= 5
    for text in ('tests.testapp.tasks.add', 'Virtual host', 'carrot-test-', 'h:9', 'Traceback', 'Requeue'):
        assert text in html
    assert 'guest:guest' not in html and ':guest@' not in html
    detail = staff.get('/carrot/api/messages/f1/').json()
    assert (detail['args'], detail['kwargs'], detail['output'], detail['log_level']) == \
        ([XSS, 2], {'who': XSS}, XSS, 'INFO')
    assert [e['level'] for e in detail['log']] == ['INFO', 'WARNING']
    assert detail['log'][1]['message'] == 'careful\nsecond line'
    assert [e['level'] for e in staff.get('/carrot/api/messages/f1/?log_level=debug').json()['log']] == \
        ['DEBUG', 'INFO', 'WARNING']
    assert staff.get('/carrot/api/messages/f1/?log_level=error').json()['log'] == []
    assert staff.get('/carrot/task/nope/').status_code == 404
    assert staff.get('/carrot/api/messages/nope/').status_code == 404
    assert log.virtual_host.startswith('amqp://guest:***@')


# -- actions (real RabbitMQ) -------------------------------------------------------------------------

def failed_copy(*args, **kwargs):
    log = publish_message(tasks.echo, *args, **kwargs)
    MessageLog.objects.filter(pk=log.pk).update(status='FAILED', failure_time=timezone.now())
    return log


def test_requeue_one_failed_task(staff, raw_channel):
    log = failed_copy(1, key='v')
    raw_channel.queue_purge('default')
    response = staff.post(f'/carrot/task/{log.uuid}/requeue/', follow=True)
    assert 'requeued' in response.content.decode()
    assert not MessageLog.objects.filter(uuid=log.uuid).exists()
    copy = MessageLog.objects.get()
    assert (copy.status, copy.positionals, copy.keywords) == ('PUBLISHED', [1], {'key': 'v'})
    assert queue_depth('default') == 1
    completed = make_log('c1')
    response = staff.post(f'/carrot/api/messages/{completed.uuid}/requeue/')
    assert response.status_code == 409 and 'only failed' in response.json()['error']


def test_requeue_all_failed_matching_the_search_after_confirming(staff, raw_channel):
    failed_copy('keep-me'), failed_copy('requeue-me'), failed_copy('requeue-me')
    raw_channel.queue_purge('default')
    confirm = staff.get('/carrot/bulk/requeue-failed/?q=requeue-me').content.decode()
    assert '<strong>2</strong> task(s) will be affected' in confirm
    assert MessageLog.objects.filter(status='FAILED').count() == 3
    staff.post('/carrot/bulk/requeue-failed/', {'q': 'requeue-me'})
    assert MessageLog.objects.filter(status='FAILED').count() == 1
    assert MessageLog.objects.filter(status='PUBLISHED').count() == 2
    assert queue_depth('default') == 2
    response = staff.post('/carrot/api/failed/requeue/', data={}, content_type='application/json')
    assert response.json()['count'] == 1 and queue_depth('default') == 3


def test_delete_one_selected_or_all_failed(staff):
    for n in range(4):
        make_log(f'f{n}', 'FAILED')
    make_log('c1')
    published = make_log('p1', 'PUBLISHED')
    staff.post('/carrot/task/f0/delete/')
    staff.post('/carrot/bulk/delete-failed/', {'uuid': ['f1', 'c1']})  # only failed rows are touched
    assert sorted(MessageLog.objects.values_list('uuid', flat=True)) == ['c1', 'f2', 'f3', 'p1']
    response = staff.post('/carrot/api/failed/delete/')
    assert response.json()['count'] == 2
    response = staff.post(f'/carrot/api/messages/{published.uuid}/delete/')
    assert response.status_code == 409 and 'purge' in response.json()['error']
    assert sorted(MessageLog.objects.values_list('uuid', flat=True)) == ['c1', 'p1']


def test_purge_a_queue_empties_it_on_rabbitmq_and_marks_its_waiting_rows_failed_as_purged(staff):
    for n in range(3):
        publish_message(tasks.add, n, n)
    publish_message(tasks.add, 9, 9, queue='other')
    running = make_log('r1', 'IN_PROGRESS')
    assert queue_depth('default') == 3
    confirm = staff.get('/carrot/bulk/purge/?queue=default').content.decode()
    assert '<strong>3</strong> task(s) are waiting in queue <strong>default</strong>' in confirm
    assert staff.get('/carrot/bulk/purge/?queue=nope').status_code == 400
    staff.post('/carrot/bulk/purge/', {'queue': 'default'})
    assert queue_depth('default') == 0 and queue_depth('other') == 1
    assert sorted(MessageLog.objects.values_list('status', 'queue')) == [
        ('FAILED', 'default')] * 3 + [('IN_PROGRESS', 'default'), ('PUBLISHED', 'other')]
    assert all(e.startswith("Purged: removed from queue 'default'") for e in
               MessageLog.objects.filter(status='FAILED').values_list('exception', flat=True))
    assert MessageLog.objects.filter(pk=running.pk).exists()
    response = staff.post('/carrot/api/queues/other/purge/')
    assert response.json()['count'] == 1 and queue_depth('other') == 0
    assert staff.post('/carrot/api/queues/nope/purge/').status_code == 404


def test_a_message_waiting_for_the_broker_is_shown_with_its_age_and_can_be_sent_or_deleted(staff):
    waiting = make_log('w1', 'WAITING', task='tests.testapp.tasks.echo', minutes_ago=10,
                       task_args='[1]', content='{"a": 2}', completion_time=None)
    make_log('w2', 'WAITING')
    rows = staff.get('/carrot/api/messages/?tab=waiting').json()['results']
    assert [r['uuid'] for r in rows] == ['w2', 'w1'] and 590 < rows[1]['age'] < 700
    html = staff.get('/carrot/waiting/').content.decode()
    assert '10 min' in html and 'Send now' in html
    response = staff.post('/carrot/api/messages/w1/send/')
    assert response.status_code == 200, response.content
    waiting.refresh_from_db()
    assert waiting.status == 'PUBLISHED' and queue_depth('default') == 1
    channel = raw_connection().channel()
    method, properties, body = channel.basic_get('default', auto_ack=True)
    assert properties.message_id == 'w1' and json.loads(body) == {'args': [1], 'kwargs': {'a': 2}}
    assert staff.post('/carrot/api/messages/w1/send/').status_code == 409
    staff.post('/carrot/task/w2/delete/')
    assert not MessageLog.objects.filter(uuid='w2').exists()


# -- the overview strip ------------------------------------------------------------------------------

def test_overview_counts_come_from_rabbitmq_and_the_last_hour(staff):
    publish_message(tasks.add, 1, 1)
    publish_message(tasks.add, 2, 2)
    make_log('c1', minutes_ago=5)
    make_log('c2', minutes_ago=90)
    make_log('f1', 'FAILED', queue='other')
    queues = {q['queue']: q for q in staff.get('/carrot/api/overview/').json()['queues']}
    assert queues['default']['broker'] == {'state': 'ok', 'ready': 2, 'consumers': 0, 'error': ''}
    assert queues['default']['completed_last_hour'] == 1 and queues['other']['failed_last_hour'] == 1
    assert queues['other']['broker']['state'] == 'not declared'


def test_an_unreachable_broker_shows_as_unreachable_not_an_error(staff):
    carrot = {'default_broker': 'amqp://guest:guest@127.0.0.1:1/x'}
    with override_settings(CARROT=carrot):
        response = staff.get('/carrot/')
        assert response.status_code == 200 and 'unreachable' in response.content.decode()
        queue, = staff.get('/carrot/api/overview/').json()['queues']
        assert queue['broker']['state'] == 'unreachable' and 'guest:guest' not in queue['broker']['error']


# -- workers -----------------------------------------------------------------------------------------

def snapshot(host, pid, seconds_ago=1, **extra):
    from carrot.models import SupervisorStatus
    now = timezone.now()
    document = {'version': 1, 'host': host, 'pid': pid, 'state': 'running', 'generation': 2, 'restarts': 1,
                'settings': 'proj.settings', 'slots': [
                    {'name': 'consumer default#1', 'group': 'consumer default', 'pid': pid + 1,
                     'state': 'running', 'task': 'tests.testapp.tasks.sleep', 'task_id': 'abc', 'task_age': 3.5,
                     'restarts': 0, 'memory_rss': 99999999, 'memory_uss': 41943040, 'memory_pss': 52428800},
                    {'name': 'consumer other#1', 'pid': None, 'state': 'parked', 'problem': 'keeps dying',
                     'restarts': 7}]}
    document.update(extra)
    return SupervisorStatus.objects.create(name=f'{host}:{pid}', host=host, pid=pid, started=now - timedelta(hours=1),
                                           last_seen=now - timedelta(seconds=seconds_ago), generation=2,
                                           document=document)


def test_workers_tab_lists_every_supervisor_and_shows_silent_ones_as_gone(staff):
    snapshot('alpha', 100)
    snapshot('beta', 200, seconds_ago=300, settings=XSS)
    data = staff.get('/carrot/api/workers/').json()['supervisors']
    alpha, beta = data
    assert (alpha['host'], alpha['gone'], alpha['state'], beta['gone'], beta['state']) == \
        ('alpha', False, 'running', True, 'gone')
    assert alpha['slots'][0]['state'] == 'running' and alpha['slots'][1]['problem'] == 'keeps dying'
    html = staff.get('/carrot/workers/').content.decode()
    for text in ('alpha', 'beta', 'consumer default#1', 'tests.testapp.tasks.sleep', 'parked', 'keeps dying',
                 '40.0 MiB', '50.0 MiB', 'gone', '3.50 s'):
        assert text in html, text
    assert XSS not in html
    with override_settings(CARROT={'supervisor_gone_after': 3600}):
        assert not any(s['gone'] for s in staff.get('/carrot/api/workers/').json()['supervisors'])
    assert 'Forget gone supervisors' in html
    assert staff.post('/carrot/api/workers/forget-gone/').json()['count'] == 1
    assert [s['host'] for s in staff.get('/carrot/api/workers/').json()['supervisors']] == ['alpha']
    assert 'Forget gone supervisors' not in staff.get('/carrot/workers/').content.decode()


def test_a_malformed_snapshot_document_is_shown_not_crashed_on(staff):
    snapshot('gamma', 300, slots='not a list')
    snapshot('delta', 400, slots=[None, {'name': 5, 'pid': 'x'}])
    assert staff.get('/carrot/workers/').status_code == 200


# -- scheduled tasks ---------------------------------------------------------------------------------

FORM = {'task_name': 'nightly echo', 'task': 'tests.testapp.tasks.echo', 'queue': 'other',
        'interval_count': '5', 'interval_type': 'minutes', 'task_args': '[1, "two"]',
        'content': '{"flag": true}', 'active': 'on'}


def test_create_edit_and_list_a_scheduled_task_with_the_form(staff):
    page = staff.get('/carrot/scheduled/new/').content.decode()
    assert '<option value="tests.testapp.tasks.echo">' in page and '<option value="other">' in page
    assert 'os.system' not in page
    response = staff.post('/carrot/scheduled/new/', FORM)
    assert response.status_code == 302
    schedule = ScheduledTask.objects.get(task_name='nightly echo')
    assert (schedule.queue, schedule.routing_key, schedule.interval,
            *load_scheduled(schedule.task_args, schedule.content), schedule.active) == \
        ('other', 'other', timedelta(minutes=5), (1, 'two'), {'flag': True}, True)
    listing = staff.get('/carrot/scheduled/').content.decode()
    assert 'Every 5 minutes' in listing and 'nightly echo' in listing
    staff.post(f'/carrot/scheduled/{schedule.pk}/', dict(FORM, interval_count='1', interval_type='hours'))
    schedule.refresh_from_db()
    assert schedule.interval_display == 'Every 1 hour'
    row = staff.get(f'/carrot/api/scheduled/{schedule.pk}/').json()
    assert row == {'id': schedule.pk, 'task_name': 'nightly echo', 'task': 'tests.testapp.tasks.echo',
                   'queue': 'other', 'interval_type': 'hours', 'interval_count': 1, 'interval': 'Every 1 hour',
                   'args': [1, 'two'], 'kwargs': {'flag': True}, 'active': True, 'last_run_time': None,
                   'problem': ''}


@pytest.mark.parametrize('field, value, message', [
    ('task_args', '[1, 2', 'The positional arguments are not valid JSON'),
    ('task_args', '{"a": 1}', 'The positional arguments must be a JSON list'),
    ('content', '[1]', 'The keyword arguments must be a JSON object'),
    ('content', '{"a": ' * 40 + '1' + '}' * 40, 'nested too deeply'),
    ('content', "__import__('os').system('true')", 'are not valid JSON'),
    ('task', 'os.system', 'Select a valid choice'),
    ('queue', 'nope', 'Select a valid choice'),
    ('interval_count', '0', 'at least 1'),
    ('interval_count', '4000', 'at most 3650 days'),
    ('interval_type', 'weeks', 'Select a valid choice'),
])
def test_bad_input_to_the_form_gives_an_inline_error_and_saves_nothing(staff, field, value, message):
    data = dict(FORM, interval_type='days' if field == 'interval_count' else FORM['interval_type'])
    data[field] = value
    response = staff.post('/carrot/scheduled/new/', data)
    assert response.status_code == 200  # the form again, with the error by the field
    html = response.content.decode()
    assert 'role="alert"' in html and message in html.replace('&quot;', '"').replace('&#x27;', "'"), html[-3000:]
    assert not ScheduledTask.objects.filter(task_name='nightly echo').exists()
    api = staff.post('/carrot/api/scheduled/', data)
    assert api.status_code == 400 and field in api.json()['errors']


def test_scheduled_task_api_create_run_now_pause_and_delete(staff):
    response = staff.post('/carrot/api/scheduled/', dict(FORM, task_args=[3], content={'x': 1}, active=True),
                          content_type='application/json')
    assert response.status_code == 201, response.content
    pk = response.json()['id']
    assert response.json()['args'] == [3]
    run = staff.post(f'/carrot/api/scheduled/{pk}/run/').json()
    log = MessageLog.objects.get(uuid=run['uuid'])
    assert (log.task, log.queue, log.positionals, log.keywords) == ('tests.testapp.tasks.echo', 'other', [3], {'x': 1})
    assert queue_depth('other') == 1
    staff.post(f'/carrot/scheduled/{pk}/run/')
    assert queue_depth('other') == 2
    staff.post(f'/carrot/scheduled/{pk}/active/', {'active': 'false'})
    assert not ScheduledTask.objects.get(pk=pk).active
    staff.post(f'/carrot/api/scheduled/{pk}/active/', {'active': 'true'})
    assert ScheduledTask.objects.get(pk=pk).active
    assert 'Delete the scheduled task' in staff.get(f'/carrot/scheduled/{pk}/delete/').content.decode()
    assert ScheduledTask.objects.filter(pk=pk).exists()
    staff.post(f'/carrot/scheduled/{pk}/delete/')
    assert not ScheduledTask.objects.filter(pk=pk).exists()
    assert staff.post(f'/carrot/api/scheduled/{pk}/run/').status_code == 404


def test_search_and_queue_filter_on_scheduled_tasks(staff):
    staff.post('/carrot/scheduled/new/', FORM)
    staff.post('/carrot/scheduled/new/', dict(FORM, task_name='other one', queue='default'))
    names = [r['task_name'] for r in staff.get('/carrot/api/scheduled/?queue=other').json()['results']]
    assert names == ['nightly echo']
    names = [r['task_name'] for r in staff.get('/carrot/api/scheduled/?q=other+one').json()['results']]
    assert names == ['other one']


def test_a_queue_not_declared_yet_is_not_a_warning_in_the_log(staff, caplog):
    with caplog.at_level('DEBUG', logger='pika'):
        queues = staff.get('/carrot/api/overview/').json()['queues']
    assert {q['broker']['state'] for q in queues} == {'not declared'}
    assert not [r for r in caplog.records if r.levelname == 'WARNING' and 'NOT_FOUND' in r.getMessage()]


@override_settings(ROOT_URLCONF='tests.testproject.urls_without_admin', LOGIN_URL='/accounts/login/')
def test_without_the_admin_people_are_sent_to_the_projects_login_url(client):
    response = client.get('/tasks/failed/')
    assert response.status_code == 302 and response['Location'] == '/accounts/login/?next=/tasks/failed/'
    assert client.get('/tasks/api/messages/').status_code == 403


def test_purging_a_queue_the_broker_does_not_have_fails_its_orphaned_rows(staff):
    make_log('p1', 'PUBLISHED', queue='other')  # e.g. the broker was reset after it was published
    response = staff.post('/carrot/api/queues/other/purge/')
    assert response.status_code == 200 and response.json()['count'] == 0
    assert MessageLog.objects.get(uuid='p1').status == 'FAILED'


def test_purge_reports_an_unreachable_broker_and_deletes_nothing(staff):
    make_log('p1', 'PUBLISHED')
    with override_settings(CARROT={'default_broker': 'amqp://guest:guest@127.0.0.1:1/x'}):
        response = staff.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 502 and 'not purged' in response.json()['error']
    assert MessageLog.objects.filter(uuid='p1').exists()


def test_counts_stop_at_the_limit_so_a_huge_log_does_not_slow_every_page(staff, monkeypatch):
    """With a million COMPLETED rows, counting them all cost each page over 100 ms; past COUNT_LIMIT a
    tab says "more than" (the figure is in the note of issue 13: scripts/bench --million)."""
    from carrot.monitor import queries
    monkeypatch.setattr(queries, 'COUNT_LIMIT', 5)
    for n in range(8):
        make_log(f'c{n}', minutes_ago=n + 1)
    make_log('f1', 'FAILED')
    page = staff.get('/carrot/completed/')
    assert page.status_code == 200
    text = page.content.decode()
    assert 'data-count="completed">5+</span>' in text and 'data-count="failed">1</span>' in text
    document = staff.get('/carrot/api/messages/', {'tab': 'completed', 'page_size': 2}).json()
    assert document['count_limit'] == 5 and document['totals']['completed'] == 6 and document['count'] == 6
    assert document['pages'] == 3 and [r['uuid'] for r in document['results']] == ['c0', 'c1']
    assert staff.get('/carrot/api/overview/').json()['count_limit'] == 5
