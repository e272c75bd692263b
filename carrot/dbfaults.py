"""Telling database faults apart: the ones waiting may cure, and the ones that mean "run migrate".

Used by the workers (carrot.consume.dbretry waits the transient ones out) and by publishing (a publish
before `migrate` says so, rather than "no such table").
"""
from __future__ import annotations

from django.db import InterfaceError, OperationalError, ProgrammingError

from carrot import text

MIGRATE_HINT = 'run manage.py migrate'

# PostgreSQL SQLSTATEs that mean "the tables are not usable now", not "this row is bad".
_TRANSIENT_SQLSTATES = {'42P01',  # undefined_table (not migrated, renamed)
                        '42703',  # undefined_column (migrations behind the code)
                        '42501'}  # insufficient_privilege (grants being changed)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (Django's, or the driver's it wraps): psycopg 3 says `sqlstate`,
    psycopg2 `pgcode`; None when it has none."""
    cause = exc.__cause__ or exc
    return getattr(cause, 'sqlstate', None) or getattr(cause, 'pgcode', None)


def is_transient(exc: BaseException) -> bool:
    """A database fault that waiting may cure (unreachable, restarting, locked, tables missing)."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, ProgrammingError):
        return getattr(exc.__cause__, 'sqlstate', None) in _TRANSIENT_SQLSTATES
    return False


def of_the_session(exc: BaseException) -> bool:
    """Whether `exc` is about the state of the session that ran the statement, not about the statement or
    its row (SQLSTATE class 25, invalid transaction state: a transaction that already failed, a session set
    read-only): another session -- a worker's -- would not meet it."""
    return (sqlstate(exc) or '').startswith('25')


def may_pass(exc: BaseException) -> bool:
    """Whether another try may succeed where this one failed: the fault passes with time (is_transient) or
    belongs to the session that met it (of_the_session), not to the statement or its row."""
    return is_transient(exc) or of_the_session(exc)


def tables_missing(exc: BaseException) -> bool:
    """Whether `exc` says one of the tables (or columns) is not there: migrations not applied."""
    if getattr(exc.__cause__, 'sqlstate', None) in ('42P01', '42703'):
        return True
    message = str(exc)
    return 'no such table' in message or 'no such column' in message or \
        ('does not exist' in message and ('relation' in message or 'column' in message))


def describe_database_fault(exc: BaseException) -> str:
    message = text.for_log(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 200)
    if 'no such table' in message or 'does not exist' in message:
        return f'{message}; are the carrot tables migrated? {MIGRATE_HINT}'
    return f'{type(exc).__name__}: {message}'
