"""The other "carrot" (djangocarrot), on carrot 2: Task rows run through the same store-and-forward row
and relay, the allowlist applies, Worker rows add queues at start and on HUP, WorkerService runs the
supervisor in the foreground."""
import signal
import sys

import pytest
from django.core.exceptions import ValidationError

from carrot.checks import run_carrot_checks
from carrot.config import get_config
from carrot.models import MessageLog, Task, Worker
from tests.conftest import queue_depth, raw_connection, run_consumer
from tests.harness import Process, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def worker_queues():
    """Worker rows' queues are gone after the test (conftest only empties the CARROT ones)."""
    yield
    channel = raw_connection().channel()
    for name in ('fileprocesser', 'thumbnails', 'disabled'):
        channel.queue_delete(name)
        channel.queue_delete(f'{name}.dead')


def test_a_created_task_is_enqueued_through_its_log_row_and_runs():
    task = Task.objects.create(kallable='tests.testapp.tasks.add', args=[2, 3])
    log = task.log
    assert (log.uuid, log.queue, log.status) == (task.message_id, 'default', 'PUBLISHED')
    assert task.status == 'PUBLISHED' and task.worker == 'default'
    run_consumer(max_messages=1)
    task.refresh_from_db()
    assert (task.status, task.log.output) == ('COMPLETED', '5')
    assert task.created_on <= task.started_on <= task.completed_on


def test_a_refused_kallable_is_failed_with_the_reason():
    task = Task.objects.create(kallable='os.system', args=['touch /tmp/carrot-pwned'])
    assert task.status == 'FAILED'
    assert 'os.system is not registered' in task.message
    assert queue_depth('default') == 0


def test_inside_a_transaction_it_is_sent_on_commit_and_a_rollback_leaves_nothing():
    from django.db import transaction
    with transaction.atomic():
        task = Task.objects.create(kallable='tests.testapp.tasks.add', args=[1, 1])
        assert task.status == 'WAITING' and queue_depth('default') == 0
    assert task.status == 'PUBLISHED' and queue_depth('default') == 1
    with transaction.atomic():
        Task.objects.create(kallable='tests.testapp.tasks.add', args=[1, 1])
        transaction.set_rollback(True)
    assert Task.objects.count() == 1 and MessageLog.objects.count() == 1


def test_a_worker_row_is_a_queue_and_a_task_names_it(worker_queues):
    worker = Worker(name='fileprocesser', concurrency=1, description='large files one at a time')
    worker.save()
    assert get_config().queue('fileprocesser').concurrency == 1
    assert [q.name for q in get_config().all_queues] == ['default', 'other', 'fileprocesser']
    task = Task.objects.create(kallable='tests.testapp.tasks.echo', args=['/tmp/huge1.wav'],
                               kwargs={'bitrate': 1411}, worker=worker)
    assert task.worker == 'fileprocesser' and task.log.queue == 'fileprocesser'
    assert queue_depth('fileprocesser') == 1
    run_consumer('fileprocesser', max_messages=1)
    assert Task.objects.get().status == 'COMPLETED'


def test_a_worker_named_like_a_carrot_queue_is_a_check_error():
    with pytest.raises(ValidationError):
        Worker(name='other').full_clean()
    Worker.objects.create(name='other')
    assert [e.id for e in run_carrot_checks()] == ['carrot.E010']


@pytest.mark.timeout(180)
def test_the_supervisor_adds_worker_rows_at_start_and_on_hup(start_supervisor, worker_queues):
    Worker.objects.create(name='fileprocesser', concurrency=2)
    Worker.objects.create(name='disabled', enabled=False)
    supervisor = start_supervisor()
    supervisor.wait_ready(['consumer default#1', 'consumer other#1', 'consumer fileprocesser#1',
                           'consumer fileprocesser#2'], timeout=60)
    Worker.objects.create(name='thumbnails', concurrency=1)
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_slots(['consumer default#1', 'consumer other#1', 'consumer fileprocesser#1',
                           'consumer fileprocesser#2', 'consumer thumbnails#1'], timeout=90)
    task = Task.objects.create(kallable='tests.testapp.tasks.add', args=[20, 22], worker='thumbnails')
    wait_for(lambda: task.status == 'COMPLETED', 60, 'the task on the new worker')
    assert task.log.output == '42'


@pytest.mark.timeout(120)
def test_worker_service_runs_the_supervisor_in_the_foreground(subprocess_env, tmp_path):
    script = ('import django; django.setup()\n'
              'from carrot.utils import WorkerService\n'
              f'raise SystemExit(WorkerService(logfile={str(tmp_path / "w.log")!r}, no_scheduler=True).start())\n')
    service = Process([sys.executable, '-c', script], subprocess_env, tmp_path, 'service')
    try:
        wait_for(lambda: (tmp_path / 'w.log').exists() and ' ready: ' in (tmp_path / 'w.log').read_text(), 60,
                 'the supervisor to be ready', tail=lambda: service.output_text())
        Task.objects.create(kallable='tests.testapp.tasks.add', args=[1, 2])
        wait_for(lambda: Task.objects.get().status == 'COMPLETED', 60, 'the task')
        service.popen.send_signal(signal.SIGINT)  # Ctrl-C: passed on once, a graceful stop
        assert service.popen.wait(60) == 0, service.output_text()
        assert 'fast stop' not in (tmp_path / 'w.log').read_text()
    finally:
        service.stop()


def test_cleanup_deletes_task_rows_whose_log_it_deleted():
    from datetime import timedelta

    from django.utils import timezone

    from carrot.helper_tasks import cleanup
    old = timezone.now() - timedelta(days=40)
    done = Task.objects.create(kallable='tests.testapp.tasks.add', args=[1, 2])
    recent = Task.objects.create(kallable='tests.testapp.tasks.add', args=[3, 4])
    Task.objects.filter(pk=done.pk).update(created_on=old)
    MessageLog.objects.filter(uuid=done.message_id).update(status='COMPLETED', completion_time=old)
    assert cleanup() == 2  # the completed log, then its Task
    assert list(Task.objects.all()) == [recent] and recent.log is not None
