"""The AMQP consume session: connect, declare, consume with prefetch 1, settle. The only consume-side
code that calls pika.

Settling a delivery follows the processor's Disposition:

- ACK: basic_ack.
- DEAD_LETTER: basic_reject(requeue=False); RabbitMQ moves the message to <queue>.dead.
- RETRY_LATER(delay): a copy goes to <queue>.wait with a per-message expiration; when it expires
  RabbitMQ dead-letters it back into <queue>. The copy is confirmed before the original is acked, so a
  crash in between leaves a duplicate (harmless: the claim sees it) rather than a loss.
- ADOPT(new id): a copy with that message_id goes to the back of <queue> (confirmed), then the original
  is acked.
- REQUEUE: basic_nack(requeue=True).

Reconnecting is the caller's loop (carrot.consumer), paced by `Outage` from carrot.backoff.
"""
from __future__ import annotations

import copy
import logging
import os
import struct
import threading
import weakref

import pika
import pika.data
import pika.exceptions as pe

from carrot import messages
from carrot.broker import CONNECTION_ERRORS, connect, declare_queue, declare_wait_queue, wait_queue_name
from carrot.config import BrokerConfig, QueueConfig
from carrot.processing import Action, Disposition

# What ends a session: the connection or channel is gone, or the broker refused something on it.
SESSION_ERRORS = CONNECTION_ERRORS + (pe.AMQPError,)


class _PikaConnectErrors(logging.Filter):
    """pika logs each failed connection attempt as several ERROR records (one with a traceback). The
    consumer logs one line per outage itself, so those records are kept only when pika's logger is set
    to DEBUG, and then as DEBUG."""

    def filter(self, record):
        if record.levelno < logging.WARNING:
            return True
        if not logging.getLogger('pika').isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, 'DEBUG'
        return True


_PIKA_NOISY_LOGGERS = ('pika.adapters.utils.io_services_utils', 'pika.adapters.utils.connection_workflow',
                       'pika.adapters.blocking_connection', 'pika.adapters.base_connection')


# Sessions with a live connection in this process (see _close_sockets_in_forked_child).
_open_sessions: weakref.WeakSet = weakref.WeakSet()


def _close_sockets_in_forked_child() -> None:
    """A task that forks (os.fork, multiprocessing) leaves its child holding the worker's AMQP socket.
    While that child lives, RabbitMQ sees the connection -- and the unacked delivery -- as alive even
    after the worker itself died, so the message is never delivered again (found by an attack test).
    The forked child never uses the session, so its copy of the socket is pointed at /dev/null."""
    for session in list(_open_sessions):
        fd = session.socket_fd()
        if fd is None:
            continue
        try:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)  # the number stays taken: nothing reused can receive pika's bytes
            os.close(null)
        except OSError:
            pass


os.register_at_fork(after_in_child=_close_sockets_in_forked_child)


def quiet_pika_connection_errors() -> None:
    for name in _PIKA_NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PikaConnectErrors) for f in logger.filters):
            logger.addFilter(_PikaConnectErrors())


# -- header tables nested without end -----------------------------------------------------------------
# pika decodes AMQP tables recursively, so a message whose headers nest a few hundred levels deep (the
# broker accepts thousands) raises RecursionError inside pika's frame reader: the connection drops,
# the message is redelivered and drops it again, for ever, and nothing behind it is consumed. Past
# MAX_HEADER_DEPTH levels carrot skips a nested table or array by its length prefix (no recursion) and
# puts a messages.NestedTooDeep marker in its place; the processor then fails the message with a reason.
MAX_HEADER_DEPTH = 32
_depth = threading.local()
_pika_decode_value = pika.data.decode_value


def _bounded_decode_value(encoded, offset):
    depth = getattr(_depth, 'value', 0)
    kind = encoded[offset:offset + 1]
    if depth >= MAX_HEADER_DEPTH and kind in (b'F', b'A'):
        length = struct.unpack_from('>I', encoded, offset + 1)[0]
        return messages.NestedTooDeep(), offset + 5 + length
    _depth.value = depth + 1
    try:
        return _pika_decode_value(encoded, offset)
    finally:
        _depth.value = depth


