"""carrot.publish.outbox against the real RabbitMQ and database: the error hierarchy, size limit, a lost
confirm, store-and-forward and the relay of waiting rows, requeue, and the import graph."""
import json
import os
import subprocess
import sys
import uuid
import warnings
from datetime import datetime, timedelta, timezone as dt_timezone

import pika
import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from django.utils.translation import gettext_lazy
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from carrot.config import get_config
from carrot.publish.relay import Relay
from carrot.amqp.publisher import Publisher
from carrot.exceptions import (BrokerUnavailable, MessageRejected, MessageTooLarge, PublishError,
                               TaskNotRegistered)
from carrot.models import MessageLog
from carrot.publish import outbox
from carrot.utilities import publish_message
from tests.conftest import queue_depth, run_consumer
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

ADD = 'tests.testapp.tasks.add'


def all_messages(channel, queue='default'):
    found = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return found
        found.append((properties, body))


# --- checked before anything is written ---------------------------------------------------------------

def test_a_message_over_max_message_size_is_refused_before_any_row_is_written(raw_channel):
    with override_settings(CARROT={**settings.CARROT, 'max_message_size': 100}):
        with pytest.raises(MessageTooLarge, match=r'tests\.testapp\.tasks\.echo is \d+ bytes, more than '
                                                  r'CARROT\["max_message_size"\] \(100 bytes\)'):
            publish_message(tasks.echo, 'x' * 100)
        assert MessageLog.objects.count() == 0
        assert queue_depth('default') == 0
        publish_message(tasks.echo, 'small')  # under the limit: fine
    assert MessageLog.objects.get().status == 'PUBLISHED'
    assert issubclass(MessageTooLarge, MessageRejected) and issubclass(MessageRejected, PublishError)


def test_arguments_nested_too_deeply_are_refused_before_any_row_is_written():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match='nested too deeply'):
        publish_message(tasks.echo, deep)
    assert MessageLog.objects.count() == 0


# --- refused by the broker: FAILED at once ------------------------------------------------------------

def test_unroutable_message_is_rejected_and_failed_at_once():
    with pytest.raises(MessageRejected, match='unroutable'):
        publish_message(tasks.add, 1, 2, exchange='amq.direct', routing_key='nobody-listens')
    log = MessageLog.objects.get()
    assert log.status == 'FAILED' and log.exception.startswith('MessageRejected:')


def test_missing_exchange_is_rejected_and_failed_at_once():
    with pytest.raises(MessageRejected, match='NOT_FOUND'):
        publish_message(tasks.add, 1, 2, exchange='no-such-exchange')
    assert MessageLog.objects.get().status == 'FAILED'
    publish_message(tasks.add, 1, 2)  # the publisher recovered its channel
    assert queue_depth('default') == 1


# --- a lost confirm -----------------------------------------------------------------------------------

def test_retry_after_a_lost_confirm_reuses_the_message_id(monkeypatch, raw_channel):
    real = Publisher._basic_publish
    calls = []

    def publish_then_lose_the_connection(channel, *args):
        calls.append(args)
        real(channel, *args)
        if len(calls) == 1:  # the message is in the queue, but this publisher never hears so
            raise pika.exceptions.StreamLostError('connection lost before the confirm (test)')

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(publish_then_lose_the_connection))
    log = publish_message(tasks.add, 1, 2)
    assert log.status == 'PUBLISHED' and len(calls) == 2
    copies = all_messages(raw_channel)
    assert [p.message_id for p, _ in copies] == [log.uuid, log.uuid]  # one id: a consumer's claim dedups
    assert MessageLog.objects.count() == 1


def test_the_row_is_left_alone_when_a_consumer_claimed_it_before_the_confirm(monkeypatch):
    real = Publisher._basic_publish

    def claim_then_publish(channel, *args):
        # As a fast consumer would: it claims the row between the send and the confirm.
        MessageLog.objects.filter(status=MessageLog.WAITING).update(status=MessageLog.IN_PROGRESS)
        real(channel, *args)

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(claim_then_publish))
    log = publish_message(tasks.add, 1, 2)
    assert log.status == 'IN_PROGRESS'
    assert MessageLog.objects.get().status == 'IN_PROGRESS'


# --- store-and-forward: a broker that refuses us, then lets us in -------------------------------------

