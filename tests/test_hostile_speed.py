"""Attacks on issue 13's speed work: the one-statement claim (take_on_arrival), the 'track' levels,
publish_messages with its batched confirms, adopted (1.x) queues, and the config keys that came with them.

Everything runs against the real RabbitMQ and database (SQLite, or PostgreSQL with CARROT_TEST_DB=postgres);
executions are counted by the tasks themselves (one line per run), never assumed.
"""
import json
import time
import uuid

import pika
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test import override_settings
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from carrot.amqp.declare import declare_queue
from carrot.config import get_config
from carrot.consume import claim
from carrot.exceptions import BrokerUnavailable, CarrotConfigException, InvalidCall, MessageRejected
from carrot.models import MessageLog
from carrot.publish import arguments, outbox
from carrot.publish.relay import Relay
from carrot.utilities import publish_message, publish_messages
from tests.conftest import dead_letters, delay_depth, queue_depth, rabbitmqctl, raw_connection, run_consumer
from tests.harness import wait_for
from tests.testapp import background, tasks

pytestmark = pytest.mark.django_db(transaction=True)
RECORD = 'tests.testapp.tasks.record_execution'


def runs(path):
    """The tokens of every execution recorded in `path` (tasks.record_execution: '<token> <pid>')."""
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def tracking(level, **carrot):
    return override_settings(CARROT={**settings.CARROT, **carrot,
                                     'queues': [{'name': 'default', 'track': level}, {'name': 'other'}]})


def publish_raw(channel, body, properties, queue='default'):
    declare_queue(channel, get_config().queue(queue))
    channel.basic_publish('', queue, body, properties)


def forged(message_id, task=RECORD):
    return pika.BasicProperties(headers={'type': task}, message_id=message_id, content_type='application/json',
                                delivery_mode=2)


# -- a forged or duplicated message on a 'all' queue -------------------------------------------------------

# The same call as ["<path>", "t"] / {} in JSON that reads differently: spacing, escapes, key order.
REFORMATTED = [
    '{"args": [PATH, "t"], "kwargs": {}}',
    '{ "kwargs" : { }  ,\n "args" : [ PATH ,\t"\\u0074" ] }',
    '{"args":[PATH,"t"],"kwargs":{}}',
]


@pytest.mark.parametrize('body', REFORMATTED)
@pytest.mark.parametrize('settled', ['COMPLETED', 'FAILED'])
def test_a_forged_copy_of_a_settled_message_is_not_run_again(raw_channel, tmp_path, body, settled):
    """A writer on the queue replays a finished message under its id, its JSON written otherwise."""
    record = tmp_path / 'runs'
    log = publish_message(tasks.record_execution, str(record), 't')
    run_consumer(max_messages=1)
    if settled == 'FAILED':
        MessageLog.objects.filter(pk=log.pk).update(status='FAILED', exception='failed earlier')
    assert runs(record) == ['t']
    text = body.replace('PATH', json.dumps(str(record)))
    for _ in range(3):
        publish_raw(raw_channel, text.encode(), forged(log.uuid))
    run_consumer(max_messages=3)
    assert runs(record) == ['t']
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.attempts) == (settled, 1)
    assert MessageLog.objects.count() == 1  # same call: no conflict row either
    assert len(dead_letters(raw_channel)) == (3 if settled == 'FAILED' else 0)


def test_a_forged_copy_of_a_message_running_elsewhere_is_parked_not_run(raw_channel, tmp_path):
    record = tmp_path / 'runs'
    log = publish_message(tasks.record_execution, str(record), 't')
    raw_channel.queue_purge('default')
    from django.utils import timezone
    from datetime import timedelta
    MessageLog.objects.filter(pk=log.pk).update(status='IN_PROGRESS', worker='elsewhere:4242', attempts=1,
                                                lease_expires=timezone.now() + timedelta(minutes=5))
    publish_raw(raw_channel, json.dumps({'args': [str(record), 't'], 'kwargs': {}}).encode(), forged(log.uuid))
    run_consumer(max_messages=1)
    assert runs(record) == []
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.worker, row.attempts) == ('IN_PROGRESS', 'elsewhere:4242', 1)
    assert delay_depth() == 1  # parked in the delay levels, to look again later


