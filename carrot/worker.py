"""The bodies of the supervisor's children: a consumer of one queue, and the scheduler.

The master imports this module but none of what it uses: each child sets Django up after the fork, so
it runs the project's current code and opens its own database and broker connections.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

logger = logging.getLogger('carrot.worker')

MEMORY_JITTER = 0.1  # children recycle between 100% and 110% of the memory limit
TASKS_JITTER = 0.1   # ... and between 100% and 110% of max_tasks_per_child, so they don't all go at once


@dataclass(frozen=True)
class WorkerOptions:
    """What a child needs besides its queue: settings module and the per-child limits."""
    settings_module: str
    task_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # MiB of growth over the size after start-up
    loglevel: str = 'INFO'


def setup_django(options: WorkerOptions) -> None:
    os.environ['DJANGO_SETTINGS_MODULE'] = options.settings_module
    import django
    django.setup()
    # Django applies LOGGING with dictConfig, whose default disable_existing_loggers=True silences every
    # logger created before it -- carrot's and the supervisor's among them, as this process imported
    # them before the fork. Their lines are what tells an operator what the workers did.
    for name, existing in logging.root.manager.loggerDict.items():
        if isinstance(existing, logging.Logger) and name.split('.')[0] in ('carrot', 'supervisor'):
            existing.disabled = False
    logging.getLogger('carrot').setLevel(options.loglevel)


def with_jitter(limit, fraction):
    return limit + random.uniform(0, fraction) * limit


def consumer_main(queue_name: str, options: WorkerOptions, ctx) -> int:
    """Consume `queue_name` until the master asks this child to stop, or a limit recycles it."""
    setup_django(options)
    import psutil
    from django.utils.module_loading import import_string

    from carrot.config import get_config
    from carrot.exceptions import TaskTimeLimitExceeded

    queue = get_config().queue(queue_name)
    consumer_class = import_string(queue.consumer_class)
    consumer = consumer_class(queue.broker, queue, logging.getLogger('carrot.consumer'), ctx.slot)
    consumer.stopping = ctx.stopping
    consumer.task_time_limit = options.task_time_limit
    consumer.on_status = ctx.set_title

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
    if max_messages is not None and consumer.messages_settled >= max_messages:
        logger.info('%s: ran %d tasks (max_tasks_per_child); recycling', ctx.slot, consumer.messages_settled)
    return 0


def scheduler_main(options: WorkerOptions, ctx) -> int:
    """Publish due ScheduledTasks until the master asks this child to stop."""
    setup_django(options)
    from carrot.scheduler import Scheduler

    scheduler = Scheduler(stopping=ctx.stopping)

    def on_tick():
        ctx.heartbeat()
        if not ctx.master_alive():
            logger.error('scheduler: the master is gone; exiting')
            os._exit(1)

    scheduler.on_tick = on_tick
    scheduler.run()
    return 0