def age(log, seconds=120):
    MessageLog.objects.filter(pk=log.pk).update(publish_time=timezone.now() - timedelta(seconds=seconds))


@pytest.mark.timeout(120)
def test_waiting_messages_are_relayed_with_their_own_id_once_the_broker_is_back(locked_vhost, caplog):
    carrot = {**settings.CARROT, 'queues': [*settings.CARROT['queues'], {'name': 'locked', 'host': locked_vhost.url}]}
    with override_settings(CARROT=carrot):
        waiting = [publish_message(tasks.add, i, i, queue='locked') for i in range(3)]
        reachable = publish_message(tasks.add, 9, 9)  # another broker is not held up
        assert [log.status for log in waiting] == ['WAITING'] * 3 and reachable.status == 'PUBLISHED'
        for log in waiting:
            age(log)

        relay = Relay()
        assert relay.relay_waiting() == 0           # still locked: the rows wait
        assert MessageLog.objects.filter(status='WAITING').count() == 3
        assert caplog.text.count('is unavailable; waiting messages are kept') == 1
        broker = get_config().queue('locked').broker
        assert relay.unavailable[broker].failures == 1
        assert relay.relay_waiting() == 0           # backing off: not tried again at once ...
        assert relay.unavailable[broker].failures == 1    # ... (a try would have counted a second failure)

        locked_vhost.unlock()
        for backoff in relay.unavailable.values():
            backoff.retry_at = 0.0  # the backoff is over
        assert relay.relay_waiting() == 3
        assert 'takes messages again' in caplog.text
        assert MessageLog.objects.filter(status='PUBLISHED').count() == 4

        connection = locked_vhost.connect()
        try:
            copies = all_messages(connection.channel(), 'locked')
        finally:
            connection.close()
        assert sorted(p.message_id for p, _ in copies) == sorted(log.uuid for log in waiting)
        assert sorted(json.loads(body)['args'][0] for _, body in copies) == [0, 1, 2]
        assert all(p.headers == {'type': ADD} for p, _ in copies)
        assert relay.relay_waiting() == 0           # nothing is sent twice


def test_the_relay_leaves_fresh_rows_to_their_publisher_and_sends_a_bounded_batch(raw_channel):
    rows = [MessageLog.objects.create(status='WAITING', queue='default', routing_key='default', task=ADD,
                                      uuid=str(uuid.uuid4()), task_args=f'[{i}, 1]', content='{}',
                                      publish_time=timezone.now()) for i in range(3)]
    relay = Relay(batch=2, relay_after=30)  # 30 s, not 5: a stalled test machine stays correct
    assert relay.relay_waiting() == 0  # written just now: the process that wrote them may still send them
    for log in rows:
        age(log)
    assert relay.relay_waiting(budget=0) == 2  # one batch per call when there is no time for more
    assert relay.relay_waiting(budget=0) == 1
    assert queue_depth('default') == 3
    assert MessageLog.objects.filter(status='PUBLISHED').count() == 3


def test_the_relay_sends_batch_after_batch_within_its_budget(raw_channel):
    for i in range(5):
        age(MessageLog.objects.create(status='WAITING', queue='default', routing_key='default', task=ADD,
                                      uuid=str(uuid.uuid4()), task_args=f'[{i}, 1]', content='{}',
                                      publish_time=timezone.now()))
    assert Relay(batch=2, relay_after=30).relay_waiting() == 5
    assert queue_depth('default') == 5


def test_the_relay_fails_rows_it_can_never_send(raw_channel):
    def waiting(task=ADD, queue='default', args='[1, 2]', routing_key=None):
        log = MessageLog.objects.create(status='WAITING', queue=queue, routing_key=routing_key or queue, task=task,
                                        uuid=str(uuid.uuid4()), task_args=args, content='{}',
                                        publish_time=timezone.now() - timedelta(minutes=1))
        return log.pk

    not_a_task, no_queue, bad_args = waiting(task='os.system'), waiting(queue='gone'), waiting(args='[1,')
    long_key = waiting(routing_key='é' * 130)  # written by an older carrot: 260 bytes, more than AMQP carries
    good = waiting()
    assert Relay().relay_waiting() == 1
    rows = {log.pk: log for log in MessageLog.objects.all()}
    assert rows[good].status == 'PUBLISHED'
    for pk, reason in ((not_a_task, 'not registered'), (no_queue, "no queue called 'gone'"),
                       (bad_args, 'could not be relayed'), (long_key, 'routing_key is too long')):
        assert rows[pk].status == 'FAILED', reason
        assert reason in rows[pk].exception


