"""The consume side against the real RabbitMQ and database: at most one execution at a time, hostile
deliveries, adoption, conflicts, outages and the queues carrot declares."""
import json
import logging
import sys
import threading
import time
import uuid

import pika
import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from carrot.amqp.declare import declare_queue
from carrot.config import get_config
from carrot.consumer import Consumer
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth, rabbitmqctl, raw_connection, run_consumer
from tests.test_consumer import consume_in_subprocess
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)
ADD = 'tests.testapp.tasks.add'


def publish_raw(channel, body=b'{}', headers=None, queue='default', **props):
    """Publish exactly these bytes and properties, as any client of the broker could."""
    declare_queue(channel, get_config().queue(queue))
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    channel.basic_publish('', queue, body, pika.BasicProperties(headers=headers, **props))


def wait_until(condition, timeout=30, what='the condition'):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.1)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


class ConsumerThread:
    """A Consumer running in a thread of this process (its DB connection is closed when it ends)."""

    def __init__(self, name, consumer_class=Consumer, **run_kwargs):
        queue = get_config().queue('default')
        self.consumer = consumer_class(queue.broker, queue, logging.getLogger('carrot.consumer'), name)
        self.thread = threading.Thread(target=self._run, kwargs=run_kwargs, name=name)
        self.error = None

    def _run(self, **kwargs):
        try:
            self.consumer.run(**kwargs)
        except Exception as exc:  # reported by join()
            self.error = exc
        finally:
            connection.close()

    def start(self):
        self.thread.start()
        return self

    def join(self, timeout=60):
        self.thread.join(timeout)
        alive = self.thread.is_alive()
        if alive:
            self.consumer.stop()
            self.thread.join(30)
        assert not alive, f'{self.thread.name} did not finish'
        assert self.error is None, self.error


def nested_headers(depth):
    headers = {'type': ADD}
    for _ in range(depth):
        headers = {'n': headers}
    return headers


# -- at most one execution at a time -----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_the_same_message_delivered_twice_at_once_runs_once(raw_channel, tmp_path):
    """Two consumers on one queue; the message is on it twice (a publisher retry after a lost confirm)."""
    target = tmp_path / 'runs'
    log = publish_message(tasks.append_and_sleep, str(target), 'once', 3)
    publish_raw(raw_channel, {'args': [str(target), 'once', 3]},
                {'type': 'tests.testapp.tasks.append_and_sleep'}, message_id=log.uuid)
    consumers = [ConsumerThread(f'default#{n}', idle_timeout=8).start() for n in (1, 2)]
    for consumer in consumers:
        consumer.join(timeout=90)
    assert lines(target) == ['once']
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert sum(c.consumer.messages_settled for c in consumers) == 2  # the run, and the duplicate's ack
    assert (queue_depth('default'), delay_depth(), queue_depth('default.dead')) == (0, 0, 0)


@pytest.mark.timeout(120)
def test_a_message_without_id_is_adopted_and_its_attempts_are_capped(raw_channel, subprocess_env):
    publish_raw(raw_channel, {'args': []}, {'type': 'tests.testapp.tasks.die'})
    for attempt in (1, 2, 3):
        result = consume_in_subprocess(subprocess_env)
        assert result.returncode == 17, result.stderr  # the task killed its worker
        log = MessageLog.objects.get()  # one row for all deliveries, not one orphan per delivery
        assert (log.status, log.attempts) == ('IN_PROGRESS', attempt)
    run_consumer(max_messages=1)
    log = MessageLog.objects.get()
    assert log.status == 'FAILED' and log.exception.startswith('worker lost after 3 attempts')
    assert [p.message_id for p, _ in dead_letters(raw_channel)] == [log.uuid]


def test_an_adopted_message_runs_once_under_its_new_id(raw_channel):
    publish_raw(raw_channel, {'args': [20, 22]}, {'type': ADD})
    consumer = run_consumer(max_messages=1)
    log = MessageLog.objects.get()
    assert (log.status, log.output, log.attempts) == ('COMPLETED', '42', 1)
    assert consumer.messages_settled == 1 and queue_depth('default') == 0


