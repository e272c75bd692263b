"""The AMQP consume session: connect, declare, consume (prefetch: the queue's, 1 by default), settle. The
only consume-side code that calls pika.

Settling a delivery follows the processor's Disposition:

- ACK: basic_ack.
- DEAD_LETTER: basic_reject(requeue=False); RabbitMQ moves the message to <queue>.dead. A message whose
  x-death header would crash the queue that dead-letters it (RabbitMQ 3.10; wire.x_death_crashes_rabbitmq)
  is moved by carrot instead: a copy with that header set aside goes to <queue>.dead (confirmed), then the
  original is acked; so is every failure of a queue django-carrot 1.x declared (adopted as it is, it
  has no dead-letter route).
- RETRY_LATER(delay): a copy goes round the delay levels (carrot.amqp.delays) and comes back into <queue>
  after `delay` seconds, rounded up to whole seconds. The copy is confirmed before the original is acked,
  so a crash in between leaves a duplicate (harmless: the claim sees it) rather than a loss.
- ADOPT(new id): a copy with that message_id goes to the back of <queue> (confirmed), then the original
  is acked.
- REQUEUE: basic_nack(requeue=True).

Prefetch is per consumer (basic.qos with global=False), never global: RabbitMQ refuses global QoS on a
quorum queue by closing the whole connection.

A consumer the broker cancels (basic.cancel: its queue was deleted, for one) ends the session like a lost
connection, so the caller's loop declares the queue and consumes again; pika alone would go on waiting
for deliveries that never come.

Reconnecting is the caller's loop (carrot.consume.loop), paced by `Outage` from carrot.backoff.
"""
from __future__ import annotations

import copy
import logging
import time

import pika
import pika.exceptions as pe

from carrot.amqp import delays, pika_compat, wire
from carrot.amqp.connection import CONNECTION_ERRORS, close_quietly, connect, connection_lost, node_of
from carrot.amqp.declare import declare_delays, declare_queue, has_dead_letter_route, repair_delays
from carrot.amqp.disposition import Action, Disposition
from carrot.config import BrokerConfig, QueueConfig
from carrot.config.schema import node_text


class ConsumerCancelled(pe.AMQPError):
    """The broker cancelled this session's consumer (basic.cancel): the session is over."""


# What ends a session: the connection or channel is gone, the broker refused something on it or cancelled
# the consumer, or a parked copy was not confirmed in time.
SESSION_ERRORS = CONNECTION_ERRORS + (pe.AMQPError, pika_compat.ConfirmTimedOut)


