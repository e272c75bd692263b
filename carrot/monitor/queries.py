"""The monitor's lists: which rows each tab shows, search, queue filter, paging, and the JSON shape of
a row (the field names are the API's, documented in README.rst, "Monitor")."""
from __future__ import annotations

from dataclasses import dataclass

from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.utils import timezone

from carrot.models import MessageLog, ScheduledTask
from carrot.publish import arguments

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Tab:
    name: str
    title: str
    statuses: tuple[str, ...]
    order: tuple[str, ...]
    time_field: str  # the time shown in the list


TABS = {
    'queued': Tab('queued', 'Queued', (MessageLog.PUBLISHED, MessageLog.IN_PROGRESS),
                  ('-publish_time', '-id'), 'publish_time'),
    'failed': Tab('failed', 'Failed', (MessageLog.FAILED,), ('-failure_time', '-id'), 'failure_time'),
    'completed': Tab('completed', 'Completed', (MessageLog.COMPLETED,), ('-completion_time', '-id'),
                     'completion_time'),
    'waiting': Tab('waiting', 'Waiting for the broker', (MessageLog.WAITING,), ('-publish_time', '-id'),
                   'publish_time'),
    # Delayed tasks and tasks waiting for their next retry, the soonest first.
    'later': Tab('later', 'Later', (MessageLog.SCHEDULED,), ('run_after', 'id'), 'run_after'),
}


class BadQuery(ValueError):
    """A list parameter a person can fix (unknown tab, page that is not a number)."""


def tab_named(name: str) -> Tab:
    try:
        return TABS[name]
    except KeyError:
        raise BadQuery(f'unknown list {name!r}; one of {", ".join(TABS)}') from None


def search_filter(text: str) -> Q:
    """Rows whose task, arguments, uuid or exception mention `text` (case-insensitive)."""
    text = text.strip()
    if not text:
        return Q()
    return (Q(task__icontains=text) | Q(task_args__icontains=text) | Q(content__icontains=text)
            | Q(uuid=text) | Q(exception__icontains=text))


def messages(tab: Tab, search: str = '', queue: str = '') -> QuerySet:
    rows = MessageLog.objects.filter(status__in=tab.statuses)
    if queue:
        rows = rows.filter(queue=queue)
    return searched(rows, tab, search).order_by(*tab.order)


# A search reads at most this many of a list's newest (or soonest) rows: with a million COMPLETED rows, a
# word that matches few of them would otherwise read them all, twice (the page and its count), every
# refresh. A message id is found wherever it is.
SEARCH_WINDOW = 100_000


def searched(rows: QuerySet, tab: Tab, search: str) -> QuerySet:
    """`rows` (one list's) narrowed to those among its newest SEARCH_WINDOW that mention `search`, or whose
    id it is."""
    text = search.strip()
    if not text:
        return rows
    return rows.filter(Q(uuid=text) | (_window(rows, tab) & search_filter(text)))


def _window(rows: QuerySet, tab: Tab) -> Q:
    """The newest SEARCH_WINDOW rows of `rows` by the list's order, as a range of its first field (read
    from the index: the row at that place); no condition when the list is shorter."""
    first = tab.order[0]
    field = first.lstrip('-')
    edge = list(rows.order_by(*tab.order).values_list(field, flat=True)[SEARCH_WINDOW - 1:SEARCH_WINDOW])
    if not edge or edge[0] is None:
        return Q()
    bound = f'{field}__gte' if first.startswith('-') else f'{field}__lte'
    return Q(**{bound: edge[0]}) | Q(**{f'{field}__isnull': True})


# Counts stop here: a count of a million COMPLETED rows reads a million index entries (over 100 ms on
# PostgreSQL, every page load), while "more than 10,000" reads 10,001. A count above it means "more".
COUNT_LIMIT = 10_000


def counts(search: str = '', queue: str = '') -> dict[str, int]:
    """How many rows each tab holds under the current search and queue filter, plus scheduled tasks;
    a tab holding more than COUNT_LIMIT says COUNT_LIMIT + 1."""
    rows = MessageLog.objects.all()
    if queue:
        rows = rows.filter(queue=queue)
    result = {name: bounded_count(searched(rows.filter(status__in=tab.statuses), tab, search))
              for name, tab in TABS.items()}
    result['scheduled'] = bounded_count(ScheduledTask.objects.all())
    return result


def bounded_count(rows: QuerySet) -> int:
    """len(rows) up to COUNT_LIMIT, else COUNT_LIMIT + 1 (one index range read, however many rows)."""
    return rows.order_by()[:COUNT_LIMIT + 1].count()