def test_a_forged_message_with_another_call_under_a_waiting_id_is_refused(raw_channel, tmp_path):
    """Equal text in every column but one: the one-statement claim must not take the row."""
    record = tmp_path / 'runs'
    log = publish_message(tasks.record_execution, str(record), 'real')
    raw_channel.queue_purge('default')
    publish_raw(raw_channel, json.dumps({'args': [str(record), 'forged'], 'kwargs': {}}).encode(),
                forged(log.uuid))
    run_consumer(max_messages=1)
    assert runs(record) == []
    assert MessageLog.objects.get(pk=log.pk).status == 'PUBLISHED'


# -- take_on_arrival with any arguments, on both databases -------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 63, max_value=2 ** 63),
                      st.floats(allow_nan=False), st.text(max_size=40),
                      st.sampled_from(['\x00', 'a\x00b', '\U0001f955', '\ud800', '\u2028', "'; DROP TABLE x; --",
                                       '%s', '%(x)s', '\\', '"', '\x1b[31m']))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(json_value, max_size=4), kwargs=st.dictionaries(
    st.text(min_size=1, max_size=10).filter(str.isidentifier), json_value, max_size=3))
def test_the_one_statement_claim_takes_a_row_of_any_arguments_exactly_once(args, kwargs):
    task_args, content = arguments.dump(args, kwargs)
    row = MessageLog.objects.create(uuid=str(uuid.uuid4()), status=MessageLog.PUBLISHED, queue='default',
                                    task='tests.testapp.tasks.echo', task_args=task_args, content=content)
    taken = claim.take_on_arrival(row.uuid, row.task, task_args, content, 'host:1', 60)
    assert taken is not None and taken.pk == row.pk
    assert (taken.task_args, taken.content, taken.status, taken.attempts) == (task_args, content, 'IN_PROGRESS', 1)
    # The columns it sets or matches are not sent back: the row holds them all the same, as a read would.
    read = MessageLog.objects.get(pk=row.pk)
    assert {f.attname: getattr(taken, f.attname) for f in MessageLog._meta.concrete_fields} == \
        {f.attname: getattr(read, f.attname) for f in MessageLog._meta.concrete_fields}
    assert claim.take_on_arrival(row.uuid, row.task, task_args, content, 'host:2', 60) is None
    other_args, other_content = arguments.dump([*args, 0], kwargs)
    assert claim.take_on_arrival(row.uuid, row.task, other_args, content, 'host:3', 60) is None
    assert MessageLog.objects.get(pk=row.pk).worker == 'host:1'


@pytest.mark.parametrize('value', ['a\x00b' * 1000, '\U0001f955' * 20_000, 'x' * 300_000, '\ud800\udfff\x00'],
                         ids=['nul', 'non-bmp', 'huge', 'surrogates'])
def test_strange_arguments_run_once_and_complete(value, tmp_path):
    log = publish_message(tasks.echo, value, k=value)
    publish_raw(raw_connection().channel(), json.dumps({'args': [value], 'kwargs': {'k': value}}).encode(),
                forged(log.uuid, 'tests.testapp.tasks.echo'))  # and a copy of it, as a second publisher sends
    run_consumer(max_messages=2)
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.attempts) == ('COMPLETED', 1)
    assert row.output.startswith('{"args": [')  # cut to CARROT['max_stored_text'] when long
    assert MessageLog.objects.count() == 1 and queue_depth('default') == 0


# -- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('value', [None, 'ALL', 'all ', b'all', ['all'], {'all': 1}, 1, True, 0.0])
def test_a_track_level_of_the_wrong_value_or_type_is_a_clear_config_error(value):
    with override_settings(CARROT={**settings.CARROT, 'queues': [{'name': 'default', 'track': value}]}):
        with pytest.raises(CarrotConfigException, match=r"\['queues'\]\[0\]\['track'\] must be 'all' or "
                                                         r"'failures' or 'none', got "):
            get_config()


@pytest.mark.parametrize('value', ['yes', 'false', 1, 0, None, [], 2.0])
def test_async_commits_must_be_a_bool(value):
    with override_settings(CARROT={**settings.CARROT, 'async_commits': value}):
        with pytest.raises(CarrotConfigException, match=r"\['async_commits'\] must be True or False"):
            get_config()


# -- the one-statement claim on every PostgreSQL driver set-up Django supports ------------------------------

