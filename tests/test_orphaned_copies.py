"""A copy whose row is gone never runs, and a purge stops every copy of what it purged (README, "A copy whose
row is gone never runs"): requeue, delete, purge, run now, cleanup and the admin, against the real RabbitMQ
and database, counting how often each task ran. Each test is an attack that once ran a task twice, or ran
one that had been cancelled or purged: a copy in the delay levels (or prefetched by a worker) found no row
and was taken for a message from another publisher."""
import json
import threading
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from carrot.consume import processor
from carrot.consume.processor import RETRY_BASE
from carrot.helper_tasks import cleanup
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth, run_consumer
from tests.harness import wait_for
from tests.test_claim import ConsumerThread, lines
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def labels(path) -> list[str]:
    return [line.split()[0] for line in lines(path)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('how', ['one', 'bulk'])
def test_a_cancelled_delayed_task_requeued_runs_once_and_its_delayed_copy_never(admin_client, raw_channel,
                                                                                 tmp_path, how):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'once', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/cancel/').status_code == 200
    if how == 'one':
        response = admin_client.post(f'/carrot/api/messages/{log.uuid}/requeue/')
    else:
        response = admin_client.post('/carrot/api/failed/requeue/', {'uuid': log.uuid})
    assert response.status_code == 200 and response.json()['count'] == 1, response.content
    run_consumer(max_messages=2, idle_timeout=8)  # the requeued copy, then the original out of the levels
    assert labels(target) == ['once']
    copy, = MessageLog.objects.all()
    assert (copy.status, copy.attempts, copy.origin) == ('COMPLETED', 1, log.uuid)
    assert len(dead_letters(raw_channel)) == 1  # the original's copy, unrun


@pytest.mark.timeout(60)
def test_a_task_run_now_and_deleted_does_not_run_again_when_its_delayed_copy_comes(admin_client, raw_channel,
                                                                                    tmp_path, caplog):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=3)
    assert MessageLog.objects.get(pk=log.pk).status == 'COMPLETED'
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=8)  # the delayed copy
    assert labels(target) == ['now']
    assert not MessageLog.objects.exists()  # no row written again for it
    assert len(dead_letters(raw_channel)) == 1
    assert 'came out of the delay levels, but its log row is gone' in caplog.text


@pytest.mark.timeout(60)
def test_cleanup_of_a_finished_task_whose_delayed_copy_is_still_out_runs_nothing_again(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'now', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    run_consumer(max_messages=1, idle_timeout=3)
    assert cleanup(days=1e-9, failed_days=1e-9) == 1
    run_consumer(max_messages=1, idle_timeout=8)
    assert labels(target) == ['now'] and not MessageLog.objects.exists()


@pytest.mark.timeout(60)
def test_a_copy_parked_while_its_task_ran_does_not_run_again_once_the_row_is_deleted(admin_client, tmp_path):
    """The delayed copy comes while the run-now copy runs: it is parked (busy) and comes out again later,
    after the task finished and its row was deleted."""
    target = tmp_path / 'runs'
    log = publish_message(tasks.append_and_sleep, str(target), 'once', RETRY_BASE + 1, countdown=1)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    consumers = [ConsumerThread(f'default#{n}', idle_timeout=RETRY_BASE + 6).start() for n in (1, 2)]
    try:
        wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', 20, 'the task to finish')
        assert delay_depth() >= 1  # the delayed copy, parked while the task ran
        assert admin_client.post(f'/carrot/api/messages/{log.uuid}/delete/').status_code == 200
    finally:
        for consumer in consumers:
            consumer.join(timeout=60)
    assert lines(target) == ['once']
    assert not MessageLog.objects.exists()


@pytest.mark.timeout(60)
def test_a_purge_after_run_now_keeps_the_delayed_copy_from_running(admin_client, raw_channel, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'purged', countdown=3)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/run/').status_code == 200
    assert queue_depth('default') == 1
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged') and log.worker == ''
    run_consumer(max_messages=1, idle_timeout=8)  # the copy out of the levels finds it FAILED
    assert not target.exists()
    assert len(dead_letters(raw_channel)) == 1
    assert MessageLog.objects.count() == 1


@pytest.mark.timeout(60)
def test_a_purge_stops_a_delayed_task_whose_copy_had_reached_the_queue(admin_client, tmp_path):
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'purged', countdown=1)
    wait_for(lambda: queue_depth('default') == 1, 10, 'the copy to come out of the delay levels')
    assert MessageLog.objects.get(pk=log.pk).status == 'SCHEDULED'  # a row is claimed, not told it arrived
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged')  # so the sweep never sends it again


