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
from carrot.dbfaults import describe_database_fault, is_transient


class StopRequested(Exception):
    """The worker is stopping (or lost the delivery) while the database is down, before any claim."""


def drop_broken_connections() -> None:
    """Before each message, close this thread's connections that the last task left unusable (errors,
    autocommit switched off) or that outlived a positive CONN_MAX_AGE, so one task's mess does not fail
    the next message. Unlike Django's per-request close_old_connections(), the default CONN_MAX_AGE=0
    does not mean "reconnect for every message": a worker is not a request, and that would cost more
    than the task."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if connection.get_autocommit() != connection.settings_dict['AUTOCOMMIT'] or \
                (connection.errors_occurred and not connection.is_usable()):
            connection.close()
        elif connection.errors_occurred:
            connection.errors_occurred = False
        elif connection.settings_dict.get('CONN_MAX_AGE') and connection.close_at is not None \
                and time.monotonic() >= connection.close_at:
            connection.close()


class DatabaseRetry:
    """Runs database steps, waiting out transient faults. `should_give_up()` is asked between tries of an
    interruptible step: StopRequested then ends the wait."""

    def __init__(self, logger: logging.Logger, name: str, should_give_up: Callable[[], bool]):
        self.outage = Outage(logger, name, 'the database')
        self.should_give_up = should_give_up

    def __call__(self, step: Callable, what: str, interruptible: bool = True):
        """`step()`'s result, after as many tries as a transient fault takes. Other errors propagate."""
        while True:
            try:
                result = step()
            except DatabaseError as exc:
                if not is_transient(exc):
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
