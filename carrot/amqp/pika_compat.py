"""Every adaptation carrot makes to pika, in one place, installed once by the connection factory
(carrot.amqp.connection.connect calls `install()`).

pika offers no hook for any of these, so each reaches into pika where it must; tests/test_pika_compat.py
fails loudly if a pika upgrade moves what they rely on.

1. A depth-bounded header decoder. pika decodes AMQP tables recursively, so a message whose headers
   nest a few hundred levels deep (the broker accepts thousands) raises RecursionError inside pika's
   frame reader: the connection drops, the message is redelivered and drops it again, for ever, and
   nothing behind it is consumed. Past MAX_HEADER_DEPTH levels a nested table or array is skipped by its
   length prefix (no recursion) and a `wire.NestedTooDeep` marker stands in its place; the processor fails
   the message with a reason. Relies on `pika.data.decode_table` looking `decode_value` up by its
   module-global name.
2. Log filters. pika logs each failed connection attempt as several ERROR records (one with a
   traceback), and a WARNING for every channel the broker closes. carrot logs one line per outage
   itself (with pika's exception at DEBUG), and a passive declare answered "not found" is an answer, not a
   problem; so those records are dropped.
3. Sockets in forked children. A task that forks (os.fork, multiprocessing) leaves its child holding
   the worker's AMQP socket; while that child lives RabbitMQ sees the connection -- and the unacked
   delivery -- as alive even after the worker itself died, so the message is never delivered again. In
   a forked child, the socket of every connection registered with `hide_from_forked_children()` is
   pointed at /dev/null (pika keeps the socket private: `socket_fd()` finds it).
4. A deadline for a publisher confirm. pika's blocking publish waits for RabbitMQ's ack or nack with no
   time limit, and a quorum queue that has lost its quorum sends neither until a majority of its nodes is
   back -- a web request publishing to it would hang that long. `confirm_deadline()` arms a timer on the
   connection's own I/O loop (pika keeps it private: `connection._impl.ioloop`), which runs while the
   publish waits, and raises ConfirmTimedOut out of the wait. Closing that connection the AMQP way would
   wait again (RabbitMQ answers the close only once the stuck channel lets go, 12 s here): `drop()` shuts
   its socket down instead, and lets pika notice the lost stream and clean up.
5. Confirms of many publishes awaited together (`ConfirmedBatch`): pika's blocking channel waits for
   each confirm before basic_publish returns.
6. A deadline for bringing a connection up. pika bounds the TCP connect (socket_timeout) and the
   handshake (stack_timeout) with timers of the workflow itself, and the name lookup not at all (it runs
   on a thread of its own). An exception raised into the connecting thread by a signal handler (a
   request timeout built on SIGALRM) is caught by pika's own `except Exception` in its callbacks, which
   can leave the workflow waiting for an event that never comes, with none of its timers armed: the
   BlockingConnection then waits for ever, and the caller's timeout is gone with the exception.
   `blocking_connection()` arms a timer of its own on the I/O loop pika polls while it connects; when it
   fires before the workflow finished, the workflow is aborted and the connect fails as a refused one
   does (AMQPConnectionError), so a publish waits for the broker (store-and-forward) instead of hanging.
7. Writes sent at once. pika hands each frame of a message (method, header, body) to its transport
   separately, and the transport only buffers it and asks the I/O loop to watch the socket for
   writability: sending one message took two epoll_ctl calls, an extra wait on the loop and three
   sends (three TCP segments for RabbitMQ to read), for every publish and every ack. Carrot's connection
   joins the frames of one message (up to JOIN_AT_MOST bytes) and sends a write at once when nothing is
   waiting to go before it, as asyncio's transports do; only what the socket does not take then (it is
   full, or failing) goes pika's way, to be sent, or to fail, from the loop. publish_message made 17
   system calls, 12 with this.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import weakref

import pika
import pika.data
import pika.exceptions
from pika.adapters.utils import io_services_utils

from carrot.amqp.wire import NestedTooDeep

MAX_HEADER_DEPTH = 32

_NOISY_CONNECT_LOGGERS = ('pika.connection', 'pika.adapters.utils.io_services_utils',
                          'pika.adapters.utils.connection_workflow',
                          'pika.adapters.blocking_connection', 'pika.adapters.base_connection')
_CHANNEL_LOGGER = 'pika.channel'

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Install every adaptation in this process (idempotent, cheap after the first call)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        pika.data.decode_value = _bounded_decode_value
        for name in _NOISY_CONNECT_LOGGERS:
            logging.getLogger(name).addFilter(_drop_connection_errors)
        logging.getLogger(_CHANNEL_LOGGER).addFilter(_drop_expected_not_found)
        os.register_at_fork(after_in_child=_detach_sockets_in_forked_child)
        _installed = True


# -- 1. header tables nested without end ----------------------------------------------------------

_depth = threading.local()
_pika_decode_value = pika.data.decode_value


def _bounded_decode_value(encoded, offset):
    depth = getattr(_depth, 'value', 0)
    kind = encoded[offset:offset + 1]
    if depth >= MAX_HEADER_DEPTH and kind in (b'F', b'A'):
        length = struct.unpack_from('>I', encoded, offset + 1)[0]
        return NestedTooDeep(), offset + 5 + length
    _depth.value = depth + 1
    try:
        return _pika_decode_value(encoded, offset)
    finally:
        _depth.value = depth


# -- 2. log filters -------------------------------------------------------------------------------

def _drop_connection_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


_expecting_not_found = threading.local()


class expecting_not_found:
    """`with expecting_not_found():` -- a channel closed with NOT_FOUND meanwhile is an expected answer
    (a passive declare of a queue that may not exist), so pika's WARNING about it is dropped."""

    def __enter__(self):
        _expecting_not_found.active = True

    def __exit__(self, *exc):
        _expecting_not_found.active = False


