"""The consumer against the real RabbitMQ: running, recording, acking, refusing bad input."""
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pika
import pytest
from django.conf import settings
from django.test import override_settings

from carrot.amqp.declare import declare_queue
from carrot.config import get_config
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, queue_depth, raw_connection, run_consumer
from tests.testapp import consumers, tasks

pytestmark = pytest.mark.django_db(transaction=True)
CONSUME_SCRIPT = os.path.join(os.path.dirname(__file__), 'consume.py')


def raw_publish(channel, body, headers=None, message_id=None, queue='default', **props):
    """Publish as a foreign (or 1.x) publisher would, with pika only."""
    declare_queue(channel, get_config().queue(queue))
    message_id = message_id or str(uuid.uuid4())
    channel.basic_publish('', queue, body if isinstance(body, bytes) else json.dumps(body).encode(),
                          pika.BasicProperties(headers=headers, message_id=message_id, **props))
    return message_id


def test_consumer_runs_the_task_and_records_completed():
    log = publish_message(tasks.add, 1, 2)
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'COMPLETED', log.traceback
    assert log.output == '3'
    assert log.attempts == 1
    assert log.worker.endswith(f':{os.getpid()}')
    assert log.publish_time <= log.started_time <= log.completion_time
    assert queue_depth('default') == 0


def test_task_logging_is_captured_in_the_log_field():
    log = publish_message(tasks.chatty, 'carrot')
    run_consumer(max_messages=1)
    log.refresh_from_db()
    lines = log.log.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith('INFO hello carrot') and lines[1].endswith('WARNING careful, carrot')
    assert lines[0][:4].isdigit()  # starts with the time


def test_output_is_json_when_serialisable_else_its_str():
    echo = publish_message(tasks.echo, 1, x=[2])
    obj = publish_message(tasks.returns_object)
    run_consumer(max_messages=2)
    echo.refresh_from_db(), obj.refresh_from_db()
    assert json.loads(echo.output) == {'args': [1], 'kwargs': {'x': [2]}}
    assert obj.status == 'COMPLETED' and obj.output.startswith('<object object at')


def test_failing_task_is_failed_with_traceback_and_dead_lettered(raw_channel):
    log = publish_message(tasks.explode, 'kaboom')
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'FAILED'
    assert log.exception == 'ValueError: kaboom'
    assert 'raise ValueError(message)' in log.traceback
    assert log.failure_time is not None
    [(properties, _)] = dead_letters(raw_channel)
    assert properties.message_id == log.uuid
    assert queue_depth('default') == 0


BAD_MESSAGES = [
    # (what, body, headers, words the FAILED log must contain)
    ('body not JSON', b'{not json', {'type': 'tests.testapp.tasks.add'}, 'body is not JSON'),
    ('body not an object', [1, 2], {'type': 'tests.testapp.tasks.add'}, 'must be a JSON object'),
    ('args not a list', {'args': 'ab', 'kwargs': {}}, {'type': 'tests.testapp.tasks.add'},
     '"args" in the message body must be a JSON list'),
    ('kwargs not an object', {'args': [], 'kwargs': [1]}, {'type': 'tests.testapp.tasks.echo'},
     '"kwargs" in the message body must be a JSON object'),
    ('missing type header', {'args': [1, 2]}, None, "has no 'type' header"),
    ('unknown module', {}, {'type': 'nosuch.module.task'}, 'task nosuch.module.task is not registered'),
    ('unknown attribute', {}, {'type': 'tests.testapp.tasks.nope'}, "has no attribute 'nope'"),
    ('unregistered os.system', {'args': ['touch /tmp/carrot-pwned']}, {'type': 'os.system'},
     'task os.system is not registered'),
    ('arguments of the wrong shape', {'args': [1, 2, 3]}, {'type': 'tests.testapp.tasks.add'},
     'the message arguments do not fit the task'),
    ('task raising', {'args': ['bad']}, {'type': 'tests.testapp.tasks.explode'}, 'ValueError: bad'),
]


def test_bad_input_never_kills_the_consumer_and_never_vanishes(raw_channel):
    ids = [raw_publish(raw_channel, body, headers) for _, body, headers, _ in BAD_MESSAGES]
    good = raw_publish(raw_channel, {'args': [20, 22]}, {'type': 'tests.testapp.tasks.add'})
    run_consumer(max_messages=len(ids) + 1)
    for message_id, (what, _, _, words) in zip(ids, BAD_MESSAGES):
        log = MessageLog.objects.get(uuid=message_id)
        assert log.status == 'FAILED', what
        assert words in log.exception, (what, log.exception)
    assert MessageLog.objects.get(uuid=good).output == '42'
    dead = {properties.message_id for properties, _ in dead_letters(raw_channel)}
    assert dead == set(ids)
    assert queue_depth('default') == 0
    assert not os.path.exists('/tmp/carrot-pwned')


