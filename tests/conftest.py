"""Fixtures shared by the test suite: a RabbitMQ virtual host of our own, raw pika access, consumers.

Tests talk to the real RabbitMQ on 127.0.0.1:5672 (guest/guest). If it cannot be reached, every test
that needs it errors: the suite never passes without a broker.
"""
import os
import subprocess

import pika
import pytest
from django.conf import settings

BROKER_HOST = '127.0.0.1'
BROKER_PORT = 5672


def rabbitmqctl(*args, check=True):
    return subprocess.run(['rabbitmqctl', *args], capture_output=True, text=True, timeout=60, check=check)


def raw_connection():
    return pika.BlockingConnection(pika.ConnectionParameters(
        BROKER_HOST, BROKER_PORT, settings.VHOST, pika.PlainCredentials('guest', 'guest')))


@pytest.fixture(scope='session', autouse=True)
def carrot_vhost():
    """A virtual host for this test run (inherited by subprocesses through CARROT_TEST_VHOST)."""
    try:
        rabbitmqctl('add_vhost', settings.VHOST)
        rabbitmqctl('set_permissions', '-p', settings.VHOST, 'guest', '.*', '.*', '.*')
    except (OSError, subprocess.CalledProcessError) as exc:
        output = getattr(exc, 'stderr', '') or ''
        pytest.fail(f'RabbitMQ is needed on {BROKER_HOST}:{BROKER_PORT} and rabbitmqctl could not create '
                    f'the test vhost: {exc} {output}\nStart it with scripts/services (or '
                    f'`rabbitmq-server -detached`).', pytrace=False)
    yield settings.VHOST
    rabbitmqctl('delete_vhost', settings.VHOST, check=False)


@pytest.fixture
def raw_channel(carrot_vhost):
    connection = raw_connection()
    yield connection.channel()
    if connection.is_open:
        connection.close()


@pytest.fixture(autouse=True)
def empty_queues(request, carrot_vhost):
    """Every test starts with the configured queues (and their dead-letter queues) and the delay levels
    gone, so no message of an earlier test turns up in it; a test marked `no_broker` (the fast layer:
    rules, arguments, the processor's decisions) skips that."""
    from carrot.amqp import delays
    from carrot.amqp.publisher import close_publishers
    from carrot.config import get_config

    if request.node.get_closest_marker('no_broker'):
        yield
        return

    close_publishers()
    connection = raw_connection()
    channel = connection.channel()
    for queue in get_config().queues:
        channel.queue_delete(queue.name)
        channel.queue_delete(queue.dead_letter_queue)
        channel.queue_delete(f'{queue.name}.wait')
    for level in range(get_config().delay_levels):
        channel.queue_delete(delays.level_name(level))
    connection.close()
    yield
    close_publishers()


def run_consumer(queue='default', max_messages=None, idle_timeout=3.0, consumer_class=None):
    """Consume in this process until `max_messages` are settled or the queue is idle for `idle_timeout`."""
    import logging

    from carrot.consumer import Consumer
    from carrot.config import get_config

    queue_config = get_config().queue(queue)
    cls = consumer_class or Consumer
    consumer = cls(queue_config.broker, queue_config, logging.getLogger('carrot.consumer'), f'{queue}#test')
    consumer.run(max_messages=max_messages, idle_timeout=idle_timeout)
    return consumer


def queue_depth(name):
    """Messages ready in queue `name` (0 when the queue does not exist yet)."""
    connection = raw_connection()
    try:
        return connection.channel().queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return 0
        raise
    finally:
        if connection.is_open:
            connection.close()


def delay_depth():
    """Messages waiting in the delay levels (carrot.amqp.delays), all levels together."""
    from carrot.amqp import delays
    from carrot.config import get_config
    return sum(queue_depth(delays.level_name(level)) for level in range(get_config().delay_levels))


def dead_letters(channel, queue='default'):
    """Every message body in <queue>.dead (consumed, so the queue is empty afterwards)."""
    bodies = []
    while True:
        method, properties, body = channel.basic_get(f'{queue}.dead', auto_ack=True)
        if method is None:
            return bodies
        bodies.append((properties, body))


@pytest.fixture
def subprocess_env(transactional_db):
    """Environment for a subprocess that must use this test's database and vhost."""
    from django.db import connection
    env = dict(os.environ)
    env['CARROT_TEST_DB_NAME'] = connection.settings_dict['NAME']
    env['DJANGO_SETTINGS_MODULE'] = 'tests.testproject.settings'
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    return env


# -- publish (store-and-forward tests) --

@pytest.fixture
def locked_vhost(carrot_vhost):
    """A virtual host guest may not use yet: connecting fails with ACCESS_REFUSED until `unlock()`. A broker
    that really refuses us, without stopping the shared RabbitMQ."""
    name = f'{carrot_vhost}-locked'
    rabbitmqctl('add_vhost', name)

    class Locked:
        vhost = name
        url = f'amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{name}'

        @staticmethod
        def unlock():
            rabbitmqctl('set_permissions', '-p', name, 'guest', '.*', '.*', '.*')

        @staticmethod
        def connect():
            return pika.BlockingConnection(pika.ConnectionParameters(
                BROKER_HOST, BROKER_PORT, name, pika.PlainCredentials('guest', 'guest')))

    yield Locked
    rabbitmqctl('delete_vhost', name, check=False)


# -- process-level supervisor tests (tests/harness.py) --------------------------------------

@pytest.fixture
def start_supervisor(subprocess_env, tmp_path):
    """A function that starts carrot-supervisor subprocesses; all of them are gone after the test."""
    from tests.harness import Starter
    starter = Starter(subprocess_env, tmp_path)
    yield starter
    starter.cleanup()


@pytest.fixture
def notify_socket():
    """A stand-in for systemd's NOTIFY_SOCKET (tests.harness.NotifySocket)."""
    from tests.harness import NotifySocket
    sock = NotifySocket()
    yield sock
    sock.close()


# -- a database without tables (what `migrate` has not created yet) --------------------------------

@pytest.fixture
def empty_database(tmp_path):
    """The NAME of a database without any table: a fresh SQLite file, or a new PostgreSQL database."""
    from django.db import connection
    if connection.vendor == 'sqlite':
        yield str(tmp_path / 'empty.sqlite3')
        return
    import uuid

    import psycopg
    params = connection.settings_dict
    name = f'carrot_empty_{uuid.uuid4().hex[:8]}'
    admin = dict(host=params['HOST'], port=params['PORT'], user=params['USER'],
                 password=params['PASSWORD'] or None, dbname='postgres', autocommit=True)
    with psycopg.connect(**admin) as pg:
        pg.execute(f'CREATE DATABASE {name}')
    yield name
    with psycopg.connect(**admin) as pg:
        pg.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
