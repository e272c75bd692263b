"""A loop's database steps on a thread of their own, so the loop that heartbeats never waits on the database.

A lock on carrot's tables held longer than the supervisor's heartbeat timeout (a plain CREATE INDEX, many
migrations, VACUUM FULL) blocks every query on them. A child whose loop waited in such a query would stop
heartbeating and be killed as hung. With `Offload`, the loop hands each step to one worker thread (which
keeps its own database connection from step to step) and, while it waits, goes on calling `on_tick`
(the heartbeat): a child is killed only when its loop itself stops turning.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from django.db import connections

logger = logging.getLogger('carrot.worker')

POLL = 0.5  # seconds between two heartbeats while a step runs


class Offload:
    """One worker thread for the database steps of one loop."""

    def __init__(self, name: str, poll: float = POLL):
        self.name = name
        self.poll = poll
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f'carrot-{name}-db')

    def call(self, step: Callable, *args, on_tick: Callable[[], None] | None = None):
        """`step(*args)` in the worker thread; returns its result (or raises its exception) once done,
        calling `on_tick()` every `poll` seconds meanwhile."""
        future = self._executor.submit(step, *args)
        while True:
            try:
                return future.result(timeout=self.poll)
            except TimeoutError:
                if on_tick is not None:
                    on_tick()

    def submit(self, step: Callable, *args):
        """`step(*args)` in the worker thread, without waiting: the Future."""
        return self._executor.submit(step, *args)

    def close(self, timeout: float = 10.0) -> None:
        """Close the worker thread's database connections (from that thread) and let it end. A step still
        waiting on the database is not waited for beyond `timeout`: the process is ending."""
        try:
            self._executor.submit(connections.close_all).result(timeout=timeout)
        except Exception:  # a step still blocked, or a dead connection: the process ends anyway
            logger.debug('%s: database connections not closed cleanly', self.name, exc_info=True)
        self._executor.shutdown(wait=False)