def purge_while_a_worker_holds_five(admin_client, target, slow_seconds: float, then=None):
    """A worker runs a slow task with five more prefetched behind it; the queue is purged meanwhile (and
    `then(admin_client)` runs) before the worker is let go."""
    publish_message(tasks.append_and_sleep, str(target), 'slow', slow_seconds)
    for n in range(5):
        publish_message(tasks.append_and_sleep, str(target), f'queued{n}', 0)
    consumer = ConsumerThread('default#prefetch', idle_timeout=3).start()
    try:
        wait_for(lambda: lines(target) == ['slow'], 20, 'the slow task to start')
        assert queue_depth('default') == 0  # the five behind it are the consumer's, prefetched
        response = admin_client.post('/carrot/api/queues/default/purge/')
        assert response.status_code == 200 and response.json()['count'] == 0
        if then is not None:
            then(admin_client)
    finally:
        consumer.join(timeout=60)


@pytest.mark.timeout(90)
def test_a_purge_keeps_the_deliveries_a_worker_had_prefetched_from_running(admin_client, tmp_path):
    target = tmp_path / 'runs'
    purge_while_a_worker_holds_five(admin_client, target, 3)
    assert lines(target) == ['slow']
    statuses = sorted(MessageLog.objects.values_list('status', flat=True))
    assert statuses == ['COMPLETED'] + ['FAILED'] * 5  # no row written again for a prefetched copy


@pytest.mark.timeout(60)
def test_a_message_committed_while_the_purge_runs_is_purged_with_it_and_never_runs(admin_client, tmp_path,
                                                                                   monkeypatch):
    """Its row was written before the purge, in a transaction that committed (and so sent it) once RabbitMQ
    had been emptied: the purge marks it all the same, and the copy that arrives is dead-lettered unrun.
    (PostgreSQL only: on SQLite the purge's write waits for that transaction to end.)"""
    from django.db import connection

    from carrot.amqp import declare

    if connection.vendor != 'postgresql':
        pytest.skip('the purge cannot overlap a writing transaction on SQLite (CARROT_TEST_DB=postgres)')
    target = tmp_path / 'runs'
    written, emptied, committed = threading.Event(), threading.Event(), threading.Event()
    purge = declare.purge

    def purge_then_let_the_publisher_commit(broker, name):
        count = purge(broker, name)
        emptied.set()
        assert committed.wait(20)
        return count

    monkeypatch.setattr(declare, 'purge', purge_then_let_the_publisher_commit)
    published = {}

    def publish_in_a_transaction():
        from django.db import connection
        try:
            with transaction.atomic():
                published['log'] = publish_message(tasks.stamp, str(target), 'late')
                written.set()
                assert emptied.wait(20)
            committed.set()
        finally:
            connection.close()

    publisher = threading.Thread(target=publish_in_a_transaction)
    publisher.start()
    assert written.wait(10), 'the row was not written'
    response = admin_client.post('/carrot/api/queues/default/purge/')
    publisher.join(30)
    assert response.status_code == 200, response.content
    log = MessageLog.objects.get(pk=published['log'].pk)
    assert log.status == 'FAILED' and log.exception.startswith('Purged'), (log.status, log.exception)
    assert queue_depth('default') == 1  # sent after RabbitMQ was emptied ...
    run_consumer(max_messages=1, idle_timeout=3)
    assert not target.exists()  # ... and still never run: the row says it was purged


@pytest.mark.timeout(60)
def test_a_message_sent_between_the_purge_and_its_rows_is_marked_purged_not_lost(admin_client, tmp_path,
                                                                                  monkeypatch):
    """Published (and confirmed) while RabbitMQ is being emptied: it is purged with the queue, and its row
    says so; it is not left PUBLISHED for a message that is gone."""
    from carrot.amqp import declare

    target = tmp_path / 'runs'
    purge = declare.purge
    published = {}

    def publish_then_purge(broker, name):
        published['log'] = publish_message(tasks.stamp, str(target), 'late')
        assert queue_depth('default') == 1
        return purge(broker, name)

    monkeypatch.setattr(declare, 'purge', publish_then_purge)
    response = admin_client.post('/carrot/api/queues/default/purge/')
    assert response.status_code == 200 and response.json()['count'] == 1, response.content
    log = MessageLog.objects.get(pk=published['log'].pk)
    assert log.status == 'FAILED' and log.exception.startswith('Purged')