def test_unregistered_task_message_says_how_to_register(raw_channel):
    message_id = raw_publish(raw_channel, {'args': ['echo hi']}, {'type': 'os.system'})
    run_consumer(max_messages=1)
    log = MessageLog.objects.get(uuid=message_id)
    assert log.status == 'FAILED'
    assert log.exception.startswith('task os.system is not registered: ')
    assert "CARROT['task_modules']" in log.exception and '@carrot.task' in log.exception


def test_message_from_another_publisher_is_tracked(raw_channel):
    message_id = raw_publish(raw_channel, {'args': [2, 3]}, {'type': 'tests.testapp.tasks.add'}, priority=4)
    assert not MessageLog.objects.filter(uuid=message_id).exists()
    run_consumer(max_messages=1)
    log = MessageLog.objects.get(uuid=message_id)
    assert (log.status, log.task, log.output, log.priority, log.queue) == \
        ('COMPLETED', 'tests.testapp.tasks.add', '5', 4, 'default')
    assert json.loads(log.task_args) == [2, 3]


def test_a_message_without_message_id_is_tracked_too(raw_channel):
    declare_queue(raw_channel, get_config().queue('default'))
    raw_channel.basic_publish('', 'default', b'{"args": [1, 1]}',
                              pika.BasicProperties(headers={'type': 'tests.testapp.tasks.add'}))
    run_consumer(max_messages=1)
    assert MessageLog.objects.get().output == '2'


def test_django_carrot_1x_payload_is_executed_and_logged(raw_channel):
    """Built by hand the way django-carrot 1.x's serializer wrote it (kwargs only: no 'args' key)."""
    message_id = str(uuid.uuid4())
    declare_queue(raw_channel, get_config().queue('default'))
    raw_channel.basic_publish(
        exchange='', routing_key='default', mandatory=True,
        body=json.dumps({'kwargs': {'a': 'x', 'b': 'y'}}),
        properties=pika.BasicProperties(headers={'type': 'tests.testapp.tasks.add'},
                                        content_type='application/json', priority=0, message_id=message_id,
                                        type='django-carrot message'))
    run_consumer(max_messages=1)
    log = MessageLog.objects.get(uuid=message_id)
    assert (log.status, log.output) == ('COMPLETED', '"xy"')


def test_redelivered_completed_message_is_acked_without_running_again(raw_channel, tmp_path):
    target = tmp_path / 'lines.txt'
    log = publish_message(tasks.append_line, str(target), 'once')
    run_consumer(max_messages=1)
    # The same message again, as after a lost ack or a publisher retry.
    raw_publish(raw_channel, {'args': [str(target), 'once']}, {'type': 'tests.testapp.tasks.append_line'},
                message_id=log.uuid)
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert target.read_text() == 'once\n'
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert queue_depth('default') == 0


