"""The statements a worker runs for every task, parsed and planned once per database connection.

A profile of PostgreSQL during a drain showed a third of its CPU in parsing and planning the same two
UPDATEs (the claim, the result) again for each task: the log table's partial indexes make planning an
UPDATE of it dearer than running it. Django sends every query as text with its values filled in (psycopg
binds on the client unless DATABASES says otherwise), so nothing is ever planned twice. Here a statement
is prepared once per connection (PREPARE) and then sent as `EXECUTE name(values)`, which PostgreSQL neither
parses beyond the EXECUTE nor plans again.

Used only where it helps and cannot surprise: PostgreSQL with the values filled in on the client (psycopg
3's default, psycopg2), outside a transaction (a failed EXECUTE would abort the caller's). Anywhere else
the statement runs as it is. A statement is named by a hash of its text, so a session shared between
clients (a pooler in transaction mode) or between two versions of carrot never runs another statement
under its name. An EXECUTE refused for the prepared statement's sake committed nothing, so the plain
statement is run instead: when the prepared statement was gone (a pooler handing each statement to
another server session, a DISCARD ALL), that connection prepares nothing any more; when a migration
changed its plan's result type, it is prepared afresh next time. Any other refusal (a lock timeout, a
constraint) is the statement's own and is raised at once: the plain statement would only wait or fail
again. An exception from outside the database (an
interrupt, a signal handler's) leaves the statement's fate unknown: it is raised as it is, never followed
by the plain statement, and a connection left busy with the statement is closed.

Where nobody watches the connection's queries (no execute_wrapper, no DEBUG query log) an EXECUTE is sent
and read on psycopg 3's connection directly (InFlight), past Django's cursor: the same single round trip,
without building, converting and wrapping the query again for each call (189 -> 160 µs for the
publisher's PUBLISHED update on its own). Django still wraps its errors, and watched connections see every
statement as before.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import logging
import re
import weakref
from types import SimpleNamespace

from django.db import Error as DatabaseError, connections

from carrot.commits import commits_may_skip_the_disk, execute_durably, execute_without_waiting, with_commit_setting
from carrot.dbfaults import of_the_session, sqlstate

logger = logging.getLogger('carrot.publishing')


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
        # Named by its text: sessions that a pooler shares between clients (or clients of two versions in a
        # rolling deploy) never run another statement under this name.
        self.prepared_name = f'carrot_{name}_{hashlib.sha1(sql.encode()).hexdigest()[:12]}'
        # Per DB-API connection: the name it is prepared under, or None when that connection prepares nothing.
        self._prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Per DB-API connection: the psycopg Transformer that reads this statement's rows, its loaders set up
        # by the first row read (InFlight.result). A prepared statement's columns and their types never
        # change: a migration that changes them fails its EXECUTE (PLAN_CHANGED), and _drop forgets both.
        self._readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def run(self, params, using: str = 'default', fetch: bool = False, wait_for_disk: bool = False):
        """Run with `params`; returns the first row (`fetch`; 'all': every row) or the number of rows changed. Unless
        `wait_for_disk`, the commit need not wait for the WAL flush (carrot.commits); with it, it waits as
        the server is configured to, whatever the session was set to."""
        connection = connections[using]
        connection.ensure_connection()
        try:
            name = self._name_on(connection)
            if name is None:
                return _execute(self.sql, params, using, fetch, wait_for_disk)
            if _unwatched(connection):
                # The same round trip, Django's cursor passed by: no query built, wrapped and converted
                # again for each call (see the module's docstring).
                return InFlight(self, connection, name, params, using, fetch, wait_for_disk).result()
            try:
                return _execute(self._call(name), params, using, fetch, wait_for_disk)
            except DatabaseError as exc:
                if not _about_the_prepared_statement(exc):
                    raise  # a lock timeout, a constraint: the plain statement would only meet it again
                # The statement gone with a pooler or a DISCARD ALL, or a plan whose result type a migration
                # changed: it committed nothing, so the plain statement decides. A connection that lost it
                # prepares nothing any more; otherwise it is prepared afresh next time.
                self._drop(connection, name, keep_off=sqlstate(exc) == NO_SUCH_STATEMENT)
            return _execute(self.sql, params, using, fetch, wait_for_disk)
        except BaseException as exc:
            # Anything else came from outside the database (an interrupt, a signal handler's exception, a
            # time limit) while the statement was on its way or running: it may commit or not, and no one
            # can tell, so it is never run again here. The connection may still be busy with it; then it is
            # closed, or the next query on it would fail for a reason that has nothing to do with it.
            if not isinstance(exc, DatabaseError):
                close_if_busy(connection)
            raise

    def send(self, params, using: str = 'default', fetch: bool = False) -> 'InFlight | None':
        """Send now, read the answer later: the statement leaves at once and `InFlight.result()` returns
        what run() would have, so the caller can wait for something else meanwhile (the publisher: the
        broker's confirm). The commit need not wait for the disk, as with run().

        Only where nothing can surprise: psycopg 3 binding on the client, outside a transaction, on a
        connection this statement is already prepared on -- a first call goes through run(), which also
        shows the table is there -- and that nobody watches (no execute_wrapper, no query log with DEBUG:
        the statement passes Django's cursor by). None anywhere else: run() it then."""
        connection = connections[using]
        if not _unwatched(connection):
            return None
        try:
            name = self._prepared.get(connection.connection)
        except TypeError:
            return None
        if name is None:
            return None
        return InFlight(self, connection, name, params, using, fetch, wait_for_disk=False)

    def _call(self, name: str) -> str:
        return f'EXECUTE {name}({", ".join(["%s"] * self.count)})' if self.count else f'EXECUTE {name}'

    def _name_on(self, connection) -> str | None:
        """The name this statement runs under on `connection` (prepared now if need be), or None: plain."""
        raw = connection.connection
        if connection.vendor != 'postgresql' or connection.in_atomic_block or raw is None:
            return None
        try:
            if raw in self._prepared:
                return self._prepared[raw]
        except TypeError:  # a driver connection that cannot be weakly referenced: never prepared
            return None
        name = self.prepared_name if _binds_on_the_client(raw) else None
        if name is not None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute(f'PREPARE {name} AS {_numbered(self.sql)}')
            except DatabaseError as exc:
                # Already there (a pooler may hand this session another client's, of the very same text:
                # the name is the text's hash), or a database that refuses PREPARE: plain from now on --
                # unless the session's state refused it (a transaction of the caller's that failed): then
                # plain this time only.
                if of_the_session(exc):
                    return None
                if sqlstate(exc) != DUPLICATE_PREPARED_STATEMENT:
                    name = None
        self._prepared[raw] = name
        return name

    def _drop(self, connection, name: str, keep_off: bool) -> None:
        raw = connection.connection
        if raw is None:
            return
        self._readers.pop(raw, None)
        if keep_off:
            self._prepared[raw] = None
            return
        self._prepared.pop(raw, None)
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'DEALLOCATE {name}')
        except DatabaseError:  # gone with the connection, or never there
            pass


def close_if_busy(connection) -> None:
    """Close Django's `connection` if its driver connection is still busy with a command whose answer nobody
    will read (a query interrupted by an exception from outside the database), or was closed by the driver
    (psycopg closes one whose interrupted query it could not cancel cleanly): any later query on it would
    fail. Django opens another when next asked."""
    raw = connection.connection
    if raw is not None and (getattr(raw, 'closed', False) or _busy(raw)):
        _close(connection)


def close_if_out_of_step(connection) -> bool:
    """Close Django's `connection` (and log it) if its driver connection does not commit as Django believes
    (autocommit_out_of_step): every write after that, carrot's rows included, waits in a transaction for a
    commit nobody will send, and vanishes when the connection closes. Closing rolls the stray transaction
    back (what closing at the request's end would do, later) and Django opens a consistent connection when
    next asked. True when it closed."""
    how = autocommit_out_of_step(connection)
    if how is None:
        return False
    logger.error('the database connection %r was in %s: closed, rolling back what it had not committed',
                 connection.alias, how)
    _close(connection)
    return True


def autocommit_out_of_step(connection) -> str | None:
    """In words, how the driver's autocommit differs from Django's flag outside an atomic block (where the
    flag is the caller's); None when they agree or carrot cannot tell. Django sets the driver's autocommit,
    then its own flag: an exception from outside (a signal handler's: a request timeout) raised between
    the two -- inside transaction.atomic()'s entry, say -- leaves the driver in a transaction Django does
    not know of."""
    raw = connection.connection
    if raw is None or connection.in_atomic_block:
        return None
    committing = driver_autocommit(connection.vendor, raw)
    if committing is None or committing == connection.autocommit:
        return None
    return (f"autocommit {'on' if committing else 'off'} for the driver and "
            f"{'on' if connection.autocommit else 'off'} for Django (an exception interrupted Django's "
            f"transaction handling, a signal handler's, say)")


def driver_autocommit(vendor: str, raw) -> bool | None:
    """Whether the driver connection `raw` commits each statement itself; None where carrot cannot tell."""
    if vendor == 'postgresql':  # psycopg 3 and psycopg2 alike
        value = getattr(raw, 'autocommit', None)
        return value if isinstance(value, bool) else None
    if vendor == 'sqlite':  # Django switches sqlite3's autocommit with isolation_level
        return raw.isolation_level is None
    return None


def _close(connection) -> None:
    try:
        connection.close()
    except Exception:  # closing a broken connection may complain; it is gone either way
        pass


IDLE, ACTIVE = 0, 1  # libpq's transaction status: no transaction; a command in progress


def driver_transaction_status(raw) -> int | None:
    """libpq's transaction status of a psycopg 3 or psycopg2 connection (IDLE, ACTIVE, 2 in a transaction,
    3 in a failed one, 4 unknown: a broken connection); None for a driver that has none (sqlite3)."""
    pgconn = getattr(raw, 'pgconn', None)  # psycopg 3, read directly: its `info` is a new object each time
    status = pgconn.transaction_status if pgconn is not None else \
        getattr(getattr(raw, 'info', None), 'transaction_status', None)  # psycopg2
    try:
        return None if status is None else int(status)
    except (TypeError, ValueError):
        return None


def _busy(raw) -> bool:
    """Whether the driver connection `raw` has a command in progress."""
    return driver_transaction_status(raw) == ACTIVE


_STATEMENTS: dict[tuple[str, str, str], Statement] = {}

DUPLICATE_PREPARED_STATEMENT = '42P05'  # PREPARE of a name the session has: a pooler's, same text
NO_SUCH_STATEMENT = '26000'  # invalid_sql_statement_name: gone with a pooler's session or a DISCARD ALL
PLAN_CHANGED = '0A000'  # feature_not_supported: "cached plan must not change result type" after a migration


def _about_the_prepared_statement(exc: BaseException) -> bool:
    """Whether the database refused an EXECUTE for the prepared statement's sake (gone, or its plan out of
    date), so the plain statement may succeed; any other refusal is the statement's own."""
    return sqlstate(exc) in (NO_SUCH_STATEMENT, PLAN_CHANGED)


class InFlight:
    """A statement Statement.send() has sent, its answer still to be read by result() -- which must be
    called before the connection runs anything else (psycopg would refuse: a command is in progress)."""

    def __init__(self, statement: Statement, connection, name: str, params, using: str, fetch: bool,
                 wait_for_disk: bool):
        generators = _psycopg().generators
        self.statement, self.connection, self.name = statement, connection, name
        self.params, self.using, self.fetch, self.wait_for_disk = params, using, fetch, wait_for_disk
        setting = 'DEFAULT' if wait_for_disk else 'off' if commits_may_skip_the_disk() else None
        text = with_commit_setting(statement._call(name), setting)  # as _execute() would run it
        raw = connection.connection
        with connection.wrap_database_errors:  # a lost connection fails here, before anything else is done
            query = literal_query(text, params, raw)
            if query is None:
                with raw.cursor() as cursor:
                    query = cursor.mogrify(text, params).encode(raw.info.encoding)
            try:
                with raw.lock:
                    raw.pgconn.send_query(query)
                    raw.wait(generators.send(raw.pgconn))
            except BaseException:
                self.abandon()  # half sent (an interrupt, a lost connection)
                raise

    def result(self):
        """What run() would have returned; raises what it would have raised. A failed EXECUTE committed
        nothing: the plain statement decides, as in run()."""
        psycopg = _psycopg()
        errors, generators = psycopg.errors, psycopg.generators
        raw = self.connection.connection
        try:
            with self.connection.wrap_database_errors:
                with raw.lock:
                    answers = raw.wait(generators.fetch_many(raw.pgconn))
        except BaseException:
            self.abandon()  # the answer half read: no later query on this connection may meet the rest
            raise
        failed = next((answer for answer in answers if answer.status == psycopg.FATAL_ERROR), None)
        if failed is None:
            last = answers[-1]
            if not self.fetch:
                return int(last.command_tuples or 0)
            if last.status != psycopg.TUPLES_OK or not last.ntuples:
                return [] if self.fetch == 'all' else None
            return self._read_row(last, raw)
        error = errors.error_from_result(failed, encoding=raw.info.encoding)
        if not _about_the_prepared_statement(error):
            with self.connection.wrap_database_errors:  # raised as Django's cursor raises it
                raise error
        self.statement._drop(self.connection, self.name, keep_off=sqlstate(error) == NO_SUCH_STATEMENT)
        return _execute(self.statement.sql, self.params, self.using, self.fetch, self.wait_for_disk)

    def _read_row(self, result, raw):
        """The first row of `result` (every row when fetching 'all'), its values loaded as psycopg loads
        them. The loaders are looked up once per connection and statement: setting them up for each row cost
        more than reading it."""
        readers = self.statement._readers
        reader = readers.get(raw)
        if reader is None or reader.pgresult is None or reader.pgresult.nfields != result.nfields:
            reader = _psycopg().Transformer.from_context(raw)
            reader.set_pgresult(result)
            readers[raw] = reader
        else:
            reader.set_pgresult(result, set_loaders=False)
        if self.fetch == 'all':
            return reader.load_rows(0, result.ntuples, tuple)
        return reader.load_row(0, tuple)

    def abandon(self) -> None:
        _close(self.connection)


@functools.cache
def _psycopg():
    """psycopg 3's parts InFlight and literal_query use, imported once (an import in a function costs on
    every call: a fiftieth of a worker's time in a drain)."""
    import psycopg
    import psycopg.adapt
    import psycopg.errors
    import psycopg.generators
    import psycopg.pq
    # The statuses as plain ints: an enum member's lookup cost more than the comparison.
    return SimpleNamespace(errors=psycopg.errors, generators=psycopg.generators, Escaping=psycopg.pq.Escaping,
                           Transformer=psycopg.adapt.Transformer,
                           FATAL_ERROR=int(psycopg.pq.ExecStatus.FATAL_ERROR),
                           TUPLES_OK=int(psycopg.pq.ExecStatus.TUPLES_OK))


def literal_query(text: str, params, raw) -> bytes | None:
    """`text` with each %s replaced by its parameter as an SQL literal, encoded for `raw` (psycopg 3) --
    what psycopg's mogrify() makes of it, without a cursor and a dumper per value (a sixth of
    publish_message's client time). For the kinds carrot's statements pass: None, bool, int (psycopg's
    Int4 too), str, datetime, and lists of one of str, int or datetime (with None); None for anything else, a str with a NUL (mogrify says why PostgreSQL
    refuses it) or a text with a literal %: then the caller uses mogrify(). Quoted untyped, a literal takes
    the type PostgreSQL inferred for that parameter of the prepared statement, as mogrify's value does."""
    encoding = raw.info.encoding
    pieces = _template_pieces(text, encoding)
    if pieces is None or len(pieces) != len(params) + 1:
        return None
    escape = None
    parts = [pieces[0]]
    for value, piece in zip(params, pieces[1:]):
        if isinstance(value, str):
            if '\x00' in value:
                return None
            if "'" in value or '\\' in value:
                if escape is None:  # libpq's escaping: the connection's encoding and string settings
                    escape = _psycopg().Escaping(raw.pgconn).escape_literal
                parts.append(escape(value.encode(encoding)))
            else:  # nothing to escape: most of carrot's values (ids, names, empty texts, plain JSON)
                parts.append(b"'%s'" % value.encode(encoding))
        elif value is None:
            parts.append(b'NULL')
        elif value is True or value is False:
            parts.append(b'true' if value else b'false')
        elif isinstance(value, int):
            parts.append(b'%d' % int(value))
        elif isinstance(value, datetime.datetime):
            parts.append(b"'%s'" % value.isoformat().encode())
        elif isinstance(value, list):  # the arrays of a window's claims (carrot.consume.ahead)
            array = _array_literal(value)
            if array is None:
                return None
            if "'" in array or '\\' in array:
                if escape is None:
                    escape = _psycopg().Escaping(raw.pgconn).escape_literal
                parts.append(escape(array.encode(encoding)))
            else:
                parts.append(b"'%s'" % array.encode(encoding))
        else:
            return None
        parts.append(piece)
    return b''.join(parts)


def _array_literal(values: list) -> str | None:
    """`values` as the text of a PostgreSQL array ('{...}'; untyped, it takes the type of the prepared
    statement's parameter) -- for a list of str, of int or of datetime, each with None among them; None for
    any other list, or a str with a NUL. Each string element is double-quoted, its backslashes and double
    quotes escaped (the array syntax), so no text can end an element or the array early."""
    elements = []
    kinds = set()
    for value in values:
        if value is None:
            elements.append('NULL')
        elif isinstance(value, str):
            if '\x00' in value:
                return None
            kinds.add(str)
            elements.append('"%s"' % value.replace('\\', '\\\\').replace('"', '\\"'))
        elif isinstance(value, bool):
            return None
        elif isinstance(value, int):
            kinds.add(int)
            elements.append('%d' % value)
        elif isinstance(value, datetime.datetime):
            kinds.add(datetime.datetime)
            elements.append('"%s"' % value.isoformat())
        else:
            return None
    if len(kinds) > 1:
        return None
    return '{%s}' % ','.join(elements)


@functools.lru_cache(maxsize=64)
def _template_pieces(text: str, encoding: str) -> tuple[bytes, ...] | None:
    """The encoded pieces of `text` between its %s placeholders, split once per statement text; None for
    a text with a literal % (left to mogrify)."""
    if '%' in text.replace('%s', ''):
        return None
    return tuple(piece.encode(encoding) for piece in text.split('%s'))


def _binds_on_the_client(raw) -> bool:
    """Whether the driver fills the values into the query text (psycopg 3's ClientCursor, Django's default;
    psycopg2 always): then nothing is prepared by the driver, and EXECUTE is ours to send."""
    try:
        import psycopg
    except ImportError:
        return True  # psycopg2
    return not isinstance(raw, psycopg.Connection) or issubclass(raw.cursor_factory, psycopg.ClientCursor)


def _unwatched(connection) -> bool:
    """Whether a statement may pass Django's cursor by on `connection`: psycopg 3 binding on the client,
    outside a transaction (Django's, and one begun by hand: the session idle), and nobody watching its
    queries (no execute_wrapper, no DEBUG query log)."""
    raw = connection.connection
    return raw is not None and connection.vendor == 'postgresql' and not connection.in_atomic_block \
        and not connection.execute_wrappers and not connection.queries_logged and _sends_without_reading(raw) \
        and driver_transaction_status(raw) == IDLE


def _sends_without_reading(raw) -> bool:
    """Whether `raw` is a psycopg 3 connection binding on the client: its query text can be sent and its
    answer read later (psycopg2 has no way to)."""
    try:
        import psycopg
        import psycopg.generators
    except ImportError:
        return False
    return isinstance(raw, psycopg.Connection) and issubclass(raw.cursor_factory, psycopg.ClientCursor) \
        and hasattr(psycopg.generators, 'fetch_many')  # the send and fetch InFlight uses


def _execute(sql, params, using, fetch, wait_for_disk):
    if wait_for_disk:
        return execute_durably(sql, params, using=using, fetch=fetch)
    return execute_without_waiting(sql, params, using=using, fetch=fetch)


def _numbered(sql: str) -> str:
    """`sql` with its %s placeholders as $1, $2, ... (PREPARE's), and %% as %."""
    counter = itertools.count(1)
    return re.sub(r'%s|%%', lambda m: f'${next(counter)}' if m.group() == '%s' else '%', sql)
