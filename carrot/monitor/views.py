"""The monitor's HTML pages and the form posts behind their buttons. Every view goes through
access.monitor_view; every state change is a POST with Django's CSRF check, and GETs change nothing
(a bulk action's GET shows what it would do and asks to confirm)."""
from __future__ import annotations

import json

from django.contrib import messages as flash
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_protect, ensure_csrf_cookie
from django.views.decorators.http import require_POST

from carrot.models import MessageLog
from carrot.monitor import actions, queries, tasklog
from carrot.monitor.access import error_response, monitor_view
from carrot.monitor.forms import ScheduledTaskForm
from carrot.monitor.overview import overview
from carrot.monitor.workers import supervisors

REFRESH_SECONDS = 5
# The columns of each list, in order; templates/carrot/_cell.html and static/carrot/monitor.js render them.
COLUMNS = {
    'queued': ('time', 'task', 'queue', 'status', 'args', 'kwargs', 'attempts'),
    'failed': ('select', 'time', 'task', 'queue', 'exception', 'args', 'attempts', 'actions'),
    'completed': ('time', 'task', 'queue', 'args', 'kwargs', 'duration'),
    'waiting': ('time', 'task', 'queue', 'age', 'args', 'kwargs', 'actions'),
    'later': ('time', 'task', 'queue', 'args', 'kwargs', 'attempts', 'actions'),
}
TIME_TITLES = {'queued': 'Published', 'failed': 'Failed', 'completed': 'Completed', 'waiting': 'Published',
               'later': 'Runs at'}


def _filters(request) -> tuple[str, str]:
    return request.GET.get('q', '').strip()[:200], request.GET.get('queue', '').strip()[:200]


def _queue_names() -> list[str]:
    from carrot.config import get_config
    return [queue.name for queue in get_config().all_queues]


def _context(request, active: str, **extra) -> dict:
    search, queue = _filters(request)
    context = {
        'active_tab': active, 'counts': queries.counts(), 'overview': overview(), 'q': search,
        'queue': queue, 'queue_names': _queue_names(), 'refresh_seconds': REFRESH_SECONDS,
    }
    context.update(extra)
    return context


def _back(request, default: str):
    """Where to go after an action: the page it came from (same host only), else `default`."""
    target = request.POST.get('next') or request.GET.get('next')
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()},
                                                   require_https=request.is_secure()):
        return redirect(target)
    return redirect(default)


def _report(request, outcome):
    """Show an action's result (or its error) as a flash message."""
    if isinstance(outcome, actions.ActionError):
        flash.error(request, str(outcome), fail_silently=True)
        return
    level = flash.WARNING if outcome.errors else flash.SUCCESS
    flash.add_message(request, level, outcome.message, fail_silently=True)
    for error in outcome.errors[:10]:
        flash.error(request, error, fail_silently=True)


def _do(request, action, *args, **kwargs):
    try:
        outcome = action(*args, **kwargs)
    except actions.ActionError as exc:
        outcome = exc
    _report(request, outcome)
    return outcome


def _args_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


@monitor_view
@ensure_csrf_cookie
def message_list(request, tab='queued'):
    try:
        current = queries.tab_named(tab)
        search, queue = _filters(request)
        page, paginator = queries.paginate(queries.messages(current, search, queue), request.GET.get('page'))
    except queries.BadQuery as exc:
        return error_response(str(exc))
    rows = [dict(queries.message_row(log), args_text=_args_text(log.positionals),
                 kwargs_text=_args_text(log.keywords)) for log in page.object_list]
    return render(request, 'carrot/list.html', _context(
        request, tab, tab=current, rows=rows, page=page, paginator=paginator,
        columns=COLUMNS[current.name], time_title=TIME_TITLES[current.name],
        api_url=reverse('carrot:api-messages')))


@monitor_view
def message_detail(request, uuid):
    try:
        log = actions.get_message(uuid)
    except actions.ActionError:
        raise Http404('no such task')
    detail = queries.message_detail(log)
    level = tasklog.level_named(request.GET.get('log_level'))
    tab = _tab_of(log.status)
    arguments = [(str(index), _args_text(value)) for index, value in enumerate(detail['args'])] + \
                [(str(name), _args_text(value)) for name, value in detail['kwargs'].items()]
    return render(request, 'carrot/detail.html', _context(
        request, tab, log=log, detail=detail, arguments=arguments,
        positional_count=len(detail['args']),
        entries=tasklog.parse_log(log.log), log_level=level, levels=tasklog.LEVELS,
        level_numbers=tasklog.LEVEL_NUMBERS,
        live=log.status in ('PUBLISHED', 'IN_PROGRESS', 'WAITING', 'SCHEDULED'),
        api_url=reverse('carrot:api-message', args=[log.uuid])))


@monitor_view
@require_POST
@csrf_protect
def message_action(request, uuid, action):
    perform = actions.MESSAGE_ACTIONS.get(action)
    if perform is None:
        raise Http404('no such action')
    log = MessageLog.objects.filter(uuid=uuid).only('status').first()
    _do(request, perform, uuid)
    # Back to the list the task was on (its detail page may be gone now).
    tab = _tab_of(log.status) if log else 'queued'
    return _back(request, reverse(f'carrot:{tab}'))