def test_a_row_whose_send_fails_unexpectedly_is_failed_and_the_rows_behind_it_go_out(raw_channel, monkeypatch,
                                                                                     caplog):
    """Whatever a row's send raises besides the broker's and the database's errors (a bug, a value the AMQP
    client cannot encode) would come back on every tick and hold up every row behind it: FAILED, saying so."""
    old = timezone.now() - timedelta(minutes=1)
    first, second = (MessageLog.objects.create(status='WAITING', queue='default', routing_key='default', task=ADD,
                                               uuid=str(uuid.uuid4()), task_args=f'[{n}, 0]', content='{}',
                                               publish_time=old + timedelta(seconds=n)) for n in (1, 2))
    real = Publisher._basic_publish

    def fail_the_first(channel, exchange, routing_key, body, properties, *rest):
        if properties['message_id'] == first.uuid:
            raise RuntimeError('a bug in the send')
        return real(channel, exchange, routing_key, body, properties, *rest)

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(fail_the_first))
    assert Relay().relay_waiting() == 1
    first.refresh_from_db(), second.refresh_from_db()
    assert (first.status, second.status) == ('FAILED', 'PUBLISHED')
    assert 'RuntimeError: a waiting message could not be relayed: a bug in the send' in first.exception
    assert 'sending tests.testapp.tasks.add (%s) failed unexpectedly' % first.uuid in caplog.text
    assert queue_depth('default') == 1


def test_a_row_deleted_while_the_relay_sends_it_is_neither_failed_nor_said_to_be(raw_channel, monkeypatch, caplog):
    """An operator deletes a waiting row from the monitor just as the relay sends it: the message has left,
    there is no row to mark, and nothing claims to have marked one FAILED."""
    row = MessageLog.objects.create(status='WAITING', queue='default', routing_key='default', task=ADD,
                                    uuid=str(uuid.uuid4()), task_args='[1, 0]', content='{}',
                                    publish_time=timezone.now() - timedelta(minutes=1))
    real = Publisher._basic_publish

    def delete_then_publish(channel, *args):
        MessageLog.objects.filter(pk=row.pk).delete()
        return real(channel, *args)

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(delete_then_publish))
    assert Relay().relay_waiting() == 1
    assert 'FAILED' not in caplog.text and 'failed unexpectedly' not in caplog.text
    assert not MessageLog.objects.filter(pk=row.pk).exists()
    assert queue_depth('default') == 1


@pytest.mark.timeout(120)
def test_a_waiting_message_runs_once_after_the_relay(locked_vhost):
    carrot = {**settings.CARROT, 'queues': [*settings.CARROT['queues'], {'name': 'locked', 'host': locked_vhost.url}]}
    with override_settings(CARROT=carrot):
        log = publish_message(tasks.add, 20, 22, queue='locked')
        assert log.status == 'WAITING'
        locked_vhost.unlock()
        age(log)
        assert Relay().relay_waiting() == 1
        run_consumer('locked', max_messages=1, idle_timeout=10)
    log.refresh_from_db()
    assert (log.status, log.output, log.attempts) == ('COMPLETED', '42', 1)


# --- requeue ------------------------------------------------------------------------------------------

def test_requeue_publishes_a_copy_and_deletes_the_original(raw_channel):
    original = publish_message(tasks.add, 1, 2, priority=4)
    all_messages(raw_channel)
    MessageLog.objects.filter(pk=original.pk).update(status='FAILED')
    original.refresh_from_db()
    copy = original.requeue()
    assert copy.uuid != original.uuid and copy.status == 'PUBLISHED'
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == [copy.uuid]
    (properties, body), = all_messages(raw_channel)
    assert properties.message_id == copy.uuid and properties.priority == 4
    assert json.loads(body) == {'args': [1, 2], 'kwargs': {}}


def test_requeue_of_a_task_no_longer_registered_keeps_the_original():
    log = MessageLog.objects.create(status='FAILED', queue='default', task='os.system', uuid='old',
                                    task_args='["true"]', content='{}')
    with pytest.raises(TaskNotRegistered):
        log.requeue()
    assert MessageLog.objects.get().uuid == 'old'


# --- the import graph ---------------------------------------------------------------------------------

