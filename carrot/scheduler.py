"""Publishes each active ScheduledTask once per interval.

Every tick (1 s) re-reads the table, so creating, editing, pausing or deleting a schedule (in the
database, the admin or the monitor) takes effect within about a second, without a restart.

Runs are claimed with a compare-and-set on ``last_run_time`` (an UPDATE that only matches the value the
scheduler read), so when two schedulers on two hosts share a database, each due run is published once.

Timing: a new schedule runs at once, then every interval after the previous run. After downtime there is
no burst of missed runs: an overdue schedule runs once, and the next run is one interval after that.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from django.db import DatabaseError, connections
from django.utils import timezone

from carrot.exceptions import CarrotError
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

    def run(self) -> None:
        """Publish due schedules until `stopping` is set."""
        from carrot.helper_tasks import sync_cleanup_schedule
        logger.info('scheduler started')
        self._guarded(sync_cleanup_schedule)
        while not self.stopping.is_set():
            self._guarded(self.publish_due)
            if self.on_tick is not None:
                self.on_tick()
            self._wait_for_next_tick()
        connections.close_all()
        logger.info('scheduler stopped after publishing %d run(s)', self.published)

    def _wait_for_next_tick(self) -> None:
        delay = min(self.tick * 2 ** self.failures, MAX_RETRY_DELAY) if self.failures else self.tick
        deadline = timezone.now().timestamp() + delay
        while not self.stopping.is_set() and timezone.now().timestamp() < deadline:
            if self.on_tick is not None:
                self.on_tick()  # stay visibly alive to the supervisor while backing off
            self.stopping.wait(min(self.tick, max(0.0, deadline - timezone.now().timestamp())))

    def _guarded(self, step) -> None:
        """Run one step; the broker or database being down is logged and retried on a later tick."""
        try:
            step()
        except (DatabaseError, CarrotError) as exc:
            self.failures += 1
            logger.error('scheduler: %s: %s; retrying in %.0fs', type(exc).__name__, exc,
                         min(self.tick * 2 ** self.failures, MAX_RETRY_DELAY))
            connections.close_all()  # a broken connection is re-opened on the next query
        else:
            self.failures = 0

    def publish_due(self) -> int:
        """Publish every schedule that is due now; returns how many were published."""
        now = timezone.now()
        published = 0
        schedules = list(ScheduledTask.objects.filter(active=True))
        for schedule in schedules:
            if schedule.is_due(now) and self.claim(schedule, now):
                published += self.publish(schedule, claimed_at=now)
        if self.on_status is not None:
            self.on_status(f'{len(schedules)} active schedule(s), {self.published} run(s) published')
        return published

    @staticmethod
    def claim(schedule: ScheduledTask, now) -> bool:
        """Take this run: only one scheduler's UPDATE matches the last_run_time they all read."""
        claimed = ScheduledTask.objects.filter(pk=schedule.pk, active=True,
                                               last_run_time=schedule.last_run_time) \
            .update(last_run_time=now)
        return claimed == 1

    def publish(self, schedule: ScheduledTask, claimed_at) -> int:
        try:
            log = schedule.publish()
        except (TypeError, ValueError) as exc:  # the schedule itself is broken: it is not retried early
            logger.error('scheduler: %r (%s) cannot be published: %s', schedule.task_name, schedule.task, exc)
            return 0
        except CarrotError:
            # Give the run back so a later tick tries again, unless another scheduler ran it meanwhile.
            ScheduledTask.objects.filter(pk=schedule.pk, last_run_time=claimed_at) \
                .update(last_run_time=schedule.last_run_time)
            raise
        self.published += 1
        logger.info('scheduler: published %r (%s) as %s', schedule.task_name, schedule.task, log.uuid)
        return 1


def run_scheduler(stopping: threading.Event | None = None) -> None:
    Scheduler(stopping).run()