@pytest.mark.timeout(60)
def test_a_message_confirmed_but_still_waiting_in_its_row_is_marked_purged_not_lost(admin_client, tmp_path,
                                                                                    monkeypatch):
    """RabbitMQ has the message; its publisher has not yet turned the row WAITING -> PUBLISHED when the
    purge runs. The row is marked, and the publisher's late update leaves it so."""
    from django.db import connection

    from carrot.publish import outbox

    target = tmp_path / 'runs'
    in_queue, purged = threading.Event(), threading.Event()
    mark_published = outbox.mark_published
    published = {}

    def slow_mark(*args, **kwargs):
        in_queue.set()
        assert purged.wait(20)
        return mark_published(*args, **kwargs)

    monkeypatch.setattr(outbox, 'mark_published', slow_mark)

    def publisher():
        try:
            published['log'] = publish_message(tasks.stamp, str(target), 'confirmed')
        finally:
            connection.close()

    thread = threading.Thread(target=publisher)
    thread.start()
    assert in_queue.wait(10) and queue_depth('default') == 1
    response = admin_client.post('/carrot/api/queues/default/purge/')
    purged.set()
    thread.join(20)
    assert response.status_code == 200 and response.json()['count'] == 1, response.content
    log = MessageLog.objects.get(pk=published['log'].pk)
    assert log.status == 'FAILED' and log.exception.startswith('Purged')


@pytest.mark.timeout(60)
def test_a_purge_whose_rows_cannot_be_marked_says_so_and_a_second_purge_marks_them(tmp_path, monkeypatch):
    from django.db import DatabaseError
    from django.db.models import QuerySet

    from carrot.monitor import actions

    log = publish_message(tasks.stamp, str(tmp_path / 'runs'), 'purged')
    update = QuerySet.update

    def database_gone(self, **fields):
        raise DatabaseError('server closed the connection unexpectedly')

    monkeypatch.setattr(QuerySet, 'update', database_gone)
    with pytest.raises(actions.ActionError) as failed:
        actions.purge_queue('default')
    monkeypatch.setattr(QuerySet, 'update', update)
    assert failed.value.status == 503 and 'Purge it again' in str(failed.value)
    assert queue_depth('default') == 0 and MessageLog.objects.get(pk=log.pk).status == 'PUBLISHED'
    assert actions.purge_queue('default').count == 0
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged')


@pytest.mark.timeout(60)
def test_two_purges_at_once_one_failing_still_mark_what_the_other_removed(tmp_path, monkeypatch):
    from carrot.amqp import declare
    from carrot.monitor import actions
    from django.db import connection

    log = publish_message(tasks.stamp, str(tmp_path / 'runs'), 'purged')
    purge = declare.purge
    first_purging, second_done = threading.Event(), threading.Event()
    calls, result = [], {}

    def one_waits_the_other_fails(broker, name):
        calls.append(name)
        if len(calls) == 1:
            first_purging.set()
            assert second_done.wait(20)
            return purge(broker, name)
        raise ConnectionError('broker unreachable from this web process')

    monkeypatch.setattr(declare, 'purge', one_waits_the_other_fails)

    def first():
        try:
            result['first'] = actions.purge_queue('default')
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    assert first_purging.wait(10)
    with pytest.raises(actions.ActionError):
        actions.purge_queue('default')
    second_done.set()
    thread.join(20)
    assert result['first'].count == 1
    log.refresh_from_db()
    assert log.status == 'FAILED' and log.exception.startswith('Purged')


