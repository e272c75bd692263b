"""The one way a message leaves carrot: prepare, enqueue, send, requeue, relay.

Everything that publishes goes through here: ``publish_message`` (the 1.x facade in carrot.utilities),
``MessageLog.requeue``, ``ScheduledTask.publish``, the scheduler, and the relay of waiting messages.

A message's way out (store-and-forward):

1. ``prepare()`` checks the call and builds an immutable ``Outgoing``: a registered task, JSON arguments,
   a priority from 0 to 255, a configured queue, an encoded body no larger than
   ``CARROT['max_message_size']`` (else ``MessageTooLarge``). Nothing is written before this passes.
2. ``enqueue()`` writes the MessageLog row first, with status WAITING ("waiting for the broker"), and
   sends at once, or after commit when called inside a transaction (so no consumer sees a message whose
   row may still roll back).
3. ``send()`` publishes through the confirmed Publisher of carrot.broker. Once RabbitMQ confirms, the row
   becomes PUBLISHED, but only if it is still WAITING: a fast consumer may already have claimed it.

   - ``BrokerUnavailable`` (unreachable, connection lost, no confirm): with
     ``CARROT['store_and_forward']`` (the default) the row stays WAITING and the call returns normally;
     ``relay_waiting()`` sends it later. Without it, the row is marked FAILED (it can be requeued from
     the admin or the monitor) and the error is raised.
   - ``MessageRejected`` (unroutable, nacked, no such exchange, too large) and a queue clash: FAILED at
     once, and raised.

4. ``relay_waiting()`` (called by the scheduler child every tick) sends WAITING rows left behind by a
   broker outage or a process that died before its after-commit send. Each keeps its uuid as the AMQP
   message_id, so a message sent twice (a lost confirm, the relay racing the original sender) is claimed
   and run once by the consumers.
"""
from __future__ import annotations

import ast
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
import uuid as uuid_module
from typing import Callable

from django.db import transaction
from django.utils import timezone

from carrot import messages, registry
from carrot.broker import publisher_for
from carrot.config import BrokerConfig, get_config
from carrot.exceptions import (BrokerUnavailable, CarrotConfigException, MessageRejected,
                               MessageTooLarge, QueueMismatchError, TaskNotRegistered)
from carrot.models import MessageLog

logger = logging.getLogger('carrot.publishing')

RELAY_AFTER = 5.0        # seconds a WAITING row is left to the process that wrote it before the relay sends it
RELAY_BATCH = 200        # rows the relay sends per call at most, so one call never holds up a scheduler tick
RELAY_BACKOFF_CAP = 60.0  # the longest wait before the relay tries an unavailable broker again


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
    uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    body: bytes = b''

    @property
    def properties(self) -> dict:
        return messages.message_properties(self.task, self.uuid, self.priority)


def task_name(task: str | Callable) -> str:
    """The dotted path of a registered task (a callable or a path), or TaskNotRegistered saying why."""
    path = task if isinstance(task, str) else registry.task_path(task)
    registry.get_task(path)
    return path


def encode(task: str, args: tuple, kwargs: dict) -> bytes:
    """The message body. TypeError naming the first argument JSON cannot carry, ValueError for arguments
    nested too deeply, MessageTooLarge when the body is over CARROT['max_message_size']."""
    try:
        body = messages.encode_body(args, kwargs)
    except RecursionError:
        raise ValueError(f'the arguments of task {task} are nested too deeply to be sent') from None
    except (TypeError, ValueError):
        messages.check_serialisable(task, args, kwargs)  # raises, naming the argument
        raise
    limit = get_config().max_message_size
    if len(body) > limit:
        raise MessageTooLarge(
            f'the message for task {task} is {len(body)} bytes, more than CARROT["max_message_size"] '
            f'({limit} bytes); pass ids and let the task fetch the data, or raise the limit')
    return body


