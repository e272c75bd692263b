"""The claim: at most one execution of a message at a time, on any host.

A worker is named by `worker_id()` (host:pid; the MessageLog.worker column). It takes a row with one
conditional UPDATE (`take`): from PUBLISHED, WAITING or SCHEDULED, or from IN_PROGRESS when the worker named in it is
known dead *and* still the one that was read (a compare-and-set on worker and attempts, so two claimers
can never both win; committed without waiting for the disk, see carrot.commits). A worker is known dead (`worker_is_dead`) when the lease it renews
(CARROT['claim_lease'], `renew_lease`) has run out, or when it is on this host and its process is gone.
The deliveries a worker holds behind the one it runs are claimed with it, a window at a time
(carrot.consume.ahead): the same conditions, in one statement.
"""
from __future__ import annotations

import collections
import functools
import os
import socket
import threading
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import psutil
from django.conf import settings
from django.db import connections, models
from django.db.models import F, Q
from django.utils import timezone

from carrot.commits import SERVER_STARTED, epoch_microseconds, without_waiting_for_disk
from carrot.consume.logrows import completion_params, write_completion_sql
from carrot.models import MessageLog
from carrot.statements import Statement, statement


def worker_id() -> str:
    return f'{socket.gethostname()}:{os.getpid()}'


# Message ids this process is processing right now (a multiset: two consumers in threads of one process
# may hold deliveries of the same id). A row IN_PROGRESS under this process's own worker id is only
# "dead" if no task thread of this process holds it.
_held = collections.Counter()
_held_lock = threading.Lock()


def hold(message_id: str) -> None:
    with _held_lock:
        _held[message_id] += 1


def release(message_id: str) -> None:
    with _held_lock:
        _held[message_id] -= 1
        if _held[message_id] <= 0:
            del _held[message_id]


def is_held(message_id: str) -> bool:
    with _held_lock:
        return _held[message_id] > 0


def _held_elsewhere(message_id: str, own_holds: int) -> bool:
    with _held_lock:
        return _held[message_id] > own_holds


def worker_is_dead(row: MessageLog, now, own_holds: int = 0) -> bool:
    """Whether the worker named in an IN_PROGRESS row is known dead (so its claim may be taken over).
    `own_holds`: how many holds on this id the caller itself has (see hold)."""
    if row.lease_expires is None or row.lease_expires <= now:
        return True  # not renewed in time (or claimed by a carrot that kept no lease)
    host, _, pid_text = (row.worker or '').rpartition(':')
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host: only its lease tells
    pid = int(pid_text)
    if pid == os.getpid():
        return not _held_elsewhere(row.uuid, own_holds)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def take(row: MessageLog, worker: str, lease: float, condition: Q, count_attempt: bool = True) -> bool:
    """The conditional UPDATE; True if `worker` now holds the row (and `row` shows the change)."""
    now = timezone.now()
    changes = dict(status=MessageLog.IN_PROGRESS, started_time=now, worker=worker,
                   lease_expires=now + timedelta(seconds=lease))
    if count_attempt:
        changes.update(attempts=F('attempts') + 1, exception='', traceback='', failure_time=None)
    with without_waiting_for_disk():  # visible to every claimer at once; see carrot.commits
        taken = MessageLog.objects.filter(pk=row.pk).filter(condition).update(**changes)
    if not taken:
        return False
    # Won: the row is as read plus these changes (attempts only ever moves by a claim, and a
    # concurrent claim would have made this one match nothing), so no second read is needed.
    if count_attempt:
        changes['attempts'] = row.attempts + 1
    for name, value in changes.items():
        setattr(row, name, value)
    return True


TAKEABLE = (MessageLog.PUBLISHED, MessageLog.WAITING, MessageLog.SCHEDULED)


def connection_for_rows():
    return connections[MessageLog.objects.db]


def can_take_on_arrival() -> bool:
    """Whether the database has UPDATE ... RETURNING (PostgreSQL; SQLite from 3.35)."""
    connection = connection_for_rows()
    if connection.vendor == 'postgresql':
        return True
    if connection.vendor == 'sqlite':
        import sqlite3
        return sqlite3.sqlite_version_info >= (3, 35)
    return False


