"""carrot.backends.CarrotBackend: Django's tasks API end to end, with a real carrot-supervisor -- on Django
6's django.tasks, and on Django 5.2 with the django-tasks backport (scripts/test runs this file on both).

enqueue and get_result at each stage, priorities, run_after, async and context tasks, the signals and the
process each is sent in, errors, commit and rollback, a task that fails twice then succeeds, and every
TaskResult field read back from carrot's rows."""
import json
import os
import time
from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from carrot.backends import compat
from carrot.backends.backend import CarrotBackend
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import delay_depth, queue_depth
from tests.harness import wait_for
from tests.testapp import background

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]
READY, RUNNING = compat.TaskResultStatus.READY, compat.TaskResultStatus.RUNNING
SUCCESSFUL, FAILED = compat.TaskResultStatus.SUCCESSFUL, compat.TaskResultStatus.FAILED


@pytest.fixture
def signals_file(tmp_path, monkeypatch):
    path = tmp_path / 'signals.jsonl'
    monkeypatch.setenv('CARROT_TEST_SIGNALS', str(path))
    return path


@pytest.fixture
def supervisor(start_supervisor, subprocess_env, signals_file):
    env = dict(subprocess_env, CARROT_TEST_SIGNALS=str(signals_file))
    started = start_supervisor(env=env)
    started.wait_ready(['consumer default#1', 'consumer other#1'], timeout=60)
    return started


