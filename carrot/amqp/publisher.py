"""The confirmed publisher: the one way a message reaches RabbitMQ from carrot.

A process keeps one publishing connection per broker and reuses it for every publish (1.x opened a TCP
connection per message). The connection is dropped and re-opened when the broker goes away -- on another
node of a cluster when its node went away (carrot.amqp.connection) -- and is never used across a fork: a
child that inherits one forgets it (without closing the parent's socket) and opens its own.

A confirm that does not come within CARROT['confirm_timeout'] seconds (a quorum queue that has lost its
quorum answers nothing until a majority of its nodes is back) and a nack (that, or a queue full under
reject-publish) are transient: BrokerUnavailable, so the row waits and is relayed. The message may still
arrive later as well; it keeps its message_id, so the consumers run it once.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import pika
import pika.exceptions as pe

from carrot.amqp import delays, pika_compat
from carrot.amqp.connection import (CONNECTION_ERRORS, NOT_FOUND, close_quietly, connect, connection_lost,
                                    describe_connection_error, node_of)
from carrot.amqp.declare import declare_delays, declare_queue, repair_delays
from carrot.config import BrokerConfig, QueueConfig
from carrot.config.schema import node_text
from carrot.exceptions import BrokerUnavailable, MessageRejected, QueueMismatchError

logger = logging.getLogger('carrot.broker')


class Publisher:
    """A confirmed publishing channel to one broker, owned by one process and shared by its threads."""

    def __init__(self, broker: BrokerConfig, confirm_timeout: float | None = None):
        self.broker = broker
        self.confirm_timeout = confirm_timeout  # None: CARROT['confirm_timeout']
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.connection: pika.BlockingConnection | None = None
        self.channel = None
        self.declared: set[QueueConfig] = set()  # by the whole config: another type is declared anew
        self.confirmed_at = float('-inf')  # time.monotonic() of this connection's last confirm

    def publish(self, queue: QueueConfig, body: bytes, properties: dict, exchange: str = '',
                routing_key: str | None = None, delay: int = 0,
                delay_levels: int = delays.DEFAULT_LEVELS) -> None:
        """Publish and return once RabbitMQ has confirmed the message.

        With a `delay` (whole seconds) the message goes round the delay levels of carrot.amqp.delays
        (declared on first use) and reaches `queue` that much later; `exchange` and `routing_key` are not
        used then. A level RabbitMQ no longer runs (it nacks) is replaced and the publish tried again.

        Raises BrokerUnavailable (transient: unreachable, connection lost, nacked, the confirm did not come
        in time) or MessageRejected (permanent: unroutable, no such exchange, a queue clash); both are
        PublishError. A connection lost mid-publish is retried once on a new connection (on another node,
        if the broker has several) with the same properties, so the same message_id: if the first copy did
        arrive (only its confirm was lost), consumers recognise the second by its id.
        """
        routing_key = routing_key or queue.name
        if delay > 0:
            exchange, routing_key = delays.entry_exchange(delay_levels), delays.routing_key(delay, delay_levels)
            properties = dict(properties, headers=delays.delayed_headers(properties.get('headers'), queue.name))
        with self.lock:
            repaired = False
            for attempt in (1, 2):
                # Retried: a kept connection that turns out stale, or one lost mid-publish. Not retried: a
                # connection that cannot be opened now (that would double the wait for an unreachable host).
                retry = self.connection is not None and self.connection.is_open
                try:
                    channel = self._open_channel(poll=False)  # a connection lost meanwhile: tried again below
                    retry = True
                    if queue not in self.declared:
                        declare_queue(channel, queue)
                        self.declared.add(queue)
                    if delay > 0 and _LEVELS not in self.declared:
                        declare_delays(channel, delay_levels)
                        self.declared.add(_LEVELS)
                    with pika_compat.confirm_deadline(self.connection, self._confirm_timeout()):
                        self._basic_publish(channel, exchange, routing_key, body, properties)
                    self.confirmed_at = time.monotonic()
                    return
                except QueueMismatchError:
                    self._forget_channel()
                    raise
                except (pe.UnroutableError, pe.NackError) as exc:
                    if delay > 0 and not repaired:  # a delay level RabbitMQ no longer runs: replace it
                        repaired = True
                        self._repair_levels(channel, delay_levels)
                        continue
                    if isinstance(exc, pe.UnroutableError):
                        if exchange == '' and routing_key == queue.name and attempt == 1:
                            # The queue itself is gone (an operator deleted it after this process declared
                            # it): declare it again and send once more, rather than refuse every message
                            # to it until this process restarts.
                            self.declared.discard(queue)
                            continue
                        raise MessageRejected(f'RabbitMQ returned the message as unroutable: no queue is bound '
                                              f'to exchange {exchange!r} with routing key {routing_key!r}') from None
                    # Not the message's fault: the queue cannot take it now (it has lost its quorum, or is
                    # full under reject-publish). Trying later may work -- on another channel: RabbitMQ's
                    # channel remembers that a quorum queue rejects publishes, and may go on nacking after
                    # the queue takes messages again.
                    self._forget_channel(close=True)
                    raise BrokerUnavailable(f'RabbitMQ did not take (nacked) the message for queue '
                                            f'{queue.name!r}: the queue cannot take messages now (a quorum '
                                            f'queue without its quorum, or a full queue)') from None
                except pika_compat.ConfirmTimedOut as exc:
                    # A late confirm would be taken for the next message's: this connection is done, and
                    # dropped rather than closed (RabbitMQ would answer the close only after a while).
                    node = node_of(self.connection)
                    pika_compat.drop(self.connection)
                    self._forget_connection()
                    raise BrokerUnavailable(f'{exc} for queue {queue.name!r} (at {self._where(node)}): the '
                                            f'queue may have lost its quorum') from None
                except pe.ChannelClosedByBroker as exc:
                    self._forget_channel()
                    if exc.reply_code == NOT_FOUND and not home_node_down(exc.reply_text):
                        raise MessageRejected(f'RabbitMQ says: {exc.reply_text}') from None
                    if attempt == 2:
                        raise BrokerUnavailable(f'RabbitMQ closed the channel: {exc.reply_text}') from None
                except CONNECTION_ERRORS as exc:
                    node = node_of(self.connection) if self.connection is not None else None
                    self._lose_connection()
                    if attempt == 2 or not retry:
                        raise BrokerUnavailable(f'cannot publish to {self.broker}: '
                                                f'{describe_connection_error(exc, self.broker, node)}') from None
                    logger.info('publishing connection to %s was lost (%s); reconnecting',
                                self._where(node), type(exc).__name__)
                except BaseException:
                    self._abandon_connection()
                    raise
            # Both tries used, the last one on replacing a delay level: not sent (the row waits).
            raise BrokerUnavailable(f'cannot publish to {self.broker}: a delay level had to be replaced; '
                                    f'the message is sent again later')

    def publish_batch(self, queue: QueueConfig, messages: list[tuple[bytes, dict]],
                      while_confirming: Callable[[], None] | None = None) -> None:
        """Publish `messages` ((body, properties) each) to `queue` and return once RabbitMQ has confirmed
        every one: the confirms are awaited together (pika_compat.ConfirmedBatch), not one by one, and
        `while_confirming()` is called once the messages are out, before the wait (other work overlaps it).
        Raises BrokerUnavailable or MessageRejected, as publish() does, for the batch as a whole; its
        `delivered` lists the positions in `messages` of those RabbitMQ confirmed all the same (on the
        queue: not to be sent again, nor marked failed)."""
        batch = None

        def error(cls, text):
            exc = cls(text)
            exc.delivered = batch.delivered() if batch is not None else []
            return exc

        with self.lock:
            try:
                kept = self.connection is not None and self.connection.is_open
                try:
                    channel = self._open_channel()
                except CONNECTION_ERRORS:
                    if not kept:
                        raise
                    # A kept connection RabbitMQ dropped while this process was idle (a restart, a
                    # failover): nothing is sent yet, so open a new one, once, as publish() does.
                    self._lose_connection()
                    channel = self._open_channel()
                if queue not in self.declared:
                    declare_queue(channel, queue)
                    self.declared.add(queue)
                batch = pika_compat.ConfirmedBatch(self.connection)
                for body, properties in messages:
                    batch.publish('', queue.name, body, pika.BasicProperties(**properties))
                batch.flush()
                if while_confirming is not None:
                    while_confirming()
                confirmed, refused, returned = batch.wait(self._confirm_timeout())
            except QueueMismatchError:
                self._forget_channel()
                raise
            except pika_compat.ConfirmTimedOut as exc:
                failure = error(BrokerUnavailable, f'{exc} for queue {queue.name!r}')
                pika_compat.drop(self.connection)
                self._forget_connection()
                raise failure from None
            except CONNECTION_ERRORS + (pe.AMQPError,) as exc:
                node = node_of(self.connection) if self.connection is not None else None
                failure = error(BrokerUnavailable, f'cannot publish to {self.broker}: '
                                                   f'{describe_connection_error(exc, self.broker, node)}')
                self._lose_connection()
                raise failure from None
            except BaseException:
                self._abandon_connection()
                raise
            if batch.channel.is_open:
                self._close_confirmed_batch(batch.channel)
        if returned:  # the queue is gone (deleted meanwhile): declared again by the next publish
            self.declared.discard(queue)
            raise error(MessageRejected, f'RabbitMQ returned {returned} of {len(messages)} messages as unroutable '
                                         f'(queue {queue.name!r})')
        if refused:
            raise error(BrokerUnavailable, f'RabbitMQ did not take (nacked) {refused} of {len(messages)} messages '
                                           f'for queue {queue.name!r}: the queue cannot take messages now')

    def _close_confirmed_batch(self, channel) -> None:
        """Close the channel of a batch whose confirms are all in. A connection RabbitMQ closes meanwhile (a
        restart, an operator's close_all_connections) does not undo them: the batch stands, and the
        connection is forgotten for the next publish to open another."""
        try:
            channel.close()
        except CONNECTION_ERRORS + (pe.AMQPError,) as exc:
            logger.info('publishing connection to %s was lost once a batch was confirmed (%s)', self.broker,
                        type(exc).__name__)
            self._lose_connection()
        except BaseException:
            self._abandon_connection()
            raise

    def _confirm_timeout(self) -> float:
        if self.confirm_timeout is not None:
            return self.confirm_timeout
        from carrot.config import get_config
        return get_config().confirm_timeout

    def _where(self, node) -> str:
        return f'node {node_text(node)} of {self.broker}' if node and len(self.broker.nodes) > 1 else \
            str(self.broker)

    def _repair_levels(self, channel, levels: int) -> None:
        try:
            fixed = repair_delays(channel, levels)
        except CONNECTION_ERRORS + (pe.AMQPError,) as exc:
            self._forget_connection()
            raise BrokerUnavailable(f'cannot repair the delay levels on {self.broker}: '
                                    f'{describe_connection_error(exc, self.broker)}') from None
        logger.error('a delay level on %s refused a message; replaced the levels RabbitMQ no longer ran: '
                     '%s', self.broker, ', '.join(map(delays.level_name, fixed)) or 'none')

    def repair_levels(self, levels: int) -> list[int]:
        """Replace the delay levels of this broker that RabbitMQ no longer runs; the levels replaced.
        BrokerUnavailable when the broker cannot be reached."""
        with self.lock:
            try:
                channel = self._open_channel()
                if _LEVELS not in self.declared:
                    declare_delays(channel, levels)
                    self.declared.add(_LEVELS)
                fixed = repair_delays(channel, levels)
            except CONNECTION_ERRORS + (pe.AMQPError,) as exc:
                self._forget_connection()
                raise BrokerUnavailable(f'cannot check the delay levels on {self.broker}: '
                                        f'{describe_connection_error(exc, self.broker)}') from None
        if fixed:
            logger.error('replaced the delay levels RabbitMQ no longer ran on %s: %s', self.broker,
                         ', '.join(map(delays.level_name, fixed)))
        return fixed

    @staticmethod
    def _basic_publish(channel, exchange, routing_key, body, properties) -> None:
        # One seam around the confirmed publish (tests drop the connection here to lose a confirm).
        channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                              properties=pika.BasicProperties(**properties), mandatory=True)

    def _open_channel(self, poll: bool = True):
        """The confirmed channel, on a connection opened if need be. `poll=False`: a connection that had a
        confirm just now is not polled first (see _just_confirmed)."""
        if self.connection is not None and self.connection.is_open and (poll or not self._just_confirmed()):
            # An idle blocking connection does not service heartbeats, so the broker may have dropped
            # it; polling here finds that out before the publish rather than during it.
            self.connection.process_data_events(time_limit=0)
        if self.connection is None or not self.connection.is_open:
            self._forget_connection()
            self.connection = connect(self.broker)
        if self.channel is None or not self.channel.is_open:
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            self.declared.clear()
        return self.channel

    def _just_confirmed(self) -> bool:
        """Whether this connection had a confirm less than FRESH_FOR ago: then it is not polled before the
        next publish (7% of publish_message's CPU in a loop of publishes). A connection lost since
        is found out by the publish itself, which publish() tries again on a new one (same message_id); a
        batch polls all the same, as a batch cannot be tried again message by message."""
        return time.monotonic() - self.confirmed_at < FRESH_FOR

    def _forget_channel(self, close: bool = False):
        """Use a new channel for the next publish; `close` this one (not when the connection goes too:
        closing a channel that waits for a confirm waits for RabbitMQ, closing the connection does not)."""
        channel, self.channel = self.channel, None
        self.declared.clear()
        if close and channel is not None and channel.is_open:
            try:
                channel.close()
            except Exception:  # the connection may be going too; the next publish finds out
                pass

    def _lose_connection(self):
        """After the broker's connection was lost: its node may be gone (the next connect tries another
        first), and the next publish opens a new connection."""
        if self.connection is not None:
            connection_lost(self.connection)
        self._forget_connection()

    def _abandon_connection(self):
        """After anything else that escaped a publish (an interrupt, a signal handler's exception, a bug, the
        caller's work while confirms were awaited): a frame may be half written or a confirm unread, and a
        late confirm would be taken for the next message's. This connection is dropped, not closed (the
        close would wait for RabbitMQ), and the next publish opens another."""
        if self.connection is not None:
            pika_compat.drop(self.connection)
        self._forget_connection()

    def _forget_connection(self):
        connection, self.connection = self.connection, None
        self.confirmed_at = float('-inf')
        self._forget_channel()
        close_quietly(connection)

    def close(self):
        with self.lock:
            self._forget_connection()


def home_node_down(reply_text: str | None) -> bool:
    """Whether a NOT_FOUND means "the node this classic queue lives on is down" (transient: it comes back
    with the node), not "no such queue or exchange"."""
    return 'down or inaccessible' in (reply_text or '')


_LEVELS = object()  # in Publisher.declared: the delay levels are declared on this channel

# Seconds after a confirm during which the connection is taken to be alive without polling it first: far
# below any heartbeat timeout, so only a broker going away in that second is met mid-publish instead.
FRESH_FOR = 1.0

_publishers: dict[BrokerConfig, Publisher] = {}
_publishers_lock = threading.Lock()


def publisher_for(broker: BrokerConfig) -> Publisher:
    """This process's publisher for `broker`, created on first use."""
    with _publishers_lock:
        publisher = _publishers.get(broker)
        if publisher is None or publisher.pid != os.getpid():
            publisher = _publishers[broker] = Publisher(broker)
        return publisher


def close_publishers() -> None:
    with _publishers_lock:
        publishers = list(_publishers.values())
        _publishers.clear()
    for publisher in publishers:
        if publisher.pid == os.getpid():
            publisher.close()


def _forget_inherited_publishers():
    """In a forked child: drop the parent's publishers without touching their sockets."""
    global _publishers_lock
    _publishers.clear()
    _publishers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited_publishers)