def test_a_message_reusing_another_messages_id_is_refused_and_that_log_kept(raw_channel, tmp_path):
    log = publish_message(tasks.add, 1, 2)
    run_consumer(max_messages=1)
    publish_raw(raw_channel, {'args': [str(tmp_path / 'pwned'), 'x']},
                {'type': 'tests.testapp.tasks.append_line'}, message_id=log.uuid)
    run_consumer(max_messages=1)
    assert not (tmp_path / 'pwned').exists()
    log.refresh_from_db()
    assert (log.status, log.output, log.attempts) == ('COMPLETED', '3', 1)
    conflict = MessageLog.objects.exclude(pk=log.pk).get()
    assert conflict.status == 'FAILED' and 'already belongs to the log of a different message' in \
        conflict.exception
    assert [p.message_id for p, _ in dead_letters(raw_channel)] == [log.uuid]


@pytest.mark.timeout(60)
def test_the_running_consumer_renews_its_claim_while_the_task_runs():
    with override_settings(CARROT={**settings.CARROT, 'claim_lease': 1.5}):
        log = publish_message(tasks.sleep, 5)
        worker = ConsumerThread('default#lease', idle_timeout=2).start()
        wait_until(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='the start')
        leases = set()
        while (row := MessageLog.objects.get(pk=log.pk)).status == 'IN_PROGRESS':
            leases.add(row.lease_expires)
            time.sleep(0.2)
        worker.join()
    assert len(leases) >= 4, leases  # pushed forward again and again, from the connection thread
    assert (row.status, row.attempts, row.lease_expires) == ('COMPLETED', 1, None)


# -- hostile deliveries ------------------------------------------------------------------------------

HOSTILE = [
    # (what, body, headers, other properties)
    ('NUL in type', {}, {'type': 'tests.testapp.tasks.add\x00'}, {}),
    ('ANSI and newline in type', {}, {'type': '\x1b[2J\x1b[31mfake\nERROR forged'}, {}),
    ('invalid UTF-8 in type', {}, {'type': b'\xc3\x28\xff'}, {}),
    ('type is a number', {}, {'type': 7}, {}),
    ('type is a nested table', {}, {'type': {'a': [1, {'b': None}]}}, {}),
    ('type far too long', {}, {'type': 'a.' * 5000 + 'b'}, {}),
    ('headers nested 300 deep', {}, nested_headers(300), {}),
    ('NUL and escapes in message_id', {'args': [1, 2]}, {'type': ADD}, {'message_id': 'id\x00\x1b[1m'}),
    ('message_id far too long', {'args': [1, 2]}, {'type': ADD}, {'message_id': 'x' * 250}),
    ('invalid UTF-8 body', b'\xff\xfe\x00', {'type': ADD}, {}),
    ('JSON nested 10000 deep', b'[' * 10000 + b']' * 10000, {'type': ADD}, {}),
    ('body larger than max_message_size', {'args': ['x' * 30000]}, {'type': 'tests.testapp.tasks.echo'}, {}),
    ('task raising with control characters', {'args': ['\x00\x1b[31m\nred']},
     {'type': 'tests.testapp.tasks.raises_weird'}, {}),
]


@pytest.mark.timeout(120)
def test_hostile_deliveries_end_failed_and_dead_lettered_and_the_next_message_runs(raw_channel, caplog):
    for _, body, headers, props in HOSTILE:
        publish_raw(raw_channel, body, headers, **{'message_id': str(uuid.uuid4()), **props})
    good = publish_message(tasks.add, 2, 2, on_commit=False)
    with override_settings(CARROT={**settings.CARROT, 'max_message_size': 20000}):
        consumer = run_consumer(max_messages=len(HOSTILE) + 1)
    good.refresh_from_db()
    assert good.output == '4'
    failed = MessageLog.objects.filter(status='FAILED')
    assert failed.count() == len(HOSTILE), [f.exception for f in failed]
    for log in failed:
        assert log.exception and '\x00' not in log.exception + log.task
    reasons = ' | '.join(failed.values_list('exception', flat=True))
    for words in ('dotted task path', 'not UTF-8', 'nested too deeply', 'message_id property',
                  "more than CARROT['max_message_size']", 'RuntimeError'):
        assert words in reasons, words
    assert len(dead_letters(raw_channel)) == len(HOSTILE)
    assert queue_depth('default') == 0 and consumer.messages_settled == len(HOSTILE) + 1
    for record in caplog.records:
        message = record.getMessage()
        assert not any(c in message for c in '\x00\x1b'), message
        assert record.name.startswith('carrot') and '\n' not in message or record.exc_info, message


