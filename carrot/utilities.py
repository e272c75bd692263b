"""The public helpers of django-carrot 1.x: publish a task, schedule one, look up a queue's broker.

A facade: the work is done in carrot.publishing (and carrot.config for brokers)."""
from __future__ import annotations

import json
from typing import Callable

from django.db import IntegrityError, transaction

from carrot import messages, publishing
from carrot.config import get_config
from carrot.exceptions import BrokerUnavailable, MessageRejected, PublishError
from carrot.models import MessageLog, ScheduledTask
from carrot.objects import Message, VirtualHost
from carrot.scheduler import MAX_INTERVAL


def validate_task(task: str | Callable) -> str:
    """The dotted path of `task` (a callable or a path), or TaskNotRegistered saying how to register it."""
    return publishing.task_name(task)


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
    outgoing = publishing.prepare(task, task_args, task_kwargs, queue=queue, exchange=exchange,
                                  routing_key=routing_key, priority=priority)
    return Message.from_outgoing(outgoing)


def publish_message(task: str | Callable, *task_args, priority: int = 0, queue: str | None = None,
                    exchange: str = '', routing_key: str | None = None, on_commit: bool = True,
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
    MessageRejected and the row says FAILED. Both are PublishError. The names priority, queue, exchange,
    routing_key and on_commit are not passed to the task.
    """
    return publishing.publish(task, task_args, task_kwargs, queue=queue, exchange=exchange,
                              routing_key=routing_key, priority=priority, on_commit=on_commit)


def create_scheduled_task(task: str | Callable, interval: dict, task_name: str | None = None,
                          queue: str | None = None, task_args: list | tuple = (), **kwargs) -> ScheduledTask:
    """Publish `task(*task_args, **kwargs)` every interval, e.g. ``{'seconds': 5}`` or ``{'hours': 1}``."""
    path = validate_task(task)
    if not isinstance(interval, dict) or len(interval) != 1:
        raise ValueError(f"interval must be a dict with one key, e.g. {{'seconds': 5}}, got {interval!r}")
    (interval_type, interval_count), = interval.items()
    if interval_type not in ScheduledTask.SECONDS_PER:
        raise ValueError(f'interval unit must be one of {", ".join(ScheduledTask.SECONDS_PER)}, '
                         f'got {interval_type!r}')
    if isinstance(interval_count, bool) or not isinstance(interval_count, int) or interval_count < 1:
        raise ValueError(f'interval count must be a positive integer, got {interval_count!r}')
    if interval_count * ScheduledTask.SECONDS_PER[interval_type] > MAX_INTERVAL.total_seconds():
        raise ValueError(f'interval {interval_count} {interval_type} is longer than the longest allowed '
                         f'({MAX_INTERVAL.days} days)')
    messages.check_serialisable(path, tuple(task_args), kwargs)
    queue_name = get_config().queue(queue).name
    publishing.encode(path, tuple(task_args), kwargs)  # MessageTooLarge now, not at every run
    try:
        with transaction.atomic(using=ScheduledTask.objects.db):
            return ScheduledTask.objects.create(
                task=path, task_name=task_name or path, interval_type=interval_type,
                interval_count=interval_count, queue=queue_name, routing_key=queue_name,
                task_args=json.dumps(list(task_args)), content=json.dumps(kwargs))
    except IntegrityError:
        raise IntegrityError(f'a ScheduledTask named {task_name or path!r} already exists; pass a unique '
                             f'task_name') from None


__all__ = ['publish_message', 'create_message', 'create_scheduled_task', 'validate_task',
           'get_host_from_name', 'PublishError', 'BrokerUnavailable', 'MessageRejected']