@pytest.mark.parametrize('module', ['carrot.models', 'carrot.objects', 'carrot.utilities', 'carrot.publish.outbox'])
def test_each_publishing_module_imports_first_on_its_own(module, subprocess_env):
    code = f'import django; django.setup(); import {module}'
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_broker_unavailable_is_raised_for_a_connection_refused():
    with override_settings(CARROT={'queues': [{'name': 'down', 'host': 'amqp://guest:guest@127.0.0.1:1/'}],
                                   'store_and_forward': False}):
        with pytest.raises(PublishError) as caught:
            publish_message(tasks.add, 1, 2, queue='down')
    assert type(caught.value) is BrokerUnavailable



@pytest.mark.parametrize('task_args, content, reason', [
    ('[' * 100_000 + ']' * 100_000, '{}', 'the stored positional arguments are nested too deeply'),
    ('not json', '{}', 'the stored positional arguments are neither JSON nor a 1.x tuple'),
    ('[1]', '[1]', 'the stored keyword arguments are a list, not a dict'),
])
def test_requeue_of_a_row_whose_arguments_cannot_be_read_says_why_and_keeps_it(task_args, content, reason):
    log = MessageLog.objects.create(status='FAILED', queue='default', task=ADD, uuid='old', task_args=task_args,
                                    content=content)
    with pytest.raises(ValueError, match=reason):
        log.requeue()
    assert MessageLog.objects.get().uuid == 'old'


def test_requeue_reads_1x_tuple_arguments(raw_channel):
    log = MessageLog.objects.create(status='FAILED', queue='default', task=ADD, uuid='old', task_args='(1, 2)',
                                    content='')
    copy = log.requeue()
    (properties, body), = all_messages(raw_channel)
    assert json.loads(body) == {'args': [1, 2], 'kwargs': {}} and properties.message_id == copy.uuid


def test_an_unreachable_broker_is_tried_once_per_publish_not_twice(caplog, monkeypatch):
    from carrot.amqp import publisher as broker
    connects = []
    real = broker.connect
    monkeypatch.setattr(broker, 'connect', lambda *a, **k: connects.append(1) or real(*a, **k))
    with override_settings(CARROT={'queues': [{'name': 'down', 'host': 'amqp://guest:guest@127.0.0.1:1/'}]}):
        publish_message(tasks.add, 1, 2, queue='down')
    assert len(connects) == 1
    assert MessageLog.objects.get().status == 'WAITING'


@pytest.mark.parametrize('publish', ['single', 'batch'])
def test_a_connection_an_interrupt_left_in_a_transaction_django_does_not_know_of_loses_no_task(publish, caplog):
    """Django turns the driver's autocommit off, then its own flag: a signal handler's exception raised
    between the two (entering transaction.atomic()) leaves the driver in a transaction Django believes it
    is not in. A row written there would wait for a commit nobody sends and vanish with the connection --
    while the caller holds it, PUBLISHED. The publish closes that connection first (rolling back what it
    had not committed, as closing it at the request's end would) and writes on a consistent one."""
    from django.contrib.auth.models import User
    from django.db import connection
    from carrot.utilities import publish_messages
    connection.ensure_connection()
    connection._set_autocommit(False)  # Django's first step; the interrupt came before its second
    assert connection.get_autocommit() and not connection.in_atomic_block
    User.objects.create(username='written after the interrupt')  # believed committed; it is not
    if publish == 'single':
        rows = [publish_message(tasks.add, 1, 2)]
    else:
        rows = publish_messages(tasks.add, [((1, 2), {}), ((3, 4), {})])
    connection.close()  # what was not committed goes now
    assert sorted(MessageLog.objects.values_list('uuid', 'status')) == sorted((r.uuid, 'PUBLISHED') for r in rows)
    assert queue_depth('default') == len(rows)
    assert not User.objects.filter(username='written after the interrupt').exists()  # rolled back, not kept
    assert "autocommit off for the driver and on for Django" in caplog.text


def test_a_transaction_begun_by_hand_is_left_to_its_owner():
    """Django's autocommit turned off the documented way (set_autocommit) is not an interrupt's doing: the
    publish writes in the caller's transaction and leaves it open."""
    from django.db import connection, transaction
    transaction.set_autocommit(False)
    try:
        row = publish_message(tasks.add, 1, 2)
        assert connection.connection is not None and not connection.get_autocommit()
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert MessageLog.objects.filter(uuid=row.uuid).exists()