@pytest.mark.timeout(120)
def test_headers_nested_deeper_than_pika_can_recurse_do_not_block_the_queue(raw_channel):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # so that pika can encode it here; the consumer reads with the default
    try:
        publish_raw(raw_channel, {'args': [1, 1]}, nested_headers(2000), message_id=str(uuid.uuid4()))
    finally:
        sys.setrecursionlimit(limit)
    good = publish_message(tasks.add, 3, 3, on_commit=False)
    run_consumer(max_messages=2)
    assert MessageLog.objects.get(pk=good.pk).output == '6'
    bad = MessageLog.objects.exclude(pk=good.pk).get()
    assert bad.status == 'FAILED' and 'nested too deeply' in bad.exception


# -- the 1.x extension points ------------------------------------------------------------------------

CALLS = []


class OldStyleConsumer(Consumer):
    """Overrides written against django-carrot 1.x: two-argument fail(), get_message_log, get_task_type."""

    def get_task_type(self, properties, body):
        CALLS.append('get_task_type')
        return super().get_task_type(properties, body)

    def get_message_log(self, properties, body):
        CALLS.append('get_message_log')
        return super().get_message_log(properties, body)

    def fail(self, log, err):
        CALLS.append(f'fail: {err}')
        super().fail(log, err)


def test_a_1x_subclass_keeps_working_for_good_and_hostile_messages(raw_channel):
    CALLS.clear()
    ok = publish_message(tasks.add, 1, 1, on_commit=False)
    publish_raw(raw_channel, b'not json', {'type': ADD}, message_id=str(uuid.uuid4()))
    failing = publish_message(tasks.explode, 'old style', on_commit=False)
    run_consumer(max_messages=3, consumer_class=OldStyleConsumer)
    assert MessageLog.objects.get(pk=ok.pk).output == '2'
    assert MessageLog.objects.get(pk=failing.pk).exception == 'ValueError: old style'
    assert 'get_message_log' in CALLS and 'get_task_type' in CALLS
    assert any(c.startswith('fail: the message body is not JSON') for c in CALLS)
    assert 'fail: ValueError: old style' in CALLS
    assert len(dead_letters(raw_channel)) == 2


# -- outages -----------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_missing_tables_hold_the_message_then_it_runs_once(raw_channel, tmp_path, caplog):
    target = tmp_path / 'runs'
    message_id = str(uuid.uuid4())
    with connection.cursor() as cursor:
        cursor.execute('ALTER TABLE carrot_messagelog RENAME TO carrot_messagelog_away')
    try:
        worker = ConsumerThread('default#db', idle_timeout=4).start()
        publish_raw(raw_channel, {'args': [str(target), 'x']}, {'type': 'tests.testapp.tasks.append_line'},
                    message_id=message_id)
        wait_until(lambda: 'the database is unavailable' in caplog.text, what='the outage to be logged')
        time.sleep(3)  # retries with backoff meanwhile; the message stays unacked in the slot
        assert queue_depth('default') == 0
    finally:
        with connection.cursor() as cursor:
            cursor.execute('ALTER TABLE carrot_messagelog_away RENAME TO carrot_messagelog')
    worker.join(timeout=90)
    assert lines(target) == ['x']
    log = MessageLog.objects.get(uuid=message_id)
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    said = [r for r in caplog.records if 'the database is' in r.getMessage()]
    assert len(said) == 2 and 'migrate' in said[0].getMessage(), [r.getMessage() for r in said]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.timeout(120)