def prepare(task: str | Callable, args: tuple = (), kwargs: dict | None = None, *, queue: str | None = None,
            exchange: str = '', routing_key: str | None = None, priority: int = 0,
            message_id: str | None = None) -> Outgoing:
    """Check a task call and build the message. Raises TaskNotRegistered, TypeError (an argument JSON
    cannot carry), ValueError (priority), CarrotConfigException (unknown queue) or MessageTooLarge."""
    path = task_name(task)
    args, kwargs = tuple(args), dict(kwargs or {})
    messages.check_priority(priority)
    queue_name = get_config().queue(queue).name
    extra = {'uuid': message_id} if message_id else {}
    return Outgoing(task=path, args=args, kwargs=kwargs, queue=queue_name, exchange=exchange or '',
                    routing_key=routing_key or queue_name, priority=priority,
                    body=encode(path, args, kwargs), **extra)


def enqueue(message: Outgoing, *, on_commit: bool = True, store_and_forward: bool | None = None) -> MessageLog:
    """Write the row (WAITING), then send: now, or when the surrounding transaction commits.

    Returns the row: PUBLISHED once RabbitMQ has it, WAITING while it waits for the broker or the commit.
    ``store_and_forward=None`` means CARROT['store_and_forward'].
    """
    if store_and_forward is None:
        store_and_forward = get_config().store_and_forward
    log = MessageLog.objects.create(
        status=MessageLog.WAITING, queue=message.queue, exchange=message.exchange,
        routing_key=message.routing_key, uuid=message.uuid, priority=message.priority, task=message.task,
        task_args=json.dumps(list(message.args)), content=json.dumps(message.kwargs),
        publish_time=timezone.now())

    connection = transaction.get_connection(MessageLog.objects.db)
    if on_commit and connection.in_atomic_block:
        transaction.on_commit(lambda: _send_after_commit(message, log, store_and_forward),
                              using=MessageLog.objects.db)
    else:
        send(message, log, store_and_forward=store_and_forward)
    return log


def _send_after_commit(message: Outgoing, log: MessageLog, store_and_forward: bool) -> None:
    # The caller's transaction has committed: raising here would reach whoever committed, long after
    # publish_message returned. The row says what happened, and the log file too.
    try:
        send(message, log, store_and_forward=store_and_forward)
    except Exception:
        logger.exception('publishing %s (%s) after commit failed', message.task, message.uuid)


def send(message: Outgoing, log: MessageLog, *, store_and_forward: bool, relaying: bool = False) -> bool:
    """Publish a logged message and record the outcome on its row (see the module docstring).
    True once RabbitMQ has it; False when it waits for the broker (store-and-forward)."""
    queue = get_config().queue(message.queue)
    try:
        publisher_for(queue.broker).publish(queue, message.body, message.properties,
                                            exchange=message.exchange, routing_key=message.routing_key)
    except BrokerUnavailable as exc:
        if store_and_forward:
            # The relay logs an outage once per broker, not once per message and try.
            logger.log(logging.DEBUG if relaying else logging.WARNING,
                       '%s (%s) waits for the broker and will be relayed: %s', message.task, message.uuid, exc)
            return False
        mark_failed(log, exc)
        raise
    except (MessageRejected, QueueMismatchError) as exc:
        mark_failed(log, exc)
        raise
    mark_published(log)
    return True


def mark_published(log: MessageLog) -> None:
    """WAITING → PUBLISHED; a row a consumer has claimed meanwhile is left as it is."""
    if MessageLog.objects.filter(pk=log.pk, status=MessageLog.WAITING).update(status=MessageLog.PUBLISHED):
        log.status = MessageLog.PUBLISHED
    else:
        log.refresh_from_db(fields=['status'])


def mark_failed(log: MessageLog, exc: Exception) -> None:
    reason = f'{type(exc).__name__}: the message could not be published: {exc}'
    MessageLog.objects.filter(pk=log.pk, status=MessageLog.WAITING).update(
        status=MessageLog.FAILED, failure_time=timezone.now(), exception=reason)
    log.refresh_from_db(fields=['status', 'failure_time', 'exception'])


def publish(task: str | Callable, args: tuple = (), kwargs: dict | None = None, *, queue: str | None = None,
            exchange: str = '', routing_key: str | None = None, priority: int = 0, on_commit: bool = True,
            store_and_forward: bool | None = None) -> MessageLog:
    """prepare() then enqueue(): the whole publish. See carrot.utilities.publish_message."""
    message = prepare(task, args, kwargs, queue=queue, exchange=exchange, routing_key=routing_key,
                      priority=priority)
    return enqueue(message, on_commit=on_commit, store_and_forward=store_and_forward)


