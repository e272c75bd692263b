"""Publishes each active ScheduledTask once per interval.

Every tick (1 s) re-reads the table, so creating, editing, pausing or deleting a schedule (in the
database, the admin or the monitor) takes effect within about a second, without a restart.

Runs are claimed with a compare-and-set on ``last_run_time`` (an UPDATE that only matches the value the
scheduler read), so when two schedulers on two hosts share a database, each due run is published once.

Timing: a new schedule runs at once, then once per interval, on the interval's grid (a run published a
little late, at the next tick, does not push the following runs later). After downtime there is no burst
of missed runs: a schedule overdue by a whole interval or more runs once, and the grid starts again from
that run.

Broken schedules: a row that cannot be published as it stands (anything carrot.schedule.rules refuses,
a message over CARROT['max_message_size'], or one the broker refuses for good) is skipped. Its `problem` field says why
(the admin and the monitor show it) and one line is logged when the problem appears or changes, and one
when it is fixed, not one per tick. The other schedules are not delayed by it.

Broker outages: a schedule whose broker cannot take the message gets its run back and is retried with a
backoff of its own (1 s, 2 s, 4 s ... at most MAX_RETRY_DELAY); runs are not stored and forwarded, so an
outage never ends in a burst of missed runs. The database being down slows every tick down the same way
until it is back.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Callable

from django.db import DatabaseError, connections
from django.utils import timezone

from carrot.backoff import Backoff
from carrot.exceptions import BrokerUnavailable, CarrotError, MessageRejected
from carrot.models import MessageLog, ScheduledTask
from carrot.publish import arguments, outbox
from carrot.publish.outgoing import Outgoing, prepare
from carrot.schedule.builtin import sync_cleanup_schedule
from carrot.schedule.rules import check_schedule
from carrot.text import for_log

logger = logging.getLogger('carrot.scheduler')

TICK = 1.0
MAX_RETRY_DELAY = 30.0  # while the broker or database is down, ticks slow down to this at most
# A last run this far in the future is an edit or a clock gone wrong, not another host's clock being a little
# ahead: the schedule would silently not run until then.
CLOCK_TOLERANCE = timedelta(minutes=5)
REFUSED = 'the broker refused the last run: '  # how a schedule's problem starts when RabbitMQ refused it


def prepare_run(schedule: ScheduledTask, priority: int = 0) -> Outgoing:
    """The message of one run of `schedule`, checked; raises one of outbox.UNSENDABLE when the row is
    broken (carrot.schedule.rules says why)."""
    check_schedule(schedule)
    args, kwargs = arguments.load_scheduled(schedule.task_args, schedule.content)
    return prepare(schedule.task, args, kwargs, queue=schedule.queue or None, exchange=schedule.exchange or '',
                   routing_key=schedule.routing_key or None, priority=priority)


def publish_run(schedule: ScheduledTask, priority: int = 0, store_and_forward: bool | None = None) -> MessageLog:
    """Publish one run of `schedule` now (ScheduledTask.publish(), the admin's and the monitor's "run now")."""
    return outbox.enqueue(prepare_run(schedule, priority), store_and_forward=store_and_forward)


def schedule_problem(schedule: ScheduledTask) -> str:
    """Why the scheduler would skip `schedule` as it stands ('' when it would publish it). The broker is not
    asked: a refusal by the broker shows only once a run was tried."""
    try:
        prepare_run(schedule)
    except outbox.UNSENDABLE as exc:
        return str(exc)
    return ''


class Scheduler:
    def __init__(self, stopping: threading.Event | None = None, tick: float = TICK):
        self.stopping = stopping or threading.Event()
        self.tick = tick
        self.on_tick: Callable[[], None] | None = None
        self.on_status: Callable[[str], None] | None = None
        self.published = 0
        # Ticks slow down while the database or broker is down (the first retry is on the next tick).
        self.tick_backoff = Backoff(base=tick, cap=MAX_RETRY_DELAY, jitter=False)
        self.next_wait = tick
        # Per schedule pk, while its broker cannot take its runs: when to try it again.
        self.retries: dict[int, Backoff] = {}
        self.offload = None  # a carrot.consume.offload.Offload: database steps off the heartbeating thread

    def run(self) -> None:
        """Publish due schedules until `stopping` is set. With `offload` (carrot.consume.offload.Offload, as the
        supervisor's scheduler child has), every database step runs on its thread while this one goes on
        calling on_tick: a lock on the log table never makes the scheduler look hung."""
        logger.info('scheduler started')
        cleanup_synced = False
        while not self.stopping.is_set():
            if not cleanup_synced:  # until it succeeds: the database may be down at start
                cleanup_synced = self._step(sync_cleanup_schedule)
            self._step(self.publish_due)
            if self.on_tick is not None:
                self.on_tick()
            self._wait_for_next_tick()
        if self.offload is not None:
            self.offload.close()
        else:
            connections.close_all()
        logger.info('scheduler stopped after publishing %d run(s)', self.published)

    def _step(self, step) -> bool:
        if self.offload is None:
            return self._guarded(step)
        return self.offload.call(self._guarded, step, on_tick=self.on_tick)

    def _wait_for_next_tick(self) -> None:
        # Monotonic: a wall clock set back must not stall the scheduler while it keeps heartbeating.
        deadline = time.monotonic() + self.next_wait
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if self.on_tick is not None:
                self.on_tick()  # stay visibly alive to the supervisor while backing off
            self.stopping.wait(min(self.tick, max(0.0, deadline - time.monotonic())))

    def _guarded(self, step) -> bool:
        """Run one step; the broker or database being down is logged and retried on a later tick."""
        try:
            step()
        except (DatabaseError, CarrotError) as exc:
            self.next_wait = self.tick_backoff.next_delay()
            logger.error('scheduler: %s: %s; retrying in %.0fs', type(exc).__name__, exc, self.next_wait)
            connections.close_all()  # a broken connection is re-opened on the next query
            return False
        self.tick_backoff.reset()
        self.next_wait = self.tick
        return True

    def publish_due(self) -> int:
        """Publish every schedule that is due now; returns how many were published."""
        now = timezone.now()
        published = 0
        schedules = list(ScheduledTask.objects.filter(active=True))
        for schedule in schedules:
            try:
                published += self.publish_if_due(schedule, now)
            except DatabaseError:
                raise  # the whole tick fails and is retried
            except Exception as exc:  # noqa: BLE001 -- whatever this row does, the others go on
                self.record_problem(schedule, f'unexpected error: {type(exc).__name__}: {exc}', exc_info=True)
        if self.on_status is not None:
            self.on_status(f'{len(schedules)} active schedule(s), {self.published} run(s) published')
        return published

    def publish_if_due(self, schedule: ScheduledTask, now) -> int:
        try:
            message = prepare_run(schedule)
        except outbox.UNSENDABLE as exc:
            self.record_problem(schedule, str(exc))
            return 0
        if schedule.last_run_time and schedule.last_run_time > now + CLOCK_TOLERANCE:
            self.record_problem(schedule, f'its last run time {schedule.last_run_time:%Y-%m-%d %H:%M:%S} is in the '
                                          f'future, so it would not run until then; clear it to run it now')
            return 0
        if not (schedule.problem or '').startswith(REFUSED):  # a refusal stands until a run goes through
            self.record_problem(schedule, '')
        if not schedule.is_due(now) or self._backing_off(schedule):
            return 0
        run_at = self.run_time(schedule, now)
        if not self.claim(schedule, run_at):
            return 0
        return self.publish(schedule, claimed_at=run_at, message=message)

    @staticmethod
    def record_problem(schedule: ScheduledTask, problem: str, exc_info: bool = False) -> None:
        """Store why `schedule` is skipped ('' once it is fine); log only when that changes."""
        if problem == (schedule.problem or ''):
            return
        ScheduledTask.objects.filter(pk=schedule.pk).update(problem=problem)
        if problem:
            logger.error('scheduler: %s (%s) is skipped until it is fixed: %s', *schedule_label(schedule),
                         for_log(problem), exc_info=exc_info)
        else:
            logger.info('scheduler: %s (%s) is fixed and runs again', *schedule_label(schedule))
        schedule.problem = problem

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
        return schedule.pk in self.retries and self.retries[schedule.pk].waiting()

    def publish(self, schedule: ScheduledTask, claimed_at, message: Outgoing | None = None) -> int:
        try:
            # Not stored and forwarded: a run the broker cannot take is given back (below), so an
            # outage does not end in a burst of every run missed meanwhile.
            log = outbox.enqueue(message or prepare_run(schedule), store_and_forward=False)
        except MessageRejected as exc:
            # Refused for good (unroutable, no such exchange, a queue clash): the run is spent, and the
            # schedule is marked until one of its runs goes through.
            self.record_problem(schedule, f'{REFUSED}{exc}')
            return 0
        except outbox.UNSENDABLE as exc:  # broken since it was checked a moment ago
            self.record_problem(schedule, str(exc))
            return 0
        except (BrokerUnavailable, CarrotError) as exc:
            # Give the run back so a later tick tries again, unless another scheduler ran it meanwhile.
            ScheduledTask.objects.filter(pk=schedule.pk, last_run_time=claimed_at) \
                .update(last_run_time=schedule.last_run_time)
            # Back off this schedule only, so one unreachable broker does not hold up the others.
            backoff = self.retries.setdefault(schedule.pk, Backoff(base=self.tick, cap=MAX_RETRY_DELAY,
                                                                   jitter=False))
            delay = backoff.wait_next()
            logger.error('scheduler: %s (%s) could not be published: %s; retrying in %.0fs',
                         *schedule_label(schedule), for_log(exc), delay)
            return 0
        self.retries.pop(schedule.pk, None)
        self.record_problem(schedule, '')
        self.published += 1
        # The run's slot and the claim's base say, when two hosts' schedulers share a database, which run
        # each one published.
        logger.info('scheduler: published %s (%s) as %s, the run of %s (claimed after %s)', *schedule_label(schedule),
                    log.uuid, _moment(claimed_at), _moment(schedule.last_run_time))
        return 1


def _moment(value) -> str:
    return value.isoformat(timespec='milliseconds') if value is not None else 'no run before'


def schedule_label(schedule: ScheduledTask) -> tuple[str, str]:
    """A schedule's name and task for a log line: anyone with the admin or the table writes them."""
    return for_log(repr(schedule.task_name)), for_log(schedule.task)