def take_on_arrival(message_id: str, task: str, task_args: str, content: str, worker: str,
                    lease: float) -> MessageLog | None:
    """The usual case in one statement and one round trip: the row of `message_id` that logs this very
    call (`task` with the stored `task_args` and `content`, as the publisher wrote them), due and
    waiting, taken for `worker` (UPDATE ... RETURNING) and returned as it now is -- or None, having
    changed nothing, when it is not that simple (no row, another status, not due yet, arguments stored
    otherwise): then the caller reads the row and decides.

    The claim commits without waiting for the disk (carrot.commits says why that is safe), at no extra
    round trip. Only the columns the statement neither sets nor matches come back: the others' values are
    the statement's own (the arguments may be large, and converting the two times it sets cost a third of
    the claim's Python)."""
    now = timezone.now()
    using = MessageLog.objects.db  # looked up once a claim: each lookup asks the routers again
    connection = connections[using]
    params, known = _take_params(connection, now, message_id, task, task_args, content, worker, lease)
    take, as_integers = statement_for(using, connection, 'take_on_arrival', _take_on_arrival_sql)
    found = take.run(params, using=using, fetch=True)
    return None if found is None else taken_row(using, connection, found, known, as_integers)


def complete_then_take(done: MessageLog, message_id: str, task: str, task_args: str, content: str,
                       worker: str, lease: float) -> tuple[object, MessageLog | None]:
    """take_on_arrival, with the success of the task before (`done`, COMPLETED and bounded: its row this
    worker holds) written in the same statement and commit (PostgreSQL only): one statement a task in a
    run of deliveries instead of two. Returns the start time of the server that took the result (None:
    its row was deleted meanwhile) and the row taken, or None as take_on_arrival.

    The two UPDATEs see one snapshot: a copy of `done` itself (its row IN_PROGRESS in it) is never taken
    here, and the caller's read then finds it COMPLETED."""
    now = timezone.now()
    using = MessageLog.objects.db
    connection = connections[using]
    params, known = _take_params(connection, now, message_id, task, task_args, content, worker, lease)
    both, as_integers = statement_for(using, connection, 'complete_then_take', _complete_then_take_sql)
    found = both.run(completion_params(done) + params, using=using, fetch=True)
    started, taken = found[0], found[1:]
    return started, (None if taken[_pk_index()] is None else
                     taken_row(using, connection, taken, known, as_integers))


def _take_params(connection, now, message_id, task, task_args, content, worker, lease) -> tuple[list, dict]:
    """take_on_arrival's parameters, and the values of the columns its statement sets or matches."""
    expires = now + timedelta(seconds=lease)
    at = connection.ops.adapt_datetimefield_value
    params = [at(now), worker, at(expires), message_id, task, task_args, content, at(now)]
    known = {'status': MessageLog.IN_PROGRESS, 'started_time': now, 'worker': worker, 'lease_expires': expires,
             'exception': '', 'traceback': '', 'failure_time': None,
             'uuid': message_id, 'task': task, 'task_args': task_args, 'content': content}
    return params, known


def taken_row(using: str, connection, found, known: dict, as_integers: bool) -> MessageLog:
    """The row a take returned (the columns it did not set or match), with the values it did."""
    returned = list(found)
    for index, column, functions in _converters_of(connection, as_integers):
        value = returned[index]
        for converter in functions:
            value = converter(value, column, connection)
        returned[index] = value
    values = [known[name] if index is None else returned[index] for name, index in _row_sources()]
    return MessageLog.from_db(using, _row_names(), values)


@functools.cache
def _row_names() -> tuple[str, ...]:
    """MessageLog's columns (attnames) in field order, as from_db takes them: made once, not per claim."""
    return tuple(f.attname for f in MessageLog._meta.concrete_fields)


@functools.cache
def _row_sources() -> tuple[tuple[str, int | None], ...]:
    """Per column of _row_names(): (its name, where a take returns it), the place None for the columns the
    take sets or matches (their values are the statement's own)."""
    returned = [f.attname for f in returned_fields()]
    return tuple((name, None if name in SET_OR_MATCHED else returned.index(name)) for name in _row_names())


# The columns take_on_arrival's UPDATE sets to a value of its own or matches with "=": not returned.
SET_OR_MATCHED = frozenset({'status', 'started_time', 'worker', 'lease_expires', 'exception', 'traceback',
                            'failure_time', 'uuid', 'task', 'task_args', 'content'})


def returned_fields() -> list:
    return [f for f in MessageLog._meta.concrete_fields if f.attname not in SET_OR_MATCHED]


@functools.cache
def _pk_index() -> int:
    """Where the primary key is among the columns a take returns (never NULL in a row taken)."""
    return dict(_row_sources())[MessageLog._meta.pk.attname]


