"""How carrot declares its queues: <queue> with priorities and dead-lettering, <queue>.dead, the binding
that lets delayed messages reach <queue>, and the delay levels (carrot.amqp.delays); and what a clash with
an existing queue means.

carrot no longer declares <queue>.wait: parking moved onto the delay levels. A <queue>.wait left by an
earlier version still dead-letters what is in it back into <queue>; delete it once it is empty.
"""
from __future__ import annotations

import re

import pika.exceptions as pe

from carrot.amqp import delays, pika_compat
from carrot.amqp.connection import NOT_FOUND, PRECONDITION_FAILED, close_quietly, connect
from carrot.config import QueueConfig
from carrot.exceptions import QueueMismatchError

def queue_arguments(queue: QueueConfig) -> dict:
    """The arguments carrot declares a queue with: priorities, and failures routed to <queue>.dead."""
    return {
        'x-max-priority': queue.max_priority,
        'x-dead-letter-exchange': '',
        'x-dead-letter-routing-key': queue.dead_letter_queue,
    }


_FROM_SETTINGS = object()


def dead_letter_arguments(ttl_days: float | None) -> dict:
    """<queue>.dead keeps a message CARROT['dead_letter_ttl_days'] days, then drops it (None: for ever)."""
    return {'x-message-ttl': int(ttl_days * 86400 * 1000)} if ttl_days else {}


def declare_queue(channel, queue: QueueConfig, dead_letter_ttl_days=_FROM_SETTINGS) -> None:
    """Declare `queue` and its dead-letter queue (durable), and bind `queue` to the exchange delayed
    messages are delivered through, so none that comes out of the levels for it is dropped. A clash with
    an existing queue raises QueueMismatchError naming the queue and the argument (the channel is closed
    by the broker then)."""
    if dead_letter_ttl_days is _FROM_SETTINGS:
        from carrot.config import get_config
        dead_letter_ttl_days = get_config().dead_letter_ttl_days
    _declare(channel, queue.dead_letter_queue, dead_letter_arguments(dead_letter_ttl_days))
    _declare(channel, queue.name, queue_arguments(queue))
    delays.declare_delivery(channel)
    delays.bind_target(channel, queue.name)


def declare_delays(channel, levels: int) -> None:
    """The delay levels of this virtual host (idempotent; see carrot.amqp.delays)."""
    delays.declare_levels(channel, levels, _declare)


def repair_delays(channel, levels: int) -> list[int]:
    """Replace the levels whose queue RabbitMQ no longer runs (see carrot.amqp.delays); `channel` is in
    confirm mode. Returns the levels replaced."""
    return delays.repair_levels(channel, levels, _declare)


def _declare(channel, name: str, arguments: dict) -> None:
    try:
        channel.queue_declare(queue=name, durable=True, arguments=arguments)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == PRECONDITION_FAILED:
            raise queue_mismatch(name, exc.reply_text, arguments) from None
        raise


def queue_mismatch(name: str, reply_text: str, declared: dict) -> QueueMismatchError:
    """Turn RabbitMQ's PRECONDITION_FAILED text into an error a person can act on."""
    match = re.search(r"inequivalent arg '([^']+)'", reply_text or '')
    argument = match.group(1) if match else 'unknown'
    wanted = declared.get(argument, '(not set)') if argument.startswith('x-') else \
        'durable=True' if argument == 'durable' else '?'
    return QueueMismatchError(
        f"queue {name!r} already exists on the broker with a different {argument!r} than carrot "
        f"declares ({argument}={wanted}). Drain and delete the queue (rabbitmqctl delete_queue {name}) "
        f"or declare it the same way. Broker said: {reply_text}")




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