def requeue(log: MessageLog) -> MessageLog:
    """Publish a copy of a logged message (a new uuid and row) and delete the original, in one transaction:
    there is never a moment with both rows or with neither, and the copy is sent once that commits."""
    args, kwargs = row_arguments(log)
    message = prepare(log.task, args, kwargs, queue=log.queue, exchange=log.exchange or '',
                      routing_key=log.routing_key or None, priority=log.priority)
    with transaction.atomic(using=MessageLog.objects.db):
        copy = enqueue(message)
        if log.pk:
            MessageLog.objects.filter(pk=log.pk).delete()
    copy.refresh_from_db(fields=['status'])
    return copy


def schedule_arguments(schedule) -> tuple[tuple, dict]:
    """A ScheduledTask's (args, kwargs), read strictly: ValueError saying what is wrong with them.

    Positional arguments are a JSON list (or 1.x's "a, b, c" strings); keyword arguments a JSON object.
    """
    def parse(text, what, kind):
        try:
            value = json.loads(text)
        except RecursionError:
            raise ValueError(f'the {what} are nested too deeply') from None
        except ValueError as exc:
            raise ValueError(f'the {what} are not valid JSON ({exc})') from None
        if not isinstance(value, kind):
            raise ValueError(f'the {what} must be a JSON {"list" if kind is list else "object"}, '
                             f'got {type(value).__name__}')
        return value

    positional = (schedule.task_args or '').strip()
    if not positional:
        args = ()
    elif positional[0] in '[{':  # JSON (a '{' is a mistake, reported as such)
        args = tuple(parse(positional, 'positional arguments', list))
    else:  # django-carrot 1.x stored "a, b, c"
        args = tuple(a.strip() for a in positional.split(',') if a.strip())
    keywords = (schedule.content or '').strip()
    kwargs = parse(keywords, 'keyword arguments', dict) if keywords else {}
    return args, kwargs


def prepare_schedule(schedule, priority: int = 0) -> Outgoing:
    """One run of a ScheduledTask as a checked message; raises as prepare() does when the schedule is
    broken, or ValueError (with the reason) for arguments that do not parse."""
    args, kwargs = schedule_arguments(schedule)
    return prepare(schedule.task, args, kwargs, queue=schedule.queue or None, exchange=schedule.exchange or '',
                   routing_key=schedule.routing_key or None, priority=priority)


def publish_schedule(schedule, priority: int = 0, store_and_forward: bool | None = None) -> MessageLog:
    """Publish one run of a ScheduledTask now."""
    return enqueue(prepare_schedule(schedule, priority), store_and_forward=store_and_forward)


# -- the relay ----------------------------------------------------------------------------------------

def row_arguments(log: MessageLog) -> tuple[tuple, dict]:
    """A logged message's (args, kwargs), or ValueError saying why they cannot be read back (1.x rows
    hold positional arguments as a Python tuple's repr; that is read too)."""
    def load(text, what, kind, legacy=False):
        try:
            value = json.loads(text)
        except RecursionError:
            raise ValueError(f'the stored {what} are nested too deeply') from None
        except ValueError:
            if not legacy:
                raise ValueError(f'the stored {what} are not JSON') from None
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, RecursionError, MemoryError):
                raise ValueError(f'the stored {what} are neither JSON nor a 1.x tuple') from None
        if not isinstance(value, kind):
            raise ValueError(f'the stored {what} are a {type(value).__name__}, not a {kind[0].__name__}')
        return value

    args = load(log.task_args or '[]', 'positional arguments', (list, tuple), legacy=True)
    return tuple(args), load(log.content or '{}', 'keyword arguments', (dict,))


def outgoing_from_row(log: MessageLog) -> Outgoing:
    """The message a WAITING row stands for, with the row's uuid; raises as prepare() does, or ValueError
    when the stored arguments cannot be read back."""
    args, kwargs = row_arguments(log)
    return prepare(log.task, args, kwargs, queue=log.queue, exchange=log.exchange or '',
                   routing_key=log.routing_key or None, priority=log.priority, message_id=log.uuid)