class ConsumeSession:
    """One connection consuming one queue. Not thread-safe except `wake()`."""

    def __init__(self, broker: BrokerConfig, queue: QueueConfig, logger: logging.Logger, name: str,
                 delay_levels: int = delays.DEFAULT_LEVELS, confirm_timeout: float | None = None,
                 prefetch: int | None = None):
        self.broker = broker
        self.queue = queue
        self.prefetch = queue.prefetch if prefetch is None else prefetch
        self.logger = logger
        self.name = name
        self.delay_levels = delay_levels
        self.confirm_timeout = confirm_timeout  # for the copies it parks or adopts (None: no deadline)
        self.connection = None
        self.node = None  # (host, port) of the node it is connected to
        self.channel = None
        self._publish_channel = None
        self._consumer_tag = None
        self._levels_declared = False
        self._cancelled_by_broker = False
        self._routes_dead_letters = True
        self._on_delivery = None
        self._ticker = None  # the timer that ends poll()'s waits (see there)

    @property
    def is_open(self) -> bool:
        return self.connection is not None and self.connection.is_open

    @property
    def where(self) -> str:
        """The broker, and the node of it this session is on when it has several (for log lines)."""
        if self.node is not None and len(self.broker.nodes) > 1:
            return f'node {node_text(self.node)} of {self.broker}'
        return str(self.broker)

    def open(self, on_delivery) -> None:
        """Connect, declare <queue> and <queue>.dead, and start consuming:
        `on_delivery(method, properties, body)` is called from `poll()` for each message."""
        self._on_delivery = on_delivery
        self.connection = connect(self.broker)
        self.node = node_of(self.connection)
        # A task that forks must not keep this connection (and its unacked delivery) alive.
        pika_compat.hide_from_forked_children(self.connection)
        try:
            self.channel = self.connection.channel()
            # A 1.x queue, adopted as it is, has no dead-letter route: failures are moved by hand then.
            self._routes_dead_letters = has_dead_letter_route(declare_queue(self.channel, self.queue))
            self.channel.basic_qos(prefetch_count=self.prefetch, global_qos=False)  # see the docstring
            self.channel.add_on_cancel_callback(self._on_cancelled_by_broker)
            self._consume()
        except BaseException as exc:
            self.close(lost=isinstance(exc, CONNECTION_ERRORS))
            raise

    def _consume(self) -> None:
        on_delivery = self._on_delivery
        self._consumer_tag = self.channel.basic_consume(
            self.queue.name, lambda channel, method, properties, body: on_delivery(method, properties, body))

    def resume(self) -> None:
        """Consume again after `cancel()` (the same queue, prefetch and callback)."""
        if self._consumer_tag is None:
            self._consume()

    def _ticked(self) -> None:
        self._ticker = None

    def _on_cancelled_by_broker(self, method_frame) -> None:
        self._cancelled_by_broker = True

    def poll(self, seconds: float) -> None:
        """Service the connection (heartbeats, deliveries, callbacks) until something happens, for up to
        `seconds`. Raises ConsumerCancelled once the broker has cancelled the consumer."""
        if seconds <= 0:
            self.connection.process_data_events(time_limit=0)
        else:
            # One timer bounds every wait until it fires: pika makes and drops a timer of its own for each
            # bounded call, which cost a busy consumer a fifth of its connection thread's time.
            deadline = time.monotonic() + seconds
            if self._ticker is not None and deadline < self._ticker[1]:  # a shorter wait than the timer's
                self.connection.remove_timeout(self._ticker[0])
                self._ticker = None
            if self._ticker is None:
                self._ticker = (self.connection.call_later(seconds, self._ticked), deadline)
            self.connection.process_data_events(time_limit=None)
        if self._cancelled_by_broker:
            raise ConsumerCancelled(f'RabbitMQ cancelled the consumer of queue {self.queue.name!r} '
                                    f'(the queue was deleted, for one)')

    def wake(self) -> None:
        """From any thread: make a running `poll()` return now."""
        connection = self.connection
        if connection is not None and connection.is_open:
            try:
                connection.add_callback_threadsafe(lambda: None)
            except Exception:  # closing meanwhile; the poll ends on its own
                pass

    def cancel(self) -> None:
        """Stop new deliveries; one may still arrive from before the cancel (poll once more to see it).
        Deliveries in hand stay in hand: they are settled as usual."""
        if self._consumer_tag is not None:
            self.channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    def settle(self, delivery_tag: int, disposition: Disposition, message) -> None:
        action = disposition.action
        if action is Action.ACK:
            self.channel.basic_ack(delivery_tag)
        elif action is Action.DEAD_LETTER:
            self._dead_letter(delivery_tag, message)
        elif action is Action.REQUEUE:
            self.channel.basic_nack(delivery_tag, requeue=True)
        elif action is Action.RETRY_LATER:
            self._park(message, disposition.delay or 0.0, disposition.busy)
            self.channel.basic_ack(delivery_tag)
        elif action is Action.ADOPT:
            self._republish(message, '', self.queue.name, message.properties, message_id=disposition.new_id)
            self.channel.basic_ack(delivery_tag)
        else:  # pragma: no cover - every Action is handled above
            raise ValueError(f'unknown disposition {disposition}')

    def ack_up_to(self, delivery_tag: int) -> None:
        """Ack every delivery of this channel up to `delivery_tag` (AMQP's `multiple`): the caller knows
        none below it is still to be settled otherwise."""
        self.channel.basic_ack(delivery_tag, multiple=True)

    def reject(self, delivery_tag: int, message=None) -> None:
        """Dead-letter a delivery (the time limit's way out)."""
        self._dead_letter(delivery_tag, message)

    def _dead_letter(self, delivery_tag: int, message) -> None:
        properties = getattr(message, 'properties', None)
        headers = getattr(properties, 'headers', None)
        if not self._routes_dead_letters:
            pass  # a 1.x queue: RabbitMQ would drop what is rejected
        elif not wire.x_death_crashes_rabbitmq(headers):
            self.channel.basic_reject(delivery_tag, requeue=False)
            return
        else:
            self.logger.warning('%s: dead-lettering %s by hand: its x-death header would crash the queue on '
                                'RabbitMQ 3.10', self.name, getattr(message, 'shown_task', 'a message'))
        # Without the header that routes it out of the delay levels: moved back from <queue>.dead, the copy
        # is a message to run again, not an orphaned copy (carrot.consume.processor).
        kept = {key: value for key, value in wire.without_unusable_x_death(headers or {}).items()
                if key != delays.TARGET_HEADER}
        self._republish(message, '', self.queue.dead_letter_queue, properties, replace_headers=kept)
        self.channel.basic_ack(delivery_tag)

    def _park(self, message, delay: float, busy: bool) -> None:
        """Send a copy round the delay levels, back into <queue> in `delay` seconds (rounded up)."""
        channel = self._confirmed_channel()
        if not self._levels_declared:
            declare_delays(channel, self.delay_levels)
            self._levels_declared = True
        properties = message.properties
        headers = delays.delayed_headers(getattr(properties, 'headers', None), self.queue.name)
        if busy:
            headers[wire.WAITS_HEADER] = message.waits + 1
        else:
            headers.pop(wire.WAITS_HEADER, None)
        key = delays.routing_key(delays.whole_seconds(delay), self.delay_levels)
        for attempt in (1, 2):
            try:
                # A publisher's own expiration would cut the delay short: the copy has none.
                self._republish(message, delays.entry_exchange(self.delay_levels), key, properties,
                                replace_headers=headers, expiration=None)
                return
            except (pe.NackError, pe.UnroutableError):
                if attempt == 2:
                    raise
                repaired = repair_delays(channel, self.delay_levels)
                self.logger.error('%s: a delay level refused a message; replaced the levels RabbitMQ no '
                                  'longer ran: %s', self.name, ', '.join(map(delays.level_name, repaired)) or
                                  'none')

    def _confirmed_channel(self):
        if self._publish_channel is None or not self._publish_channel.is_open:
            self._publish_channel = self.connection.channel()
            self._publish_channel.confirm_delivery()
        return self._publish_channel

    def _republish(self, message, exchange: str, routing_key: str, properties,
                   replace_headers: dict | None = None, **changes):
        """Publish a copy of `message` (same body and properties, with `changes`), confirmed."""
        props = copy.copy(properties) if properties is not None else pika.BasicProperties()
        for key, value in changes.items():
            setattr(props, key, value)
        if replace_headers is not None:
            props.headers = replace_headers
        # Unconfirmed in time (the queue lost its quorum): the session ends, the original is not acked and
        # comes back; the copy, if it lands after all, is recognised by its message_id.
        with pika_compat.confirm_deadline(self.connection, self.confirm_timeout):
            self._confirmed_channel().basic_publish(exchange, routing_key, message.body, props, mandatory=True)

    def close(self, lost: bool = False) -> None:
        """Close the connection. `lost`: it broke (its node may be gone), so the next one tries another
        node first, and it is dropped rather than closed (a close would wait for an answer that may be long
        in coming, e.g. while a channel waits for a confirm)."""
        connection, self.connection = self.connection, None
        self.channel = self._publish_channel = self._consumer_tag = None
        self._levels_declared = False
        self._cancelled_by_broker = False
        if connection is not None:
            pika_compat.unhide(connection)
            if lost:
                connection_lost(connection)
                pika_compat.drop(connection)
        close_quietly(connection)
