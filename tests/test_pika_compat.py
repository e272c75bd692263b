"""carrot.amqp.pika_compat's writes sent at once (adaptation 7), against the real RabbitMQ: a message leaves
in one send without a turn of pika's loop, and arrives whole and once when the socket takes only part of
it, refuses it for now, fails on it, or is gone. Also the pika internals the adaptation relies on, so that
a pika upgrade that moves them fails here, loudly."""
import os
import socket
import uuid

import pika
import pika.exceptions
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from carrot.amqp import pika_compat
from carrot.amqp.connection import connect
from carrot.config import get_config

TIMEOUT = 10  # seconds any wait for the broker here may take


class WatchedSocket:
    """Stands in for a transport's socket: counts send calls, records what each took, and lets `trouble(data)` answer the next
    send instead of the socket (return a count of bytes really sent, or raise); anything else goes to
    the real socket."""

    def __init__(self, real):
        self.real = real
        self.calls = 0
        self.sends: list[int] = []
        self.trouble = None

    def send(self, data):
        self.calls += 1
        trouble, self.trouble = self.trouble, None
        if trouble is not None:
            sent = trouble(self.real, data)
        else:
            sent = self.real.send(data)
        self.sends.append(sent)
        return sent

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def broker_channel():
    """A confirming channel on a connection made as carrot makes its own, a queue of its own, and the
    stand-in for the connection's socket."""
    connection = connect(get_config().queue('default').broker)
    channel = connection.channel()
    channel.confirm_delivery()
    queue = f'pika-compat-{uuid.uuid4().hex[:8]}'
    channel.queue_declare(queue)
    transport = connection._impl._transport
    watched = WatchedSocket(transport._sock)
    transport._sock = watched
    try:
        yield connection, channel, queue, watched
    finally:
        if connection.is_open:
            transport._sock = watched.real
            channel.queue_delete(queue)
            connection.close()


def publish(connection, channel, queue, body, message_id):
    """A confirmed publish that fails within TIMEOUT rather than waiting for ever for a confirm (a
    message cut short on the wire leaves RabbitMQ waiting for the rest of its frame)."""
    with pika_compat.confirm_deadline(connection, TIMEOUT):
        channel.basic_publish('', queue, body, pika.BasicProperties(message_id=message_id), mandatory=True)


def received(channel, queue):
    """The bodies on `queue`, taken off it."""
    bodies = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def test_a_message_leaves_in_one_send_without_waiting_for_the_loop(broker_channel):
    connection, channel, queue, watched = broker_channel
    nbio = connection._impl._transport._nbio
    armed = []
    set_writer = nbio.set_writer
    nbio.set_writer = lambda *args: (armed.append(args), set_writer(*args))
    try:
        publish(connection, channel, queue, b'x' * 100, 'one')
    finally:
        nbio.set_writer = set_writer
    assert watched.calls == 1, 'the method, header and body frames left in one send'
    assert watched.sends[0] > 100
    assert armed == [], 'nothing waited for the loop to find the socket writable'
    assert received(channel, queue) == [b'x' * 100]


def take_seven(real, data):
    return real.send(data[:7])


def full(real, data):
    raise BlockingIOError(11, 'Resource temporarily unavailable')


def failing(real, data):
    raise ConnectionResetError(104, 'Connection reset by peer (once)')


@pytest.mark.parametrize('trouble', [take_seven, full, failing], ids=['partial', 'full', 'failing once'])
def test_what_the_socket_does_not_take_at_once_goes_out_from_the_loop_whole_and_once(broker_channel, trouble):
    connection, channel, queue, watched = broker_channel
    body = os.urandom(5000)
    watched.trouble = trouble
    publish(connection, channel, queue, body, 'two')
    assert watched.calls >= 2, 'the rest was sent by pika from its loop'
    publish(connection, channel, queue, b'after', 'three')
    assert received(channel, queue) == [body, b'after']
    assert connection._impl._transport._tx_buffers == type(connection._impl._transport._tx_buffers)()


def test_a_publish_on_a_socket_that_is_gone_fails_as_a_lost_connection(broker_channel):
    connection, channel, queue, watched = broker_channel
    other = socket.socket(fileno=os.dup(watched.real.fileno()))
    other.shutdown(socket.SHUT_RDWR)
    other.close()
    with pytest.raises((pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)):
        publish(connection, channel, queue, b'lost', 'four')
    assert not connection.is_open


FRAME_MAX = 131072  # what RabbitMQ offers and pika takes: a body frame carries FRAME_MAX - 8 bytes
EDGES = [0, 1, FRAME_MAX - 9, FRAME_MAX - 8, FRAME_MAX - 7, 2 * (FRAME_MAX - 8), pika_compat.JOIN_AT_MOST - 200,
         pika_compat.JOIN_AT_MOST, pika_compat.JOIN_AT_MOST + 1, 700_000]


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, 600_000)), min_size=1, max_size=4),
       troubled=st.booleans())
def test_bodies_of_any_size_arrive_whole_and_in_order(broker_channel, sizes, troubled):
    """Bodies around the frame size and the joining limit, back to back, with the socket taking only part
    of the first write or not."""
    connection, channel, queue, watched = broker_channel
    bodies = [os.urandom(size) for size in sizes]
    watched.trouble = take_seven if troubled else None
    for number, body in enumerate(bodies):
        publish(connection, channel, queue, body, str(number))
    assert received(channel, queue) == bodies


def test_the_pika_internals_the_writes_rely_on_are_there():
    """Fails loudly if a pika upgrade moves what adaptation 7 reaches into."""
    from pika.adapters.base_connection import BaseConnection
    from pika.adapters.utils import io_services_utils
    from pika.connection import Connection
    assert callable(Connection._output_marshaled_frames) and callable(BaseConnection._adapter_emit_data)
    transport = io_services_utils._AsyncPlaintextTransport
    assert transport._STATE_ACTIVE == 1 and hasattr(transport, '_produce')
    connection = connect(get_config().queue('default').broker)
    try:
        impl = connection._impl
        assert isinstance(impl, pika_compat._CarrotSelectConnection)
        assert type(impl._transport) is transport
        assert impl._transport._state == transport._STATE_ACTIVE and len(impl._transport._tx_buffers) == 0
        assert hasattr(impl._transport._sock, 'send') and impl.frames_sent > 0 and impl.bytes_sent > 0
    finally:
        connection.close()