@pytest.fixture
def silent_name_lookup(monkeypatch):
    """A DNS server that does not answer: the lookup of SILENT_HOST blocks (until the test ends, so pika's
    lookup thread does not outlive it); every other name is looked up as usual."""
    import socket
    import threading
    released = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == SILENT_HOST:
            released.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
    yield
    released.set()


SILENT_HOST = 'silent-dns.carrot.invalid'


@pytest.mark.timeout(60)
def test_a_name_lookup_that_never_answers_fails_the_connect_by_its_deadline(silent_name_lookup):
    """pika bounds the TCP connect and the handshake, not the name lookup (nor a workflow wedged by an
    exception a signal handler raised into it): carrot's deadline ends the connect all the same, as a
    connection error, which every caller treats as the broker being unreachable."""
    import time
    from carrot.amqp import pika_compat
    from carrot.amqp.connection import connect
    from carrot.config.schema import BrokerConfig
    started = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError, match='not up within 6s'):
        connect(BrokerConfig(host=SILENT_HOST), socket_timeout=1, stack_timeout=1)  # deadline 1 + 5 s
    assert time.monotonic() - started < 6 + 3
    assert pika_compat.CONNECT_DEADLINE_SLACK == 5.0


@pytest.mark.timeout(60)
def test_a_publish_to_a_broker_whose_name_never_resolves_returns_with_the_task_waiting(silent_name_lookup,
                                                                                       monkeypatch):
    """A web request publishing while the DNS server is silent gets its answer after the connect deadline
    (here shortened to 2 s): the task waits for the broker in its row, for the relay."""
    import time
    from carrot.amqp import pika_compat
    monkeypatch.setattr(pika_compat, 'connect_deadline', lambda parameters: 2.0)
    started = time.monotonic()
    with override_settings(CARROT={'queues': [{'name': 'silent', 'host': f'amqp://guest:guest@{SILENT_HOST}/'}]}):
        row = publish_message(tasks.add, 1, 2, queue='silent')
    assert time.monotonic() - started < 2 + 3
    assert row.status == 'WAITING' and MessageLog.objects.get(uuid=row.uuid).status == 'WAITING'


def test_the_socket_of_an_open_connection_is_found():
    """pika keeps the socket private; the after-fork hook (carrot.amqp.pika_compat) reaches it. Fails
    loudly if a pika upgrade moves it, instead of silently letting a task's forked child hold it."""
    from carrot.amqp import pika_compat
    from carrot.amqp.connection import connect
    connection = connect(get_config().queue('default').broker)
    try:
        fd = pika_compat.socket_fd(connection)
        assert isinstance(fd, int) and fd >= 0
        import socket
        assert socket.socket(fileno=os.dup(fd)).getpeername()[1] == 5672
    finally:
        connection.close()
    assert pika_compat.socket_fd(connection) is None


# --- the row's INSERT sent while RabbitMQ confirms (PostgreSQL, psycopg 3) ---------------------------------

def sends_rows_early():
    from django.db import connection
    if connection.vendor != 'postgresql':
        pytest.skip("the row's INSERT is sent while RabbitMQ confirms on PostgreSQL only (CARROT_TEST_DB=postgres)")
    publish_message(tasks.add, 0, 0)  # the INSERT is prepared on this connection: from now on it is sent early


@pytest.fixture
def refused_rows():
    """A trigger that makes PostgreSQL refuse every new log row of add(1, 2) -- a database that refuses it just
    after the message has left -- until the test drops it."""
    from django.db import connection
    if connection.vendor != 'postgresql':
        pytest.skip('a PL/pgSQL trigger (CARROT_TEST_DB=postgres)')
    table = MessageLog._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION carrot_refuse_row() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
        cursor.execute(f"CREATE TRIGGER carrot_refuse_row BEFORE INSERT ON {table} FOR EACH ROW "
                       f"WHEN (NEW.task_args = '[1, 2]') EXECUTE FUNCTION carrot_refuse_row()")

    def allow():
        with connection.cursor() as cursor:
            cursor.execute(f'DROP TRIGGER IF EXISTS carrot_refuse_row ON {table}')
            cursor.execute('DROP FUNCTION IF EXISTS carrot_refuse_row()')
    yield allow
    allow()


