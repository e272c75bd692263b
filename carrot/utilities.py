"""The public helpers: publish a task, schedule one, look up a queue's broker."""
from __future__ import annotations

import json
import logging
from typing import Callable

from django.db import IntegrityError, transaction
from django.utils import timezone

from carrot import messages, registry
from carrot.broker import publisher_for
from carrot.config import get_config
from carrot.exceptions import CarrotError, PublishError
from carrot.models import MessageLog, ScheduledTask
from carrot.objects import Message, VirtualHost

logger = logging.getLogger('carrot')


def validate_task(task: str | Callable) -> str:
    """The dotted path of `task` (a callable or a path), or TaskNotRegistered saying how to register it."""
    path = task if isinstance(task, str) else registry.task_path(task)
    registry.get_task(path)
    return path


def get_host_from_name(name: str | None) -> VirtualHost:
    """The broker of queue `name`; no name means the default broker."""
    config = get_config()
    broker = config.queue(name).broker if name else config.default_broker
    return VirtualHost.from_config(broker)


def create_message(task: str | Callable, priority: int = 0, task_args: tuple = (), queue: str | None = None,
                   exchange: str = '', routing_key: str | None = None,
                   task_kwargs: dict | None = None) -> Message:
    """A validated, unpublished Message: the task is registered, the arguments JSON, the priority in range."""
    path = validate_task(task)
    task_kwargs = dict(task_kwargs or {})
    messages.check_serialisable(path, tuple(task_args), task_kwargs)
    messages.check_priority(priority)
    queue_config = get_config().queue(queue)
    return Message(task=path, queue=queue_config.name, routing_key=routing_key, exchange=exchange or '',
                   priority=priority, task_args=tuple(task_args), task_kwargs=task_kwargs)


def publish_message(task: str | Callable, *task_args, priority: int = 0, queue: str | None = None,
                    exchange: str = '', routing_key: str | None = None, on_commit: bool = True,
                    **task_kwargs) -> MessageLog:
    """Put `task(*task_args, **task_kwargs)` on a queue and log it; returns the MessageLog.

    Inside ``transaction.atomic()`` the message is sent when the transaction commits (nothing is sent if
    it rolls back), so no consumer can see a message whose log row is not committed. Pass
    ``on_commit=False`` to send at once. Outside a transaction it is sent before this returns, and only
    returns once RabbitMQ has confirmed it; PublishError if it could not (the log then says FAILED and
    why). The names priority, queue, exchange, routing_key and on_commit are not passed to the task.
    """
    return create_message(task, priority, task_args, queue, exchange, routing_key, task_kwargs) \
        .publish(on_commit=on_commit)


def send_logged_message(message: Message, log: MessageLog) -> None:
    """Send an already-logged message to the broker; on failure, record it on the log and raise."""
    queue = get_config().queue(message.queue)
    body = messages.encode_body(message.task_args, message.task_kwargs)
    properties = messages.message_properties(message.task, log.uuid, message.priority)
    try:
        publisher_for(queue.broker).publish(queue, body, properties, exchange=message.exchange,
                                            routing_key=message.routing_key)
    except CarrotError as exc:
        MessageLog.objects.filter(pk=log.pk).update(
            status=MessageLog.FAILED, failure_time=timezone.now(),
            exception=f'{type(exc).__name__}: the message could not be published: {exc}')
        log.refresh_from_db()
        raise


def publish_logged(message: Message, on_commit: bool = True) -> MessageLog:
    """Create the log row for `message`, then send it (after commit when inside a transaction)."""
    log = MessageLog.objects.create(
        status=MessageLog.PUBLISHED, queue=message.queue, exchange=message.exchange,
        routing_key=message.routing_key, uuid=message.uuid, priority=message.priority,
        task=message.task, task_args=json.dumps(list(message.task_args)),
        content=json.dumps(message.task_kwargs), publish_time=timezone.now())

    connection = transaction.get_connection(MessageLog.objects.db)
    if on_commit and connection.in_atomic_block:
        def send_after_commit():
            try:
                send_logged_message(message, log)
            except CarrotError:
                # The caller's transaction has committed and returned long ago; the log row says
                # FAILED with the reason, and the error is logged, rather than lost.
                logger.exception('publishing %s (%s) after commit failed', message.task, log.uuid)
        transaction.on_commit(send_after_commit, using=MessageLog.objects.db)
    else:
        send_logged_message(message, log)
    return log


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
    messages.check_serialisable(path, tuple(task_args), kwargs)
    queue_name = get_config().queue(queue).name
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
           'get_host_from_name', 'PublishError']
