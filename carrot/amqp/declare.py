"""How carrot declares its queues, by type and role, in one place -- and what a clash with an existing
queue means.

A configured queue is declared as two RabbitMQ queues (`declarations()`), each in a role, and bound to
the exchange delayed messages are delivered through (carrot.amqp.delays):

- MAIN, <queue>: consumed; what fails is dead-lettered to <queue>.dead;
- DEAD, <queue>.dead: nothing consumes it; it keeps a message CARROT['dead_letter_ttl_days'] days.

A third role, PARKING, is a queue without a consumer whose messages expire into another queue: the delay
levels of a virtual host (carrot.amqp.delays; parked and retried messages go round them too). carrot no
longer declares <queue>.wait; one left by an earlier version still dead-letters what is in it back into
<queue>: delete it once it is empty.

`arguments_for(queue_type, role, ...)` says what a queue of each type gets in each role:

============ ============================================== ==============================================
role         classic                                        quorum
============ ============================================== ==============================================
MAIN         x-max-priority, dead-letter route              dead-letter route, at-least-once; x-delivery-limit
DEAD         x-message-ttl                                  x-message-ttl
PARKING      dead-letter route (+ x-message-ttl)            dead-letter route, at-least-once (+ x-message-ttl)
============ ============================================== ==============================================

A quorum queue has no x-max-priority (RabbitMQ before 4.0 refuses the argument; 4.x gives every quorum
queue two priority levels). Its dead-lettering is at-least-once (`x-dead-letter-strategy`, which RabbitMQ
accepts only with `x-overflow: reject-publish`): a message moves to its dead-letter queue only once that
queue has confirmed it, so nothing is lost between two queues when a node dies. `x-delivery-limit` is a
backstop for a message that kills its worker before carrot could count the attempt: past that many
deliveries RabbitMQ dead-letters it itself. The delay levels stay classic whatever the queues they feed
(on RabbitMQ 3.10 a quorum level with at-least-once dead-lettering stops on one malformed message, and
with at-most-once it expires late at every hop): a delayed message's row is the source of truth, and
housekeeping sends a row that a lost node kept from arriving again (CARROT['delay_sweep_after']).

A queue's type and arguments cannot change once it is declared: a declaration that differs raises
QueueMismatchError, and QueueTypeMismatch (with the way out) when the type differs.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import pika.exceptions as pe

from carrot.amqp import delays, pika_compat
from carrot.amqp.connection import NOT_FOUND, PRECONDITION_FAILED, close_quietly, connect
from carrot.config import CLASSIC, DEFAULT_MAX_PRIORITY, QUORUM, QueueConfig
from carrot.exceptions import QueueMismatchError, QueueTypeMismatch

DEFAULT_EXCHANGE = ''  # dead-letter routes go through it, by queue name


class Role(enum.Enum):
    MAIN = 'main'        # consumed; failures are dead-lettered to <queue>.dead
    DEAD = 'dead'        # <queue>.dead: kept for inspection, nothing consumes it
    PARKING = 'parking'  # no consumer: what expires there is dead-lettered back into a queue


def arguments_for(queue_type: str, role: Role, *, dead_letter_to: str | None = None,
                  message_ttl: int | None = None, max_priority: int = DEFAULT_MAX_PRIORITY,
                  delivery_limit: int | None = None) -> dict:
    """The arguments of a carrot queue of `queue_type` ('classic' or 'quorum') in `role`.

    `dead_letter_to`: the queue its dead letters go to (MAIN: <queue>.dead; PARKING: the queue its
    messages go back to; DEAD: none). `message_ttl`: milliseconds (DEAD: dead_letter_ttl_days; a delay
    level: its delay). `max_priority`: classic MAIN only. `delivery_limit`: quorum MAIN only (None: not set).
    """
    if queue_type not in (CLASSIC, QUORUM):
        raise ValueError(f'unknown queue type {queue_type!r}')
    arguments = {}
    if queue_type == QUORUM:
        arguments['x-queue-type'] = QUORUM
    # Classic queues are declared without x-queue-type, as 1.x and earlier carrot versions declared them
    # (RabbitMQ counts "classic" and "not set" as the same).
    if role is Role.MAIN and queue_type == CLASSIC:
        arguments['x-max-priority'] = max_priority
    if message_ttl is not None:
        arguments['x-message-ttl'] = int(message_ttl)
    if dead_letter_to is not None:
        arguments['x-dead-letter-exchange'] = DEFAULT_EXCHANGE
        arguments['x-dead-letter-routing-key'] = dead_letter_to
        if queue_type == QUORUM:
            arguments['x-dead-letter-strategy'] = 'at-least-once'
            arguments['x-overflow'] = 'reject-publish'
    if role is Role.MAIN and queue_type == QUORUM and delivery_limit is not None:
        arguments['x-delivery-limit'] = delivery_limit
    return arguments


@dataclass(frozen=True)
class Declaration:
    """One RabbitMQ queue carrot declares for a configured queue."""
    name: str
    role: Role
    queue_type: str
    arguments: dict


_FROM_SETTINGS = object()


def declarations(queue: QueueConfig, dead_letter_ttl_days=_FROM_SETTINGS,
                 queue_type: str | None = None) -> list[Declaration]:
    """Every queue carrot declares for `queue`, in the order to declare them: a dead-letter target before
    the queue that dead-letters into it. `dead_letter_ttl_days`: CARROT's by default. `queue_type`: as if
    the queue were of that type (by default its own)."""
    if dead_letter_ttl_days is _FROM_SETTINGS:
        from carrot.config import get_config
        dead_letter_ttl_days = get_config().dead_letter_ttl_days
    kind = queue_type or queue.queue_type
    dead_ttl = int(dead_letter_ttl_days * 86400 * 1000) if dead_letter_ttl_days else None
    return [
        Declaration(queue.dead_letter_queue, Role.DEAD, kind,
                    arguments_for(kind, Role.DEAD, message_ttl=dead_ttl)),
        Declaration(queue.name, Role.MAIN, kind,
                    arguments_for(kind, Role.MAIN, dead_letter_to=queue.dead_letter_queue,
                                  max_priority=queue.max_priority, delivery_limit=queue.delivery_limit)),
    ]


def queue_arguments(queue: QueueConfig) -> dict:
    """The arguments of <queue> itself (scripts/bench declares its baseline queue like carrot's)."""
    return arguments_for(queue.queue_type, Role.MAIN, dead_letter_to=queue.dead_letter_queue,
                         max_priority=queue.max_priority, delivery_limit=queue.delivery_limit)


def declare_queue(channel, queue: QueueConfig, dead_letter_ttl_days=_FROM_SETTINGS) -> dict:
    """Declare `queue` and its dead-letter queue (durable), and bind `queue` to the exchange delayed
    messages are delivered through, so none that comes out of the levels for it is dropped. A clash with
    an existing queue raises QueueMismatchError (QueueTypeMismatch for another type) naming the queue and
    what differs. Returns the arguments `queue` itself has. Each queue is declared on a channel of its
    own, as a declaration RabbitMQ refuses closes its channel: `channel` stays open for the caller."""
    main = {}
    for declaration in declarations(queue, dead_letter_ttl_days):
        own = channel.connection.channel()
        arguments = declare(own, declaration, queue)
        if own.is_open:
            own.close()
        if declaration.role is Role.MAIN:
            main = arguments
    delays.declare_delivery(channel)
    delays.bind_target(channel, queue.name)
    return main


def declare_delays(channel, levels: int) -> None:
    """The delay levels of this virtual host (idempotent; see carrot.amqp.delays)."""
    delays.declare_levels(channel, levels, _declare_level)


def repair_delays(channel, levels: int) -> list[int]:
    """Replace the levels whose queue RabbitMQ no longer runs (see carrot.amqp.delays); `channel` is in
    confirm mode. Returns the levels replaced."""
    return delays.repair_levels(channel, levels, _declare_level)


def _declare_level(channel, name: str, arguments: dict) -> None:
    try:
        channel.queue_declare(queue=name, durable=True, arguments=arguments)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == PRECONDITION_FAILED:
            raise queue_mismatch(name, exc.reply_text, arguments) from None
        raise


def declare(channel, declaration: Declaration, queue: QueueConfig) -> dict:
    """Declare one queue; returns the arguments it has (carrot's, or those of an existing queue adopted:
    see `adopted_arguments`). A clash raises QueueMismatchError (QueueTypeMismatch for another type)."""
    try:
        channel.queue_declare(queue=declaration.name, durable=True, arguments=declaration.arguments)
        return declaration.arguments
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        adopted = adopted_arguments(channel.connection, declaration, queue, exc.reply_text)
        if adopted is not None:
            return adopted
        existing = existing_queue_type(channel.connection, declaration, queue, exc.reply_text)
        if existing is not None and existing != declaration.queue_type:
            raise type_mismatch(declaration, existing, queue) from None
        raise queue_mismatch(declaration.name, exc.reply_text, declaration.arguments) from None


# "inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': received '10' but current is '255'" (or
# "... the value '255' of type 'signedint'").
_PRIORITY_SAID = re.compile(r"inequivalent arg 'x-max-priority'.*?but current is (?:the value )?'(\d+)'")


def adopted_arguments(connection, declaration: Declaration, queue: QueueConfig, reply_text: str) -> dict | None:
    """The arguments of an existing classic <queue> that carrot takes as they are, or None.

    Two shapes are adopted rather than refused, when CARROT does not name max_priority: carrot's own
    arguments with another x-max-priority (a queue declared before the default became 10), and the queue
    django-carrot 1.x declared, with x-max-priority only and no dead-letter route (the consumer then
    moves a failed message to <queue>.dead itself: carrot.amqp.session)."""
    if declaration.role is not Role.MAIN or declaration.queue_type != CLASSIC or queue.max_priority_set:
        return None
    said = _PRIORITY_SAID.search(reply_text or '')
    priorities = [int(said.group(1))] if said else [255]  # 1.x's, when RabbitMQ named another argument
    for priority in priorities:
        for arguments in ({**declaration.arguments, 'x-max-priority': priority}, {'x-max-priority': priority}):
            channel = connection.channel()
            try:
                channel.queue_declare(queue=declaration.name, durable=True, arguments=arguments)
            except pe.ChannelClosedByBroker as exc:
                again = _PRIORITY_SAID.search(exc.reply_text or '')
                if again and int(again.group(1)) not in priorities:
                    priorities.append(int(again.group(1)))
                continue
            except pe.AMQPError:
                return None
            if channel.is_open:
                channel.close()
            return arguments
    return None


def has_dead_letter_route(arguments: dict) -> bool:
    """Whether a queue with these arguments dead-letters a rejected message (a 1.x queue does not)."""
    return 'x-dead-letter-routing-key' in arguments


# What RabbitMQ says when it compares the type: "inequivalent arg 'x-queue-type' for queue 'q' in vhost '/':
# received 'classic' but current is 'quorum'" (or "... but current is the value 'quorum' of type
# 'longstr'", or "... but current is none" for a classic queue declared without a type).
_TYPE_SAID = re.compile(r"inequivalent arg 'x-queue-type'.*?but current is (?:the value )?(none|'[^']+')")


def existing_queue_type(connection, declaration: Declaration, queue: QueueConfig,
                        reply_text: str = '') -> str | None:
    """The type of the existing queue `declaration.name` that refused `declaration`, or None if it cannot
    be told. AMQP cannot ask, and RabbitMQ names the first argument that differs, not always the type. So
    the queue is declared again the ways it could have been declared before -- by carrot as the other
    type, by django-carrot 1.x (x-max-priority only), without arguments -- and the one RabbitMQ accepts
    (declaring a queue that exists as it is changes nothing) tells the type; failing that, what RabbitMQ
    said about x-queue-type on the way."""
    other = QUORUM if declaration.queue_type == CLASSIC else CLASSIC
    same = dict(dead_letter_to=declaration.arguments.get('x-dead-letter-routing-key'),
                message_ttl=declaration.arguments.get('x-message-ttl'), max_priority=queue.max_priority)
    if other == QUORUM:
        limits = {queue.delivery_limit, _default_delivery_limit(), None}
        candidates = [(QUORUM, arguments_for(QUORUM, declaration.role, delivery_limit=limit, **same))
                      for limit in limits]
    else:
        candidates = [(CLASSIC, arguments_for(CLASSIC, declaration.role, **same))]
    if declaration.role is Role.MAIN:  # 1.x's shape, with its 255 levels or the ones CARROT names
        candidates += [(CLASSIC, {'x-max-priority': levels}) for levels in dict.fromkeys((queue.max_priority, 255))]
    candidates.append((CLASSIC, {}))
    said = [reply_text]
    for kind, arguments in candidates:
        try:
            channel = connection.channel()
            channel.queue_declare(queue=declaration.name, durable=True, arguments=arguments)
        except pe.ChannelClosedByBroker as exc:
            said.append(exc.reply_text or '')
            continue
        except pe.AMQPError:
            return None
        if channel.is_open:
            channel.close()
        return kind
    for text in said:
        match = _TYPE_SAID.search(text or '')
        if match:
            return CLASSIC if match.group(1) == 'none' else match.group(1).strip("'")
    return None


def _default_delivery_limit():
    """CARROT['delivery_limit'], what a quorum queue declared by carrot has (None if CARROT is broken)."""
    from carrot.config import get_config
    from carrot.exceptions import CarrotConfigException
    try:
        return get_config().delivery_limit
    except CarrotConfigException:
        return None


def type_mismatch(declaration: Declaration, existing: str, queue: QueueConfig) -> QueueTypeMismatch:
    """The way out when CARROT names a queue of another type than the one on the broker."""
    names = ' '.join(d.name for d in declarations(queue, None))
    vhost = queue.broker.virtual_host
    return QueueTypeMismatch(
        f"queue {declaration.name!r} on {queue.broker} is a {existing} queue, and CARROT declares it as a "
        f"{declaration.queue_type} queue ('queue_type' of queue {queue.name!r}); RabbitMQ cannot change "
        f"the type of a queue. Either give the {declaration.queue_type} queue a new name (add it to "
        f"CARROT['queues'] with 'queue_type': {declaration.queue_type!r} and publish to it; keep "
        f"{queue.name!r} as {existing!r} until the workers have emptied it, then remove it), or drain and "
        f"delete it: stop publishing to {queue.name!r}, let the workers empty it (rabbitmqctl list_queues "
        f"-p {vhost} name messages), stop them, delete {names} (rabbitmqctl delete_queue -p {vhost} <name>), "
        f"and start the workers with the new queue_type: they declare the queues anew. README.rst, "
        f"\"Running on several hosts\", has the steps.", queue=declaration.name, existing=existing,
        wanted=declaration.queue_type)


def queue_mismatch(name: str, reply_text: str, declared: dict) -> QueueMismatchError:
    """Turn RabbitMQ's PRECONDITION_FAILED text into an error a person can act on."""
    match = re.search(r"inequivalent arg '([^']+)'", reply_text or '')
    argument = match.group(1) if match else 'unknown'
    wanted = declared.get(argument, '(not set)') if argument.startswith('x-') else \
        'durable=True' if argument == 'durable' else '?'
    return QueueMismatchError(
        f"queue {name!r} already exists on the broker with a different {argument!r} than carrot "
        f"declares ({argument}={wanted}). Drain and delete the queue (rabbitmqctl delete_queue {name}) "
        f"or declare it the same way. Broker said: {reply_text}", queue=name)


def clashes(broker, queues: list[QueueConfig], dead_letter_ttl_days=_FROM_SETTINGS,
            **connect_options) -> list[QueueMismatchError]:
    """What of carrot's declarations for `queues` (all on `broker`) clashes with queues that exist there,
    without creating any: a queue that does not exist yet is skipped; one that does is declared as carrot
    would (which changes nothing when it is the same). Raises the connection's error when the broker
    cannot be reached."""
    found = []
    connection = connect(broker, **connect_options)
    try:
        for queue in queues:
            for declaration in declarations(queue, dead_letter_ttl_days):
                channel = connection.channel()
                try:
                    with pika_compat.expecting_not_found():
                        channel.queue_declare(declaration.name, passive=True)
                except pe.ChannelClosedByBroker as exc:
                    if exc.reply_code == NOT_FOUND:
                        continue
                    raise
                try:
                    declare(channel, declaration, queue)
                except QueueMismatchError as exc:
                    found.append(exc)
                    break  # the first clash of a queue says what to do with all of them
                if channel.is_open:
                    channel.close()
    finally:
        close_quietly(connection)
    return found


class QueueRefused(Exception):
    """The broker refused to say anything about a queue (other than "not found")."""


def queue_counts(connection, name: str) -> tuple[int, int] | None:
    """(messages ready, consumers) of queue `name` from a passive declare on a channel of its own, or
    None when the queue does not exist. AMQP does not report unacknowledged messages."""
    channel = connection.channel()
    try:
        with pika_compat.expecting_not_found():
            ok = channel.queue_declare(name, passive=True)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == NOT_FOUND:
            return None
        raise QueueRefused(exc.reply_text) from None
    if channel.is_open:
        channel.close()
    return ok.method.message_count, ok.method.consumer_count


def purge(broker, name: str) -> int:
    """Empty queue `name` on `broker`; how many messages were dropped (0: no such queue there)."""
    connection = connect(broker)
    try:
        return connection.channel().queue_purge(name).method.message_count
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != NOT_FOUND:
            raise
        return 0  # the broker has no such queue (reset, or never declared): nothing waits in it
    finally:
        close_quietly(connection)