@pytest.mark.timeout(120)
def test_purging_twice_while_two_consumers_drain_runs_each_task_once_or_marks_it_purged(tmp_path):
    from carrot.monitor import actions

    target = tmp_path / 'runs'
    # 10 ms each: the purges come while most of them still wait (no-op tasks all ran before them, at times).
    logs = [publish_message(tasks.record_execution, str(target), f't{n}', 0.01) for n in range(60)]
    consumers = [ConsumerThread(f'default#{n}', idle_timeout=3).start() for n in (1, 2)]
    try:
        wait_for(lambda: len(lines(target)) >= 10, 20, 'some tasks to run')
        actions.purge_queue('default')
        actions.purge_queue('default')
    finally:
        for consumer in consumers:
            consumer.join(timeout=60)
    runs = labels(target)
    rows = {row.uuid: row for row in MessageLog.objects.all()}
    for n, log in enumerate(logs):
        row = rows[log.uuid]
        if row.status == 'COMPLETED':
            assert runs.count(f't{n}') == 1, (n, runs.count(f't{n}'))
        else:
            assert row.status == 'FAILED' and row.exception.startswith('Purged') and f't{n}' not in runs, \
                (n, row.status, row.exception)
    assert 'FAILED' in {row.status for row in rows.values()}, 'the purge came too late to test anything'


@pytest.mark.timeout(30)
def test_a_running_task_is_not_requeued_in_the_admin_or_in_code(admin_client):
    from carrot.exceptions import StillRunning

    running = MessageLog.objects.create(uuid='running', status='IN_PROGRESS', task='tests.testapp.tasks.add',
                                        queue='default', task_args='[1, 2]', content='{}', worker='host:1',
                                        publish_time=timezone.now() - timedelta(minutes=1))
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'requeue', '_selected_action': [running.pk]}, follow=True)
    assert 'it can be requeued once it has finished' in response.content.decode()
    with pytest.raises(StillRunning):
        running.requeue()
    assert list(MessageLog.objects.values_list('uuid', 'status')) == [('running', 'IN_PROGRESS')]
    assert queue_depth('default') == 0


@pytest.mark.timeout(60)
def test_a_retry_whose_row_was_deleted_in_the_admin_is_not_run_as_a_new_task(admin_client, raw_channel, tmp_path):
    runs = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(runs), 5)
    run_consumer(idle_timeout=0.5)  # the first run fails: retry 1 scheduled, its copy in the delay levels
    assert MessageLog.objects.get(pk=log.pk).status == 'SCHEDULED'
    response = admin_client.post('/admin/carrot/messagelog/', {
        'action': 'delete_selected', '_selected_action': [log.pk], 'post': 'yes'}, follow=True)
    assert response.status_code == 200 and not MessageLog.objects.exists()
    run_consumer(max_messages=1, idle_timeout=8)  # the retry's copy: dead-lettered, not a fresh first run
    assert len(lines(runs)) == 1 and not MessageLog.objects.exists()
    assert len(dead_letters(raw_channel)) == 1


@pytest.mark.timeout(60)
def test_a_cancelled_task_whose_row_is_deleted_as_its_copy_arrives_does_not_run(admin_client, tmp_path,
                                                                                monkeypatch):
    """The row goes (cleanup, a delete) just as the copy from the delay levels arrives: the worker must not
    insert a row for it, as it would for a message from another publisher, and run it."""
    target = tmp_path / 'runs'
    log = publish_message(tasks.stamp, str(target), 'cancelled', countdown=1)
    assert admin_client.post(f'/carrot/api/messages/{log.uuid}/cancel/').status_code == 200
    from carrot.consume import claim

    take_on_arrival = claim.take_on_arrival

    def missed_then_deleted(message_id, *args, **kwargs):  # the row is gone by the time it is read
        taken = take_on_arrival(message_id, *args, **kwargs)
        MessageLog.objects.filter(uuid=message_id).delete()
        return taken

    monkeypatch.setattr(claim, 'take_on_arrival', missed_then_deleted)
    run_consumer(max_messages=1, idle_timeout=8)
    assert not target.exists() and not MessageLog.objects.exists()


@pytest.mark.timeout(60)
def test_a_task_whose_row_is_deleted_between_its_read_and_its_claim_does_not_run(raw_channel, tmp_path,
                                                                               monkeypatch):
    """A delivery that takes the slow way (the fast claim missed) reads its row, which is deleted before
    the claim: it is dead-lettered as a copy whose row is gone, and no FAILED row is written for it."""
    from carrot.consume import claim

    target = tmp_path / 'runs'
    publish_message(tasks.stamp, str(target), 'deleted')
    monkeypatch.setattr(claim, 'take_on_arrival', lambda *args, **kwargs: None)
    take = processor.MessageProcessor._take

    def deleted_first(self, row, condition, count_attempt=True):
        MessageLog.objects.filter(pk=row.pk).delete()
        return take(self, row, condition, count_attempt)

    monkeypatch.setattr(processor.MessageProcessor, '_take', deleted_first)
    run_consumer(max_messages=1, idle_timeout=3)
    assert not target.exists() and not MessageLog.objects.exists()
    assert len(dead_letters(raw_channel)) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize('how', ['published_now', 'countdown', 'retried'])
