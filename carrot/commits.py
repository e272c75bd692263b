"""Commits that need not wait for the disk: carrot's bookkeeping writes that a crash may lose harmlessly.

On PostgreSQL every commit waits for its WAL record to reach the disk (synchronous_commit). On a small
machine that flush is the one cost that bounds a worker: about 2,000 per second in all, however many
processes share it, while a commit that does not wait costs a tenth of a millisecond. So the writes whose
loss a crash of the *database server* (not of a worker, not a restart) could only make late, never wrong,
commit without waiting, each in a transaction of its own with `SET LOCAL synchronous_commit TO off`:

- the claim (PUBLISHED -> IN_PROGRESS) and the lease renewals: the task runs only after the claim is
  visible to every other session, which a commit that does not wait is, at once; the flush only decides
  whether the claim survives a server crash. Lost, the row reads PUBLISHED again while the task runs,
  and the result the worker writes afterwards (which does wait) is COMPLETED all the same.
- the publisher's own rows outside a transaction (WAITING, then PUBLISHED): the message is on the broker
  (confirmed) before the call returns, and a worker writes the row of a message it finds none for.

Results, failures and attempts -- what the ack of a delivery follows -- always wait. CARROT['async_commits']
= False makes every write wait (README.rst, "Speed").

Not PostgreSQL: a plain commit (SQLite's WAL mode is fast as it is).
"""
from __future__ import annotations

import contextlib

from django.db import DatabaseError, connections, transaction

from carrot.config import get_config
from carrot.dbfaults import sqlstate
from carrot.exceptions import CarrotConfigException


@contextlib.contextmanager
def without_waiting_for_disk(using: str = 'default'):
    """A transaction whose commit does not wait for the WAL flush (PostgreSQL, when CARROT allows it).
    Inside a transaction that is already open (the caller's), nothing changes: its commit is its own."""
    connection = connections[using]
    if connection.vendor != 'postgresql' or connection.in_atomic_block or not commits_may_skip_the_disk():
        yield
        return
    with _committing_with('off', using):
        yield


@contextlib.contextmanager
def _committing_with(synchronous_commit: str, using: str):
    """A transaction of its own whose commit follows `synchronous_commit` (off, DEFAULT ...)."""
    with transaction.atomic(using=using):
        with connections[using].cursor() as cursor:
            cursor.execute(f'SET LOCAL synchronous_commit TO {synchronous_commit}')
        yield


def commits_may_skip_the_disk() -> bool:
    """CARROT['async_commits'] (False when CARROT cannot be read)."""
    try:
        return get_config().async_commits
    except CarrotConfigException:
        return False


def execute_without_waiting(sql: str, params, using: str = 'default', fetch: bool = False):
    """Run one statement whose commit need not wait for the disk, in one round trip: on PostgreSQL (when
    CARROT allows it, outside a transaction) it goes in one query string behind `SET LOCAL
    synchronous_commit TO off`, which PostgreSQL runs as one transaction; elsewhere as it is. Returns the
    first row (`fetch`: for RETURNING; 'all': every row) or the number of rows changed."""
    skip = commits_may_skip_the_disk()
    return execute_with_commit(sql, params, 'off' if skip else None, using, fetch)


def execute_durably(sql: str, params, using: str = 'default', fetch: bool = False):
    """Run one statement whose commit waits for the disk as the server is configured to, whatever the
    session was set to since (a task may have run `SET synchronous_commit TO off` on the connection it
    shares with carrot): `SET LOCAL synchronous_commit TO DEFAULT` in front, in the same round trip."""
    return execute_with_commit(sql, params, 'DEFAULT', using, fetch)


def execute_with_commit(sql: str, params, synchronous_commit: str | None, using: str = 'default',
                        fetch: bool = False):
    """`sql` as its own transaction with `SET LOCAL synchronous_commit TO <synchronous_commit>` (None: as
    the session says) on PostgreSQL outside a transaction; elsewhere as it is."""
    connection = connections[using]
    set_it = synchronous_commit is not None and connection.vendor == 'postgresql' and \
        not connection.in_atomic_block
    with connection.cursor() as cursor:
        if set_it and _takes_two_statements(cursor):
            cursor.execute(with_commit_setting(sql, synchronous_commit), params)
            cursor.cursor.nextset()  # past the SET's empty result, to the statement's
        elif set_it:  # psycopg2, or psycopg 3 binding on the server: the SET in a transaction of its own
            with _committing_with(synchronous_commit, using):
                cursor.execute(sql, params)
                return _answer(cursor, fetch)
        else:
            cursor.execute(sql, params)
        return _answer(cursor, fetch)


def _answer(cursor, fetch: bool | str):
    """What a statement run by execute_with_commit returns: its first row (`fetch`), every row (`fetch` is
    'all') or the number of rows it changed."""
    if fetch == 'all':
        return cursor.fetchall()
    return cursor.fetchone() if fetch else cursor.rowcount


def with_commit_setting(sql: str, synchronous_commit: str | None) -> str:
    """`sql` behind `SET LOCAL synchronous_commit TO <synchronous_commit>` in one query string, which
    PostgreSQL runs as one transaction (None: `sql` as it is). Only for drivers that send the string
    whole (psycopg 3 binding on the client)."""
    if synchronous_commit is None:
        return sql
    return f'SET LOCAL synchronous_commit TO {synchronous_commit}; {sql}'


def epoch_microseconds(expression: str) -> str:
    """SQL for the timestamp `expression` as microseconds since the epoch: an integer that reads faster than
    a timestamp (Django's loader for those is Python that parses text) and does not depend on the session's
    time zone. extract() is exact (numeric) from PostgreSQL 14; before, a double holds today's microseconds
    to within rounding, which ::bigint takes to the nearest."""
    return f'(extract(epoch FROM {expression}) * 1000000)::bigint'


# The server's start time, as the statements that write or flush results return it (carrot.consume.unflushed
# compares them).
SERVER_STARTED = epoch_microseconds('pg_postmaster_start_time()')


def flush_to_disk(using: str = 'default'):
    """Make every commit so far durable: one small transaction that writes WAL and waits for the flush,
    which takes all earlier WAL with it (commits that did not wait included). PostgreSQL only. Returns
    the server's start time (pg_postmaster_start_time: a restart in between means the commits that did
    not wait may be gone), or None when the database refuses the WAL record."""
    # A transactional logical message gives the transaction an id and a WAL record (one that only takes an
    # id commits without flushing); it touches no table and needs no privilege beyond LOGIN. Outside a
    # transaction it commits on its own, as durably as the server's synchronous_commit says.
    try:
        return execute_durably(f"SELECT {SERVER_STARTED} FROM pg_logical_emit_message(true, 'carrot', '')",
                               [], using, fetch=True)[0]
    except DatabaseError as exc:
        if sqlstate(exc) == '42501':
            return None  # insufficient privilege (a managed server may revoke it)
        raise


def _takes_two_statements(cursor) -> bool:
    """Whether `cursor` runs 'SET ...; UPDATE ...' with parameters and steps to the second result: psycopg 3
    binding on the client (Django's default). Not psycopg 3 with OPTIONS['server_side_binding'] (a
    prepared statement is one command), nor psycopg2 (whose nextset() raises NotSupportedError)."""
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(cursor.cursor, psycopg.ClientCursor)