class BoundedPaginator(Paginator):
    """Pages through the first COUNT_LIMIT + 1 rows of a list: the newest (or soonest) ones, which is what
    a person pages through; a search or the queue filter narrows the rest down."""

    @property
    def count(self) -> int:
        if not hasattr(self, '_bounded_count'):
            self._bounded_count = bounded_count(self.object_list)
        return self._bounded_count


def parse_page(value, default=1) -> int:
    if value in (None, ''):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadQuery(f'page must be a whole number, got {value!r}') from None
    if number < 1:
        raise BadQuery('page must be 1 or more')
    return number


def paginate(rows: QuerySet, page, page_size=None):
    """(Page, paginator); a page past the end gives the last page (a refresh after deletes stays put)."""
    size = parse_page(page_size, PAGE_SIZE)
    paginator = BoundedPaginator(rows, min(size, MAX_PAGE_SIZE))
    return paginator.get_page(parse_page(page)), paginator


def iso(value) -> str | None:
    return value.isoformat() if value else None


def _json_or_text(text):
    """A stored JSON text as its value, or the text itself. NaN, Infinity and a number too large for a
    float (1E+400, the str() of a Decimal) are not JSON a strict reader takes: such a text stays text."""
    if text in (None, ''):
        return None
    try:
        return arguments.strict_json(text)
    except ValueError:
        return text


def message_row(log: MessageLog, now=None) -> dict:
    """One list row of the JSON API."""
    now = now or timezone.now()
    duration = log.duration
    return {
        'uuid': log.uuid,
        'task': log.task,
        'queue': log.queue,
        'status': log.status,
        'priority': log.priority,
        'args': log.positionals,
        'kwargs': log.keywords,
        'publish_time': iso(log.publish_time),
        'run_after': iso(log.run_after),
        'started_time': iso(log.started_time),
        'completion_time': iso(log.completion_time),
        'failure_time': iso(log.failure_time),
        'duration': duration.total_seconds() if duration is not None else None,
        'age': (now - log.publish_time).total_seconds() if log.publish_time else None,
        'attempts': log.attempts,
        'retries': log.retries,
        'worker': log.worker,
        'exception': log.exception or '',
    }


def message_detail(log: MessageLog) -> dict:
    """The detail document: a row plus virtual host, output, log entries and traceback."""
    from carrot.monitor.tasklog import parse_log
    detail = message_row(log)
    detail.update({
        'virtual_host': virtual_host_of(log.queue),
        'exchange': log.exchange or '',
        'routing_key': log.routing_key or '',
        'output': _json_or_text(log.output),
        'output_text': log.output or '',
        'traceback': log.traceback or '',
        'log': [entry.as_dict() for entry in parse_log(log.log)],
        'next_retry': iso(log.run_after) if log.status == MessageLog.SCHEDULED and log.retries else None,
        'attempt_history': [attempt_row(record) for record in log.attempt_history()],
    })
    return detail


def attempt_row(record) -> dict:
    """One attempt of the detail document (carrot.models.AttemptRecord)."""
    duration = (record.finished - record.started).total_seconds() if record.started and record.finished else None
    return {'number': record.number, 'outcome': record.outcome, 'worker': record.worker,
            'started': iso(record.started), 'finished': iso(record.finished), 'duration': duration,
            'exception_class': record.exception_class, 'exception': record.exception,
            'traceback': record.traceback}


def virtual_host_of(queue: str | None) -> str:
    """The virtual host a queue lives on (never the password; '?' for a queue no longer configured)."""
    from carrot.config import get_config
    from carrot.exceptions import CarrotConfigException
    try:
        return get_config().queue(queue).broker.virtual_host
    except CarrotConfigException:
        return '?'


def schedule_row(schedule: ScheduledTask) -> dict:
    return {
        'id': schedule.pk,
        'task_name': schedule.task_name,
        'task': schedule.task,
        'queue': schedule.queue or '',
        'interval_type': schedule.interval_type,
        'interval_count': schedule.interval_count,
        'interval': schedule.interval_display,
        'args': _json_or_text(schedule.task_args) or [],
        'kwargs': _json_or_text(schedule.content) or {},
        'active': schedule.active,
        'last_run_time': iso(schedule.last_run_time),
        'problem': schedule.problem,
    }


def schedules(search: str = '', queue: str = '') -> QuerySet:
    rows = ScheduledTask.objects.all()
    if search.strip():
        text = search.strip()
        rows = rows.filter(Q(task_name__icontains=text) | Q(task__icontains=text)
                           | Q(task_args__icontains=text) | Q(content__icontains=text))
    if queue:
        rows = rows.filter(queue=queue)
    return rows.order_by('task_name')