def test_losing_the_broker_while_waiting_for_the_database_drops_the_delivery_not_the_message(
        tmp_path, caplog):
    target = tmp_path / 'runs'
    message_id = str(uuid.uuid4())
    with connection.cursor() as cursor:
        cursor.execute('ALTER TABLE carrot_messagelog RENAME TO carrot_messagelog_away')
    try:
        worker = ConsumerThread('default#both', idle_timeout=4).start()
        publisher = raw_connection()  # closed before the broker closes every connection of the vhost
        publish_raw(publisher.channel(), {'args': [str(target), 'x']},
                    {'type': 'tests.testapp.tasks.append_line'}, message_id=message_id)
        publisher.close()
        wait_until(lambda: 'the database is unavailable' in caplog.text, what='the database outage')
        rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'carrot test: broker lost too')
        wait_until(lambda: 'lost the delivery while the database is unavailable' in caplog.text,
                   timeout=20, what='the slot to let go of the delivery')
    finally:
        with connection.cursor() as cursor:
            cursor.execute('ALTER TABLE carrot_messagelog_away RENAME TO carrot_messagelog')
    worker.join(timeout=90)
    assert lines(target) == ['x']
    log = MessageLog.objects.get(uuid=message_id)
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert queue_depth('default') == 0


@pytest.mark.timeout(120)
def test_a_connection_lost_mid_task_is_logged_when_it_happens(caplog):
    log = publish_message(tasks.sleep, 6)
    worker = ConsumerThread('default#lost', idle_timeout=4).start()
    wait_until(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='the task to start')
    rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'carrot test: connection lost mid-task')
    wait_until(lambda: 'while running tests.testapp.tasks.sleep' in caplog.text, timeout=10,
               what='the lost connection to be logged')
    assert MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS'  # logged before the task ended
    worker.join(timeout=90)
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert 'already COMPLETED' in caplog.text  # the redelivery was acked as a duplicate, not run
    assert queue_depth('default') == 0


@pytest.mark.timeout(60)
def test_an_unreachable_broker_is_one_warning_not_a_flood(caplog):
    caplog.set_level(logging.INFO)
    worker = Consumer('amqp://guest:guest@127.0.0.1:1/', 'default', logging.getLogger('carrot.consumer'),
                      'default#away')
    thread = threading.Thread(target=worker.run)
    thread.start()
    time.sleep(5)
    worker.stop()
    thread.join(30)
    assert not thread.is_alive()
    unavailable = [r for r in caplog.records if 'is unavailable' in r.getMessage()]
    assert len(unavailable) == 1 and unavailable[0].levelno == logging.WARNING
    assert '***' in unavailable[0].getMessage() and 'guest:guest' not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith('pika') and r.levelno >= logging.WARNING]


# -- what carrot declares ----------------------------------------------------------------------------

def test_dead_letter_queue_keeps_messages_for_the_configured_days():
    run_consumer(idle_timeout=0.5)
    channel = raw_connection().channel()
    channel.queue_declare('default.dead', durable=True, arguments={'x-message-ttl': 14 * 86400 * 1000})
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        channel.queue_declare('default.dead', durable=True)  # without the TTL: not what carrot declared
    assert refused.value.reply_code == 406


def test_no_dead_letter_ttl_when_the_setting_is_none():
    with override_settings(CARROT={**settings.CARROT, 'dead_letter_ttl_days': None}):
        run_consumer(idle_timeout=0.5)
    raw_connection().channel().queue_declare('default.dead', durable=True)


# -- under carrot-supervisor: separate processes -----------------------------------------------------