def _drop_expected_not_found(record: logging.LogRecord) -> bool:
    return not (getattr(_expecting_not_found, 'active', False) and 'NOT_FOUND' in record.getMessage())


# -- 3. sockets in forked children ----------------------------------------------------------------

_hidden: weakref.WeakSet = weakref.WeakSet()


def socket_fd(connection) -> int | None:
    """The file descriptor of a BlockingConnection's socket while it is open (pika keeps it private)."""
    try:
        return connection._impl._transport._sock.fileno()
    except (AttributeError, OSError):
        return None


def hide_from_forked_children(connection) -> None:
    _hidden.add(connection)


def unhide(connection) -> None:
    _hidden.discard(connection)


def _detach_sockets_in_forked_child() -> None:
    for connection in list(_hidden):
        fd = socket_fd(connection)
        if fd is None:
            continue
        try:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)  # the number stays taken: nothing reused can receive pika's bytes
            os.close(null)
        except OSError:
            pass
    _hidden.clear()


# -- 4. a deadline for a publisher confirm ---------------------------------------------------------

class ConfirmTimedOut(Exception):
    """No confirm (ack or nack) came within the deadline. The message may still be taken later; the
    connection must not publish again (a late confirm would be taken for the next message's): close it."""


@contextlib.contextmanager
def confirm_deadline(connection, seconds: float | None):
    """`with confirm_deadline(connection, 10): channel.basic_publish(...)` -- ConfirmTimedOut if the
    publish is still waiting for its confirm after `seconds` (None: no deadline)."""
    if not seconds:
        yield
        return
    ioloop = connection._impl.ioloop

    def expired():
        raise ConfirmTimedOut(f'RabbitMQ did not confirm the message within {seconds:g}s')

    timer = ioloop.call_later(seconds, expired)
    try:
        yield
    finally:
        ioloop.remove_timeout(timer)


