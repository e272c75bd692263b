"""Housekeeping: the duties every carrot-supervisor host has besides consuming and scheduling.

One `housekeeping` child per supervisor, whatever it consumes and whether it runs a scheduler:

- the relay: messages left WAITING for the broker (an outage, a web process that died before its
  after-commit send) are sent (carrot.publish.relay), a bounded batch per tick;
- the sweep: scheduled messages overdue by more than CARROT['delay_sweep_after'] seconds (their copy in
  the delay levels was lost) are sent again under the same uuid (carrot.publish.sweep);
- the status copy: the master's status snapshot goes into the SupervisorStatus table every few seconds,
  so the monitor's Workers tab shows every host.

Each duty backs off on its own while the database or the broker is down and logs one line per change of
state, and a reminder every ten minutes while it keeps failing; one duty failing never stops the others.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from django.db import DatabaseError, connections

from carrot.backoff import Backoff
from carrot.exceptions import CarrotError

logger = logging.getLogger('carrot.housekeeping')

TICK = 1.0
SNAPSHOT_EVERY = 5.0  # seconds between copies of the master's status snapshot into the database
SWEEP_EVERY = 10.0    # seconds between looks for overdue scheduled rows
MAX_DUTY_BACKOFF = 30.0
STILL_FAILING_EVERY = 600.0  # seconds between reminders that a duty is still failing (its first line scrolls away)


@dataclass
class Duty:
    """One thing housekeeping does every `every` seconds, with a backoff of its own after a failure."""
    name: str
    run: Callable[[], object]
    every: float = TICK
    next_run: float = 0.0
    failing: bool = False
    failing_since: float = 0.0
    reminded: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=TICK, cap=MAX_DUTY_BACKOFF))

    def due(self, now: float) -> bool:
        return now >= self.next_run

    def perform(self, now: float) -> None:
        try:
            self.run()
        except Exception as exc:  # noqa: BLE001 -- one duty failing never stops the others (nor the child)
            delay = self.backoff.next_delay()
            self.next_run = now + delay
            if not self.failing:
                if isinstance(exc, (DatabaseError, CarrotError, OSError)):  # an outage: one line says it
                    logger.warning('housekeeping: %s failed (%s: %s); retrying with backoff', self.name,
                                   type(exc).__name__, exc)
                else:  # a bug: its traceback, once per failing streak
                    logger.exception('housekeeping: %s failed unexpectedly; retrying with backoff', self.name)
                self.failing_since = self.reminded = now
            elif now - self.reminded >= STILL_FAILING_EVERY:
                logger.warning('housekeeping: %s still fails after %.0f s (%s: %s); retrying with backoff',
                               self.name, now - self.failing_since, type(exc).__name__, exc)
                self.reminded = now
            self.failing = True
            connections.close_all()  # a broken connection is re-opened on the next query
            return
        if self.failing:
            logger.info('housekeeping: %s works again', self.name)
        self.failing = False
        self.backoff.reset()
        self.next_run = now + self.every


class Housekeeping:
    def __init__(self, duties: list[Duty], stopping: threading.Event | None = None, tick: float = TICK):
        self.duties = duties
        self.stopping = stopping or threading.Event()
        self.tick = tick
        self.on_tick: Callable[[], None] | None = None
        self.offload = None  # a carrot.consume.offload.Offload: duties off the heartbeating thread

    def run(self) -> None:
        """Perform the duties that are due, every tick, until `stopping` is set. With `offload` (the
        supervisor's housekeeping child), each duty runs on its thread while this one goes on calling
        on_tick: a locked table slows a duty down, it never makes the child look hung."""
        logger.info('housekeeping started: %s', ', '.join(duty.name for duty in self.duties))
        while not self.stopping.is_set():
            now = time.monotonic()
            for duty in self.duties:
                if duty.due(now) and not self.stopping.is_set():
                    if self.offload is None:
                        duty.perform(now)
                    else:
                        self.offload.call(duty.perform, now, on_tick=self.on_tick)
                if self.on_tick is not None:
                    self.on_tick()
            self.stopping.wait(self.tick)
        if self.offload is not None:
            self.offload.close()
        else:
            connections.close_all()
        logger.info('housekeeping stopped')


def relay_duty() -> Duty:
    from carrot.publish.relay import Relay

    relay = Relay()
    return Duty('relaying messages that wait for the broker', relay.relay_waiting)


def sweep_duty() -> Duty:
    from carrot.publish.sweep import Sweep

    sweep = Sweep()
    return Duty('sending overdue scheduled messages again', sweep.sweep_overdue, every=SWEEP_EVERY)


def status_copy_duty(path: str | None) -> Duty | None:
    """Copies the master's status file into the database; None when the master writes none."""
    if not path:
        return None
    from carrot.run.status import read_snapshot, store_snapshot

    def copy():
        document = read_snapshot(path)
        if document is not None:
            store_snapshot(document)

    return Duty('copying the supervisor status to the database', copy, every=SNAPSHOT_EVERY)
