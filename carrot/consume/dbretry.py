"""Database faults in a worker: which ones waiting may cure, and waiting them out.

A worker must never run a task twice because its result could not be written, nor loop a message
because the database is down: a transient fault (unreachable, restarting, locked, tables missing) is
waited out with backoff and one log line per change of state (carrot.backoff.Outage); anything else is
the caller's to handle.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from django.db import DatabaseError, connections

from carrot.backoff import Outage
from carrot.dbfaults import describe_database_fault, may_pass, of_the_session
from carrot.statements import IDLE, autocommit_out_of_step, driver_transaction_status


class StopRequested(Exception):
    """The worker is stopping (or lost the delivery) while the database is down, before any claim."""


def drop_broken_connections() -> None:
    """Before each message, close this thread's connections that the last task left unusable (errors,
    autocommit switched off, a transaction open) or that outlived a positive CONN_MAX_AGE, so one task's
    mess does not fail the next message. Unlike Django's per-request close_old_connections(), the default
    CONN_MAX_AGE=0 does not mean "reconnect for every message": a worker is not a request, and that would
    cost more than the task.

    With DEBUG on, Django keeps every query of a connection (up to 9,000) until the next request starts;
    a worker has no requests, so its query logs are emptied here, once per message, as Django does once
    per request (else a consumer grows by about 10 MiB after a few thousand tasks).

    One pass over this thread's connections (as reset_connections_left_in_transaction, then the rest):
    each pass looks every connection up twice in Django's thread-local table."""
    for connection in connections.all(initialized_only=True):
        if _replaced_if_left(connection) is not None:
            continue  # a fresh wrapper: nothing of the rest to do
        connection.queries_log.clear()
        if connection.connection is None:
            continue
        if connection.errors_occurred and not connection.is_usable():
            replace_connection(connection.alias)
        elif connection.errors_occurred:
            connection.errors_occurred = False
        elif connection.settings_dict.get('CONN_MAX_AGE') and connection.close_at is not None \
                and time.monotonic() >= connection.close_at:
            connection.close()


def left_in_transaction(connection) -> str | None:
    """How `connection` (this thread's) was left in a transaction, in words, or None when it is clean:
    an atomic() block entered and never left, autocommit switched off, or a transaction begun by hand
    (a raw BEGIN, seen by the database driver) with autocommit on."""
    if connection.connection is None:
        return None
    if connection.in_atomic_block:
        return 'an atomic() block was entered and never left'
    if connection.get_autocommit() != connection.settings_dict['AUTOCOMMIT']:
        return 'autocommit was switched off (set_autocommit(False)) and not back on'
    out_of_step = autocommit_out_of_step(connection)  # the next statement opens a transaction Django never ends
    if out_of_step is not None:
        return out_of_step
    if _driver_in_transaction(connection.connection):
        return 'a transaction was begun (BEGIN) and neither committed nor rolled back'
    return None


def _driver_in_transaction(raw) -> bool:
    """Whether the DB-API connection is inside a transaction: psycopg's transaction status, sqlite3's
    in_transaction. A driver that says neither is taken as clean."""
    status = driver_transaction_status(raw)
    if status is not None:
        return status != IDLE
    in_transaction = getattr(raw, 'in_transaction', None)
    return in_transaction if isinstance(in_transaction, bool) else False


def replace_connection(alias: str) -> None:
    """Throw this thread's connection `alias` away, whatever state a task left it in (inside atomic()
    blocks, autocommit off, a transaction open), and let the next query open a fresh one. The DB-API
    connection is closed (the database rolls back what was not committed); the wrapper is dropped rather
    than closed, as Django's close() inside an atomic block leaves a wrapper that refuses every query."""
    connection = connections[alias]
    raw, connection.connection = connection.connection, None
    if raw is not None:
        try:
            raw.close()
        except Exception:  # a connection that is already broken: it is gone either way
            pass
    connection.run_on_commit = []
    del connections[alias]  # this thread's next connections[alias] is a new wrapper in a clean state


def reset_connections_left_in_transaction() -> dict[str, str]:
    """After a task: replace this thread's connections it left in a transaction, so carrot's own writes
    (the task's result) go to a connection in a known clean state. What the task did not commit is
    rolled back, as the database would on a disconnect. Returns {alias: how it was left} for the log."""
    found = {}
    for connection in connections.all(initialized_only=True):
        how = _replaced_if_left(connection)
        if how is not None:
            found[connection.alias] = how
    return found


def _replaced_if_left(connection) -> str | None:
    """Replace `connection` if it was left in a transaction or read-only, or is too broken to say; how it
    was left (None: clean, kept)."""
    try:
        how = left_in_transaction(connection)
        how = f'in a transaction ({how})' if how is not None else left_read_only(connection)
    except Exception as exc:
        how = f'in a state that could not be read ({type(exc).__name__})'
    if how is not None:
        replace_connection(connection.alias)
    return how


def left_read_only(connection) -> str | None:
    """How `connection`'s session was left read-only (a task's `SET default_transaction_read_only TO on`:
    every write on it would be refused, the next task's included), or None. PostgreSQL 14 and later report
    that setting to the client, so this asks nothing of the server; elsewhere the next write of carrot's
    finds out (DatabaseRetry)."""
    info = getattr(connection.connection, 'info', None) if connection.vendor == 'postgresql' else None
    status = getattr(info, 'parameter_status', None)  # psycopg 3
    if status is None or status('default_transaction_read_only') != 'on':
        return None
    return 'read-only (default_transaction_read_only on)'


class DatabaseRetry:
    """Runs database steps, waiting out transient faults. `should_give_up()` is asked between tries of an
    interruptible step: StopRequested then ends the wait."""

    def __init__(self, logger: logging.Logger, name: str, should_give_up: Callable[[], bool]):
        self.outage = Outage(logger, name, 'the database')
        self.should_give_up = should_give_up
        self.logger, self.name = logger, name

    def __call__(self, step: Callable, what: str, interruptible: bool = True):
        """`step()`'s result, after as many tries as a transient fault takes. Other errors propagate.

        A refusal for the session's sake (SQLSTATE class 25: a task that set the connection it shares with
        carrot read-only, say) is tried again at once on a fresh session, which has none of what the task
        set; refused there too, the server itself is read-only (a failover under way): waited out."""
        fresh_session = False
        while True:
            try:
                result = step()
            except DatabaseError as exc:
                if of_the_session(exc) and not fresh_session:
                    self.logger.warning('%s: %s: %s; trying again on a fresh database session', self.name, what,
                                        describe_database_fault(exc))
                    connections.close_all()
                    fresh_session = True
                    continue
                if not may_pass(exc):
                    raise
                connections.close_all()  # this thread's connections; a fresh one is opened next try
                delay = self.outage.failed(f'{what}: {describe_database_fault(exc)}', exc)
                if interruptible and self.should_give_up():
                    raise StopRequested from None
                self._sleep(delay, interruptible)
                continue
            self.outage.recovered()
            return result

    def _sleep(self, delay: float, interruptible: bool) -> None:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not (interruptible and self.should_give_up()):
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
