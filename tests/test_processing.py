"""The message processor on its own: no RabbitMQ, the real database (SQLite or PostgreSQL).

Deliveries are plain objects shaped like pika's (method, properties, body); what the processor decides
(the Disposition) and what it writes (the MessageLog row) are checked.
"""
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from carrot import text
from carrot.config import get_config
from carrot.amqp.wire import MAX_NESTING, decode_delivery
from carrot.models import MessageLog
from carrot.amqp.disposition import Action
from carrot.consume.claim import worker_id
from carrot.consume.processor import DefaultHooks, MessageProcessor
from carrot.utilities import publish_message
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)
ADD = 'tests.testapp.tasks.add'


def delivery(task=ADD, args=(), kwargs=None, message_id='auto', body=None, headers=None, **props):
    """(method, properties, body) as pika hands them to a consumer."""
    if message_id == 'auto':
        message_id = str(uuid.uuid4())
    if body is None:
        body = json.dumps({'args': list(args), 'kwargs': kwargs or {}}).encode()
    if headers is None:
        headers = {'type': task}
    method = SimpleNamespace(redelivered=props.pop('redelivered', False), exchange='', routing_key='default',
                             delivery_tag=1)
    properties = SimpleNamespace(headers=headers, message_id=message_id, priority=props.pop('priority', 0),
                                 **props)
    return method, properties, body


def incoming(*args, max_size=None, **kwargs):
    method, properties, body = delivery(*args, **kwargs)
    return decode_delivery(method, properties, body, max_size or get_config().max_message_size)


def processor(name='default#unit'):
    config = get_config()
    return MessageProcessor(config.queue('default'), config, logging.getLogger('carrot.consumer'), name)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


# -- the ordinary path -------------------------------------------------------------------------------

def test_a_published_message_is_claimed_run_and_recorded():
    log = publish_message(tasks.add, 2, 3, on_commit=False)
    message = incoming(args=[2, 3], message_id=log.uuid)
    disposition = processor().process(message)
    assert disposition.action is Action.ACK
    log.refresh_from_db()
    assert (log.status, log.output, log.attempts, log.worker) == ('COMPLETED', '5', 1, worker_id())
    assert log.lease_expires is None


def test_a_waiting_row_is_claimed_too():
    """The store-and-forward relay may deliver a message whose row still says WAITING."""
    message = incoming(args=[1, 1])
    MessageLog.objects.create(uuid=message.message_id, status=MessageLog.WAITING, task=ADD,
                              task_args='[1, 1]', content='{}', queue='default')
    assert processor().process(message).action is Action.ACK
    assert MessageLog.objects.get(uuid=message.message_id).status == 'COMPLETED'


def test_a_message_from_another_publisher_gets_a_row():
    message = incoming(args=[4, 5], priority=7)
    assert processor().process(message).action is Action.ACK
    log = MessageLog.objects.get(uuid=message.message_id)
    assert (log.status, log.output, log.priority, log.task) == ('COMPLETED', '9', 7, ADD)


def test_a_completed_row_is_acked_without_running_again(tmp_path):
    target = tmp_path / 'runs'
    message = incoming('tests.testapp.tasks.append_line', args=[str(target), 'x'])
    assert processor().process(message).action is Action.ACK
    assert processor().process(message).action is Action.ACK
    assert lines(target) == ['x']


# -- the claim ---------------------------------------------------------------------------------------

def in_progress_row(message, worker, lease_in, attempts=1):
    return MessageLog.objects.create(
        uuid=message.message_id, status=MessageLog.IN_PROGRESS, task=message.task,
        task_args=json.dumps(list(message.args)), content=json.dumps(message.kwargs), queue='default',
        worker=worker, attempts=attempts, started_time=timezone.now(),  # started: not a claim ahead
        lease_expires=timezone.now() + timedelta(seconds=lease_in) if lease_in is not None else None)