class Relay:
    """Sends rows left WAITING, with a backoff per broker while that broker stays unavailable."""

    def __init__(self, relay_after: float = RELAY_AFTER, batch: int = RELAY_BATCH,
                 backoff_cap: float = RELAY_BACKOFF_CAP):
        self.relay_after = relay_after
        self.batch = batch
        self.backoff_cap = backoff_cap
        self.unavailable: dict[BrokerConfig, tuple[int, float]] = {}  # broker: (failures, retry at)
        self.relayed = 0

    def relay_waiting(self) -> int:
        """Send up to `batch` WAITING rows older than `relay_after` seconds; returns how many were sent."""
        config = get_config()
        now = time.monotonic()
        skipped_queues = [q.name for q in config.queues
                          if now < self.unavailable.get(q.broker, (0, 0.0))[1]]
        rows = MessageLog.objects.filter(
            status=MessageLog.WAITING,
            publish_time__lt=timezone.now() - timedelta(seconds=self.relay_after)
        ).exclude(queue__in=skipped_queues).order_by('publish_time', 'id')[:self.batch]
        sent = 0
        down: set[BrokerConfig] = set()
        up: set[BrokerConfig] = set()
        for log in rows:
            try:
                broker = config.queue(log.queue).broker
                if broker in down:
                    continue
                message = outgoing_from_row(log)
            except (CarrotConfigException, TaskNotRegistered, MessageRejected, TypeError, ValueError,
                    RecursionError) as exc:
                self._give_up(log, exc)
                continue
            try:
                if send(message, log, store_and_forward=True, relaying=True):
                    sent += 1
                    up.add(broker)
                else:
                    down.add(broker)
            except (MessageRejected, QueueMismatchError) as exc:  # send() has marked it FAILED
                logger.error('relay: %s (%s) was refused by the broker: %s', log.task, log.uuid, exc)
                up.add(broker)
        self._update_backoff(up, down)
        self.relayed += sent
        if sent:
            logger.info('relay: sent %d message(s) that were waiting for the broker', sent)
        return sent

    def _give_up(self, log: MessageLog, exc: Exception) -> None:
        reason = f'{type(exc).__name__}: a waiting message could not be relayed: {exc}'
        MessageLog.objects.filter(pk=log.pk, status=MessageLog.WAITING).update(
            status=MessageLog.FAILED, failure_time=timezone.now(), exception=reason)
        logger.error('relay: %s (%s) cannot be sent and is marked FAILED: %s', log.task, log.uuid, exc)

    def _update_backoff(self, up: set[BrokerConfig], down: set[BrokerConfig]) -> None:
        now = time.monotonic()
        for broker in down:
            failures = self.unavailable.get(broker, (0, 0.0))[0] + 1
            delay = min(2 ** (failures - 1), self.backoff_cap)
            if failures == 1:  # one line per outage, not one per try
                logger.warning('relay: broker %s is unavailable; waiting messages are kept and retried '
                               '(backing off up to %.0fs)', broker, self.backoff_cap)
            self.unavailable[broker] = (failures, now + delay)
        for broker in up - down:
            if self.unavailable.pop(broker, None) is not None:
                logger.info('relay: broker %s takes messages again', broker)


_default_relay = Relay()


def send_waiting(log: MessageLog) -> None:
    """Send one WAITING row now (the monitor's "send now"), with its own uuid. BrokerUnavailable when the
    broker still cannot take it (the row keeps waiting); MessageRejected when it never will (FAILED). A
    relay sending the same row at the same moment is harmless: the consumers' claim runs it once."""
    try:
        message = outgoing_from_row(log)
    except (CarrotConfigException, TaskNotRegistered, MessageRejected, TypeError, ValueError,
            RecursionError) as exc:
        _default_relay._give_up(log, exc)
        raise MessageRejected(f'it cannot be sent: {exc}') from None
    if not send(message, log, store_and_forward=True, relaying=True):
        raise BrokerUnavailable('the broker still cannot take it; it keeps waiting and will be relayed')


def relay_waiting() -> int:
    """Send the messages left waiting for the broker (see Relay); the scheduler child calls this."""
    return _default_relay.relay_waiting()


__all__ = ['Outgoing', 'prepare', 'enqueue', 'send', 'publish', 'requeue', 'publish_schedule', 'prepare_schedule',
           'schedule_arguments', 'relay_waiting', 'send_waiting', 'Relay', 'task_name', 'encode']