def test_a_row_its_worker_wrote_first_becomes_the_publishers_row(raw_channel):
    """A worker that gets the message before the publisher's INSERT reaches the table writes the row
    itself (as for any message without one); the INSERT then finds it and the call returns that row."""
    sends_rows_early()
    from carrot.publish import outbox
    from carrot.publish.outgoing import prepare
    all_messages(raw_channel)
    message = prepare(ADD, (1, 2), {}, queue='default')
    task_args, content = outbox.arguments.dump(message.args, message.kwargs)
    worker_row = MessageLog.objects.create(uuid=message.uuid, task=ADD, queue='default', task_args=task_args,
                                           content=content, status=MessageLog.IN_PROGRESS, worker='host:1')
    log = outbox.enqueue(message)
    assert (log.pk, log.status, log.worker) == (worker_row.pk, 'IN_PROGRESS', 'host:1')
    assert MessageLog.objects.filter(uuid=message.uuid).count() == 1
    assert [p.message_id for p, _ in all_messages(raw_channel)] == [message.uuid]


def test_on_a_new_connection_an_id_that_has_a_row_is_refused_before_anything_is_sent():
    from django.db import IntegrityError, connection
    from carrot.publish import outbox
    from carrot.publish.outgoing import prepare
    connection.close()  # the first INSERT of a connection is written before the message is sent
    message = prepare(ADD, (1, 2), {}, queue='default')
    MessageLog.objects.create(uuid=message.uuid, task=ADD, queue='default', status=MessageLog.COMPLETED)
    with pytest.raises(IntegrityError, match=message.uuid):
        outbox.enqueue(message)
    assert queue_depth('default') == 0
    assert MessageLog.objects.get(uuid=message.uuid).status == 'COMPLETED'


class LostSession:
    """The publisher's database session lost while its row's INSERT is on the way (the server restarted,
    a pooler or an operator ended it): another session holds a lock the INSERT waits for, and the
    publisher's session is terminated before the lock goes."""

    def __init__(self):
        from django.db import connection, connections
        with connection.cursor() as cursor:
            cursor.execute('SELECT pg_backend_pid()')
            self.pid = cursor.fetchone()[0]
        self.locker = connections.create_connection('default')
        self.locker.inc_thread_sharing()  # now() may be called from a timer thread
        with self.locker.cursor() as cursor:
            # Should now() never come, the server ends the lock after 10 s, and with it the test's wait.
            cursor.execute("SET idle_in_transaction_session_timeout = '10s'")
        self.locker.set_autocommit(False)
        with self.locker.cursor() as cursor:
            cursor.execute(f'LOCK TABLE {MessageLog._meta.db_table} IN SHARE MODE')  # INSERTs wait

    def now(self):
        with self.locker.cursor() as cursor:
            cursor.execute('SELECT pg_terminate_backend(%s)', [self.pid])
        self.locker.rollback()

    def close(self):
        self.locker.close()
        self.locker.dec_thread_sharing()


def test_a_row_lost_with_its_session_after_its_message_left_is_written_by_the_worker_and_runs_once(
        monkeypatch, caplog):
    """The message is on its way when the INSERT is lost: the call must not raise (a caller would publish the
    task again), and the task is not lost -- the worker that takes it writes the row and runs it."""
    sends_rows_early()
    real = Publisher._basic_publish
    lost = LostSession()

    def lose_the_session_then_publish(channel, *args):
        lost.now()
        real(channel, *args)

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(lose_the_session_then_publish))
    try:
        log = publish_message(tasks.add, 1, 2)
    finally:
        lost.close()
    assert log.pk is None and log.status == 'PUBLISHED'
    assert 'its log row could not be written' in caplog.text
    assert not MessageLog.objects.filter(uuid=log.uuid).exists()  # the next query has a session again
    assert queue_depth('default') == 2
    run_consumer(max_messages=2, idle_timeout=5)
    row = MessageLog.objects.get(uuid=log.uuid)
    assert (row.status, row.attempts, row.task_args) == ('COMPLETED', 1, '[1, 2]')
    assert queue_depth('default') == 0


