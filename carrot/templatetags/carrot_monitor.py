"""Formatting for the monitor's templates (monitor.js formats the same way when it refreshes a table)."""
import datetime as dt

from django import template

register = template.Library()


@register.filter
def utc(value):
    """'2026-11-21 20:45:03' (UTC) from a datetime or an ISO 8601 string; '' for nothing."""
    if not value:
        return ''
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.strftime('%Y-%m-%d %H:%M:%S')


@register.filter
def seconds(value):
    """A duration in seconds, for people: '0.25 s', '42 s', '3 min 5 s', '2 h 4 min'."""
    if value is None or value == '':
        return ''
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    value = float(value)
    if value < 10:
        return f'{value:.2f} s'
    if value < 60:
        return f'{value:.0f} s'
    if value < 3600:
        return f'{int(value // 60)} min {int(value % 60)} s'
    return f'{int(value // 3600)} h {int(value % 3600 // 60)} min'


@register.filter
def mib(value):
    if value is None or value == '':
        return ''
    return f'{float(value) / 1048576:.1f} MiB'


@register.filter
def clip(value, length=120):
    text = str(value)
    return text if len(text) <= length else text[:length - 1] + '…'


@register.filter
def lookup_time(row, field):
    return row.get(field) if isinstance(row, dict) else getattr(row, field, None)


@register.simple_tag
def task_url(uuid, action=''):
    """The detail page (or an action) of a task; ids from other publishers may hold any character, so
    the id is percent-encoded rather than reversed (reverse() would raise on a '/')."""
    from urllib.parse import quote

    from django.urls import reverse
    base = reverse('carrot:queued')
    return f'{base}task/{quote(str(uuid), safe="")}/' + (f'{quote(action, safe="")}/' if action else '')


@register.filter
def bounded(count):
    """A tab's count as the monitor shows it: '10,000+' past the limit counts stop at (monitor.queries)."""
    from carrot.monitor.queries import COUNT_LIMIT
    if isinstance(count, int) and count > COUNT_LIMIT:
        return f'{COUNT_LIMIT:,}+'
    return count
