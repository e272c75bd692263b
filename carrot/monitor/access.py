"""Who may use the monitor.

By default only logged-in staff users (anyone else is sent to the admin login page; the JSON API answers
403). ``CARROT['monitor_authentication']`` replaces that with the project's own decorators, as dotted
paths applied in order (the first one listed is the outermost). The monitor is public only when a
project says so explicitly, by listing ``carrot.monitor.access.public``.
"""
from __future__ import annotations

import functools

from django.contrib.admin.views.decorators import staff_member_required
from django.http import JsonResponse
from django.utils.module_loading import import_string

PUBLIC = 'carrot.monitor.access.public'


def public(view):
    """Opt in to an unauthenticated monitor (e.g. behind a VPN or the project's own proxy auth)."""
    return view


def staff_only(view):
    """The default: staff users; the JSON API answers 403 rather than redirecting to a login page."""
    page_view = staff_member_required(view)

    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        if '/api/' in request.path:
            user = getattr(request, 'user', None)
            if not (user and user.is_active and user.is_staff):
                return JsonResponse({'error': 'staff login required'}, status=403)
            return view(request, *args, **kwargs)
        return page_view(request, *args, **kwargs)
    return guarded


def configured_decorators() -> list:
    from carrot.config import get_config
    paths = get_config().monitor_authentication
    if not paths:
        return [staff_only]
    return [import_string(path) for path in paths]


def monitor_view(view):
    """Wrap a monitor view in the configured access decorators (looked up per request, so a settings
    override in tests or a reload takes effect without re-importing the URLconf)."""
    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        wrapped = view
        for decorator in reversed(configured_decorators()):
            wrapped = decorator(wrapped)
        return wrapped(request, *args, **kwargs)
    return guarded