def test_a_dead_letter_moved_back_after_its_row_was_cleaned_up_runs_again(raw_channel, tmp_path, how):
    """README: a dead letter can be moved back from <queue>.dead. It was dead-lettered from the work queue
    since it last left the delay levels, so it is not an orphaned copy, whatever headers it kept."""
    runs = tmp_path / 'runs'
    if how == 'published_now':
        log = publish_message(tasks.wrong_kind, str(runs))
    elif how == 'countdown':
        log = publish_message(tasks.wrong_kind, str(runs), countdown=1)
    else:
        log = publish_message(tasks.flaky, str(runs), 100)  # retried until its retries run out

    def failed_for_good() -> bool:
        run_consumer(idle_timeout=1)
        return MessageLog.objects.get(pk=log.pk).status == 'FAILED'
    wait_for(failed_for_good, 60, 'the task to fail for good')
    ran = len(lines(runs))
    wait_for(lambda: queue_depth('default.dead') == 1, 10, 'the dead letter')
    MessageLog.objects.filter(pk=log.pk).delete()
    moved = dead_letters(raw_channel)
    assert len(moved) == 1
    for properties, body in moved:
        raw_channel.basic_publish('', 'default', body, properties)  # as a shovel or "move messages" does
    run_consumer(max_messages=1, idle_timeout=3)
    assert len(lines(runs)) > ran  # run again (a failing one with its retries again, as a new message)


@pytest.mark.timeout(60)
def test_a_row_deleted_while_its_attempt_fails_is_not_written_again_for_a_retry(tmp_path, monkeypatch):
    from carrot.consume.processor import MessageProcessor

    runs = tmp_path / 'runs'
    publish_message(tasks.flaky, str(runs), 1)  # fails once, then would succeed on its retry
    retry = MessageProcessor._retry

    def deleted_in_the_admin_meanwhile(self, row, message, outcome, delay):
        MessageLog.objects.filter(pk=row.pk).delete()
        return retry(self, row, message, outcome, delay)

    monkeypatch.setattr(MessageProcessor, '_retry', deleted_in_the_admin_meanwhile)
    run_consumer(max_messages=2, idle_timeout=5)
    assert len(lines(runs)) == 1 and not MessageLog.objects.exists()
    assert delay_depth() == 0


@pytest.mark.timeout(60)
def test_a_consumer_with_its_own_get_message_log_does_not_run_a_deleted_retry_again(admin_client, tmp_path):
    """The orphan rule holds for a 1.x subclass that finds rows its own way (here: through super())."""
    from tests.test_claim import OldStyleConsumer

    runs = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(runs), 5)
    run_consumer(idle_timeout=0.5, consumer_class=OldStyleConsumer)  # fails: retry 1 in the delay levels
    assert MessageLog.objects.get(pk=log.pk).status == 'SCHEDULED'
    MessageLog.objects.filter(pk=log.pk).delete()
    run_consumer(max_messages=1, idle_timeout=8, consumer_class=OldStyleConsumer)
    assert len(lines(runs)) == 1 and not MessageLog.objects.exists()


@pytest.mark.timeout(90)
def test_purged_tasks_requeued_while_a_worker_holds_their_copies_run_once(admin_client, tmp_path):
    """The worker had prefetched the five when they were purged and requeued: their held copies find their
    ids requeued as other messages, and only the requeued messages run."""
    target = tmp_path / 'runs'

    def requeue_them(client):
        response = client.post('/carrot/api/failed/requeue/', {'queue': 'default'})
        assert response.status_code == 200 and response.json()['count'] == 5, response.content

    purge_while_a_worker_holds_five(admin_client, target, 4, then=requeue_them)
    run_consumer(idle_timeout=3)  # the requeued messages not run yet
    assert sorted(labels(target)) == sorted(['slow'] + [f'queued{n}' for n in range(5)])


# -- attacks: hostile headers, and a stop at the worst moment -----------------------------------------------

