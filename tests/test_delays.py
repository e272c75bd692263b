"""Delays on a stock RabbitMQ (carrot.amqp.delays): the binary levels, run_after and countdown, early
arrivals parked again, the sweep of overdue rows, the monitor's Later tab, and what a foreign publisher
can put into the levels and carrot's other helper queues without holding up carrot's own messages."""
import time
from datetime import timedelta

import pytest
from django.test import override_settings
from django.conf import settings
from django.utils import timezone

from carrot.amqp import delays
from carrot.amqp.publisher import publisher_for
from carrot.config import get_config
from carrot.exceptions import InvalidCall
from carrot.models import MessageLog
from carrot.publish.sweep import Sweep
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth, raw_connection, run_consumer
from tests.test_claim import ConsumerThread, lines, publish_raw
from tests.testapp import tasks

LEVELS = 28


# -- the routing key and the levels' arguments (no broker) -------------------------------------------------

@pytest.mark.no_broker
def test_the_routing_key_spells_the_delay_least_significant_bit_first():
    assert delays.routing_key(0, 4) == '0.0.0.0'
    assert delays.routing_key(1, 4) == '1.0.0.0'
    assert delays.routing_key(6, 4) == '0.1.1.0'
    assert delays.routing_key(15, 4) == '1.1.1.1'
    assert delays.routing_key(10 ** 9, 4) == '1.1.1.1'  # longer than the levels spell: one trip of the most
    assert len(delays.routing_key(30 * 86400, LEVELS).split('.')) == LEVELS


@pytest.mark.no_broker
def test_delays_are_whole_seconds_rounded_up_so_never_early():
    assert [delays.whole_seconds(d) for d in (0, -3, 0.001, 0.3, 1, 1.01, 2.5)] == [0, 0, 1, 1, 1, 2, 3]


@pytest.mark.no_broker
def test_a_level_holds_one_ttl_and_dead_letters_to_the_level_below():
    assert delays.level_queue_arguments(5) == {'x-message-ttl': 32000,
                                               'x-dead-letter-exchange': 'carrot.delay.04'}
    assert delays.level_queue_arguments(0)['x-dead-letter-exchange'] == delays.DELIVER_EXCHANGE
    assert 'x-max-priority' not in delays.level_queue_arguments(3, 'quorum')  # quorum queues refuse it
    assert delays.bit_pattern(2, '1') == '*.*.1.#'


@pytest.mark.no_broker
def test_a_copy_sent_round_again_loses_its_dead_letter_history():
    """RabbitMQ drops a message dead-lettered into a queue its x-death already names (a "cycle")."""
    headers = {'type': 'a.b', 'x-death': [{'queue': 'carrot.delay.01'}], 'x-first-death-queue': 'q',
               delays.TARGET_HEADER: 'elsewhere'}
    assert delays.delayed_headers(headers, 'default') == {'type': 'a.b', delays.TARGET_HEADER: 'default'}
    assert delays.delayed_headers(None, 'default') == {delays.TARGET_HEADER: 'default'}


# -- the levels on the broker ---------------------------------------------------------------------------------

def publish_delayed(seconds, label, queue='default'):
    """A message of `label` through the levels, `seconds` late, with carrot's publisher."""
    config = get_config().queue(queue)
    publisher_for(config.broker).publish(config, label.encode(), {'headers': {'label': label}, 'delivery_mode': 2},
                                         delay=seconds, delay_levels=LEVELS)


def collect(queue, count, timeout):
    """(label, seconds since the first call) of `count` messages taken from `queue` as they arrive."""
    connection = raw_connection()
    channel = connection.channel()
    start, got = time.monotonic(), []
    try:
        while len(got) < count and time.monotonic() - start < timeout:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                time.sleep(0.01)
                continue
            got.append((body.decode(errors='replace'), time.monotonic() - start))
    finally:
        connection.close()
    return got