def _complete_then_take_sql(connection) -> str:
    # Writable CTEs run to completion whether read or not; the outer SELECT always gives one row: the
    # result's server start (NULL: no row to complete) and the taken row's columns (NULL: none taken).
    return (f'WITH done AS ({write_completion_sql(connection)} RETURNING {SERVER_STARTED} AS started), '
            f'taken AS ({_take_on_arrival_sql(connection)}) '
            f'SELECT done.started, taken.* FROM (SELECT 1) AS one LEFT JOIN done ON true LEFT JOIN taken ON true')


def _take_on_arrival_sql(connection) -> str:
    quote = connection.ops.quote_name
    # The statuses are constants of the statement, not values sent with each call.
    takeable = ', '.join(f"'{status}'" for status in TAKEABLE)
    return (f'UPDATE {quote(MessageLog._meta.db_table)} '
            f"SET status = '{MessageLog.IN_PROGRESS}', started_time = %s, worker = %s, lease_expires = %s, "
            f"attempts = attempts + 1, exception = '', traceback = '', failure_time = NULL "
            f'WHERE uuid = %s AND task = %s AND task_args = %s AND content = %s AND status IN ({takeable}) '
            f'AND (run_after IS NULL OR run_after <= %s) '
            f'RETURNING {", ".join(returned_column(connection, f) for f in returned_fields())}')


def statement_for(using: str, connection, name: str, build) -> tuple[Statement, bool]:
    """The Statement `name` of the log table's database, in the form that returns its times as integers
    where _times_as_integers() says so (a form of its own: settings may change between two calls), and
    whether it does."""
    if _times_as_integers(connection):
        return statement(f'{name}_epoch_us', build, using), True
    return statement(name, build, using), False


def _times_as_integers(connection) -> bool:
    """Whether a take returns its date-time columns as microseconds since the epoch: on PostgreSQL with
    USE_TZ, where the ORM gives them as aware datetimes in UTC. Django's loader for timestamps is Python
    that parses the text of each one: for the publish time a task always has, it cost a twentieth of a
    worker's CPU in a drain, against a tenth of that for the integer."""
    return connection.vendor == 'postgresql' and settings.USE_TZ


def returned_column(connection, field) -> str:
    column = connection.ops.quote_name(field.column)
    if isinstance(field, models.DateTimeField) and _times_as_integers(connection):
        return f'{epoch_microseconds(column)} AS {column}'
    return column


def _converters_of(connection, as_integers: bool) -> list[tuple]:
    """(place, column, converters) for each column take_on_arrival returns whose value as read needs
    turning into the ORM's (SQLite's datetimes are text, for one; `as_integers`: its times come as
    integers); the others are taken as read.
    Looked up once per connection: the lookup cost more than the claim's own Python."""
    cached = getattr(connection, '_carrot_converters', None)
    if cached is not None and cached[0] == as_integers:
        return cached[1]
    found = []
    for index, field in enumerate(returned_fields()):
        column = field.get_col(MessageLog._meta.db_table)
        if as_integers and isinstance(field, models.DateTimeField):
            functions = (_from_epoch_us,)
        else:
            functions = tuple(connection.ops.get_db_converters(column) + column.get_db_converters(connection))
        if functions:
            found.append((index, column, functions))
    connection._carrot_converters = (as_integers, found)
    return found


_EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)


def _from_epoch_us(value, expression, connection):
    """A time returned as microseconds since the epoch (returned_column) as the ORM gives it with USE_TZ:
    an aware datetime in UTC, to the microsecond."""
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def from_waiting(now) -> Q:
    """The condition for a claim of a row no worker holds: never taken, or scheduled (to run later, or to
    be retried), and due at `now`."""
    return Q(status__in=TAKEABLE) & (Q(run_after__isnull=True) | Q(run_after__lte=now))


def from_lost_worker(row: MessageLog) -> Q:
    """The condition for taking over from a dead worker: still the very claim that was read."""
    return Q(status=MessageLog.IN_PROGRESS, worker=row.worker, attempts=row.attempts)


def renew_lease(message_id: str, worker: str, lease: float) -> bool:
    """Push the lease of a row `worker` holds `lease` seconds forward; False if it holds it no more."""
    expires = timezone.now() + timedelta(seconds=lease)
    connection = connection_for_rows()
    params = [connection.ops.adapt_datetimefield_value(expires), message_id, MessageLog.IN_PROGRESS, worker]
    return bool(statement('renew_lease', _renew_lease_sql, MessageLog.objects.db).run(
        params, using=MessageLog.objects.db))


def _renew_lease_sql(connection) -> str:
    return (f'UPDATE {connection.ops.quote_name(MessageLog._meta.db_table)} SET lease_expires = %s '
            f'WHERE uuid = %s AND status = %s AND worker = %s')
