"""Attack tests for carrot's helper queues: whatever anyone who may publish on the virtual host puts into
the delay levels, the delivery exchange or <queue>.dead -- raw pika, any shape -- carrot's own delayed and
parked messages still arrive on time, and run once.

One shape RabbitMQ 3.10 itself cannot take: a message whose x-death header is an array holding anything
but tables crashes the queue that dead-letters it, for good once it is persistent. carrot dead-letters
such a message from its own queues by hand (never through the broker), and replaces a level that RabbitMQ
no longer runs at the next delayed publish that reaches it; what was in that level when it crashed is
sent again by the sweep, late but once.
"""
import json
import time

import pika
import pytest
from django.conf import settings
from django.test import override_settings

from carrot.amqp import delays
from carrot.models import MessageLog
from carrot.publish.sweep import Sweep
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth
from tests.test_claim import ConsumerThread, lines, publish_raw
from tests.testapp import tasks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
LEVELS = 28
ON_TIME = 1.5  # seconds a task may run after its run_after


def foreign_shapes():
    """(body, properties) of messages a foreign publisher might put anywhere: none is carrot's."""
    garbage = bytes(range(256)) * 4
    return [
        (b'no expiration, persistent', pika.BasicProperties(delivery_mode=2)),
        (b'expires in ten years', pika.BasicProperties(delivery_mode=2, expiration=str(10 * 365 * 86400 * 1000))),
        (b'expires at once', pika.BasicProperties(expiration='0')),
        (garbage, pika.BasicProperties(delivery_mode=2, priority=255, content_type='application/x-garbage')),
        (b'{"args": [1, 2]}', pika.BasicProperties(headers={'type': 'tests.testapp.tasks.add'}, delivery_mode=2)),
        (b'to a queue that does not exist', pika.BasicProperties(headers={delays.TARGET_HEADER: 'nowhere'})),
        (b'bytes as the target', pika.BasicProperties(headers={delays.TARGET_HEADER: b'\xff\xfe'}, delivery_mode=2)),
        (b'x-death a string', pika.BasicProperties(headers={'x-death': 'garbage'}, delivery_mode=2)),
        (b'x-death empty', pika.BasicProperties(headers={'x-death': []}, delivery_mode=2)),
        (b'x-death tables of nonsense', pika.BasicProperties(delivery_mode=2, headers={
            'x-death': [{'queue': 5, 'reason': None, 'count': 'many'}, {'count': -1}, {}]})),
        (b'x' * (1024 * 1024), pika.BasicProperties(delivery_mode=2)),
        (b'', pika.BasicProperties(headers={'x-carrot-waits': 10 ** 9, 'type': b'\x00'}, delivery_mode=2,
                                   message_id='\x00' * 200, expiration='1')),
    ]


def ran_at(path):
    """label -> the times it ran, from tests.testapp.tasks.stamp."""
    runs = {}
    for line in lines(path):
        label, at = line.split()
        runs.setdefault(label, []).append(float(at))
    return runs


def assert_on_time(logs, path):
    runs = ran_at(path)
    for label, log in logs.items():
        assert len(runs.get(label, [])) == 1, (label, runs.get(label))
        late = runs[label][0] - log.run_after.timestamp()
        assert 0 <= late <= ON_TIME, (label, late)


