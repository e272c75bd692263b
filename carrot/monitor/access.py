"""Who may use the monitor.

By default only logged-in staff users (anyone else is sent to the admin login page; the JSON API answers
403). ``CARROT['monitor_authentication']`` replaces that with the project's own decorators, as dotted
paths applied in order (the first one listed is the outermost). The monitor is public only when a
project says so explicitly, by listing ``carrot.monitor.access.public``.
"""
from __future__ import annotations

import functools
import logging

from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.utils.module_loading import import_string

PUBLIC = 'carrot.monitor.access.public'
logger = logging.getLogger('carrot.monitor')


def public(view):
    """Opt in to an unauthenticated monitor (e.g. behind a VPN or the project's own proxy auth)."""
    return view


def _login_url() -> str:
    """The admin's login page when the admin is mounted, else settings.LOGIN_URL."""
    from django.conf import settings
    from django.urls import NoReverseMatch, reverse
    try:
        return reverse('admin:login')
    except NoReverseMatch:
        return settings.LOGIN_URL


def staff_only(view):
    """The default: active staff users. Anyone else is sent to log in; the JSON API answers 403."""
    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        user = getattr(request, 'user', None)
        if user is not None and user.is_active and user.is_staff:
            return view(request, *args, **kwargs)
        if getattr(request, 'carrot_api', False):
            return JsonResponse({'error': 'staff login required'}, status=403)
        return redirect_to_login(request.get_full_path(), _login_url())
    return guarded


def configured_decorators() -> list:
    from carrot.config import get_config
    paths = get_config().monitor_authentication
    if not paths:
        return [staff_only]
    return [import_string(path) for path in paths]


def monitor_view(view, api=False):
    """Wrap a monitor view in the configured access decorators (looked up per request, so a settings
    override in tests or a reload takes effect without re-importing the URLconf), and, inside them, in
    the input check (`checked_input`): bad input answers 4xx with {"error": ...}, never a 500."""
    checked = checked_input(view)

    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        request.carrot_api = api
        wrapped = checked
        for decorator in reversed(configured_decorators()):
            wrapped = decorator(wrapped)
        return wrapped(request, *args, **kwargs)
    return guarded


# -- bad input ---------------------------------------------------------------------------------------

MAX_FIELD = 10_000         # characters in one query or form value (a search is cut to 200 anyway)
MAX_PATH_VALUE = 1_000     # characters in an id or name in the URL (uuids are 200 at most)
MAX_ID = 2 ** 63 - 1       # the largest value of a primary key column
MAX_JSON_BODY = 1_000_000  # bytes of a JSON body


class BadInput(ValueError):
    """Input no view can use: answered 400 (or `status`) with {"error": ...}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error_response(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({'error': message}, status=status)


def unusable_text(value: str) -> str | None:
    """Why `value` cannot be used as text in a query (a NUL, a lone surrogate), or None."""
    if '\x00' in value:
        return 'contains a NUL character'
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        return 'is not valid text (a lone surrogate)'
    return None


def check_text(where: str, value, limit: int = MAX_FIELD) -> None:
    if not isinstance(value, str):
        return
    problem = unusable_text(value)
    if problem:
        raise BadInput(f'{where} {problem}')
    if len(value) > limit:
        raise BadInput(f'{where} is too long ({len(value)} characters; at most {limit})')


def check_request(request, kwargs: dict) -> None:
    """Raise BadInput for what no monitor view can use: path values, query and form fields with a NUL or
    a lone surrogate or past their length, ids past any key, a JSON body too large."""
    for name, value in kwargs.items():
        if isinstance(value, int) and not 0 <= value <= MAX_ID:
            raise BadInput(f'there is no {name} {value}', 404)
        check_text(f'the {name} in the address', value, MAX_PATH_VALUE)
    for source in (request.GET, request.POST):
        for key, values in source.lists():
            check_text('a field name', key, 200)
            for value in values:
                check_text(f'the field {key!r}', value)
    if request.content_type == 'application/json' and len(request.body) > MAX_JSON_BODY:
        raise BadInput(f'the body is too large ({len(request.body)} bytes; at most {MAX_JSON_BODY})', 413)


def checked_input(view):
    """Bad input answers 4xx with {"error": ...} (JSON, for pages too), never a 500: the request is
    checked first (check_request), and what a view still finds unusable in it (BadInput and the
    monitor's own BadQuery and ActionError are ValueErrors; a value of the wrong type, a number too large
    for the database, a JSON body too deep) is answered the same way."""
    from django.core.exceptions import SuspiciousOperation
    from django.db import DataError

    @functools.wraps(view)
    def checked(request, *args, **kwargs):
        try:
            check_request(request, kwargs)
            response = view(request, *args, **kwargs)
            if response.status_code == 405 and 'Allow' in response and not response.content:
                allowed = response['Allow']
                response = error_response(f'use {allowed.replace(", ", " or ")}', 405)
                response['Allow'] = allowed
            return response
        except BadInput as exc:
            return error_response(str(exc), exc.status)
        except SuspiciousOperation as exc:  # a request too large or with too many fields
            return error_response(f'bad request: {exc}')
        except (ValueError, TypeError, OverflowError, RecursionError, DataError) as exc:
            logger.warning('monitor: %s %s: bad input answered 400: %s: %s', request.method,
                           request.path[:200], type(exc).__name__, str(exc)[:300], exc_info=True)
            return error_response(f'bad input: {type(exc).__name__}: {str(exc)[:300]}')
    return checked


def monitor_api_view(view):
    """monitor_view for the JSON API: refusals are JSON, not a redirect to a login page."""
    return monitor_view(view, api=True)
