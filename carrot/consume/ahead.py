"""Claiming ahead: the deliveries held behind the one about to run are claimed in the same statement.

In a backlog a consumer holds up to its queue's `prefetch` deliveries. Claiming each one as it starts costs
a statement a task (the result of the task before rides along: claim.complete_then_take), and on a small
machine that statement -- PostgreSQL's executor and commit, the round trip, two processes woken -- is most
of what a task costs. Here the claim of the delivery about to run also claims every delivery held behind
it and writes every result deferred so far (`take_window`): one statement for a window of deliveries. The
tasks claimed ahead start with no statement, their results are deferred, and the last task of the window
writes them all with its own in one commit that waits for the disk (`write_completions`).

A claim ahead
    The same conditional UPDATE as any claim (this very call, due, its attempt counted, the lease set), for
    PUBLISHED rows only, with `started_time` left NULL: the row is this worker's, not started. So is the
    row of the delivery about to run, claimed by the same statement. A task's start is kept in memory and
    written with its result (logrows.write_completion).
A worker that dies
    Its rows IN_PROGRESS with no start were claimed in a window: they are taken over without a lost attempt
    (the claim's count becomes the next run's; MessageProcessor.claim). So neither the deliveries it held
    and never ran nor the ones it ran and had not written yet are blamed for its death. The one it was
    running is among them: a task that kills its worker is counted from its next run on (taken over, it
    starts with its claim), so it is failed for good after at most max_attempts + 1 deaths. (A result of a
    task claimed with its start is not deferred behind a claim ahead: written at once, it is never blamed
    either.)
Held deliveries that go back unrun
    Given back behind a long task, at a stop, with a lost connection: un-claimed first (`unclaim`:
    PUBLISHED again, the attempt taken back). When the un-claim fails (the database is down), a delivery
    given back behind a long task is kept; one whose channel is gone waits for its claim's lease to run
    out, and is then taken over (uncounted) by whoever has it.
A claim ahead held too long
    The lease thread renews the running task's lease only: a claim ahead is used within a third of
    CARROT['claim_lease'] (`FRESH_FOR`), and an older one is taken over the normal way.
Where
    PostgreSQL, carrot's own row lookup, 'track': 'all', classic queues (a quorum queue's held deliveries
    are never given back), CARROT['claim_ahead'] (on by default).
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

from django.db import connections
from django.utils import timezone

from carrot.commits import SERVER_STARTED
from carrot.consume import claim
from carrot.consume.claim import TAKEABLE, returned_column, returned_fields, statement_for, taken_row
from carrot.models import MessageLog
from carrot.statements import statement


def fresh_for(lease: float) -> float:
    """Seconds a claim ahead may wait before its task starts (see the module docstring)."""
    return lease / 3


class AheadClaims:
    """The rows a processor claimed ahead, by the delivery (IncomingMessage) each was claimed for. Each row
    is held (claim.hold) while it is here, so no claimer of this process takes it for a dead worker's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rows: dict[int, tuple[object, MessageLog, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._rows)

    def __contains__(self, message) -> bool:
        return id(message) in self._rows

    def add(self, message, row: MessageLog) -> None:
        claim.hold(row.uuid)
        with self._lock:
            self._rows[id(message)] = (message, row, time.monotonic())

    def take(self, message) -> tuple[MessageLog, float] | None:
        """The row claimed ahead for `message` and its age in seconds, now the caller's (who holds its id),
        or None."""
        with self._lock:
            found = self._rows.pop(id(message), None)
        if found is None:
            return None
        _, row, claimed = found
        claim.release(row.uuid)
        return row, time.monotonic() - claimed

    def take_all(self, messages=None) -> list[MessageLog]:
        """The rows claimed ahead for `messages` (None: for every delivery), no longer held: to un-claim."""
        with self._lock:
            keys = list(self._rows) if messages is None else [id(m) for m in messages if id(m) in self._rows]
            rows = [self._rows.pop(key)[1] for key in keys]
        for row in rows:
            claim.release(row.uuid)
        return rows

    def give_back(self, rows: list[MessageLog], messages) -> None:
        """Rows take_all() returned that could not be un-claimed: theirs again, for the same deliveries."""
        by_id = {row.uuid: row for row in rows}
        for message in messages:
            row = by_id.pop(message.message_id, None)
            if row is not None:
                self.add(message, row)


