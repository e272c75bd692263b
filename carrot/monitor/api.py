"""The JSON API: the data behind the pages, with stable field names (README.rst, "Monitor: JSON API").

Reads are GET; every change is a POST carrying Django's CSRF token (header X-CSRFToken), with form
fields or a JSON object as the body. Errors are ``{"error": "..."}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import json
import math

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET, require_POST

from carrot.monitor import actions, queries, tasklog
from carrot.monitor.access import check_text, monitor_api_view
from carrot.monitor.forms import ScheduledTaskForm
from carrot.monitor.overview import overview
from carrot.monitor.workers import supervisors


def error(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({'error': message}, status=status)


class Document(JsonResponse):
    """An answer of the API, strict JSON whatever the rows hold: a float JSON cannot write (NaN or an
    infinity, in the arguments a message from another publisher carried, say) goes as its text ("inf")."""

    def __init__(self, data, **kwargs):
        try:
            super().__init__(data, json_dumps_params={'allow_nan': False}, **kwargs)
        except ValueError:
            super().__init__(_finite(data), json_dumps_params={'allow_nan': False}, **kwargs)


def _finite(value):
    """`value` with each NaN and infinity in it replaced by its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def payload(request):
    """The POSTed fields: a JSON object body, or form fields (lists for repeated keys)."""
    if request.content_type == 'application/json':
        try:
            data = json.loads(request.body or b'{}')
        except RecursionError:
            raise actions.ActionError('the body is nested too deep') from None
        except ValueError:
            raise actions.ActionError('the body is not valid JSON') from None
        if not isinstance(data, dict):
            raise actions.ActionError('the body must be a JSON object')
        _check_json(data)
        return data
    return {key: (values if key == 'uuid' else values[-1]) for key, values in request.POST.lists()}


JSON_DEPTH = 20  # levels a JSON body may have (task arguments inside it included)


def _check_json(value, where='the body', depth=0) -> None:
    """A JSON body's values must be usable text: no NUL, no lone surrogate, not nested past JSON_DEPTH."""
    if depth > JSON_DEPTH:
        raise actions.ActionError(f'{where} is nested too deep (more than {JSON_DEPTH} levels)')
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(f'a key in {where}', key, 200)
            _check_json(item, f'{key!r}' if depth == 0 else where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, where, depth + 1)
    elif isinstance(value, str):
        check_text(f'the field {where}' if depth else where, value)


def _texts(value, field: str, limit: int = 1000) -> list[str]:
    """A field that takes one text or a list of texts (uuid): the texts, or ActionError for another shape."""
    if value in (None, '', []):
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise actions.ActionError(f'{field} must be a text or a list of texts')
    return [str(v) for v in values][:limit]


def _text(value, field: str) -> str:
    """A field that takes one text (q, queue): the text, or ActionError for a list, an object..."""
    if value is None:
        return ''
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise actions.ActionError(f'{field} must be a text')
    return str(value)


def _act(action, *args, **kwargs) -> JsonResponse:
    try:
        return Document(action(*args, **kwargs).as_dict())
    except actions.ActionError as exc:
        return error(str(exc), exc.status)


def _page_document(page, paginator, results) -> dict:
    return {'count': paginator.count, 'page': page.number, 'pages': paginator.num_pages,
            'page_size': paginator.per_page, 'results': results}


@monitor_api_view
@require_GET
def message_list(request):
    search, queue = request.GET.get('q', ''), request.GET.get('queue', '')
    try:
        tab = queries.tab_named(request.GET.get('tab', 'queued'))
        page, paginator = queries.paginate(queries.messages(tab, search, queue), request.GET.get('page'),
                                           request.GET.get('page_size'))
    except queries.BadQuery as exc:
        return error(str(exc))
    document = _page_document(page, paginator, [queries.message_row(log) for log in page.object_list])
    document.update(tab=tab.name, counts=queries.counts(search, queue), totals=queries.counts(),
                    count_limit=queries.COUNT_LIMIT)
    return Document(document)


@monitor_api_view
@require_GET
def message_detail(request, uuid):
    try:
        log = actions.get_message(uuid)
    except actions.ActionError as exc:
        return error(str(exc), exc.status)
    detail = queries.message_detail(log)
    level = tasklog.level_named(request.GET.get('log_level'))
    detail['log'] = [entry.as_dict() for entry in tasklog.at_or_above(tasklog.parse_log(log.log), level)]
    detail['log_level'] = level
    return Document(detail)


