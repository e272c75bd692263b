"""The public helpers of django-carrot 1.x: publish a task, schedule one, look up a queue's broker.

A facade: the work is done in carrot.publish.outbox (and carrot.config for brokers)."""
from __future__ import annotations

from datetime import datetime
from typing import Callable

from django.db import IntegrityError, transaction

from carrot.config import get_config
from carrot.exceptions import BrokerUnavailable, InvalidSchedule, MessageRejected, PublishError
from carrot.models import MessageLog, ScheduledTask
from carrot.objects import Message, VirtualHost
from carrot.publish import arguments, outbox
from carrot.publish.outgoing import encode, prepare, task_name
from carrot.schedule import rules


def validate_task(task: str | Callable) -> str:
    """The dotted path of `task` (a callable or a path), or TaskNotRegistered saying how to register it."""
    return task_name(task)


def get_host_from_name(name: str | None) -> VirtualHost:
    """The broker of queue `name`; no name means the default broker."""
    config = get_config()
    broker = config.queue(name).broker if name else config.default_broker
    return VirtualHost.from_config(broker)


def create_message(task: str | Callable, priority: int = 0, task_args: tuple = (), queue: str | None = None,
                   exchange: str = '', routing_key: str | None = None,
                   task_kwargs: dict | None = None) -> Message:
    """A checked, unpublished Message: the task is registered, the arguments JSON, the priority in range,
    the encoded message within CARROT['max_message_size']."""
    outgoing = prepare(task, task_args, task_kwargs, queue=queue, exchange=exchange,
                                  routing_key=routing_key, priority=priority)
    return Message.from_outgoing(outgoing)


def publish_message(task: str | Callable, *task_args, priority: int = 0, queue: str | None = None,
                    exchange: str = '', routing_key: str | None = None, on_commit: bool = True,
                    run_after: datetime | None = None, countdown: float | None = None,
                    **task_kwargs) -> MessageLog:
    """Put `task(*task_args, **task_kwargs)` on a queue and log it; returns the MessageLog.

    The call is checked first (registered task, JSON arguments, priority 0-255, a configured queue, at
    most CARROT['max_message_size'] bytes encoded); nothing is written if it fails. Then the log row is
    written and the message sent: inside ``transaction.atomic()`` when the transaction commits (nothing
    is sent if it rolls back; pass ``on_commit=False`` to send at once), otherwise before this returns,
    once RabbitMQ has confirmed it (status PUBLISHED).

    When RabbitMQ cannot take the message now, the row says WAITING and carrot-supervisor's scheduler
    relays it later (store-and-forward, the default); with CARROT['store_and_forward'] = False the row
    says FAILED and BrokerUnavailable is raised. A message the broker refuses for good raises
    MessageRejected and the row says FAILED. Both are PublishError.

    ``run_after`` (an aware datetime) or ``countdown`` (seconds) delays the task: the row says SCHEDULED
    until then and the message waits in RabbitMQ's delay levels (see README.rst, "Delayed tasks"). The
    names priority, queue, exchange, routing_key, on_commit, run_after and countdown are not passed to
    the task.
    """
    return outbox.publish(task, task_args, task_kwargs, queue=queue, exchange=exchange,
                          routing_key=routing_key, priority=priority, on_commit=on_commit,
                          run_after=run_after, countdown=countdown)


def publish_messages(task: str | Callable, calls, queue: str | None = None, priority: int = 0,
                     on_commit: bool = True) -> list[MessageLog]:
    """Publish `task` once for each ``(args, kwargs)`` pair of `calls` -- e.g. ``publish_messages(send_mail,
    [((1,), {}), ((2,), {'urgent': True})], queue='mail')`` -- much faster than as many publish_message
    calls: the rows are written in one INSERT per thousand, and RabbitMQ's confirms are awaited together.

    Every call is checked first (InvalidCall names the entry that is wrong); then the rows (WAITING) and,
    as for publish_message, the messages sent now or when the surrounding transaction commits. Returns
    the rows, in the order of `calls`. What RabbitMQ cannot take now waits in its rows for the relay
    (CARROT['store_and_forward']); a refusal for good marks that batch's rows FAILED and raises."""
    return outbox.publish_many(task, calls, queue=queue, priority=priority, on_commit=on_commit)


def create_scheduled_task(task: str | Callable, interval: dict, task_name: str | None = None,
                          queue: str | None = None, task_args: list | tuple = (), **kwargs) -> ScheduledTask:
    """Publish `task(*task_args, **kwargs)` every interval, e.g. ``{'seconds': 5}`` or ``{'hours': 1}``.

    Held to the same rules as a schedule saved in the admin or the monitor (carrot.schedule.rules):
    InvalidCall (a ValueError) says what is wrong; nothing is saved then."""
    path = validate_task(task)
    if not isinstance(interval, dict) or len(interval) != 1:
        raise InvalidSchedule(f"interval must be a dict with one key, e.g. {{'seconds': 5}}, got {interval!r}")
    (interval_type, interval_count), = interval.items()
    # NotSerialisable names an argument JSON cannot carry; MessageTooLarge now, not at every run.
    encode(path, tuple(task_args), kwargs)
    stored_args, stored_kwargs = arguments.dump(task_args, kwargs)
    queue_name = get_config().queue(queue).name
    schedule = ScheduledTask(task=path, task_name=task_name or path, interval_type=interval_type,
                             interval_count=interval_count, queue=queue_name, routing_key=queue_name,
                             task_args=stored_args, content=stored_kwargs)
    rules.check_schedule(schedule)
    try:
        with transaction.atomic(using=ScheduledTask.objects.db):
            schedule.save(force_insert=True)
            return schedule
    except IntegrityError:
        raise IntegrityError(f'a ScheduledTask named {task_name or path!r} already exists; pass a unique '
                             f'task_name') from None


__all__ = ['publish_message', 'create_message', 'create_scheduled_task', 'validate_task',
           'get_host_from_name', 'PublishError', 'BrokerUnavailable', 'MessageRejected']