def bound_header_depth() -> None:
    """Make pika's table decoder depth-bounded (idempotent; pika.data.decode_table looks the value
    decoder up by its module-global name, so replacing it there is enough)."""
    pika.data.decode_value = _bounded_decode_value


class ConsumeSession:
    """One connection consuming one queue. Not thread-safe except `wake()`."""

    def __init__(self, broker: BrokerConfig, queue: QueueConfig, logger: logging.Logger, name: str):
        self.broker = broker
        self.queue = queue
        self.logger = logger
        self.name = name
        self.connection = None
        self.channel = None
        self._publish_channel = None
        self._consumer_tag = None

    @property
    def is_open(self) -> bool:
        return self.connection is not None and self.connection.is_open

    def socket_fd(self) -> int | None:
        """The file descriptor of the connection's socket, if it is open (pika keeps it private)."""
        try:
            return self.connection._impl._transport._sock.fileno()
        except (AttributeError, OSError):
            return None

    def open(self, on_delivery) -> None:
        """Connect, declare <queue>, <queue>.dead and <queue>.wait, and start consuming:
        `on_delivery(method, properties, body)` is called from `poll()` for each message."""
        quiet_pika_connection_errors()
        bound_header_depth()
        self.connection = connect(self.broker)
        _open_sessions.add(self)
        try:
            self.channel = self.connection.channel()
            declare_queue(self.channel, self.queue)
            declare_wait_queue(self.channel, self.queue)
            self.channel.basic_qos(prefetch_count=1)
            self._consumer_tag = self.channel.basic_consume(
                self.queue.name, lambda channel, method, properties, body: on_delivery(method, properties,
                                                                                       body))
        except BaseException:
            self.close()
            raise

    def poll(self, seconds: float) -> None:
        """Service the connection (heartbeats, deliveries, callbacks) for up to `seconds`."""
        self.connection.process_data_events(time_limit=seconds)

    def wake(self) -> None:
        """From any thread: make a running `poll()` return now."""
        connection = self.connection
        if connection is not None and connection.is_open:
            try:
                connection.add_callback_threadsafe(lambda: None)
            except Exception:  # closing meanwhile; the poll ends on its own
                pass

    def cancel(self) -> None:
        """Stop new deliveries; one may still arrive from before the cancel (poll once more to see it)."""
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
            self.channel.basic_reject(delivery_tag, requeue=False)
        elif action is Action.REQUEUE:
            self.channel.basic_nack(delivery_tag, requeue=True)
        elif action is Action.RETRY_LATER:
            self._republish(message, wait_queue_name(self.queue), message.properties,
                            expiration=str(max(1, int(disposition.delay * 1000))),
                            headers={messages.WAITS_HEADER: message.waits + 1})
            self.channel.basic_ack(delivery_tag)
        elif action is Action.ADOPT:
            self._republish(message, self.queue.name, message.properties, message_id=disposition.new_id)
            self.channel.basic_ack(delivery_tag)
        else:  # pragma: no cover - every Action is handled above
            raise ValueError(f'unknown disposition {disposition}')

    def reject(self, delivery_tag: int) -> None:
        self.channel.basic_reject(delivery_tag, requeue=False)

    def _republish(self, message, routing_key: str, properties, headers: dict | None = None, **changes):
        """Publish a copy of `message` (same body and properties, with `changes`), confirmed."""
        props = copy.copy(properties) if properties is not None else pika.BasicProperties()
        for key, value in changes.items():
            setattr(props, key, value)
        if headers:
            props.headers = {**(props.headers if isinstance(props.headers, dict) else {}), **headers}
        if self._publish_channel is None or not self._publish_channel.is_open:
            self._publish_channel = self.connection.channel()
            self._publish_channel.confirm_delivery()
        self._publish_channel.basic_publish('', routing_key, message.body, props, mandatory=True)

    def close(self) -> None:
        _open_sessions.discard(self)
        connection, self.connection = self.connection, None
        self.channel = self._publish_channel = self._consumer_tag = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken; nothing more to do with it
                pass