def drop(connection) -> None:
    """Drop `connection` without the AMQP close handshake (the broker cleans up when the socket goes)."""
    fd = socket_fd(connection)
    if fd is None:
        return
    try:
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        connection.process_data_events(time_limit=0)  # pika reads the end of the stream and tears down
    except Exception:  # the stream is gone either way
        pass


# -- 5. many publishes, their confirms awaited together ---------------------------------------------

class ConfirmedBatch:
    """Publish many messages on a channel of their own and wait for all their confirms at once.

    pika's BlockingChannel waits for each confirm before it returns from basic_publish: one round trip
    per message. This drives the channel underneath it (`_impl`): the publishes go out back to back and
    the confirms (RabbitMQ acks several at once, `multiple`) are counted as they come. A channel that
    has published a batch is used for batches only, and dropped after a batch that did not end well."""

    def __init__(self, connection):
        self.connection = connection
        self.channel = connection.channel()
        self._impl = self.channel._impl
        self._next_tag = 1
        self._confirmed: set[int] = set()
        self._refused: set[int] = set()
        self._first_open = 1  # the lowest tag neither confirmed nor refused yet
        self._returned = 0
        self._ids: list = []  # the message_id of each message published, in order (tag - 1)
        self._returned_ids: set = set()
        self._impl.add_on_return_callback(self._on_return)
        ready = []
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda frame: ready.append(1))
        self._until(lambda: ready, 10, 'RabbitMQ did not put the channel in confirm mode within 10s')

    def _on_confirm(self, frame) -> None:
        method = frame.method
        # `multiple` settles every tag up to this one that is still open; they are settled in order
        # mostly, so the search for the first open tag starts where the last one ended.
        tags = range(self._first_open, method.delivery_tag + 1) if method.multiple else [method.delivery_tag]
        into = self._confirmed if type(method).__name__ == 'Ack' else self._refused
        into.update(tag for tag in tags if tag not in self._confirmed and tag not in self._refused)
        while self._first_open in self._confirmed or self._first_open in self._refused:
            self._first_open += 1

    def _on_return(self, channel, method, properties, body) -> None:
        self._returned += 1
        self._returned_ids.add(getattr(properties, 'message_id', None))

    def publish(self, exchange: str, routing_key: str, body: bytes, properties) -> None:
        self._ids.append(getattr(properties, 'message_id', None))
        self._impl.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        self._next_tag += 1

    def delivered(self) -> list[int]:
        """The positions (0: the first published) of the messages RabbitMQ has confirmed so far and not
        returned: on the queue, whatever happens to the rest of the batch. (RabbitMQ sends a return before
        the confirm of the same message.)"""
        return [tag - 1 for tag in sorted(self._confirmed)
                if tag <= len(self._ids) and self._ids[tag - 1] not in self._returned_ids]

    def flush(self) -> None:
        """Hand what is published so far to the socket (pika writes when it services the connection)."""
        self.connection.process_data_events(time_limit=0)

    def wait(self, seconds: float) -> tuple[int, int, int]:
        """Wait up to `seconds` for every confirm: (confirmed, refused (nacked), returned as unroutable).
        ConfirmTimedOut if some are still open then."""
        sent = self._next_tag - 1
        self._until(lambda: len(self._confirmed) + len(self._refused) >= sent, seconds,
                    lambda: f'RabbitMQ confirmed {len(self._confirmed)} of {sent} messages within {seconds:g}s')
        return len(self._confirmed), len(self._refused), self._returned

    def _until(self, done, seconds: float, what) -> None:
        """Service the connection until `done()`, or ConfirmTimedOut after `seconds`. Short polls: a
        BlockingConnection waits out the whole time_limit it is given, events or not."""
        import time
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() >= deadline:
                raise ConfirmTimedOut(what() if callable(what) else what)
            self.connection.process_data_events(time_limit=0.002)


# -- 6. a deadline for bringing a connection up --------------------------------------------------------

