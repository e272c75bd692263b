"""The statements a worker runs for every task, parsed and planned once per database connection.

A profile of PostgreSQL during a drain showed a third of its CPU in parsing and planning the same two
UPDATEs (the claim, the result) again for each task: the log table's partial indexes make planning an
UPDATE of it dearer than running it. Django sends every query as text with its values filled in (psycopg
binds on the client unless DATABASES says otherwise), so nothing is ever planned twice. Here a statement
is prepared once per connection (PREPARE) and then sent as `EXECUTE name(values)`, which PostgreSQL neither
parses beyond the EXECUTE nor plans again.

Used only where it helps and cannot surprise: PostgreSQL with the values filled in on the client (psycopg
3's default, psycopg2), outside a transaction (a failed EXECUTE would abort the caller's). Anywhere else
the statement runs as it is. A connection that loses its prepared statements (a pooler in transaction mode
hands each statement to another server session, or a DISCARD ALL) is noticed on the first EXECUTE that
fails: the statement runs as it is, and that connection prepares nothing any more.
"""
from __future__ import annotations

import itertools
import re
import weakref

from django.db import connections

from carrot.commits import execute_without_waiting

_names = itertools.count(1)


def statement(name: str, build, using: str = 'default') -> 'Statement':
    """The Statement `name` for database `using`, its SQL built once by `build(connection)`."""
    connection = connections[using]
    key = (name, using, connection.vendor)
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = Statement(name, build(connection))
    return found


class Statement:
    """One SQL statement with %s placeholders, prepared per connection on first use."""

    def __init__(self, name: str, sql: str):
        self.name = name
        self.sql = sql
        self.count = sql.count('%s')
        # Per DB-API connection: the name it is prepared under, or None when that connection prepares nothing.
        self._prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def run(self, params, using: str = 'default', fetch: bool = False, wait_for_disk: bool = False):
        """Run with `params`; returns the first row (`fetch`) or the number of rows changed. Unless
        `wait_for_disk`, the commit need not wait for the WAL flush (carrot.commits)."""
        connection = connections[using]
        connection.ensure_connection()
        name = self._name_on(connection)
        if name is None:
            return _execute(self.sql, params, using, fetch, wait_for_disk)
        call = f'EXECUTE {name}({", ".join(["%s"] * self.count)})' if self.count else f'EXECUTE {name}'
        try:
            return _execute(call, params, using, fetch, wait_for_disk)
        except Exception as exc:
            if not _is_missing_statement(exc):
                self._forget(connection)  # prepared again next time (a new name: the old one may linger)
                raise
            self._prepared[connection.connection] = None  # this connection cannot keep them: plain from now on
        return _execute(self.sql, params, using, fetch, wait_for_disk)

    def _name_on(self, connection) -> str | None:
        if not _can_prepare(connection):
            return None
        raw = connection.connection
        try:
            if raw in self._prepared:
                return self._prepared[raw]
        except TypeError:  # a driver connection that cannot be weakly referenced: never prepared
            return None
        name = f'carrot_{self.name}_{next(_names)}'
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'PREPARE {name} AS {_numbered(self.sql)}')
        except Exception:  # a database that refuses PREPARE: the plain statement, from now on
            name = None
        self._prepared[raw] = name
        return name

    def _forget(self, connection) -> None:
        try:
            self._prepared.pop(connection.connection, None)
        except TypeError:
            pass


_STATEMENTS: dict[tuple[str, str, str], Statement] = {}


def _can_prepare(connection) -> bool:
    if connection.vendor != 'postgresql' or connection.in_atomic_block or connection.connection is None:
        return False
    try:
        import psycopg
    except ImportError:
        return True  # psycopg2: values are always filled in on the client
    raw = connection.connection
    if isinstance(raw, psycopg.Connection):
        return issubclass(raw.cursor_factory, psycopg.ClientCursor)
    return True


def _execute(sql, params, using, fetch, wait_for_disk):
    if wait_for_disk:
        with connections[using].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if fetch else cursor.rowcount
    return execute_without_waiting(sql, params, using=using, fetch=fetch)


def _numbered(sql: str) -> str:
    """`sql` with its %s placeholders as $1, $2, ... (PREPARE's), and %% as %."""
    counter = itertools.count(1)
    return re.sub(r'%s|%%', lambda m: f'${next(counter)}' if m.group() == '%s' else '%', sql)


def _is_missing_statement(exc: BaseException) -> bool:
    """Whether `exc` says the prepared statement does not exist (SQLSTATE 26000) on this session."""
    cause = exc.__cause__ or exc
    return getattr(cause, 'sqlstate', None) == '26000' or getattr(cause, 'pgcode', None) == '26000'