FORGED_HEADERS = {  # label: (the headers of a copy with no row, whether it counts as out of the delay levels)
    'levels-no-x-death': ({'carrot-queue': 'default'}, True),
    'levels-bytes-queue': ({'carrot-queue': 'default', 'x-death': [
        {'queue': b'carrot.delay.03', 'reason': 'expired', 'count': 1}]}, True),
    'levels-count-text': ({'carrot-queue': 'default', 'x-death': [{'queue': 'carrot.delay.00', 'count': 'x'}]},
                          True),
    'levels-x-death-text': ({'carrot-queue': 'default', 'x-death': 'not an array'}, True),
    'rejected-since': ({'carrot-queue': 'default', 'x-death': [
        {'queue': 'carrot.delay.00', 'reason': 'expired', 'count': 1},
        {'queue': 'default', 'reason': 'rejected', 'count': 1}]}, False),
    'x-death-junk': ({'carrot-queue': 'default', 'x-death': ['junk', [1]]}, False),
    'x-death-queue-number': ({'carrot-queue': 'default', 'x-death': [{'queue': 7}]}, False),
}


@pytest.mark.timeout(60)
def test_copies_with_forged_or_broken_delay_headers_run_once_or_are_dead_lettered_never_lost(raw_channel,
                                                                                            tmp_path):
    """Copies of carrot's own wire format with no row, carrying the delay levels' header and x-death arrays
    of every shape: those that read as out of the levels are dead-lettered unrun, the others run as
    messages from another publisher; the consumer survives them all and nothing is lost."""
    import pika

    target = tmp_path / 'runs'
    for label in FORGED_HEADERS:
        publish_message(tasks.stamp, str(target), label)
    taken = [raw_channel.basic_get('default', auto_ack=True)[1:] for _ in FORGED_HEADERS]
    MessageLog.objects.all().delete()
    for properties, body in taken:
        label = json.loads(body)['args'][1]  # stamp(path, label)
        raw_channel.basic_publish('', 'default', body, pika.BasicProperties(
            content_type=properties.content_type, message_id=properties.message_id,
            headers={**(properties.headers or {}), **FORGED_HEADERS[label][0]}))
    run_consumer(max_messages=len(FORGED_HEADERS), idle_timeout=3)
    ran = {label for label, (_, orphaned) in FORGED_HEADERS.items() if not orphaned}
    assert sorted(labels(target)) == sorted(ran)
    assert len(dead_letters(raw_channel)) == len(FORGED_HEADERS) - len(ran)
    assert sorted(MessageLog.objects.values_list('status', flat=True)) == ['COMPLETED'] * len(ran)
    assert queue_depth('default') == 0


@pytest.mark.timeout(120)
def test_a_graceful_stop_while_a_worker_holds_purged_copies_runs_none_of_them_later(admin_client, raw_channel,
                                                                                 start_supervisor, tmp_path):
    """SIGTERM to the supervisor while its child runs a slow task with five purged ones prefetched behind
    it: the slow one finishes once, the five go back to the queue unacked and, at the next start, are
    dead-lettered unrun because their rows say purged."""
    import signal

    target = tmp_path / 'runs'
    sup = start_supervisor('--queues', 'default', name='purge-then-term')
    sup.wait_ready(['consumer default#1'], timeout=60)
    publish_message(tasks.append_and_sleep, str(target), 'slow', 3)
    for n in range(5):
        publish_message(tasks.append_and_sleep, str(target), f'queued{n}', 0)
    wait_for(lambda: lines(target) == ['slow'], 20, 'the slow task to start', tail=sup.tail)
    assert queue_depth('default') == 0  # the five are the child's, prefetched
    assert admin_client.post('/carrot/api/queues/default/purge/').status_code == 200
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(40) == 0, sup.tail()
    wait_for(lambda: queue_depth('default') == 5, 10, 'the five unacked copies back in the queue')
    again = start_supervisor('--queues', 'default', name='after-term')
    again.wait_ready(['consumer default#1'], timeout=60)
    # Settled, not only delivered: an empty queue says no more than that the child holds them (prefetch).
    again.wait_for(lambda: queue_depth('default.dead') == 5, 30, 'the five copies to be dead-lettered')
    again.stop()
    assert queue_depth('default') == 0
    assert lines(target) == ['slow']
    statuses = sorted(MessageLog.objects.values_list('status', flat=True))
    assert statuses == ['COMPLETED'] + ['FAILED'] * 5
    assert len(dead_letters(raw_channel)) == 5