CONSUME_WITH = """
import runpy, sys
if sys.argv[1] == 'psycopg2':
    sys.modules['psycopg'] = None  # Django falls back to psycopg2, as on a site that only has psycopg2
else:
    import tests.testproject.settings as s
    s.DATABASES['default'].setdefault('OPTIONS', {})['server_side_binding'] = True
sys.argv[1:] = ['default', '2', '3']
runpy.run_path('tests/consume.py', run_name='__main__')
"""


@pytest.mark.parametrize('driver', ['psycopg2', 'server_side_binding'])
def test_the_claim_works_with_psycopg2_and_with_server_side_binding(driver, subprocess_env, tmp_path):
    """Django on PostgreSQL runs on psycopg 3 with client-side binding (its default), psycopg 3 with
    OPTIONS['server_side_binding'], or psycopg2; a claim that only works on the first fails every task."""
    if connection.vendor != 'postgresql':
        pytest.skip('PostgreSQL only')
    if driver == 'psycopg2':
        pytest.importorskip('psycopg2')
    import subprocess
    import sys
    from tests.harness import ROOT
    record = tmp_path / 'runs'
    logs = [publish_message(tasks.record_execution, str(record), f't{n}') for n in range(2)]
    result = subprocess.run([sys.executable, '-c', CONSUME_WITH, driver], env=subprocess_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = MessageLog.objects.filter(pk__in=[log.pk for log in logs])
    assert {(row.status, row.attempts) for row in rows} == {('COMPLETED', 1)}, \
        [(row.status, row.exception) for row in rows]
    assert sorted(runs(record)) == ['t0', 't1']


# -- queues that track less ----------------------------------------------------------------------------------

UNREACHABLE = 'amqp://guest:guest@127.0.0.1:1/'


@pytest.mark.parametrize('level', ['failures', 'none'])
def test_a_message_relayed_from_its_row_is_tracked_as_all_and_its_row_completed(tmp_path, level):
    """README: a message that must wait for the broker keeps a WAITING row for the relay 'and is then tracked
    as all'. The relayed copy is a first delivery: it must still find its row, or the row reads PUBLISHED for
    ever (the monitor shows a task that never ran) and a copy of it runs again unclaimed."""
    record = tmp_path / 'runs'
    with tracking(level, default_broker=UNREACHABLE, confirm_timeout=2):
        log = publish_message(tasks.record_execution, str(record), 'relayed')
    assert MessageLog.objects.get(uuid=log.uuid).status == 'WAITING'
    with tracking(level):
        assert Relay(relay_after=0).relay_waiting() == 1
        run_consumer(max_messages=1)
    assert runs(record) == ['relayed']
    row = MessageLog.objects.get(uuid=log.uuid)
    assert (row.status, row.attempts) == ('COMPLETED', 1)


@pytest.mark.parametrize('level', ['failures', 'none'])
def test_an_untracked_publish_that_fails_after_the_commit_leaves_a_failed_row(level):
    """store_and_forward off, inside a transaction: nothing can be raised into the caller after the commit,
    so the row must say FAILED (as on a 'all' queue) rather than the message vanish with a log line."""
    with tracking(level, default_broker=UNREACHABLE, confirm_timeout=2, store_and_forward=False):
        with transaction.atomic():
            log = publish_message(tasks.add, 1, 2)
        with pytest.raises(BrokerUnavailable):
            publish_message(tasks.add, 3, 4)  # outside a transaction: raised, as on a 'all' queue
    rows = MessageLog.objects.order_by('id')
    assert [(row.task_args, row.status) for row in rows] == [('[1, 2]', 'FAILED'), ('[3, 4]', 'FAILED')]
    assert rows[0].uuid == log.uuid and 'BrokerUnavailable' in rows[0].exception


@pytest.mark.parametrize('level', ['failures', 'none'])
@pytest.mark.parametrize('kind', ['KeyboardInterrupt', 'SystemExit', 'GeneratorExit', 'custom'])
def test_an_untracked_task_raising_a_base_exception_fails_once_and_the_worker_goes_on(tmp_path, raw_channel,
                                                                                      level, kind):
    record = tmp_path / 'runs'
    with tracking(level):
        publish_message(tasks.raises_base, kind, str(record))
        publish_message(tasks.record_execution, str(record), 'after')
        run_consumer(max_messages=2)
    assert sorted(runs(record)) == sorted([kind, 'after'])
    assert len(dead_letters(raw_channel)) == 1 and queue_depth('default') == 0
    if level == 'none':
        assert MessageLog.objects.count() == 0
    else:
        row = MessageLog.objects.get()
        assert (row.status, row.attempts, row.task) == ('FAILED', 1, 'tests.testapp.tasks.raises_base')


@pytest.mark.parametrize('kind', ['begin', 'atomic', 'nested', 'autocommit', 'broken'])
def test_an_untracked_task_leaving_a_transaction_open_is_rolled_back_and_the_next_runs(tmp_path, kind):
    record = tmp_path / 'runs'
    with tracking('failures'):
        publish_message(tasks.leaves_transaction, kind, f'user-{kind}')
        publish_message(tasks.record_execution, str(record), 'after')
        publish_message(tasks.explode, 'logged')
        run_consumer(max_messages=3)
    assert runs(record) == ['after']
    assert not User.objects.filter(username=f'user-{kind}').exists()  # never committed by the task
    assert MessageLog.objects.get().status == 'FAILED'  # the one failure, recorded on a clean connection


def test_a_django_task_on_an_untracked_queue_keeps_its_result():
    with tracking('none'):
        result = background.add.enqueue(2, 3)
        run_consumer(max_messages=1)
    result.refresh()
    assert result.return_value == 5
    assert MessageLog.objects.get(uuid=result.id).status == 'COMPLETED'


@pytest.mark.parametrize('level', ['failures', 'none'])
def test_an_untracked_message_from_a_1x_publisher_without_id_runs_once(tmp_path, raw_channel, level):
    record = tmp_path / 'runs'
    with tracking(level):
        for n in range(3):
            publish_raw(raw_channel, json.dumps({'args': [str(record), f'old{n}'], 'kwargs': {}}).encode(),
                        pika.BasicProperties(headers={'type': RECORD}, content_type='application/json'))
        run_consumer(max_messages=6, idle_timeout=3)
    assert sorted(runs(record)) == ['old0', 'old1', 'old2']
    assert (queue_depth('default'), delay_depth(), queue_depth('default.dead')) == (0, 0, 0)


# -- publish_messages ----------------------------------------------------------------------------------------

class FullQueue:
    """A RabbitMQ policy on `default`: at most `length` messages, the rest nacked (overflow reject-publish),
    as a queue with a max-length that its consumers cannot keep up with. Scoped to the test's vhost."""

    def __init__(self, length):
        self.length = length

    def __enter__(self):
        rabbitmqctl('set_policy', '-p', settings.VHOST, '--apply-to', 'queues', 'hostile-full', '^default$',
                    json.dumps({'max-length': self.length, 'overflow': 'reject-publish'}))
        time.sleep(0.5)  # policies apply asynchronously
        return self

    def __exit__(self, *exc):
        rabbitmqctl('clear_policy', '-p', settings.VHOST, 'hostile-full')
        time.sleep(0.5)


def statuses():
    counts = {}
    for status in MessageLog.objects.values_list('status', flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


@pytest.mark.timeout(120)
def test_a_batch_the_queue_takes_only_in_part_fails_only_what_it_refused(tmp_path, monkeypatch):
    """store_and_forward off, 12 calls in batches of 5, the queue takes 3. The 3 it took are on the queue:
    their rows must not say FAILED (a consumer would dead-letter them unrun, or a requeue of them run them
    twice). The calls after the failed batch were never sent: none may be left WAITING for the relay to
    send behind the back of a caller that was told BrokerUnavailable."""
    monkeypatch.setattr(outbox, 'BATCH_SIZE', 5)
    record = tmp_path / 'runs'
    with FullQueue(3):
        with pytest.raises(BrokerUnavailable, match='nacked'):
            outbox.publish_many(tasks.record_execution, [((str(record), f'c{n}'), {}) for n in range(12)],
                                store_and_forward=False)
    assert queue_depth('default') == 3
    assert 'WAITING' not in statuses()
    assert statuses().get('PUBLISHED') == 3, statuses()
    run_consumer(max_messages=3)
    completed = MessageLog.objects.filter(status='COMPLETED')
    assert sorted(runs(record)) == sorted(json.loads(row.task_args)[1] for row in completed)
    assert completed.count() == 3 and queue_depth('default.dead') == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize('level', ['all', 'failures'])
def test_a_batch_the_queue_takes_only_in_part_is_relayed_and_every_call_runs_once(tmp_path, monkeypatch, level):
    """store_and_forward on: what the queue refused waits in its rows; once the queue has room the relay
    sends those, and every call runs exactly once -- on a 'failures' queue too, where the calls the queue
    took (confirmed) have no row, and must not be given one the relay would send again."""
    monkeypatch.setattr(outbox, 'BATCH_SIZE', 5)
    record = tmp_path / 'runs'
    with tracking(level):
        with FullQueue(3):
            rows = outbox.publish_many(tasks.record_execution,
                                       [((str(record), f'c{n}'), {}) for n in range(12)], store_and_forward=True)
        assert len(rows) == 12 and queue_depth('default') == 3
        assert MessageLog.objects.filter(status='WAITING').count() == 9
        assert Relay(relay_after=0).relay_waiting() == 9
        run_consumer(max_messages=12, idle_timeout=3)
    assert sorted(runs(record)) == sorted(f'c{n}' for n in range(12))
    assert set(statuses()) <= {'COMPLETED'} and (queue_depth('default'), delay_depth()) == (0, 0)


def calls_of(record, label, count):
    """A generator of `count` record_execution calls (publish_messages must take any iterable)."""
    return (((str(record), f'{label}{n}'), {}) for n in range(count))


def wait_completed(count, timeout, supervisor=None):
    def done():
        return MessageLog.objects.filter(status='COMPLETED').count() >= count
    wait_for(done, timeout, lambda: f'{count} rows COMPLETED; statuses now {statuses()}',
             tail=supervisor.tail if supervisor is not None else None, interval=0.2)


CONSUMERS = ['consumer default#1', 'consumer default#2', 'consumer default#3']


@pytest.fixture
def draining(start_supervisor):
    """A carrot-supervisor with three consumers on `default`, draining while the test publishes."""
    supervisor = start_supervisor('--queues', 'default', extra="CARROT['queues'][0]['concurrency'] = 3\n")
    supervisor.wait_ready(CONSUMERS, timeout=60)
    return supervisor


@pytest.mark.timeout(300)
def test_publish_messages_of_every_size_from_a_generator_runs_each_call_once_while_consumers_drain(draining,
                                                                                              tmp_path):
    record = tmp_path / 'runs'
    expected = []
    for size in (0, 1, 999, 1000, 1001, 2500):
        rows = publish_messages(tasks.record_execution, calls_of(record, f's{size}-', size))
        assert len(rows) == size and all(row.pk for row in rows)
        assert [json.loads(row.task_args)[1] for row in rows] == [f's{size}-{n}' for n in range(size)]
        expected += [f's{size}-{n}' for n in range(size)]
    wait_completed(len(expected), 240, draining)
    assert sorted(runs(record)) == sorted(expected)  # none lost, none twice
    assert statuses() == {'COMPLETED': len(expected)}
    assert MessageLog.objects.filter(attempts=1).count() == len(expected)


def test_one_bad_call_deep_in_a_generator_writes_and_sends_nothing(tmp_path):
    record = tmp_path / 'runs'

    def calls(bad):
        yield from calls_of(record, 'ok', 1500)
        yield bad
        yield from calls_of(record, 'late', 10)

    for bad in [((str(record),), {}), ((str(record), object()), {}), [str(record), 'x'], 'not a pair',
                ((str(record), 'x'), {'seconds': 0.0, 'nope': 1})]:
        with pytest.raises((InvalidCall, TypeError)):
            publish_messages(tasks.record_execution, calls(bad))

    def exploding():
        yield from calls_of(record, 'ok', 1200)
        raise RuntimeError('the generator broke')

    with pytest.raises(RuntimeError, match='the generator broke'):
        publish_messages(tasks.record_execution, exploding())
    assert MessageLog.objects.count() == 0 and queue_depth('default') == 0


@pytest.mark.timeout(400)
@pytest.mark.parametrize('outage', ['vhost_shut', 'close_all_connections'])
def test_rabbitmq_failing_while_a_batch_is_confirmed_loses_and_doubles_no_call(draining, tmp_path, monkeypatch,
                                                                               outage):
    """publish_messages of 3,000 calls; RabbitMQ shuts this test's virtual host (every connection of it
    dropped and no new one let in until the end of the publish: the broker is shared with the other CI
    runs, so it is not stopped) or only drops its connections, while the first batch's confirms are awaited (exactly when the second batch's rows are written), with three
    consumers draining. Whatever was not confirmed waits in its rows; the supervisor's relay sends it once
    RabbitMQ is back. Every call must run exactly once, and every row end COMPLETED."""
    record = tmp_path / 'runs'
    write_rows = outbox._write_rows
    writes = []

    def outage_while_confirming(messages):
        writes.append(len(messages))
        if len(writes) == 2:
            if outage == 'vhost_shut':
                rabbitmqctl('clear_permissions', '-p', settings.VHOST, 'guest')
            rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'hostile test')
        return write_rows(messages)

    monkeypatch.setattr(outbox, '_write_rows', outage_while_confirming)
    try:
        rows = publish_messages(tasks.record_execution, calls_of(record, 'c', 3000))
    finally:
        rabbitmqctl('set_permissions', '-p', settings.VHOST, 'guest', '.*', '.*', '.*')
    monkeypatch.undo()
    assert len(rows) == 3000 and len(writes) == 3
    if outage == 'vhost_shut':
        assert MessageLog.objects.filter(status='WAITING').count() >= 2000, statuses()  # batches 2 and 3
    wait_completed(3000, 300, draining)
    assert sorted(runs(record)) == sorted(f'c{n}' for n in range(3000))
    assert statuses() == {'COMPLETED': 3000}
    assert (queue_depth('default'), queue_depth('default.dead')) == (0, 0)


@pytest.mark.timeout(120)
def test_the_queue_deleted_while_a_batch_is_confirmed(tmp_path, monkeypatch):
    """An operator deletes the queue mid-publish: what RabbitMQ returns as unroutable is FAILED, nothing is
    left WAITING behind the raise, and the next publish_messages declares the queue again and goes through."""
    record = tmp_path / 'runs'
    write_rows = outbox._write_rows
    writes = []

    def delete_queue_while_confirming(messages):
        writes.append(len(messages))
        if len(writes) == 2:
            connection = raw_connection()
            connection.channel().queue_delete('default')
            connection.close()
        return write_rows(messages)

    monkeypatch.setattr(outbox, '_write_rows', delete_queue_while_confirming)
    with pytest.raises(MessageRejected, match='unroutable'):
        publish_messages(tasks.record_execution, calls_of(record, 'c', 3000))
    monkeypatch.undo()
    assert 'WAITING' not in statuses(), statuses()
    assert statuses().get('FAILED', 0) >= 1000
    rows = publish_messages(tasks.record_execution, calls_of(record, 'again', 5))
    assert {row.status for row in rows} == {'PUBLISHED'} and queue_depth('default') == 5


def test_a_single_publish_after_the_queue_was_deleted_declares_it_again():
    publish_message(tasks.add, 1, 2)
    connection = raw_connection()
    connection.channel().queue_delete('default')
    connection.close()
    log = publish_message(tasks.add, 3, 4)  # the publisher had it declared: it must not refuse it for good
    assert log.status == 'PUBLISHED' and queue_depth('default') == 1


# -- racing copies under a supervisor ---------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_copies_of_each_message_racing_on_three_consumers_run_once(draining, raw_channel, tmp_path):
    """Every message is on the queue three times (a publisher retry after a lost confirm, a relay, a
    hostile writer), back to back, so the copies reach different consumers at the same moment: the
    one-statement claim lets exactly one of them run it."""
    record = tmp_path / 'runs'
    logs = publish_messages(tasks.record_execution,
                            [((str(record), f'r{n}', 0.05), {}) for n in range(60)])
    for log in logs:
        body = json.dumps({'args': [str(record), json.loads(log.task_args)[1], 0.05], 'kwargs': {}}).encode()
        for _ in range(2):
            raw_channel.basic_publish('', 'default', body, forged(log.uuid))
    wait_completed(60, 180, draining)
    wait_for(lambda: queue_depth('default') == 0 and delay_depth() == 0, 120, 'the copies to be settled',
             draining.tail)
    assert sorted(runs(record)) == sorted(f'r{n}' for n in range(60))
    assert set(MessageLog.objects.values_list('status', 'attempts')) == {('COMPLETED', 1)}
    assert queue_depth('default.dead') == 0


# -- a django-carrot 1.x queue adopted while carrot runs -----------------------------------------------------

def redeclare_as_1x(name='default'):
    """What an operator rolling back to django-carrot 1.x (or its publisher starting first) leaves behind."""
    connection = raw_connection()
    channel = connection.channel()
    channel.queue_delete(name)
    channel.queue_declare(name, durable=True, arguments={'x-max-priority': 255})
    connection.close()


def queue_arguments_of(name):
    out = rabbitmqctl('list_queues', '-p', settings.VHOST, 'name', 'arguments').stdout
    return next(line for line in out.splitlines() if line.startswith(f'{name}\t'))


@pytest.mark.timeout(240)
def test_a_1x_queue_swapped_in_under_a_running_supervisor_is_adopted_and_failures_still_dead_lettered(
        start_supervisor, raw_channel, tmp_path):
    supervisor = start_supervisor('--queues', 'default')
    supervisor.wait_ready(['consumer default#1'], timeout=60)
    record = tmp_path / 'runs'
    before = publish_message(tasks.record_execution, str(record), 'before')
    wait_completed(1, 60, supervisor)
    redeclare_as_1x()
    # The consumer's subscription was cancelled with the queue; it comes back on the 1.x queue as it is.
    wait_for(lambda: 'default\t1\n' in rabbitmqctl('list_queues', '-p', settings.VHOST, 'name', 'consumers').stdout,
             90, 'the consumer to subscribe to the 1.x queue again', supervisor.tail)
    failing = publish_message(tasks.explode, 'on a 1.x queue')
    after = publish_message(tasks.record_execution, str(record), 'after')
    wait_for(lambda: MessageLog.objects.filter(status__in=['COMPLETED', 'FAILED']).count() == 3, 90,
             lambda: f'the tasks to settle; statuses {statuses()}', supervisor.tail)
    assert MessageLog.objects.get(pk=failing.pk).status == 'FAILED'
    assert MessageLog.objects.get(pk=after.pk).status == 'COMPLETED'
    assert MessageLog.objects.get(pk=before.pk).status == 'COMPLETED'
    assert runs(record) == ['before', 'after']
    assert queue_arguments_of('default') == 'default\t[{"x-max-priority",255}]'  # adopted as it is
    dead = wait_for(lambda: dead_letters(raw_channel), 30, 'the failure in default.dead', supervisor.tail)
    assert [properties.message_id for properties, _ in dead] == [failing.uuid]


def test_a_connection_dropped_just_after_a_confirm_is_met_mid_publish_and_the_message_sent_once(monkeypatch,
                                                                                               caplog):
    """A connection that had a confirm moments ago is not polled before the next publish (for speed): if
    RabbitMQ dropped it in that moment, the publish meets the drop itself and must go out once on a new
    connection -- not fail (store_and_forward off: the caller would be told BrokerUnavailable while
    RabbitMQ is up), not arrive twice. FRESH_FOR is stretched so that the slow rabbitmqctl falls inside it."""
    from carrot.amqp import publisher
    monkeypatch.setattr(publisher, 'FRESH_FOR', 3600)
    caplog.set_level('INFO', logger='carrot.broker')
    with override_settings(CARROT={**settings.CARROT, 'store_and_forward': False}):
        publish_message(tasks.add, 0, 1)
        rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'hostile test')
        time.sleep(1)
        row = publish_message(tasks.add, 1, 1)
    assert row.status == 'PUBLISHED'
    assert 'was lost' in caplog.text and 'reconnecting' in caplog.text  # met mid-publish: it was not polled
    assert queue_depth('default') == 2


@pytest.mark.parametrize('publish', ['single', 'batch'])
def test_the_first_publish_after_rabbitmq_dropped_an_idle_connection_goes_through(publish):
    """The web process published once, then RabbitMQ dropped its connection (a restart, a failover, an idle
    timeout on the way) while it was idle. The next publish must reconnect, not fail (store_and_forward off:
    the caller would be told BrokerUnavailable while RabbitMQ is up)."""
    with override_settings(CARROT={**settings.CARROT, 'store_and_forward': False}):
        publish_messages(tasks.add, [((0, 0), {})])
        publish_message(tasks.add, 0, 1)
        rabbitmqctl('close_all_connections', '-p', settings.VHOST, 'hostile test')
        time.sleep(1)
        if publish == 'batch':
            rows = publish_messages(tasks.add, [((n, n), {}) for n in range(3)])
        else:
            rows = [publish_message(tasks.add, 1, 1)]
    assert {row.status for row in rows} == {'PUBLISHED'}
    assert queue_depth('default') == 2 + len(rows)