def _tab_of(status: str) -> str:
    tab = {'PUBLISHED': 'queued', 'IN_PROGRESS': 'queued', 'SCHEDULED': 'later'}.get(status, str(status).lower())
    return tab if tab in queries.TABS else 'queued'


BULK = {
    'requeue-failed': ('Requeue failed tasks', 'carrot:failed',
                       'Each one is published again as a new message, and its failed row is deleted.'),
    'delete-failed': ('Delete failed tasks', 'carrot:failed', 'Their log rows are deleted for good.'),
    'purge': ('Purge a queue', 'carrot:queued',
              'The messages waiting in the queue on RabbitMQ are removed and their log rows marked failed '
              '("Purged"), so that no copy of them runs: to requeue or delete from the Failed tab. '
              'Tasks already running finish.'),
}


@monitor_view
@csrf_protect
def bulk_action(request, action):
    """GET: what the action would touch and a confirm button; POST: do it."""
    if action not in BULK:
        raise Http404('no such action')
    title, list_name, consequence = BULK[action]
    source = request.POST if request.method == 'POST' else request.GET
    search, queue = source.get('q', '').strip()[:200], source.get('queue', '').strip()[:200]
    uuids = [u for u in source.getlist('uuid') if u][:1000]
    if request.method == 'POST':
        if action == 'purge':
            _do(request, actions.purge_queue, queue)
        elif action == 'requeue-failed':
            _do(request, actions.requeue_failed, search, queue, uuids)
        else:
            _do(request, actions.delete_failed, search, queue, uuids)
        return redirect(reverse(list_name) + (f'?queue={queue}' if queue and action == 'purge' else ''))
    if action == 'purge':
        if queue not in _queue_names():
            return error_response('choose a configured queue to purge')
        affected = queries.messages(queries.TABS['queued'], '', queue).filter(status='PUBLISHED')
    else:
        affected = actions.failed_rows(search, queue, uuids)
    return render(request, 'carrot/confirm.html', _context(
        request, 'queued' if action == 'purge' else 'failed', title=title, consequence=consequence,
        action=action, affected_count=affected.count(), sample=affected[:10], search=search,
        queue_filter=queue, uuids=uuids, cancel_url=reverse(list_name)))


@monitor_view
@ensure_csrf_cookie
def schedule_list(request):
    search, queue = _filters(request)
    page, paginator = queries.paginate(queries.schedules(search, queue), request.GET.get('page'))
    rows = []
    for schedule in page.object_list:
        row = queries.schedule_row(schedule)
        rows.append(dict(row, args_text=_args_text(row['args']), kwargs_text=_args_text(row['kwargs'])))
    return render(request, 'carrot/schedules.html', _context(
        request, 'scheduled', rows=rows, page=page, paginator=paginator))


@monitor_view
@csrf_protect
def schedule_edit(request, pk=None):
    instance = None
    if pk is not None:
        try:
            instance = actions.get_schedule(pk)
        except actions.ActionError:
            raise Http404('no such scheduled task')
    form = ScheduledTaskForm(request.POST or None, instance=instance)
    if request.method == 'POST' and form.is_valid():
        schedule = form.save()
        flash.success(request, f'{schedule.task_name} saved.', fail_silently=True)
        return redirect('carrot:scheduled')
    return render(request, 'carrot/schedule_form.html', _context(
        request, 'scheduled', form=form, schedule=instance))


@monitor_view
@require_POST
@csrf_protect
def schedule_action(request, pk, action):
    if action == 'run':
        _do(request, actions.run_schedule_now, pk)
    elif action == 'active':
        _do(request, actions.set_schedule_active, pk, request.POST.get('active') == 'true')
    else:
        raise Http404('no such action')
    return _back(request, reverse('carrot:scheduled'))


@monitor_view
@csrf_protect
def schedule_delete(request, pk):
    """GET: ask to confirm; POST: delete."""
    try:
        schedule = actions.get_schedule(pk)
    except actions.ActionError:
        raise Http404('no such scheduled task')
    if request.method == 'POST':
        _do(request, actions.delete_schedule, pk)
        return redirect('carrot:scheduled')
    return render(request, 'carrot/confirm.html', _context(
        request, 'scheduled', title=f'Delete the scheduled task {schedule.task_name}',
        consequence='It stops running; tasks it already published are not touched.',
        form_action=reverse('carrot:schedule-delete', args=[schedule.pk]),
        affected_count=None, cancel_url=reverse('carrot:scheduled')))


@monitor_view
@ensure_csrf_cookie
def worker_list(request):
    from carrot.config import get_config
    rows = supervisors()
    return render(request, 'carrot/workers.html', _context(
        request, 'workers', supervisors=rows, any_gone=any(row['gone'] for row in rows),
        gone_after=get_config().supervisor_gone_after))


@monitor_view
@require_POST
@csrf_protect
def forget_gone_supervisors(request):
    _do(request, actions.forget_gone_supervisors)
    return redirect('carrot:workers')
