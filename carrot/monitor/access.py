"""Who may use the monitor.

By default only logged-in staff users (anyone else is sent to the admin login page; the JSON API answers
403). ``CARROT['monitor_authentication']`` replaces that with the project's own decorators, as dotted
paths applied in order (the first one listed is the outermost). The monitor is public only when a
project says so explicitly, by listing ``carrot.monitor.access.public``.
"""
from __future__ import annotations

import functools

from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.utils.module_loading import import_string

PUBLIC = 'carrot.monitor.access.public'


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
    override in tests or a reload takes effect without re-importing the URLconf)."""
    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        request.carrot_api = api
        wrapped = view
        for decorator in reversed(configured_decorators()):
            wrapped = decorator(wrapped)
        return wrapped(request, *args, **kwargs)
    return guarded


def monitor_api_view(view):
    """monitor_view for the JSON API: refusals are JSON, not a redirect to a login page."""
    return monitor_view(view, api=True)