def test_a_row_in_progress_under_a_live_worker_is_retried_later_and_left_alone(tmp_path):
    message = incoming('tests.testapp.tasks.append_line', args=[str(tmp_path / 'runs'), 'x'])
    row = in_progress_row(message, 'another-host:4242', lease_in=60)
    disposition = processor().process(message)
    assert disposition.action is Action.RETRY_LATER and 0 < disposition.delay <= get_config().claim_lease
    assert not (tmp_path / 'runs').exists()
    after = MessageLog.objects.get(pk=row.pk)
    assert (after.status, after.worker, after.attempts) == ('IN_PROGRESS', 'another-host:4242', 1)


def test_the_wait_grows_with_each_retry_up_to_the_lease():
    first = incoming(args=[1, 2])
    in_progress_row(first, 'another-host:1', lease_in=60)
    delays = []
    for waits in (0, 1, 2, 10):
        message = incoming(args=[1, 2], message_id=first.message_id, headers={'type': ADD,
                                                                              'x-carrot-waits': waits})
        delays.append(processor().process(message).delay)
    assert delays[0] < delays[1] < delays[2] <= delays[3] == get_config().claim_lease


@pytest.mark.parametrize('worker, lease_in', [
    ('another-host:4242', -1),                          # the lease ran out
    ('another-host:4242', None),                        # never had one (a 1.x row)
    (f'{socket.gethostname()}:999999999', 60),          # this host, and that process is gone
    (worker_id(), 60),                                  # this very process, which does not hold it
])
def test_a_row_whose_worker_is_dead_is_taken_over(worker, lease_in):
    message = incoming(args=[1, 2])
    in_progress_row(message, worker, lease_in, attempts=1)
    assert processor().process(message).action is Action.ACK
    log = MessageLog.objects.get(uuid=message.message_id)
    assert (log.status, log.attempts, log.worker) == ('COMPLETED', 2, worker_id())


def test_a_live_process_on_this_host_keeps_its_claim():
    message = incoming(args=[1, 2])
    in_progress_row(message, f'{socket.gethostname()}:{os.getppid()}', lease_in=60)
    assert processor().process(message).action is Action.RETRY_LATER


def test_worker_lost_past_max_attempts_is_failed():
    message = incoming(args=[1, 2])
    in_progress_row(message, 'another-host:1', lease_in=-1, attempts=3)
    assert processor().process(message).action is Action.DEAD_LETTER
    log = MessageLog.objects.get(uuid=message.message_id)
    assert log.status == 'FAILED' and log.exception.startswith('worker lost after 3 attempts')


def test_two_deliveries_at_once_run_the_task_once(tmp_path):
    """Two slots (threads here) get the same message at the same time: one runs, one waits."""
    target = tmp_path / 'runs'
    message = incoming('tests.testapp.tasks.append_and_sleep', args=[str(target), 'x', 1.0])
    results = []
    both_have_read = threading.Barrier(2, timeout=20)

    class ReadThenWait(DefaultHooks):
        """Both slots read the row (PUBLISHED) before either claims it: only the UPDATE can decide."""
        def get_message_log(self, message):
            row = super().get_message_log(message)
            both_have_read.wait()
            return row

    def one_slot(name):
        try:
            slot = processor(name)
            slot.hooks = ReadThenWait(slot)
            results.append(slot.process(message).action)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_slot, args=(f'default#{n}',)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(a.value for a in results) == ['ack', 'retry-later']
    assert lines(target) == ['x']
    assert MessageLog.objects.get(uuid=message.message_id).attempts == 1