@pytest.mark.timeout(60)
def test_messages_come_out_of_the_levels_in_time_whatever_order_they_went_in():
    started = time.monotonic()
    for seconds in (5, 1, 3, 2, 4):
        publish_delayed(seconds, f'after-{seconds}')
    published = time.monotonic() - started
    got = collect('default', 5, timeout=20)
    assert [label for label, _ in got] == ['after-1', 'after-2', 'after-3', 'after-4', 'after-5']
    for label, at in got:
        due = int(label.split('-')[1])
        assert due - 0.05 <= at + published and at <= due + 0.5, (label, at)
    assert delay_depth() == 0


@pytest.mark.timeout(60)
def test_a_short_delay_never_waits_behind_a_long_one():
    """The head-of-line blocking of per-message TTLs: in <queue>.wait a 1 s wait behind a 3 s one took 3 s."""
    publish_delayed(3, 'long')
    publish_delayed(1, 'short')
    got = dict(collect('default', 2, timeout=10))
    assert got['short'] < 1.5 and got['long'] >= 2.9


def test_declaring_the_levels_twice_changes_nothing():
    channel = raw_connection().channel()
    from carrot.amqp.declare import declare_delays
    declare_delays(channel, LEVELS)
    declare_delays(channel, LEVELS)
    for level in (0, 13, 27):
        assert channel.queue_declare(delays.level_name(level), passive=True).method.message_count == 0


# -- publish_message(run_after=..., countdown=...) -------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_countdown_runs_the_task_once_not_before_its_time(tmp_path):
    target = tmp_path / 'runs'
    before = time.time()
    log = publish_message(tasks.stamp, str(target), 'later', countdown=2)
    log.refresh_from_db()
    assert log.status == 'SCHEDULED' and log.run_after is not None
    assert abs((log.run_after - log.publish_time).total_seconds() - 2) < 0.5
    assert queue_depth('default') == 0 and delay_depth() == 1
    run_consumer(max_messages=1, idle_timeout=10)
    (label, ran), = (line.split() for line in lines(target))
    assert float(ran) >= log.run_after.timestamp() and float(ran) - before < 4
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)


@pytest.mark.django_db(transaction=True)
def test_run_after_in_the_past_runs_at_once_and_is_recorded():
    past = timezone.now() - timedelta(minutes=5)
    log = publish_message(tasks.add, 1, 2, run_after=past)
    assert (log.status, log.run_after) == ('PUBLISHED', past)
    assert queue_depth('default') == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize('options, reason', [
    ({'run_after': timezone.now().replace(tzinfo=None)}, 'aware datetime'),
    ({'run_after': '2030-01-01'}, 'must be a datetime'),
    ({'countdown': -1}, 'seconds >= 0'),
    ({'countdown': float('nan')}, 'seconds >= 0'),
    ({'countdown': True}, 'seconds >= 0'),
    ({'countdown': 1e300}, 'past the calendar'),
    ({'countdown': 5, 'run_after': timezone.now()}, 'not both'),
    ({'countdown': 5, 'exchange': 'amq.direct'}, 'delivered to its queue'),
])
def test_a_delay_carrot_cannot_honour_is_refused_before_anything_is_written(options, reason):
    with pytest.raises(InvalidCall, match=reason):
        publish_message(tasks.add, 1, 2, **options)
    assert not MessageLog.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_delay_of_thirty_days_is_accepted_and_shown_in_the_later_tab(admin_client):
    log = publish_message(tasks.add, 1, 2, countdown=30 * 86400)
    log.refresh_from_db()
    assert log.status == 'SCHEDULED'
    assert timedelta(days=29, hours=23) < log.run_after - timezone.now() <= timedelta(days=30)
    assert delay_depth() == 1
    page = admin_client.get('/carrot/later/').content.decode()
    assert log.uuid in page and log.run_after.strftime('%Y-%m-%d') in page
    row, = admin_client.get('/carrot/api/messages/?tab=later').json()['results']
    assert row['run_after'] == log.run_after.isoformat()
    assert admin_client.get('/carrot/api/messages/?tab=later').json()['counts']['later'] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_delayed_publish_inside_a_transaction_is_sent_on_commit(tmp_path):
    from django.db import transaction
    with transaction.atomic():
        log = publish_message(tasks.add, 1, 2, countdown=1)
        assert delay_depth() == 0
    assert delay_depth() == 1
    log.refresh_from_db()
    assert log.status == 'SCHEDULED'
    with transaction.atomic():
        publish_message(tasks.add, 3, 4, countdown=1)
        transaction.set_rollback(True)
    assert delay_depth() == 1 and MessageLog.objects.count() == 1