def consume_in_subprocess(env, max_messages=1, idle_timeout=3):
    return subprocess.run([sys.executable, CONSUME_SCRIPT, 'default', str(max_messages), str(idle_timeout)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_worker_death_mid_task_redelivers_and_counts_attempts(subprocess_env, tmp_path):
    log = publish_message(tasks.die_once, str(tmp_path / 'died'))
    first = consume_in_subprocess(subprocess_env)
    assert first.returncode == 17, first.stderr  # the task killed its worker
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('IN_PROGRESS', 1)
    assert queue_depth('default') == 1  # never acked: back in the queue
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert (log.status, log.attempts, log.output) == ('COMPLETED', 2, '"survived"')


def test_worker_lost_past_max_attempts_is_failed_and_dead_lettered(subprocess_env, raw_channel):
    log = publish_message(tasks.die)
    for attempt in (1, 2, 3):
        result = consume_in_subprocess(subprocess_env)
        assert result.returncode == 17, result.stderr
        log.refresh_from_db()
        assert log.attempts == attempt
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'FAILED'
    assert log.exception.startswith('worker lost after 3 attempts')
    assert [p.message_id for p, _ in dead_letters(raw_channel)] == [log.uuid]


def test_max_attempts_setting_is_honoured(subprocess_env):
    log = publish_message(tasks.die)
    assert consume_in_subprocess(subprocess_env).returncode == 17
    with override_settings(CARROT={**settings.CARROT, 'max_attempts': 1}):
        run_consumer(max_messages=1)
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('worker lost after 1 attempts')


def test_failure_callback_of_a_1x_style_consumer_class_runs():
    consumers.FAILURES.clear()
    log = publish_message(tasks.explode, 'for the callback')
    run_consumer(max_messages=1, consumer_class=consumers.CustomConsumer)
    log.refresh_from_db()
    assert log.status == 'FAILED'
    assert consumers.FAILURES == [('tests.testapp.tasks.explode', 'ValueError: for the callback')]


def test_stop_finishes_and_acks_the_task_in_hand():
    from carrot.consumer import Consumer
    log = publish_message(tasks.sleep, 1.5)
    consumer = Consumer(None, 'default', name='default#stop')
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while MessageLog.objects.get(pk=log.pk).status != 'IN_PROGRESS':
            assert time.monotonic() < deadline, 'the task never started'
            time.sleep(0.05)
        consumer.stop()
        thread.join(timeout=15)
        assert not thread.is_alive()
    finally:
        consumer.stop()
        thread.join(timeout=15)
    log.refresh_from_db()
    assert log.status == 'COMPLETED'
    assert queue_depth('default') == 0
    connection = raw_connection()
    assert connection.channel().queue_declare('default', passive=True).method.message_count == 0
    connection.close()


@pytest.mark.timeout(60)
def test_task_longer_than_two_heartbeats_completes_and_is_acked_once(raw_channel, caplog):
    broker = f'amqp://guest:guest@127.0.0.1:5672/{settings.VHOST}?heartbeat=2'
    with override_settings(CARROT={'default_broker': broker, 'queues': [{'name': 'default'}]}):
        log = publish_message(tasks.sleep, 7)
        run_consumer(max_messages=1, idle_timeout=3)
        # Had the heartbeat lapsed, the broker would have closed the connection and redelivered.
        run_consumer(max_messages=1, idle_timeout=2)
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert queue_depth('default') == 0
    # Neither a lost connection nor a redelivery (which carrot would ack as a duplicate) happened.
    assert 'connection to' not in caplog.text and 'already COMPLETED' not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_prefetch_above_one_runs_every_message_once_in_order_and_a_stop_returns_the_held_ones(tmp_path):
    """With 'prefetch': 3 a consumer holds the next deliveries while one runs: each still runs once, one at
    a time, in order; those it holds when it stops go back to the queue, unacked, for the next worker."""
    from django.conf import settings
    from django.test import override_settings
    record = tmp_path / 'runs'
    with override_settings(CARROT={**settings.CARROT, 'queues': [{'name': 'default', 'prefetch': 3}]}):
        for n in range(12):
            publish_message(tasks.record_execution, str(record), f'm{n:02d}', 0.05)
        run_consumer(max_messages=7)  # stops with up to two held
        assert queue_depth('default') == 5  # the held ones are back
        run_consumer(max_messages=5)
    tokens = [line.split()[0] for line in record.read_text().splitlines()]
    assert tokens == [f'm{n:02d}' for n in range(12)]
    assert MessageLog.objects.filter(status='COMPLETED', attempts=1).count() == 12


def test_a_poll_returns_within_its_own_time_even_after_a_longer_one():
    """ConsumeSession.poll keeps one timer until it fires: a shorter poll after a longer one still returns
    in its own time (nothing arrives meanwhile: an idle queue)."""
    import logging
    import time

    from carrot.amqp.session import ConsumeSession
    from carrot.config import get_config
    queue = get_config().queue('default')
    session = ConsumeSession(queue.broker, queue, logging.getLogger('carrot.consumer'), 'default#poll')
    session.open(lambda method, properties, body: None)
    try:
        session.poll(0.05)  # its timer fires: the next poll makes its own
        started = time.monotonic()
        session.poll(0.3)
        assert 0.2 < time.monotonic() - started < 2
        session.connection.call_later(0.01, lambda: None)  # wakes the next poll at once ...
        session.poll(5)
        started = time.monotonic()
        session.poll(0.1)  # ... and this one must not wait for the 5 s timer
        assert time.monotonic() - started < 1
    finally:
        session.close()


def test_a_task_logs_only_its_own_lines_when_the_capture_is_reused_and_inside_another_task():
    # The task thread keeps one capture handler and attaches it for each task (carrot.consume.runner): the
    # second task must not see the first's lines, a task run inside a task keeps its own (the outer one
    # sees them too, as it always did), lines logged between tasks go nowhere, and no handler stays on the
    # task logger afterwards.
    import logging as logging_module
    from carrot.consume.runner import run_task
    task_logger = logging_module.getLogger('carrot')
    handlers_before = list(task_logger.handlers)

    def inner():
        task_logger.warning('inner line')

    def outer():
        task_logger.warning('outer before')
        nested = run_task(inner, [], {})
        task_logger.warning('outer after')
        return nested.log

    first = run_task(lambda: task_logger.warning('first line'), [], {})
    task_logger.warning('between tasks')
    second = run_task(outer, [], {})
    third = run_task(lambda: None, [], {}, log_limit=10)
    assert first.log.endswith('WARNING first line') and len(first.log.splitlines()) == 1
    assert [line.split(' ', 3)[-1] for line in second.log.splitlines()] == \
        ['outer before', 'inner line', 'outer after']
    assert second.output.endswith('WARNING inner line"') and 'outer' not in second.output
    assert third.log == '' and third.succeeded
    assert task_logger.handlers == handlers_before