def test_a_message_id_of_another_message_is_not_run_and_does_not_touch_that_row(tmp_path):
    log = publish_message(tasks.add, 1, 2, on_commit=False)
    hostile = incoming('tests.testapp.tasks.append_line', args=[str(tmp_path / 'x'), 'pwned'],
                       message_id=log.uuid)
    assert processor().process(hostile).action is Action.DEAD_LETTER
    assert not (tmp_path / 'x').exists()
    same = MessageLog.objects.get(pk=log.pk)
    assert (same.status, same.task, same.task_args, same.attempts) == ('PUBLISHED', ADD, '[1, 2]', 0)
    conflict = MessageLog.objects.exclude(pk=log.pk).get()
    assert conflict.status == 'FAILED' and conflict.task == 'tests.testapp.tasks.append_line'
    assert f'message_id {log.uuid} already belongs to the log of a different message' in conflict.exception
    # The same task with other arguments is a conflict too; the original still runs afterwards.
    assert processor().process(incoming(args=[5, 5], message_id=log.uuid)).action is Action.DEAD_LETTER
    assert processor().process(incoming(args=[1, 2], message_id=log.uuid)).action is Action.ACK
    assert MessageLog.objects.get(pk=log.pk).output == '3'


def test_a_1x_row_with_a_tuple_repr_matches_its_message():
    message = incoming(args=[1, 2])
    MessageLog.objects.create(uuid=message.message_id, status='PUBLISHED', task=ADD, task_args='(1, 2)',
                              content='{}', queue='default')
    assert processor().process(message).action is Action.ACK


def test_a_message_without_id_is_adopted_not_logged():
    disposition = processor().process(incoming(args=[1, 2], message_id=None))
    assert disposition.action is Action.ADOPT and uuid.UUID(disposition.new_id)
    assert not MessageLog.objects.exists()


# -- bad input ---------------------------------------------------------------------------------------

HOSTILE = [
    # (what, delivery keyword arguments, words of the reason)
    ('NUL in the type header', dict(headers={'type': 'tests.testapp\x00.tasks.add'}), 'dotted task path'),
    ('ANSI escape and newline in the type', dict(headers={'type': '\x1b[31mevil\nINFO forged line'}),
     'dotted task path'),
    ('type header not UTF-8', dict(headers={'type': b'\xff\xfe'}), 'not UTF-8'),
    ('type header a number', dict(headers={'type': 42}), 'must be a dotted task path, got int'),
    ('type header a table', dict(headers={'type': {'a': {'b': 1}}}), 'got dict'),
    ('type header too long', dict(headers={'type': 'a.' * 300 + 'b'}), 'at most 200'),
    ('headers not a table', dict(headers=['type']), 'headers must be a table'),
    ('message_id with NUL', dict(message_id='abc\x00def'), 'message_id property is not a usable id'),
    ('message_id not UTF-8', dict(message_id=b'\xff'), 'message_id property is not UTF-8'),
    ('message_id too long', dict(message_id='x' * 500), 'message_id property is not a usable id'),
    ('body not UTF-8', dict(body=b'\xff\xfe{}'), 'body is not UTF-8'),
    ('body JSON nested thousands deep', dict(body=b'[' * 5000 + b']' * 5000), 'nested too deeply'),
    ('body JSON nested past the limit', dict(body=json.dumps({'args': [[[[[[[[1]]]]]]]] * 1}).encode()
                                         .replace(b'[1]', b'[' * MAX_NESTING + b'1' + b']' * MAX_NESTING)),
     f'nested more than {MAX_NESTING} levels'),
    ('a number too long to read', dict(body=b'{"args": [' + b'9' * 5000 + b']}'), 'not JSON'),
    ('arguments that do not fit', dict(args=[1, 2, 3]), 'the message arguments do not fit the task'),
    ('unregistered task', dict(headers={'type': 'os.system'}, args=['true']), 'is not registered'),
]