@monitor_api_view
@require_POST
@csrf_protect
def message_action(request, uuid, action):
    perform = actions.MESSAGE_ACTIONS.get(action)
    if perform is None:
        return error(f'unknown action {action!r}', 404)
    return _act(perform, uuid)


@monitor_api_view
@require_POST
@csrf_protect
def failed_action(request, action):
    try:
        data = payload(request)
    except actions.ActionError as exc:
        return error(str(exc))
    try:
        arguments = (_text(data.get('q'), 'q'), _text(data.get('queue'), 'queue'), _texts(data.get('uuid'), 'uuid'))
    except actions.ActionError as exc:
        return error(str(exc))
    if action == 'requeue':
        return _act(actions.requeue_failed, *arguments)
    if action == 'delete':
        return _act(actions.delete_failed, *arguments)
    return error(f'unknown action {action!r}', 404)


@monitor_api_view
@require_POST
@csrf_protect
def purge_queue(request, name):
    return _act(actions.purge_queue, name)


@monitor_api_view
@require_GET
def overview_document(request):
    return Document({'queues': overview(), 'counts': queries.counts(), 'count_limit': queries.COUNT_LIMIT})


@monitor_api_view
@require_GET
def worker_list(request):
    return Document({'supervisors': supervisors()})


@monitor_api_view
@csrf_protect
def schedule_list(request):
    """GET: the scheduled tasks (paged, searchable). POST: create one (form fields as in the monitor)."""
    if request.method == 'POST':
        return _save_schedule(request, None)
    if request.method != 'GET':
        return error('use GET or POST', 405)
    try:
        page, paginator = queries.paginate(
            queries.schedules(request.GET.get('q', ''), request.GET.get('queue', '')),
            request.GET.get('page'), request.GET.get('page_size'))
    except queries.BadQuery as exc:
        return error(str(exc))
    return Document(_page_document(page, paginator, [queries.schedule_row(s) for s in page.object_list]))


@monitor_api_view
@csrf_protect
def schedule_detail(request, pk):
    """GET: one scheduled task. POST: change it (all form fields)."""
    try:
        schedule = actions.get_schedule(pk)
    except actions.ActionError as exc:
        return error(str(exc), exc.status)
    if request.method == 'POST':
        return _save_schedule(request, schedule)
    if request.method != 'GET':
        return error('use GET or POST', 405)
    return Document(queries.schedule_row(schedule))


def _save_schedule(request, instance):
    try:
        data = payload(request)
    except actions.ActionError as exc:
        return error(str(exc))
    for key in ('task_args', 'content'):  # a JSON body may carry the arguments as JSON values
        if key in data and not isinstance(data[key], str):
            data[key] = json.dumps(data[key])
    if isinstance(data.get('active'), bool):
        data['active'] = 'on' if data['active'] else ''
    for key, value in list(data.items()):  # a form field takes one text: a list or an object is refused
        if key not in ('task_args', 'content') and isinstance(value, (list, dict)):
            return error(f'{key} must be a single value, not a {type(value).__name__}')
    form = ScheduledTaskForm(data, instance=instance)
    if not form.is_valid():
        return JsonResponse({'error': 'the scheduled task is not valid',
                             'errors': {field: [str(e) for e in errs] for field, errs in form.errors.items()}},
                            status=400)
    schedule = form.save()
    return Document(queries.schedule_row(schedule), status=201 if instance is None else 200)


@monitor_api_view
@require_POST
@csrf_protect
def schedule_action(request, pk, action):
    if action == 'run':
        return _act(actions.run_schedule_now, pk)
    if action == 'delete':
        return _act(actions.delete_schedule, pk)
    if action == 'active':
        try:
            data = payload(request)
        except actions.ActionError as exc:
            return error(str(exc))
        active = data.get('active')
        if isinstance(active, str):
            active = active.lower() in ('true', '1', 'on', 'yes')
        if not isinstance(active, (bool, int, type(None))):
            return error('active must be true or false')
        return _act(actions.set_schedule_active, pk, bool(active))
    return error(f'unknown action {action!r}', 404)


@monitor_api_view
@require_POST
@csrf_protect
def forget_gone_supervisors(request):
    return _act(actions.forget_gone_supervisors)