CONNECT_DEADLINE_SLACK = 5.0  # seconds past pika's own bound on an attempt, for the name lookup


def connect_deadline(parameters) -> float:
    """Seconds a connection to `parameters` may take to come up at most: pika's own bound on an attempt
    (stack_timeout covers the TCP connect and the handshake; socket_timeout the connect alone), and some
    slack for the name lookup, which pika does not bound."""
    return max(parameters.socket_timeout or 0, parameters.stack_timeout or 0) + CONNECT_DEADLINE_SLACK


class ConnectDeadlineExpired(pika.exceptions.AMQPConnectionError):
    """The connection was not up within connect_deadline(): pika's workflow was aborted."""


class _CarrotSelectConnection(pika.SelectConnection):
    """The connection a BlockingConnection drives underneath (its `_impl_class`): its workflow ends by a
    deadline of carrot's even when the workflow itself no longer would (see 6. above), and its writes
    leave at once (7.)."""

    @classmethod
    def create_connection(cls, connection_configs, on_done, custom_ioloop=None, workflow=None):
        finished = []

        def finish(result):
            if finished:  # the workflow ended after the deadline: what it opened is closed, not handed on
                if isinstance(result, pika.connection.Connection) and result.is_open:
                    result.close()
                return
            finished.append(result)
            on_done(result)

        workflow = super().create_connection(connection_configs, on_done=finish, custom_ioloop=custom_ioloop,
                                             workflow=workflow)
        seconds = max(connect_deadline(config) for config in connection_configs)

        def expired():
            if finished:
                return
            finish(ConnectDeadlineExpired(f'the connection was not up within {seconds:g}s'))
            try:
                workflow.abort()  # closes the socket of an attempt in progress
            except Exception:  # noqa: BLE001 -- a wedged workflow may refuse; its socket goes with it
                pass

        custom_ioloop.call_later(seconds, expired)
        return workflow

    def _output_marshaled_frames(self, marshaled_frames) -> None:
        size = sum(map(len, marshaled_frames))
        if len(marshaled_frames) > 1 and size <= JOIN_AT_MOST:
            self.bytes_sent += size  # pika's own counts, which its heartbeat checker reads
            self.frames_sent += len(marshaled_frames)
            self._adapter_emit_data(b''.join(marshaled_frames))
        else:
            super()._output_marshaled_frames(marshaled_frames)

    def _adapter_emit_data(self, data: bytes) -> None:
        rest = _send_at_once(self._transport, data)
        if rest:
            super()._adapter_emit_data(rest)


# -- 7. writes sent at once -------------------------------------------------------------------------

# Frames of one message joined into one write up to this size; a bigger body is sent frame by frame (the
# copy would cost more than the calls it saves).
JOIN_AT_MOST = 256 * 1024

_PLAINTEXT_TRANSPORT = io_services_utils._AsyncPlaintextTransport


def _send_at_once(transport, data: bytes) -> bytes:
    """Send `data` on `transport`'s socket now, if nothing is queued to go before it; what the socket did
    not take is returned, for pika to buffer and send from its loop. Only a plain TCP transport that is
    up: TLS keeps a state of its own between writes."""
    if type(transport) is not _PLAINTEXT_TRANSPORT or transport._tx_buffers \
            or transport._state != transport._STATE_ACTIVE:
        return data
    try:
        sent = transport._sock.send(data)
    except OSError:
        # Full (EAGAIN), or failing: pika's own write meets the same socket from the loop and, if it is
        # broken, aborts the connection as it always does.
        return data
    return data[sent:]


def blocking_connection(parameters) -> pika.BlockingConnection:
    """pika.BlockingConnection(parameters) that fails with ConnectDeadlineExpired rather than waiting for
    ever (see 6. above) and sends each write at once (7.)."""
    return pika.BlockingConnection(parameters, _impl_class=_CarrotSelectConnection)