# -- the row decides, not the message ---------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_a_message_that_comes_early_is_parked_again_for_the_rest(raw_channel, tmp_path, caplog):
    """Twice, through the same levels: the copy goes round without the x-death of its first trip, or
    RabbitMQ would drop it as a dead-letter cycle."""
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'once', countdown=3)
    body = {'args': [str(target), 'once'], 'kwargs': {}}
    publish_raw(raw_channel, body, {'type': 'tests.testapp.tasks.stamp'}, message_id=log.uuid)  # at once
    consumer = ConsumerThread('default#early', idle_timeout=9).start()
    time.sleep(2)
    MessageLog.objects.filter(pk=log.pk).update(run_after=timezone.now() + timedelta(seconds=3))
    consumer.join(timeout=60)
    (label, ran), = (line.split() for line in lines(target))
    log.refresh_from_db()
    assert float(ran) >= log.run_after.timestamp()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert 'parked for another' in caplog.text
    assert (queue_depth('default'), delay_depth(), queue_depth('default.dead')) == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_an_overdue_scheduled_row_is_sent_again_by_the_sweep_and_runs_once(tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'swept', countdown=1)
    channel = raw_connection().channel()
    for level in range(LEVELS):  # the copy in the levels is lost (a broker reset, a level deleted)
        channel.queue_purge(delays.level_name(level))
    time.sleep(1.5)
    assert Sweep().sweep_overdue() == 0  # not overdue by delay_sweep_after yet
    with override_settings(CARROT={**settings.CARROT, 'delay_sweep_after': 0.1}):
        assert Sweep().sweep_overdue() == 1
        assert Sweep().sweep_overdue() == 0  # PUBLISHED now: sent once
    log.refresh_from_db()
    assert log.status == 'PUBLISHED'
    run_consumer(max_messages=1)
    assert [line.split()[0] for line in lines(target)] == ['swept']


@pytest.mark.django_db(transaction=True)
def test_the_sweep_fails_a_row_that_can_never_be_sent():
    log = publish_message(tasks.add, 1, 2, countdown=1)
    MessageLog.objects.filter(pk=log.pk).update(task='tests.testapp.tasks._private',
                                               run_after=timezone.now() - timedelta(hours=1))
    assert Sweep().sweep_overdue() == 0
    log.refresh_from_db()
    assert log.status == 'FAILED' and 'overdue scheduled message could not be sent again' in log.exception


# -- the monitor: run now, cancel ----------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_run_now_sends_a_scheduled_task_at_once_and_the_delayed_copy_is_a_duplicate(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=2)
    response = admin_client.post(f'/carrot/api/messages/{log.uuid}/run/')
    assert response.status_code == 200, response.content
    log.refresh_from_db()
    assert log.status == 'PUBLISHED' and log.run_after <= timezone.now()
    run_consumer(max_messages=2, idle_timeout=5)  # the task, then the delayed copy acked as a duplicate
    assert [line.split()[0] for line in lines(target)] == ['now']
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('COMPLETED', 1)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 409


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
@pytest.mark.parametrize('then_delete', [False, True])
def test_a_cancelled_task_never_runs_even_with_its_row_deleted(admin_client, raw_channel, tmp_path, then_delete):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'never', countdown=4)
    response = admin_client.post(f'/carrot/task/{log.uuid}/cancel/', follow=True)
    assert 'cancelled' in response.content.decode()
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Cancelled')
    if then_delete:  # its message, when it comes, finds no row: still not run (tests/test_orphaned_copies.py)
        assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=8)
    assert not target.exists()
    assert len(dead_letters(raw_channel)) == 1
    assert MessageLog.objects.count() == (0 if then_delete else 1)
