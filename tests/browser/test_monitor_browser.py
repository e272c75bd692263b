"""The monitor in a real browser, with a real carrot-supervisor (consumers and scheduler) behind it.

One flow, as a person uses it: log in; see a task published elsewhere complete without reloading;
open it and change the log level; see markup in its output shown as text; watch a running task's page
turn to completed; tick a failed task and see
the tick survive a refresh; requeue it and see it leave the Failed tab; create a scheduled task through the form (after a refused bad input) and see
it run. Screenshots of every tab go to tests/artifacts/ (docs/ keeps the README's copies).
"""
import re
import time

import pytest
from django.contrib.auth.models import User

from carrot.models import MessageLog, ScheduledTask, SupervisorStatus
from carrot.utilities import publish_message
from tests.testapp import tasks
from tests.harness import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOTS = ['consumer default#1', 'consumer other#1', 'scheduler']
XSS = '<script>alert(1)</script>'


def shoot(page, artifacts, name, full_page=True):
    page.screenshot(path=str(artifacts / f'monitor-{name}.png'), full_page=full_page)


def wait_status(log, status, timeout=30):
    return wait_for(lambda: MessageLog.objects.filter(pk=log.pk, status=status).first(), timeout,
                    f'{log.task} to be {status}')


def test_monitor_in_a_browser(live_server, page, artifacts, start_supervisor, tmp_path):
    started = time.monotonic()
    supervisor = start_supervisor(scheduler=True)
    User.objects.create_user('ops', password='carrot-ops', is_staff=True)
    supervisor.wait_ready(SLOTS, timeout=30)

    # Log in: the monitor is staff-only and sends us to the admin's login page.
    page.goto(f'{live_server.url}/carrot/completed/')
    assert '/admin/login/' in page.url
    page.fill('#id_username', 'ops')
    page.fill('#id_password', 'carrot-ops')
    page.click('input[type=submit]')
    page.wait_for_url(re.compile(r'/carrot/completed/$'))

    # A task published elsewhere shows up in the open Completed tab by itself (no reload: the marker
    # set on this window survives).
    page.evaluate('window.__stayed = true')
    log = publish_message(tasks.log_levels, 'browser')
    row = page.locator(f'tr[data-uuid="{log.uuid}"]')
    row.wait_for(timeout=30_000)
    assert page.evaluate('window.__stayed') is True
    assert 'tests.testapp.tasks.log_levels' in row.inner_text()
    shoot(page, artifacts, 'completed')
    page.set_viewport_size({'width': 390, 'height': 844})
    shoot(page, artifacts, 'phone', full_page=False)
    page.set_viewport_size({'width': 1280, 'height': 900})

    # Its detail: INFO and up by default, DEBUG on demand; the output's markup is text, never run.
    row.locator('td.task a').click()
    page.wait_for_url(re.compile(r'/carrot/task/'))
    assert page.locator('pre.output').inner_text() == f'"{XSS}"'
    assert page.dialogs == []
    debug = page.locator('#task-log li.log-debug')
    assert page.locator('#task-log li.log-info').is_visible() and not debug.is_visible()
    shoot(page, artifacts, 'detail')
    page.select_option('#log-level', 'DEBUG')
    assert debug.is_visible() and 'debug detail for browser' in debug.inner_text()
    assert 'log_level=DEBUG' in page.url
    page.select_option('#log-level', 'ERROR')
    assert not page.locator('#task-log li.log-warning').is_visible()
    assert page.locator('#task-log li.log-error').is_visible()

    # The page of a task still running turns into its final state by itself.
    slow = publish_message(tasks.sleep, 1)
    page.goto(f'{live_server.url}/carrot/task/{slow.uuid}/')
    page.locator('.panel-head .status', has_text='Completed').wait_for(timeout=20_000)
    assert page.locator('pre.output').inner_text() == '1'

    # A failed task, requeued from the Failed tab, leaves it (and, now fixed, completes).
    marker = tmp_path / 'fixed'
    failing = publish_message(tasks.fail_unless_exists, str(marker))
    wait_status(failing, 'FAILED')
    page.goto(f'{live_server.url}/carrot/failed/')
    failed_row = page.locator(f'tr[data-uuid="{failing.uuid}"]')
    assert 'FileNotFoundError' in failed_row.inner_text()
    # A ticked row stays ticked while the list refreshes around it.
    page.evaluate('window.__stayed = true')
    failed_row.locator('input[name=uuid]').check()
    other = publish_message(tasks.explode, 'another failure')
    page.locator(f'tr[data-uuid="{other.uuid}"]').wait_for(timeout=30_000)
    assert failed_row.locator('input[name=uuid]').is_checked() and page.evaluate('window.__stayed') is True
    assert page.locator('[data-count="failed"]').inner_text() == '2'
    shoot(page, artifacts, 'failed')
    marker.touch()
    failed_row.get_by_role('button', name='Requeue').click()
    page.wait_for_url(re.compile(r'/carrot/failed/'))
    assert 'requeued' in page.locator('.flash').inner_text()
    assert page.locator(f'tr[data-uuid="{failing.uuid}"]').count() == 0
    copy = MessageLog.objects.exclude(uuid=failing.uuid).get(task='tests.testapp.tasks.fail_unless_exists')
    wait_status(copy, 'COMPLETED')

    # A scheduled task through the form: bad JSON is refused inline, then it is saved and runs.
    page.goto(f'{live_server.url}/carrot/scheduled/')
    page.get_by_role('link', name='New scheduled task').click()
    page.fill('#id_task_name', 'browser schedule')
    page.select_option('#id_task', 'tests.testapp.tasks.echo')
    page.select_option('#id_queue', 'other')
    page.fill('#id_interval_count', '1')
    page.select_option('#id_interval_type', 'hours')
    page.fill('#id_task_args', '["from the form"]')
    page.fill('#id_content', '{"flag": tru')
    page.get_by_role('button', name='Save').click()
    assert 'The keyword arguments are not valid JSON' in page.locator('.field-content .error').inner_text()
    shoot(page, artifacts, 'form')
    page.fill('#id_content', '{"flag": true}')
    page.get_by_role('button', name='Save').click()
    page.wait_for_url(re.compile(r'/carrot/scheduled/$'))
    schedule = ScheduledTask.objects.get(task_name='browser schedule')
    ran = wait_for(lambda: MessageLog.objects.filter(task='tests.testapp.tasks.echo', status='COMPLETED',
                                                     task_args__contains='from the form').first(),
                   30, 'the new schedule to run')
    assert ran.queue == 'other' and ran.keywords == {'flag': True}
    # The open Scheduled tab shows the run by itself.
    schedule_row = page.locator(f'tr[data-id="{schedule.pk}"]')
    assert 'Every 1 hour' in schedule_row.inner_text()
    page.wait_for_function('id => !document.querySelector(`tr[data-id="${id}"]`).innerText.includes("never")',
                           arg=schedule.pk, timeout=20_000)
    shoot(page, artifacts, 'scheduled')

    # The remaining tabs, for the record (and the README). A worker snapshot as the supervisor's
    # scheduler child stores it, so the Workers tab has something to show.
    if not MessageLog.objects.filter(status='PUBLISHED').exists():
        publish_message(tasks.add, 1, 2, queue='other')  # consumed at once; the tab may be empty
    page.goto(f'{live_server.url}/carrot/')
    shoot(page, artifacts, 'queued')
    # The Workers tab shows the real supervisor, from the snapshot its scheduler child stores, and
    # follows it by itself: a task started after the page was opened appears there.
    wait_for(lambda: SupervisorStatus.objects.filter(pid=supervisor.pid).exists(), 30,
             'the supervisor to publish its status snapshot')
    page.goto(f'{live_server.url}/carrot/workers/')
    assert 'consumer default#1' in page.inner_text('main')
    publish_message(tasks.sleep, 12)
    page.get_by_text('tests.testapp.tasks.sleep').first.wait_for(timeout=20_000)
    shoot(page, artifacts, 'workers')
    page.goto(f'{live_server.url}/carrot/waiting/')
    shoot(page, artifacts, 'waiting')
    assert (page.dialogs, page.script_errors, page.bad_responses) == ([], [], [])
    print(f'\nbrowser flow took {time.monotonic() - started:.1f} s')
