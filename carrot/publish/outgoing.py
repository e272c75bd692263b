"""A task call, checked and turned into the immutable message that is logged and sent.

`prepare()` does every check before anything is written: a registered task, JSON arguments, a priority
from 0 to 255, a configured queue, an encoded body no larger than CARROT['max_message_size'], and for a
delayed call an aware `run_after` (or a `countdown` in seconds). What it refuses is an `InvalidCall` (also
a ValueError) or `MessageTooLarge`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from carrot import registry, text
from carrot.amqp import delays, wire
from carrot.config import get_config
from carrot.exceptions import InvalidCall, MessageTooLarge
from carrot.names import check_name


@dataclass(frozen=True)
class Outgoing:
    """A checked task call, ready to be logged and sent."""
    task: str
    args: tuple
    kwargs: dict
    queue: str
    exchange: str = ''
    routing_key: str | None = None
    priority: int = 0
    uuid: str = field(default_factory=text.new_message_id)
    body: bytes = b''
    run_after: datetime | None = None  # the earliest it may run; None: at once
    backend: str = ''     # the django.tasks backend alias that enqueued it ('' for carrot's own API)
    origin: str = ''      # the uuid of the message this one is a requeued copy of (its first)

    @property
    def properties(self) -> dict:
        return wire.message_properties(self.task, self.uuid, self.priority)

    def delay(self, now: datetime) -> int:
        """Whole seconds (rounded up) until run_after, seen at `now`; 0 when it may run now."""
        if self.run_after is None:
            return 0
        return delays.whole_seconds((self.run_after - now).total_seconds())


def task_name(task: str | Callable) -> str:
    """The dotted path of a registered task (a callable or a path), or TaskNotRegistered saying why."""
    return _registered(task)[0]


def _registered(task: str | Callable) -> tuple[str, Callable]:
    path = task if isinstance(task, str) else registry.task_path(task)
    return path, registry.get_task(path)


def encode(task: str, args: tuple, kwargs: dict) -> bytes:
    """The message body. NotSerialisable naming the first argument JSON cannot carry, InvalidCall for
    arguments nested too deeply, MessageTooLarge when the body is over CARROT['max_message_size']."""
    try:
        body = wire.encode_body(args, kwargs)
    except RecursionError:
        raise InvalidCall(f'the arguments of task {task} are nested too deeply to be sent') from None
    except (TypeError, ValueError):
        wire.check_serialisable(task, args, kwargs)  # raises, naming the argument
        raise
    limit = get_config().max_message_size
    if len(body) > limit:
        raise MessageTooLarge(
            f'the message for task {task} is {len(body)} bytes, more than CARROT["max_message_size"] '
            f'({limit} bytes); pass ids and let the task fetch the data, or raise the limit')
    return body


def run_after_of(run_after: datetime | None, countdown: float | None) -> datetime | None:
    """The aware datetime a delayed call may run after (`run_after`, or `countdown` seconds from now), or
    InvalidCall saying what is wrong."""
    from django.conf import settings
    from django.utils import timezone

    if run_after is not None and countdown is not None:
        raise InvalidCall('give run_after or countdown, not both')
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or not math.isfinite(countdown) \
                or countdown < 0:
            raise InvalidCall(f'countdown must be a number of seconds >= 0, got {countdown!r}')
        try:
            return timezone.now() + timedelta(seconds=countdown)
        except OverflowError:
            raise InvalidCall(f'countdown {countdown!r} runs past the calendar') from None
    if run_after is None:
        return None
    if not isinstance(run_after, datetime):
        raise InvalidCall(f'run_after must be a datetime, got {type(run_after).__name__}: {run_after!r}')
    if settings.USE_TZ and timezone.is_naive(run_after):
        raise InvalidCall(f'run_after must be an aware datetime (USE_TZ is on), got {run_after!r}: '
                          f'use django.utils.timezone.now() + timedelta(...)')
    if not settings.USE_TZ and timezone.is_aware(run_after):
        run_after = timezone.make_naive(run_after)
    return run_after


def prepare(task: str | Callable, args: tuple = (), kwargs: dict | None = None, *, queue: str | None = None,
            exchange: str = '', routing_key: str | None = None, priority: int = 0,
            message_id: str | None = None, run_after: datetime | None = None,
            countdown: float | None = None, backend: str = '', origin: str = '') -> Outgoing:
    """Check a task call and build the message. Raises InvalidCall (TaskNotRegistered, NotSerialisable,
    a priority out of range, UnknownQueue, a naive run_after ...) or MessageTooLarge; nothing is written
    before this."""
    path, func = _registered(task)
    args, kwargs = tuple(args), dict(kwargs or {})
    problem = registry.call_problem(func, args, kwargs)
    if problem:
        raise InvalidCall(f'task {path}: {problem}')
    wire.check_priority(priority)
    check_name('exchange', exchange or '')
    if routing_key:
        check_name('routing_key', routing_key)
    if message_id:
        check_name('message_id', message_id)
    queue_name = get_config().queue(queue).name
    run_after = run_after_of(run_after, countdown)
    if run_after is not None and (exchange or (routing_key and routing_key != queue_name)):
        raise InvalidCall(f'a delayed message is delivered to its queue ({queue_name!r}); it cannot be '
                          f'sent through exchange {exchange!r} with routing key {routing_key!r}')
    extra = {'uuid': message_id} if message_id else {}
    return Outgoing(task=path, args=args, kwargs=kwargs, queue=queue_name, exchange=exchange or '',
                    routing_key=routing_key or queue_name, priority=priority,
                    body=encode(path, args, kwargs), run_after=run_after, backend=backend, origin=origin,
                    **extra)