@pytest.mark.timeout(180)
def test_foreign_messages_in_every_helper_queue_hold_up_nothing(raw_channel, tmp_path):
    channel = raw_channel
    target = tmp_path / 'runs'
    publish_message(tasks.add, 0, 0, countdown=1)  # declares the levels (and default, default.dead)
    shapes = foreign_shapes()
    for level in range(LEVELS):
        for body, properties in shapes:
            channel.basic_publish('', delays.level_name(level), body, properties)
    for body, properties in shapes:
        channel.basic_publish('', 'default.dead', body, properties)
        channel.basic_publish(delays.DELIVER_EXCHANGE, '', body, properties)
        # Through carrot's own entry, bits and all, for a queue that is not there.
        channel.basic_publish(delays.entry_exchange(LEVELS), delays.routing_key(2, LEVELS), body,
                              pika.BasicProperties(headers={delays.TARGET_HEADER: 'nowhere'}))
    assert delay_depth() >= LEVELS * len(shapes) - LEVELS * 2  # the ones with a short expiration are gone
    logs = {f'delayed-{n}': publish_message(tasks.stamp, str(target), f'delayed-{n}', countdown=n)
            for n in (1, 2, 3, 5, 6)}
    # A copy that comes early (at once) is parked in the levels for the rest of its wait.
    parked = publish_message(tasks.stamp, str(target), 'parked', countdown=4)
    publish_raw(channel, {'args': [str(target), 'parked'], 'kwargs': {}}, {'type': 'tests.testapp.tasks.stamp'},
                message_id=parked.uuid, delivery_mode=2)
    logs['parked'] = parked
    for log in logs.values():
        log.refresh_from_db()
    consumer = ConsumerThread('default#hostile', idle_timeout=8).start()
    consumer.join(timeout=120)
    assert_on_time(logs, target)
    assert {log.status for log in MessageLog.objects.filter(task='tests.testapp.tasks.stamp')} == {'COMPLETED'}
    # What came out of the delivery exchange into default was failed and dead-lettered, not run.
    assert not MessageLog.objects.filter(task='tests.testapp.tasks.add', status='COMPLETED',
                                         task_args='[1, 2]').exists()


def poison():
    """A persistent message whose x-death RabbitMQ 3.10 cannot dead-letter without crashing the queue."""
    return pika.BasicProperties(delivery_mode=2, headers={'x-death': ['not a table']})


@pytest.mark.timeout(180)
def test_a_level_rabbitmq_can_no_longer_run_is_replaced_and_nothing_is_lost(raw_channel, tmp_path, caplog):
    target = tmp_path / 'runs'
    publish_message(tasks.add, 0, 0, countdown=1)  # declares the levels
    raw_channel.basic_publish('', delays.level_name(1), b'poison', poison())
    # In level 1 with the poison: when that crashes the queue, this copy is lost to the broker.
    lost = publish_message(tasks.stamp, str(target), 'lost', countdown=2)
    time.sleep(3)  # the poison expired; RabbitMQ gave the queue up
    later = {f'later-{n}': publish_message(tasks.stamp, str(target), f'later-{n}', countdown=n) for n in (2, 3)}
    assert 'replaced the levels RabbitMQ no longer ran: carrot.delay.01' in caplog.text
    for log in later.values():
        log.refresh_from_db()
    consumer = ConsumerThread('default#poison', idle_timeout=6).start()
    with override_settings(CARROT={**settings.CARROT, 'delay_sweep_after': 1}):
        deadline = time.monotonic() + 30
        while not ran_at(target).get('lost') and time.monotonic() < deadline:
            Sweep().sweep_overdue()
            time.sleep(0.5)
    consumer.join(timeout=60)
    assert_on_time(later, target)
    runs = ran_at(target)
    assert len(runs['lost']) == 1  # late (swept), but once
    lost.refresh_from_db()
    assert lost.status == 'COMPLETED'
    assert raw_channel.queue_declare(delays.level_name(1), passive=True).method.message_count == 0


@pytest.mark.timeout(60)
def test_a_message_that_would_crash_the_queue_is_dead_lettered_by_hand(raw_channel, tmp_path):
    target = tmp_path / 'runs'
    publish_raw(raw_channel, {'args': [1, 2]}, {'type': 'no.such.task', 'x-death': ['not a table', 7]},
                message_id='poisoned-1', delivery_mode=2)
    log = publish_message(tasks.stamp, str(target), 'after')
    consumer = ConsumerThread('default#dead', max_messages=2, idle_timeout=5).start()
    consumer.join(timeout=30)
    assert [line.split()[0] for line in lines(target)] == ['after']
    (properties, body), = dead_letters(raw_channel)
    assert json.loads(body) == {'args': [1, 2]} and 'x-death' not in (properties.headers or {})
    assert MessageLog.objects.get(uuid='poisoned-1').status == 'FAILED'
    log.refresh_from_db()
    assert log.status == 'COMPLETED'
    assert queue_depth('default') == 0
