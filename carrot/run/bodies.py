"""The bodies of the supervisor's children: a consumer of one queue, the scheduler, and housekeeping.

They run in processes forked from the warm image (carrot/run/build.py): Django is set up and the task
modules are imported already; no connection was inherited, so each child opens its own database and
broker connections. Each reports what it does (idle / running a task) to the master over its heartbeat
pipe; the master puts that in its status snapshot.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

logger = logging.getLogger('carrot.worker')

MEMORY_JITTER = 0.1  # children recycle between 100% and 110% of the memory limit
TASKS_JITTER = 0.1   # ... and between 100% and 110% of max_tasks_per_child, so they don't all go at once


@dataclass(frozen=True)
class ChildOptions:
    """What a child needs besides its queue: the per-child limits, and where the master's snapshot is."""
    task_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # MiB of growth over the size after start-up
    status_file: str | None = None


# A task is shown as running (process title, the master's status) once it has run this long (seconds).
# Showing every task meant two titles and two reports to the master per task: a quarter of a consumer's
# time on a fast queue, and a wake-up of the master each time.
SHOW_RUNNING_AFTER = 0.2


def with_jitter(limit, fraction):
    return limit + random.uniform(0, fraction) * limit


def consumer_main(queue_name: str, options: ChildOptions, ctx) -> int:
    """Consume `queue_name` until the master asks this child to stop, or a limit recycles it."""
    import psutil
    from django.utils.module_loading import import_string

    from supervisor.procs import become_subreaper, end_descendants

    from carrot.config import get_config
    from carrot.exceptions import TaskTimeLimitExceeded

    queue = get_config().queue(queue_name)
    consumer_class = import_string(queue.consumer_class)
    consumer = consumer_class(queue.broker, queue, logging.getLogger('carrot.consumer'), ctx.slot)
    consumer.stopping = ctx.stopping
    consumer.task_time_limit = options.task_time_limit

    def on_status(text):
        delivery = consumer.delivery
        if delivery is not None and time.monotonic() - delivery.started < SHOW_RUNNING_AFTER:
            return  # a short task is never shown: the title and the master hear of the long ones
        ctx.set_title(text)
        if delivery is None:
            ctx.report('idle')
        else:
            ctx.report('running', delivery.task, delivery.message_id, time.monotonic() - delivery.started)

    consumer.on_status = on_status

    # Nothing a task starts outlives it: this child adopts whatever the task's processes orphan (a
    # double fork, a setsid daemon), and after each task every process still below it is killed.
    become_subreaper()

    def end_what_the_task_left():
        ended = end_descendants()
        if ended:
            logger.warning('%s: the task left %d process(es) running; killed: %s', ctx.slot, len(ended),
                           ', '.join(ended[:5]) + (' ...' if len(ended) > 5 else ''))

    consumer.after_task = end_what_the_task_left

    process = psutil.Process()
    baseline = process.memory_info().rss
    memory_limit = None
    if options.max_memory_per_child:
        memory_limit = with_jitter(options.max_memory_per_child * 1024 * 1024, MEMORY_JITTER)

    def on_tick():
        ctx.heartbeat()
        if not ctx.master_alive():  # where PR_SET_PDEATHSIG is missing; the message goes back to the queue
            logger.error('%s: the master is gone; exiting', ctx.slot)
            os._exit(1)
        if memory_limit and consumer.delivery is None and not ctx.stopping.is_set():
            growth = process.memory_info().rss - baseline
            if growth > memory_limit:
                logger.info('%s: grew by %.0f MiB (limit %s MiB); recycling', ctx.slot, growth / 2**20,
                            options.max_memory_per_child)
                ctx.stopping.set()

    consumer.on_tick = on_tick
    max_messages = None
    if options.max_tasks_per_child:
        max_messages = int(with_jitter(options.max_tasks_per_child, TASKS_JITTER))
    try:
        consumer.run(max_messages=max_messages)
    except TaskTimeLimitExceeded as exc:
        # The overrunning task's thread cannot be stopped; ending the process is what stops it.
        logger.error('%s: %s; this worker exits and is replaced', ctx.slot, exc)
        return 0
    finally:
        end_what_the_task_left()
    if max_messages is not None and consumer.messages_settled >= max_messages:
        logger.info('%s: ran %d tasks (max_tasks_per_child); recycling', ctx.slot, consumer.messages_settled)
    return 0


def scheduler_main(options: ChildOptions, ctx) -> int:
    """Publish due ScheduledTasks until the master asks this child to stop."""
    from carrot.consume.offload import Offload
    from carrot.schedule.scheduler import Scheduler

    scheduler = Scheduler(stopping=ctx.stopping)
    scheduler.offload = Offload('scheduler')
    ctx.report('idle')
    scheduler.on_tick = _beating(ctx, 'scheduler')
    scheduler.run()
    return 0


def housekeeping_main(options: ChildOptions, ctx) -> int:
    """This host's housekeeping (carrot.run.housekeeping) until the master asks this child to stop."""
    from carrot.consume.offload import Offload
    from carrot.run.housekeeping import Housekeeping, relay_duty, status_copy_duty, sweep_duty

    duties = [duty for duty in (relay_duty(), sweep_duty(), status_copy_duty(options.status_file))
              if duty is not None]
    housekeeping = Housekeeping(duties, stopping=ctx.stopping)
    housekeeping.offload = Offload('housekeeping')
    ctx.report('idle')
    housekeeping.on_tick = _beating(ctx, 'housekeeping')
    housekeeping.run()
    return 0


def _beating(ctx, name: str):
    """An on_tick for a loop child: heartbeat, and exit if the master is gone."""
    def on_tick():
        ctx.heartbeat()
        if not ctx.master_alive():  # where PR_SET_PDEATHSIG is missing
            logger.error('%s: the master is gone; exiting', name)
            os._exit(1)
    return on_tick