@pytest.mark.timeout(180)
def test_supervised_children_survive_hostile_input_and_run_a_double_delivery_once(start_supervisor,
                                                                                  raw_channel, tmp_path):
    slots = ['consumer default#1', 'consumer default#2', 'consumer other#1']
    supervisor = start_supervisor(extra="CARROT['queues'][0]['concurrency'] = 2\n")
    kids = supervisor.wait_ready(slots, timeout=60)
    hostile = [({}, {'type': 'tests.testapp.tasks.add\x00'}),      # killed the 1.x-era child every time
               (b'[' * 10000 + b']' * 10000, {'type': ADD}),
               ({}, {'type': b'\xff\xfe'})]
    for body, headers in hostile:
        publish_raw(raw_channel, body, headers, message_id=str(uuid.uuid4()))
    target = tmp_path / 'runs'
    log = publish_message(tasks.append_and_sleep, str(target), 'once', 3)
    publish_raw(raw_channel, {'args': [str(target), 'once', 3]},
                {'type': 'tests.testapp.tasks.append_and_sleep'}, message_id=log.uuid)
    wait_until(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', timeout=60,
               what='the task to complete')
    wait_until(lambda: 'is already COMPLETED; acking the duplicate' in supervisor.log(), timeout=60,
               what='the second delivery to be acked as a duplicate')
    assert lines(target) == ['once']
    assert MessageLog.objects.get(pk=log.pk).attempts == 1
    assert MessageLog.objects.filter(status='FAILED').count() == len(hostile)
    assert len(dead_letters(raw_channel)) == len(hostile)
    assert {slot: kid.pid for slot, kid in supervisor.by_slot().items()} == \
        {slot: kid.pid for slot, kid in kids.items()}  # no child died
    assert (queue_depth('default'), delay_depth()) == (0, 0)
    assert '\x00' not in supervisor.log() and '\x1b' not in supervisor.log()


@pytest.mark.parametrize('use_tz', [True, False], ids=['USE_TZ', 'no-USE_TZ'])
def test_the_one_statement_claim_returns_the_row_as_a_read_would(use_tz):
    # On PostgreSQL with USE_TZ the take returns its times as integers (claim._times_as_integers): a time
    # before 1970, one far ahead and one with microseconds must come back as the ORM reads them.
    import datetime as dt
    with override_settings(USE_TZ=use_tz):
        _claim_returns_the_row_as_a_read_would(
            run_after=dt.datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=dt.timezone.utc),
            completion_time=dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
            publish_time=dt.datetime(2999, 1, 2, 3, 4, 5, 1, tzinfo=dt.timezone.utc))


def _claim_returns_the_row_as_a_read_would(**times):
    from django.forms.models import model_to_dict
    from carrot.consume import claim
    from carrot.utilities import publish_message as publish
    if not settings.USE_TZ:
        times = {name: value.replace(tzinfo=None) for name, value in times.items()}
    log = publish(tasks.echo, 'a', [1, {'b': None}], key='ü', on_commit=False)
    MessageLog.objects.filter(pk=log.pk).update(output='"before"', log='a line', origin='first-id', retries=2,
                                                **times)
    row = claim.take_on_arrival(log.uuid, log.task, log.task_args, log.content, 'host:1', 60)
    assert row is not None and row.pk == log.pk
    assert model_to_dict(row) == model_to_dict(MessageLog.objects.get(pk=log.pk))
    # Every column, the ones the statement sets or matches (not returned: their values are its own) too.
    read = MessageLog.objects.get(pk=log.pk)
    for field in MessageLog._meta.concrete_fields:
        assert getattr(row, field.attname) == getattr(read, field.attname), field.attname
    assert not row.get_deferred_fields() and not row._state.adding and row._state.db == read._state.db
    assert (row.output, row.log, row.origin, row.retries) == ('"before"', 'a line', 'first-id', 2)
    assert {name: getattr(row, name) for name in times} == times
    assert (row.status, row.attempts, row.worker) == ('IN_PROGRESS', 1, 'host:1')
    assert row.lease_expires > row.started_time
    # Taken: a second claim (another delivery of it) matches nothing and changes nothing.
    assert claim.take_on_arrival(log.uuid, log.task, log.task_args, log.content, 'host:2', 60) is None
    assert MessageLog.objects.get(pk=log.pk).worker == 'host:1'
    # Other arguments under its id: nothing.
    other = publish(tasks.echo, 'b', on_commit=False)
    assert claim.take_on_arrival(other.uuid, other.task, '["a"]', other.content, 'host:3', 60) is None