def test_a_row_refused_for_good_after_its_message_left_is_raised_and_its_worker_does_not_run_it(
        refused_rows, tmp_path):
    """A refusal that will not pass (here a trigger) is raised although the message has left: its worker is
    refused the row as well, and dead-letters the message without running it."""
    sends_rows_early()
    run_consumer(max_messages=1, idle_timeout=5)  # its add(0, 0) out of the way
    from django.db import DatabaseError
    MessageLog.objects.all().delete()
    target = tmp_path / 'ran.txt'
    with pytest.raises(DatabaseError, match='refused by the test'):
        publish_message(tasks.add, 1, 2)
    publish_message(tasks.append_line, str(target), 'ran')  # behind it, to show the worker went past
    run_consumer(max_messages=2, idle_timeout=5)
    assert target.read_text() == 'ran\n'
    assert list(MessageLog.objects.order_by('pk').values_list('task_args', 'status')) == [
        (f'["{target}", "ran"]', 'COMPLETED')]
    assert queue_depth('default') == 0


def test_a_row_lost_with_its_session_while_the_broker_is_away_is_written_again_to_wait_for_the_relay(caplog):
    """Two faults at once: the broker cannot take the message (or its confirm is lost: it may have arrived)
    and the INSERT is lost with its session. The row is written again on a new session, WAITING: the relay
    sends it (a copy of one that did arrive is recognised by its id)."""
    import threading
    with override_settings(CARROT={'queues': [{'name': 'down', 'host': 'amqp://guest:guest@127.0.0.1:1/'}]}):
        from django.db import connection
        if connection.vendor != 'postgresql':
            pytest.skip('PostgreSQL only (CARROT_TEST_DB=postgres)')
        publish_message(tasks.add, 0, 0, queue='down')  # prepared on this connection (and left WAITING)
        lost = LostSession()
        later = threading.Timer(0.5, lost.now)  # while the publisher waits for the INSERT's answer
        later.start()
        try:
            log = publish_message(tasks.add, 1, 2, queue='down')
        finally:
            later.join(10)
            lost.close()
    assert 'it is written again, to wait for the relay' in caplog.text
    assert log.pk is not None and log.status == 'WAITING'
    assert MessageLog.objects.get(uuid=log.uuid).status == 'WAITING'
    assert MessageLog.objects.filter(uuid=log.uuid).count() == 1


def test_a_row_refused_when_the_broker_is_away_too_raises_and_leaves_nothing(refused_rows):
    """Neither the row (refused again on the second try) nor the message: the call raises the database's
    error, as when the row is written first, and nothing waits for the relay."""
    from django.db import DatabaseError
    with override_settings(CARROT={'queues': [{'name': 'down', 'host': 'amqp://guest:guest@127.0.0.1:1/'}]}):
        publish_message(tasks.add, 0, 0, queue='down')  # prepared on this connection (and left WAITING)
        with pytest.raises(DatabaseError, match='refused by the test'):
            publish_message(tasks.add, 1, 2, queue='down')
    assert list(MessageLog.objects.values_list('task_args', flat=True)) == ['[0, 0]']


def test_a_consumer_that_claims_the_row_before_the_confirm_leaves_it_claimed(monkeypatch):
    """As the test above without early INSERTs, with the claim from another session (as a worker's is):
    the row is found, claimed, and left IN_PROGRESS by the publisher's PUBLISHED update."""
    sends_rows_early()
    import time
    from django.db import connections
    real = Publisher._basic_publish
    worker = connections.create_connection('default')

    def claim_then_publish(channel, *args):
        properties = args[3]
        deadline = time.monotonic() + 10
        with worker.cursor() as cursor:
            while time.monotonic() < deadline:  # the INSERT is on its way; a worker sees it once committed
                cursor.execute(f'UPDATE {MessageLog._meta.db_table} SET status = %s WHERE uuid = %s',
                               ['IN_PROGRESS', properties['message_id']])
                if cursor.rowcount:
                    break
        real(channel, *args)

    monkeypatch.setattr(Publisher, '_basic_publish', staticmethod(claim_then_publish))
    try:
        log = publish_message(tasks.add, 1, 2)
    finally:
        worker.close()
    assert log.status == 'IN_PROGRESS'
    assert MessageLog.objects.get(uuid=log.uuid).status == 'IN_PROGRESS'


class Interrupted(Exception):
    """What a signal handler of the caller's raises in the middle of a publish (a time limit, say)."""