def signals(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def settled(result, timeout=60):
    """The result once it is finished (refreshed until then)."""
    def done():
        result.refresh()
        return result.is_finished
    wait_for(done, timeout, f'task {result.id} to finish')
    return result


# -- no broker, no worker -----------------------------------------------------------------------------------

@pytest.mark.no_broker
def test_building_the_backend_touches_no_database_and_no_broker(django_assert_num_queries):
    with override_settings(CARROT={'default_broker': 'amqp://guest:guest@127.0.0.1:1/nowhere'}):
        with django_assert_num_queries(0):
            backend = CarrotBackend('elsewhere', {'QUEUES': ['default'], 'BACKEND': 'carrot.backends.CarrotBackend'})
    assert (backend.supports_defer, backend.supports_async_task, backend.supports_get_result,
            backend.supports_priority) == (True, True, True, True)


@pytest.mark.no_broker
def test_check_names_queues_that_carrot_does_not_have():
    backend = CarrotBackend('default', {'QUEUES': ['default', 'reports', 'other']})
    errors = backend.check()
    assert [e.id for e in errors] == ['carrot.E011'] and "'reports'" in errors[0].msg
    assert CarrotBackend('default', {'QUEUES': ['default']}).check() == []


@pytest.mark.no_broker
def test_the_priorities_keep_their_order_on_the_queue():
    from carrot.consume.djangotask import carrot_priority, django_priority
    mapped = [carrot_priority(p, 255) for p in range(-100, 101)]
    assert mapped[0] == 0 and mapped[-1] == 255 and mapped == sorted(set(mapped))
    assert all(django_priority(carrot_priority(p, 255), 255) == p for p in range(-100, 101))
    assert [carrot_priority(p, 10) for p in (-100, 0, 100)] == [0, 5, 10]


def test_the_allowlist_takes_a_task_object_and_so_does_publish_message():
    from carrot import registry
    assert registry.get_task('tests.testapp.background.add') is background.add
    assert registry.task_path(background.add) == 'tests.testapp.background.add'
    log = publish_message(background.add, 1, 2)
    assert log.task == 'tests.testapp.background.add'
    with pytest.raises(Exception, match='not registered'):
        registry.get_task('tests.testapp.background._private_helper')
    with pytest.raises(compat.InvalidTask):
        background.add.using(queue_name='reports').enqueue(1, 2)  # not in QUEUES
    with pytest.raises(compat.InvalidTask, match='do not fit'):
        background.add.enqueue(1, 2, 3)


def test_an_unknown_id_does_not_exist():
    with pytest.raises(compat.TaskResultDoesNotExist):
        background.add.get_result('no-such-id')
    with pytest.raises(compat.TaskResultDoesNotExist):
        compat.task_backends['default'].get_result('')


# -- end to end, with a supervisor -----------------------------------------------------------------------------

def test_enqueue_then_get_result_at_each_stage(supervisor, signals_file):
    enqueued = background.slow.enqueue(2)
    # As the row stands when enqueue returns: READY, or RUNNING when an idle worker took it first.
    assert enqueued.status in (READY, RUNNING) and enqueued.enqueued_at is not None
    assert (enqueued.args, enqueued.kwargs, enqueued.errors) == ([2], {}, [])
    assert enqueued.attempts == (0 if enqueued.status == READY else 1)
    result = background.slow.get_result(enqueued.id)
    wait_for(lambda: result.refresh() or result.status == RUNNING, 30, 'the task to start')
    assert result.started_at and result.last_attempted_at == result.started_at and not result.finished_at
    assert len(result.worker_ids) == 1 and result.worker_ids == [MessageLog.objects.get(uuid=result.id).worker]
    with pytest.raises(ValueError):
        result.return_value  # not finished yet
    settled(result)
    assert (result.status, result.return_value, result.attempts, result.errors) == (SUCCESSFUL, 2, 1, [])
    assert result.enqueued_at <= result.started_at < result.finished_at
    assert result.finished_at - result.started_at >= timedelta(seconds=2)
    assert result.backend == 'default' and result.task.func is background.slow.func


def test_run_after_is_honoured_and_the_result_is_ready_until_then(supervisor):
    when = timezone.now() + timedelta(seconds=3)
    result = background.add.using(run_after=when).enqueue(20, 22)
    assert result.status == READY and result.task.run_after == when
    assert MessageLog.objects.get(uuid=result.id).status == 'SCHEDULED'
    time.sleep(1.5)
    result.refresh()
    assert result.status == READY and result.started_at is None
    settled(result)
    assert result.return_value == 42 and result.started_at >= when
    assert result.started_at - when < timedelta(seconds=1.5)


def test_priorities_order_the_queue(start_supervisor, subprocess_env, tmp_path):
    path = tmp_path / 'order'
    for label, priority in (('low', -100), ('middle', 0), ('high', 100), ('urgent-default', None)):
        task = background.urgent if priority is None else background.urgent.using(priority=priority)
        task.enqueue(label, str(path))
    assert queue_depth('other') == 4
    supervisor = start_supervisor()
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'], timeout=60)
    wait_for(lambda: path.exists() and len(path.read_text().split()) == 4, 60, 'the four tasks')
    assert path.read_text().split() == ['high', 'urgent-default', 'middle', 'low']
    result = background.urgent.get_result(MessageLog.objects.get(task_args__contains='"high"').uuid)
    assert (result.task.priority, result.task.queue_name) == (100, 'other')


def test_async_and_context_tasks(supervisor):
    adding = background.async_add.enqueue(2, 3)
    context = background.with_context.enqueue(note='hi')
    assert settled(adding).return_value == 5
    value = settled(context).return_value
    assert (value['attempt'], value['id'], value['status'], value['note']) == (1, context.id, 'RUNNING', 'hi')
    assert value['worker_ids'] == context.worker_ids and value['started_at'] == context.started_at.isoformat()


def test_signals_are_sent_at_the_right_moments_in_the_right_process(supervisor, signals_file):
    result = background.add.enqueue(1, 1)
    settled(result)
    wait_for(lambda: len(signals(signals_file)) == 3, 10, 'three signals')
    enqueued, started, finished = signals(signals_file)
    assert (enqueued['signal'], enqueued['pid'], enqueued['status']) == ('task_enqueued', os.getpid(), 'READY')
    assert (started['signal'], started['status'], started['attempts']) == ('task_started', 'RUNNING', 1)
    assert (finished['signal'], finished['status']) == ('task_finished', 'SUCCESSFUL')
    worker_pid = int(result.worker_ids[0].rpartition(':')[2])
    assert started['pid'] == finished['pid'] == worker_pid != os.getpid()
    assert {s['id'] for s in (enqueued, started, finished)} == {result.id}
    assert {s['sender'] for s in (enqueued, started, finished)} == {'CarrotBackend'}


def test_errors_are_failed_with_their_class_path_and_traceback(supervisor, raw_channel):
    failing = background.fails.enqueue('boom')
    odd = background.not_json.enqueue()
    settled(failing)
    assert failing.status == FAILED and failing.finished_at and failing.attempts == 1
    error, = failing.errors
    assert error.exception_class_path == 'builtins.ValueError' and error.exception_class is ValueError
    assert 'ValueError: boom' in error.traceback and 'Traceback' in error.traceback
    with pytest.raises(ValueError):
        failing.return_value
    nan = background.not_strict_json.enqueue()
    settled(odd)
    assert odd.status == FAILED and odd.errors[0].exception_class_path == 'builtins.TypeError'
    assert 'Unsupported type' in odd.errors[0].traceback
    settled(nan)  # NaN is not JSON (a JSONField on PostgreSQL refuses it too)
    assert nan.status == FAILED and nan.errors[0].exception_class_path == 'builtins.ValueError'
    wait_for(lambda: queue_depth('default.dead') == 3, 10, 'all three dead-lettered')


def test_a_task_that_fails_twice_then_succeeds(supervisor, signals_file):
    result = background.flaky.enqueue(2)
    settled(result, timeout=60)
    assert (result.status, result.return_value, result.attempts) == (SUCCESSFUL, 3, 3)
    assert [e.exception_class_path for e in result.errors] == ['builtins.OSError', 'builtins.OSError']
    assert 'attempt 2 fails' in result.errors[1].traceback
    assert result.started_at < result.last_attempted_at < result.finished_at
    assert result.last_attempted_at - result.started_at >= timedelta(seconds=3)  # 1 s, then 2 s (+ jitter)
    row = MessageLog.objects.get(uuid=result.id)
    assert (row.retries, row.attempts) == (2, 3)
    names = [s['signal'] for s in signals(signals_file)]
    assert names == ['task_enqueued', 'task_started', 'task_started', 'task_started', 'task_finished']
    assert (queue_depth('default'), delay_depth(), queue_depth('default.dead')) == (0, 0, 0)


def test_enqueue_waits_for_the_commit_and_a_rollback_sends_nothing(signals_file):
    with transaction.atomic():
        kept = background.add.enqueue(1, 2)
        assert queue_depth('default') == 0 and not signals(signals_file)
    assert queue_depth('default') == 1
    assert [s['signal'] for s in signals(signals_file)] == ['task_enqueued']
    assert background.add.get_result(kept.id).status == READY
    with transaction.atomic():
        dropped = background.add.enqueue(3, 4)
        transaction.set_rollback(True)
    assert queue_depth('default') == 1 and len(signals(signals_file)) == 1
    with pytest.raises(compat.TaskResultDoesNotExist):
        background.add.get_result(dropped.id)


def test_aenqueue_and_aget_result():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def both():
        from asgiref.sync import sync_to_async
        from django.db import connections
        try:
            result = await background.add.aenqueue(5, 6)
            return result, await background.add.aget_result(result.id)
        finally:  # the database connection of asgiref's thread: closed, or it outlives the test database
            await sync_to_async(connections.close_all)()

    # A thread of its own: an event loop another test left in this one (Playwright's) must not matter.
    with ThreadPoolExecutor(1) as pool:
        result, again = pool.submit(asyncio.run, both()).result(timeout=60)
    assert again.id == result.id and again.status == READY and again.args == [5, 6]


def test_a_requeued_task_stays_reachable_by_its_id(supervisor):
    result = settled(background.fails.enqueue('once'))
    assert result.status == FAILED
    MessageLog.objects.get(uuid=result.id).requeue()
    again = background.fails.get_result(result.id)
    assert again.id == result.id and again.status in (READY, RUNNING, FAILED)
    settled(again)
    assert again.status == FAILED and again.attempts == 1  # a fresh start
