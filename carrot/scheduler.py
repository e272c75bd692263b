"""Publishes each active ScheduledTask once per interval.

Every tick (1 s) re-reads the table, so creating, editing, pausing or deleting a schedule (in the
database, the admin or the monitor) takes effect within about a second, without a restart.

Runs are claimed with a compare-and-set on ``last_run_time`` (an UPDATE that only matches the value the
scheduler read), so when two schedulers on two hosts share a database, each due run is published once.

Timing: a new schedule runs at once, then once per interval, on the interval's grid (a run published a
little late, at the next tick, does not push the following runs later). After downtime there is no burst
of missed runs: a schedule overdue by a whole interval or more runs once, and the grid starts again from
that run.

Failures: a schedule whose broker cannot take the message gets its run back and is retried with a backoff
of its own (1 s, 2 s, 4 s ... at most MAX_RETRY_DELAY); a schedule that cannot be published at all (a task
that is not registered, a queue that is not configured, arguments that are not JSON) is logged and tried
again at its next interval. Neither holds up the other schedules. The database being down slows every
tick down the same way until it is back.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from django.db import DatabaseError, connections
from django.utils import timezone

from carrot.exceptions import CarrotConfigException, CarrotError, TaskNotRegistered
from carrot.helper_tasks import sync_cleanup_schedule
from carrot.models import ScheduledTask

logger = logging.getLogger('carrot.scheduler')

TICK = 1.0
MAX_RETRY_DELAY = 30.0  # while the broker or database is down, ticks slow down to this at most


class Scheduler:
    def __init__(self, stopping: threading.Event | None = None, tick: float = TICK):
        self.stopping = stopping or threading.Event()
        self.tick = tick
        self.on_tick: Callable[[], None] | None = None
        self.on_status: Callable[[str], None] | None = None
        self.published = 0
        self.failures = 0  # consecutive ticks that failed; slows retries while a service is down
        # Per schedule pk: (consecutive publish failures, monotonic time before which it is not retried).
        self.retries: dict[int, tuple[int, float]] = {}

    def run(self) -> None:
        """Publish due schedules until `stopping` is set."""
        logger.info('scheduler started')
        cleanup_synced = False
        while not self.stopping.is_set():
            if not cleanup_synced:  # until it succeeds: the database may be down at start
                cleanup_synced = self._guarded(sync_cleanup_schedule)
            self._guarded(self.publish_due)
            if self.on_tick is not None:
                self.on_tick()
            self._wait_for_next_tick()
        connections.close_all()
        logger.info('scheduler stopped after publishing %d run(s)', self.published)

    def _retry_delay(self) -> float:
        # The first retry is on the next tick, then 2 s, 4 s ...
        return min(self.tick * 2 ** (self.failures - 1), MAX_RETRY_DELAY) if self.failures else self.tick

    def _wait_for_next_tick(self) -> None:
        # Monotonic: a wall clock set back must not stall the scheduler while it keeps heartbeating.
        deadline = time.monotonic() + self._retry_delay()
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if self.on_tick is not None:
                self.on_tick()  # stay visibly alive to the supervisor while backing off
            self.stopping.wait(min(self.tick, max(0.0, deadline - time.monotonic())))

    def _guarded(self, step) -> bool:
        """Run one step; the broker or database being down is logged and retried on a later tick."""
        try:
            step()
        except (DatabaseError, CarrotError) as exc:
            self.failures += 1
            logger.error('scheduler: %s: %s; retrying in %.0fs', type(exc).__name__, exc, self._retry_delay())
            connections.close_all()  # a broken connection is re-opened on the next query
            return False
        self.failures = 0
        return True

    def publish_due(self) -> int:
        """Publish every schedule that is due now; returns how many were published."""
        now = timezone.now()
        published = 0
        schedules = list(ScheduledTask.objects.filter(active=True))
        for schedule in schedules:
            if not schedule.is_due(now) or self._backing_off(schedule):
                continue
            run_at = self.run_time(schedule, now)
            if self.claim(schedule, run_at):
                published += self.publish(schedule, claimed_at=run_at)
        if self.on_status is not None:
            self.on_status(f'{len(schedules)} active schedule(s), {self.published} run(s) published')
        return published

    @staticmethod
    def run_time(schedule: ScheduledTask, now):
        """The time this run stands for: its slot on the grid, or now when a whole interval was missed."""
        due = schedule.next_run_time()
        if due is None or now - due >= schedule.interval:
            return now
        return due

    @staticmethod
    def claim(schedule: ScheduledTask, run_at) -> bool:
        """Take this run: only one scheduler's UPDATE matches the last_run_time they all read."""
        claimed = ScheduledTask.objects.filter(pk=schedule.pk, active=True,
                                               last_run_time=schedule.last_run_time) \
            .update(last_run_time=run_at)
        return claimed == 1

    def _backing_off(self, schedule: ScheduledTask) -> bool:
        _, retry_at = self.retries.get(schedule.pk, (0, 0.0))
        return time.monotonic() < retry_at

    def publish(self, schedule: ScheduledTask, claimed_at) -> int:
        try:
            log = schedule.publish()
        except (TypeError, ValueError, TaskNotRegistered, CarrotConfigException) as exc:
            # The schedule itself is broken (a task that is not registered, a queue that is not
            # configured, bad arguments): retrying early would not help, and the other schedules go on.
            logger.error('scheduler: %r (%s) cannot be published: %s', schedule.task_name, schedule.task, exc)
            return 0
        except CarrotError as exc:
            # Give the run back so a later tick tries again, unless another scheduler ran it meanwhile.
            ScheduledTask.objects.filter(pk=schedule.pk, last_run_time=claimed_at) \
                .update(last_run_time=schedule.last_run_time)
            # Back off this schedule only, so one unreachable broker does not hold up the others.
            failures = self.retries.get(schedule.pk, (0, 0.0))[0] + 1
            delay = min(self.tick * 2 ** (failures - 1), MAX_RETRY_DELAY)
            self.retries[schedule.pk] = (failures, time.monotonic() + delay)
            logger.error('scheduler: %r (%s) could not be published: %s; retrying in %.0fs',
                         schedule.task_name, schedule.task, exc, delay)
            return 0
        self.retries.pop(schedule.pk, None)
        self.published += 1
        logger.info('scheduler: published %r (%s) as %s', schedule.task_name, schedule.task, log.uuid)
        return 1