def take_window(done: list[MessageLog], calls: list[tuple[str, str, str, str]], worker: str, lease: float):
    """In one statement and commit that does not wait for the disk (PostgreSQL): write the successes `done`
    (COMPLETED, bounded, rows this worker holds), claim the first of `calls` -- (message id, task, stored
    arguments, content) -- as take_on_arrival does but with no start written, and claim ahead each other
    one (see the module docstring). Returns the primary keys of the results written (a row deleted meanwhile is not), the start
    time of the server that took them, and per call the row taken or None."""
    now = timezone.now()
    using = MessageLog.objects.db
    connection = connections[using]
    at = connection.ops.adapt_datetimefield_value
    expires = now + timedelta(seconds=lease)
    params = [*_completions(done, at), worker, at(expires),
              *[list(column) for column in zip(*calls)], at(now)]
    window, as_integers = statement_for(using, connection, 'take_window', _take_window_sql)
    found = window.run(params, using=using, fetch='all')
    written, started = set(found[0][0] or ()), found[0][1]
    rows: list[MessageLog | None] = [None] * len(calls)
    for returned in found:
        place = returned[2]
        if place is None:
            continue
        message_id, task, task_args, content = calls[place - 1]
        known = {'status': MessageLog.IN_PROGRESS, 'started_time': None, 'worker': worker,
                 'lease_expires': expires, 'exception': '', 'traceback': '', 'failure_time': None,
                 'uuid': message_id, 'task': task, 'task_args': task_args, 'content': content}
        rows[place - 1] = taken_row(using, connection, returned[3:], known, as_integers)
    return written, started, rows


def write_completions(done: list[MessageLog]) -> tuple[set, object]:
    """The successes `done` in one statement whose commit waits for the disk (PostgreSQL). Returns the
    primary keys written (a row deleted meanwhile is not) and the start time of the server that took them."""
    using = MessageLog.objects.db
    connection = connections[using]
    found = statement('write_completions', _write_completions_sql, using).run(
        _completions(done, connection.ops.adapt_datetimefield_value), using=using, fetch='all',
        wait_for_disk=True)
    return {pk for pk, _ in found}, (found[0][1] if found else None)


def unclaim(rows: list[MessageLog], worker: str) -> int:
    """Give back the claims ahead of `rows` that `worker` still holds unstarted: PUBLISHED again, the
    attempt taken back. Returns how many it gave back."""
    if not rows:
        return 0
    using = MessageLog.objects.db
    return statement('unclaim', _unclaim_sql, using).run([[row.uuid for row in rows], worker], using=using)


def _completions(done: list[MessageLog], at) -> list[list]:
    """The arrays of _done_sql's parameters for the successes `done`."""
    return [[row.pk for row in done], [at(row.completion_time) for row in done], [row.output for row in done],
            [row.log for row in done], [at(row.started_time) for row in done]]


def _done_sql(connection) -> str:
    quote = connection.ops.quote_name
    pk = quote(MessageLog._meta.pk.column)
    return (f"UPDATE {quote(MessageLog._meta.db_table)} SET status = '{MessageLog.COMPLETED}', "
            f'completion_time = d.done_at, output = d.done_output, log = d.done_log, '
            f'started_time = d.done_started, lease_expires = NULL '
            f'FROM unnest(%s::bigint[], %s::timestamptz[], %s::text[], %s::text[], %s::timestamptz[]) '
            f'AS d(done_pk, done_at, done_output, done_log, done_started) '
            f'WHERE {pk} = d.done_pk RETURNING {pk} AS done_pk, {SERVER_STARTED} AS started')


def _write_completions_sql(connection) -> str:
    return _done_sql(connection)


def _take_window_sql(connection) -> str:
    quote = connection.ops.quote_name
    takeable = ', '.join(f"'{status}'" for status in TAKEABLE)
    returned = ', '.join(returned_column(connection, f) for f in returned_fields())
    take = (f'UPDATE {quote(MessageLog._meta.db_table)} '
            f"SET status = '{MessageLog.IN_PROGRESS}', "
            f'started_time = NULL, worker = %s, lease_expires = %s, '
            f"attempts = attempts + 1, exception = '', traceback = '', failure_time = NULL "
            f'FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) WITH ORDINALITY '
            f'AS a(take_uuid, take_task, take_args, take_content, take_n) '
            f'WHERE uuid = a.take_uuid AND task = a.take_task AND task_args = a.take_args '
            f'AND content = a.take_content '
            f"AND (status = '{MessageLog.PUBLISHED}' OR a.take_n = 1 AND status IN ({takeable})) "
            f'AND (run_after IS NULL OR run_after <= %s) '
            f'RETURNING a.take_n, {returned}')
    # Writable CTEs run to completion whether read or not; the outer SELECT gives a row per row taken (one
    # with NULLs when none was), each with the results' primary keys and server start.
    return (f'WITH done AS ({_done_sql(connection)}), taken AS ({take}) '
            f'SELECT (SELECT array_agg(done_pk) FROM done), (SELECT min(started) FROM done), taken.* '
            f'FROM (SELECT 1) AS one LEFT JOIN taken ON true')


def _unclaim_sql(connection) -> str:
    return (f"UPDATE {connection.ops.quote_name(MessageLog._meta.db_table)} SET status = '{MessageLog.PUBLISHED}', "
            f"attempts = attempts - 1, worker = '', lease_expires = NULL "
            f"WHERE uuid = ANY(%s::text[]) AND worker = %s AND status = '{MessageLog.IN_PROGRESS}' "
            f'AND started_time IS NULL')