def test_an_interrupt_the_instant_the_rows_insert_left_closes_the_connection_its_answer_waits_on(monkeypatch):
    """An exception from a signal handler may come the instant the INSERT has left, before the call holds on
    to it: its answer is then never read, and the connection it waits on must not serve the next query
    ('another command is already in progress'). Nothing was sent for the interrupted call."""
    sends_rows_early()
    from django.db import connection
    from carrot.publish import outbox
    start_insert = outbox._start_insert

    def interrupted_once_sent(row):
        assert start_insert(row) is not None  # sent early: the answer is pending
        raise Interrupted()

    monkeypatch.setattr(outbox, '_start_insert', interrupted_once_sent)
    with pytest.raises(Interrupted):
        publish_message(tasks.add, 1, 2)
    assert connection.connection is None  # closed, not left busy
    monkeypatch.undo()
    log = publish_message(tasks.add, 3, 4)
    assert MessageLog.objects.get(uuid=log.uuid).status == 'PUBLISHED'
    assert queue_depth('default') == 2  # add(0, 0) and add(3, 4)


def test_a_caller_whose_transaction_begun_by_hand_has_failed_is_refused_before_anything_is_sent():
    """A raw BEGIN that Django does not know of, and a statement in it that failed: the INSERT would be
    refused for the session's sake, so it is not sent ahead of the message -- the call raises and nothing
    is on the queue (sent first, the task would run while the call said it failed)."""
    sends_rows_early()
    from django.db import InternalError, connection
    with connection.cursor() as cursor:
        cursor.execute('BEGIN')
        with pytest.raises(Exception):
            cursor.execute('SELECT 1/0')
    try:
        with pytest.raises(InternalError, match='current transaction is aborted'):
            publish_message(tasks.add, 1, 2)
    finally:
        with connection.cursor() as cursor:
            cursor.execute('ROLLBACK')
    assert queue_depth('default') == 1  # add(0, 0) only
    assert list(MessageLog.objects.values_list('task_args', flat=True)) == ['[0, 0]']


def test_a_row_the_callers_read_only_session_refuses_after_its_message_left_is_written_by_the_worker(caplog):
    """A session the caller set read-only refuses the row only after the message left: the worker's session
    writes it and runs the task once, so the call returns (logging why) instead of raising -- a caller
    that publishes again would run it twice."""
    sends_rows_early()
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute('SET default_transaction_read_only TO on')
    try:
        log = publish_message(tasks.add, 1, 2)
    finally:
        with connection.cursor() as cursor:
            cursor.execute('RESET default_transaction_read_only')
    assert log.pk is None and log.status == 'PUBLISHED'
    assert 'its log row could not be written' in caplog.text and 'read-only' in caplog.text
    run_consumer(max_messages=2, idle_timeout=5)
    row = MessageLog.objects.get(uuid=log.uuid)
    assert (row.status, row.attempts, row.task_args) == ('COMPLETED', 1, '[1, 2]')
    assert queue_depth('default') == 0


# Values of the kinds a row holds, and of kinds it might (lazy text, text subclasses, naive and aware
# datetimes), per kind of column: what publish_message sends for each must be what the ORM sends, of the
# same type too (on psycopg 3 the ORM wraps an int, to bind it as a typed integer).
class TextSubclass(str):
    pass


TEXT_VALUES = st.one_of(st.none(), st.text(max_size=20), st.text(max_size=5).map(TextSubclass),
                        st.text(max_size=5).map(gettext_lazy))
DATETIMES = st.one_of(
    st.none(), st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.none()),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(dt_timezone.utc)))


def column_values(field):
    if field.get_internal_type() in ('CharField', 'TextField'):
        return TEXT_VALUES
    if field.get_internal_type() == 'DateTimeField':
        return DATETIMES
    return st.one_of(st.none(), st.integers(0, 2**31 - 1))


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.tuples(*[column_values(field) for field in outbox._insert_fields()]))
def test_the_insert_sends_each_value_as_the_orm_would(values):
    """outbox._insert_params takes some values as they are, without the ORM's conversion (for speed): for
    any value in any column the result must equal the ORM's, type and all."""
    from django.db import connection
    row = MessageLog()
    fields = outbox._insert_fields()
    for field, value in zip(fields, values):
        setattr(row, field.attname, value)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # a naive datetime, which the ORM warns of
        expected = [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
        sent = outbox._insert_params(row, connection.alias)
    assert [(type(value), value) for value in sent] == [(type(value), value) for value in expected]