@pytest.mark.parametrize('what, kwargs, words', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_ends_failed_with_a_reason_and_is_dead_lettered(what, kwargs, words, caplog):
    message = incoming(**kwargs)
    assert processor().process(message).action is Action.DEAD_LETTER
    [log] = MessageLog.objects.all()
    assert log.status == 'FAILED'
    assert words in log.exception, log.exception
    for field in ('task', 'uuid', 'exception', 'task_args', 'content'):
        assert '\x00' not in (getattr(log, field) or ''), field
    assert len(log.task) <= 200
    for record in caplog.records:
        assert not any(c in record.getMessage() for c in '\x00\x1b\n'), record.getMessage()


def test_a_body_over_the_size_limit_is_failed_unread():
    with override_settings(CARROT={**_carrot(), 'max_message_size': 1000}):
        message = incoming(body=b'{"args": [' + b'1,' * 1000 + b'1]}', max_size=1000)
        assert message.problem and 'max_message_size' in message.problem
        assert processor().process(message).action is Action.DEAD_LETTER
    log = MessageLog.objects.get()
    assert log.status == 'FAILED' and 'more than CARROT[\'max_message_size\'] (1000 bytes)' in log.exception


def _carrot():
    from django.conf import settings
    return settings.CARROT


def test_a_bad_message_with_a_taken_id_fails_on_a_row_of_its_own():
    log = publish_message(tasks.add, 1, 2, on_commit=False)
    message = incoming(message_id=log.uuid, body=b'not json')
    assert processor().process(message).action is Action.DEAD_LETTER
    assert MessageLog.objects.get(pk=log.pk).status == 'PUBLISHED'
    assert MessageLog.objects.exclude(pk=log.pk).get().status == 'FAILED'


# -- what is stored ----------------------------------------------------------------------------------

def test_output_exception_and_log_are_cut_to_max_stored_text_with_a_marker():
    with override_settings(CARROT={**_carrot(), 'max_stored_text': 1000}):
        big = incoming('tests.testapp.tasks.returns_text', args=['y', 5000])
        chatty = incoming('tests.testapp.tasks.logs_a_lot', args=[2000])
        failing = incoming('tests.testapp.tasks.raises_weird', args=['z' * 5000])
        for message in (big, chatty, failing):
            processor().process(message)
    output = MessageLog.objects.get(uuid=big.message_id).output
    assert len(output) <= 1000 and '[... cut: ' in output
    log = MessageLog.objects.get(uuid=chatty.message_id).log
    assert len(log) <= 1000 and '[... cut: ' in log
    failed = MessageLog.objects.get(uuid=failing.message_id)
    assert len(failed.exception) <= 1000 and '[... cut: ' in failed.exception
    assert len(failed.traceback) <= 1000


def test_nul_and_lone_surrogates_in_results_are_stored_escaped():
    message = incoming('tests.testapp.tasks.raises_weird', args=['bad\x00byte \ud800 here'])
    assert processor().process(message).action is Action.DEAD_LETTER
    log = MessageLog.objects.get(uuid=message.message_id)
    assert log.exception == 'RuntimeError: bad\\x00byte \\ud800 here'
    echo = incoming('tests.testapp.tasks.returns_text', args=['nul\x00'])
    assert processor().process(echo).action is Action.ACK
    assert json.loads(MessageLog.objects.get(uuid=echo.message_id).output) == 'nul\x00'


def refuse_output_containing(word):
    """A trigger that makes the database itself refuse a row whose output contains `word`."""
    with connection.cursor() as cursor:
        if connection.vendor == 'postgresql':
            cursor.execute(f"""CREATE FUNCTION carrot_refuse() RETURNS trigger AS $$ BEGIN
                IF NEW.output LIKE '%{word}%' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
                RETURN NEW; END $$ LANGUAGE plpgsql""")
            cursor.execute('CREATE TRIGGER carrot_refuse BEFORE UPDATE ON carrot_messagelog '
                           'FOR EACH ROW EXECUTE FUNCTION carrot_refuse()')
        else:
            cursor.execute(f"""CREATE TRIGGER carrot_refuse BEFORE UPDATE ON carrot_messagelog
                WHEN NEW.output LIKE '%{word}%' BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END""")


def drop_refusal():
    with connection.cursor() as cursor:
        cursor.execute('DROP TRIGGER IF EXISTS carrot_refuse' +
                       (' ON carrot_messagelog' if connection.vendor == 'postgresql' else ''))
        if connection.vendor == 'postgresql':
            cursor.execute('DROP FUNCTION IF EXISTS carrot_refuse()')


def test_a_task_whose_result_cannot_be_stored_is_not_run_again(tmp_path):
    target = tmp_path / 'runs'
    message = incoming('tests.testapp.tasks.append_line', args=[str(target), 'poison'])
    refuse_output_containing('poison')
    try:
        assert processor().process(message).action is Action.ACK
        assert processor().process(message).action is Action.ACK  # a redelivery
    finally:
        drop_refusal()
    assert lines(target) == ['poison']
    log = MessageLog.objects.get(uuid=message.message_id)
    assert (log.status, log.output, log.attempts) == ('COMPLETED', None, 1)
    assert 'carrot could not store the full row' in log.exception and 'refused by a trigger' in log.exception


# -- the database away -------------------------------------------------------------------------------

def rename_log_table(to_missing: bool):
    old, new = ('carrot_messagelog', 'carrot_messagelog_away') if to_missing else \
        ('carrot_messagelog_away', 'carrot_messagelog')
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE {old} RENAME TO {new}')


def warnings_about_the_database(caplog):
    return [r.getMessage() for r in caplog.records if 'the database is' in r.getMessage()]


@pytest.mark.timeout(60)
def test_missing_tables_hold_the_message_with_backoff_then_run_it_once(tmp_path, caplog):
    target = tmp_path / 'runs'
    message = incoming('tests.testapp.tasks.append_line', args=[str(target), 'x'])
    rename_log_table(to_missing=True)
    results = []
    slot = threading.Thread(target=lambda: (results.append(processor().process(message)), connection.close()))
    try:
        slot.start()
        deadline = time.monotonic() + 20
        while not warnings_about_the_database(caplog):
            assert time.monotonic() < deadline, 'the outage was never reported'
            time.sleep(0.1)
        time.sleep(3)  # several retries happen meanwhile
    finally:
        rename_log_table(to_missing=False)
    slot.join(timeout=40)
    assert [r.action for r in results] == [Action.ACK]
    assert lines(target) == ['x']
    said = warnings_about_the_database(caplog)
    assert len(said) == 2, said  # one line when it went, one when it came back; none per retry
    assert 'is unavailable' in said[0] and 'migrate' in said[0] and 'is back after' in said[1]


@pytest.mark.timeout(60)
def test_stopping_while_the_database_is_away_gives_the_message_back_unclaimed(caplog):
    message = incoming(args=[1, 2])
    worker = processor()
    rename_log_table(to_missing=True)
    results = []
    slot = threading.Thread(target=lambda: (results.append(worker.process(message)), connection.close()))
    try:
        slot.start()
        deadline = time.monotonic() + 20
        while not warnings_about_the_database(caplog):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker.stopping.set()
        slot.join(timeout=40)
    finally:
        rename_log_table(to_missing=False)
    assert [r.action for r in results] == [Action.REQUEUE]
    assert not MessageLog.objects.exists()


def test_text_bounds_and_escapes():
    assert text.cut('a' * 10, 20) == 'a' * 10
    cut = text.cut('a' * 100, 50)
    assert len(cut) <= 50 and cut.endswith('more characters]')
    assert text.for_log('a\nb\x1b[2J\x00\u202e') == 'a\\x0ab\\x1b[2J\\x00\\u202e'
    assert text.for_column('a\x00b\ud800', None) == 'a\\x00b\\ud800'
    assert text.for_log(b'\xff') == '\\xff'


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_written_yet_is_held_and_written_later_not_run_again(tmp_path, caplog):
    target = tmp_path / 'runs'
    message = incoming('tests.testapp.tasks.takes_the_log_table_away', args=[str(target)])
    results = []
    slot = threading.Thread(target=lambda: (results.append(processor().process(message)), connection.close()))
    slot.start()
    try:
        wait = time.monotonic() + 20
        while not warnings_about_the_database(caplog):
            assert time.monotonic() < wait, 'the outage was never reported'
            time.sleep(0.1)
        time.sleep(2)
    finally:
        rename_log_table(to_missing=False)
    slot.join(timeout=40)
    assert [r.action for r in results] == [Action.ACK]
    assert lines(target) == ['ran']
    log = MessageLog.objects.get(uuid=message.message_id)
    assert (log.status, log.output, log.attempts) == ('COMPLETED', '"done"', 1)
    assert 'recording the result' in warnings_about_the_database(caplog)[0]


def test_an_unexpected_error_after_the_claim_fails_the_claimed_row(tmp_path):
    """A bug anywhere (here: a task lookup that raises something carrot does not expect) is FAILED +
    dead-letter on the message's own row, never a requeue and never a row left IN_PROGRESS."""
    message = incoming(args=[1, 2])
    worker = processor()

    def broken_run(*args, **kwargs):
        raise LookupError('something carrot did not foresee')

    worker.run = broken_run
    assert worker.process(message).action is Action.DEAD_LETTER
    [log] = MessageLog.objects.all()
    assert log.uuid == message.message_id and log.status == 'FAILED'
    assert 'carrot could not process this message: LookupError' in log.exception
    assert 'LookupError' in log.traceback


def test_a_return_value_too_deep_to_show_does_not_turn_success_into_failure():
    message = incoming('tests.testapp.tasks.returns_deep', args=[100000])
    assert processor().process(message).action is Action.ACK
    log = MessageLog.objects.get(uuid=message.message_id)
    assert log.status == 'COMPLETED' and log.output == '<list object that cannot be shown>'


def test_two_deliveries_claiming_in_one_statement_at_once_run_the_task_once(tmp_path, monkeypatch):
    """The usual path reads and claims the row in one UPDATE ... RETURNING: two slots sending it at the
    same moment still run the task once."""
    from carrot.consume import claim
    target = tmp_path / 'runs'
    log = publish_message(tasks.append_and_sleep, str(target), 'x', 1.0, on_commit=False)
    message = incoming('tests.testapp.tasks.append_and_sleep', args=[str(target), 'x', 1.0], message_id=log.uuid)
    both_are_claiming = threading.Barrier(2, timeout=20)
    take = claim.take_on_arrival
    taken = []

    def at_the_same_moment(*args, **kwargs):
        both_are_claiming.wait()
        row = take(*args, **kwargs)
        taken.append(row is not None)
        return row

    monkeypatch.setattr(claim, 'take_on_arrival', at_the_same_moment)
    results = []

    def one_slot(name):
        try:
            results.append(processor(name).process(message).action)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_slot, args=(f'default#{n}',)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(a.value for a in results) == ['ack', 'retry-later']
    assert lines(target) == ['x']
    assert MessageLog.objects.get(uuid=message.message_id).attempts == 1
    assert sorted(taken) == [False, True]  # one UPDATE won, the other matched nothing


def test_with_debug_on_the_query_log_does_not_grow_with_the_tasks():
    """DEBUG keeps every query of a connection until the next request; a worker empties it per message,
    or it would grow by megabytes over a few thousand tasks."""
    slot = processor()
    with override_settings(DEBUG=True):
        connection.queries_log.clear()
        for n in range(200):
            log = publish_message(tasks.add, n, n, on_commit=False)
            assert slot.process(incoming(ADD, args=[n, n], message_id=log.uuid)).action is Action.ACK
        # What the last message (and the publish after it) left, not 200 messages' worth.
        assert len(connection.queries) < 20
    assert MessageLog.objects.filter(status='COMPLETED').count() == 200
