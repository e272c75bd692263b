"""The scheduler: publishing due ScheduledTasks, in this process and as carrot-supervisor's child.

In-process tests drive Scheduler.publish_due() against real rows and the real broker (the clock is
moved by moving a schedule's last_run_time back, or by sleeping for short intervals). Process-level
tests start carrot-supervisor, change ScheduledTask rows while it runs, and read the MessageLog rows
its scheduler child writes. Measured delays are printed as FIGURE lines (run with -s to see them).
"""
import logging
import re
import threading
import time
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.conf import settings
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from carrot.helper_tasks import CLEANUP_TASK_NAME
from carrot.schedule.builtin import sync_cleanup_schedule
from carrot.models import MessageLog, ScheduledTask
from carrot.schedule.scheduler import Scheduler
from carrot.utilities import create_scheduled_task
from tests.conftest import queue_depth
from tests.harness import SupervisorCommand as Supervisor, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ADD = 'tests.testapp.tasks.add'
DEAD_BROKER = 'amqp://guest:guest@127.0.0.1:1/'  # nothing listens on port 1: connections are refused


def schedule(name, seconds=60, queue='other', task_args=(1, 2), **fields):
    """A schedule of add(1, 2) named `name`, on queue `other` (the cleanup schedule uses `default`)."""
    task = create_scheduled_task(ADD, {'seconds': seconds}, task_name=name, queue=queue,
                                 task_args=list(task_args))
    if fields:
        ScheduledTask.objects.filter(pk=task.pk).update(**fields)
        task.refresh_from_db()
    return task


@pytest.fixture(autouse=True)
def cleanup_schedule_paused(db):
    """The cleanup schedule (made by post_migrate) is paused so counts are ours alone; a scheduler that
    starts (Scheduler.run, the supervisor) syncs it with the settings and so turns it on again."""
    ScheduledTask.objects.filter(task_name=CLEANUP_TASK_NAME).update(active=False)


def published(queue='other'):
    """Rows of messages RabbitMQ confirmed for `queue` (a failed publish leaves a FAILED row)."""
    return MessageLog.objects.filter(queue=queue, status=MessageLog.PUBLISHED)


def move_back(task, seconds):
    """Pretend `seconds` have passed since the schedule last ran."""
    earlier = task.last_run_time - timedelta(seconds=seconds)
    ScheduledTask.objects.filter(pk=task.pk).update(last_run_time=earlier)
    task.refresh_from_db()
    return task


def with_unreachable_queue():
    """CARROT plus a queue `unreachable` on a broker nobody listens to (not consumed by anyone)."""
    carrot = dict(settings.CARROT)
    carrot['queues'] = list(carrot['queues']) + [
        {'name': 'unreachable', 'host': DEAD_BROKER, 'consumable': False}]
    return override_settings(CARROT=carrot)


def run_in_thread(target, *args):
    """Run `target` in a thread with its own database connection; returns (thread, result list)."""
    result = []

    def body():
        try:
            result.append(target(*args))
        except BaseException as exc:  # reported to the test by the caller
            result.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


# --- in process ---------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_new_schedule_is_published_at_once_then_once_per_interval():
    task = schedule('every minute', seconds=60)
    assert task.last_run_time is None and task.is_due(timezone.now())

    before = timezone.now()
    assert Scheduler().publish_due() == 1
    after = timezone.now()
    task.refresh_from_db()
    assert before <= task.last_run_time <= after
    assert published().count() == 1
    log = published().get()
    assert log.positionals == [1, 2] and log.task == ADD
    assert wait_for(lambda: queue_depth('other') == 1, 5, what='the message in RabbitMQ')

    # Not again before the interval has passed ...
    assert Scheduler().publish_due() == 0
    move_back(task, 55)
    assert Scheduler().publish_due() == 0
    assert published().count() == 1
    # ... and again once it has.
    move_back(task, 5)
    assert Scheduler().publish_due() == 1
    assert published().count() == 2
    assert queue_depth('other') == 2


@pytest.mark.timeout(60)
def test_one_second_schedule_runs_again_after_a_second_of_real_time():
    schedule('every second', seconds=1)
    scheduler = Scheduler()
    scheduler.publish_due()
    assert published().count() == 1
    scheduler.publish_due()
    assert published().count() == 1
    time.sleep(1.05)
    scheduler.publish_due()
    assert published().count() == 2


@pytest.mark.timeout(60)
def test_inactive_and_deleted_schedules_are_not_published():
    paused = schedule('paused', seconds=1, active=False)
    doomed = schedule('doomed', seconds=1)
    doomed.delete()
    assert Scheduler().publish_due() == 0
    assert published().count() == 0
    assert queue_depth('other') == 0
    paused.refresh_from_db()
    assert paused.last_run_time is None

    # An inactive schedule that was due long ago is not published either, and is on reactivation.
    ScheduledTask.objects.filter(pk=paused.pk).update(last_run_time=timezone.now() - timedelta(days=1))
    assert Scheduler().publish_due() == 0
    ScheduledTask.objects.filter(pk=paused.pk).update(active=True)
    assert Scheduler().publish_due() == 1
    assert published().count() == 1


@pytest.mark.timeout(60)
def test_after_downtime_one_run_then_the_normal_interval():
    task = schedule('hourly', seconds=3600)
    ScheduledTask.objects.filter(pk=task.pk).update(last_run_time=timezone.now() - timedelta(days=2))

    before = timezone.now()
    scheduler = Scheduler()
    assert scheduler.publish_due() == 1     # 48 missed runs: one is published, not 48
    assert scheduler.publish_due() == 0
    assert published().count() == 1
    task.refresh_from_db()
    # The next run is an interval after this run, not after the last one before the downtime.
    assert task.last_run_time >= before
    assert task.next_run_time() == task.last_run_time + timedelta(hours=1)
    move_back(task, 3590)
    assert scheduler.publish_due() == 0
    move_back(task, 10)
    assert scheduler.publish_due() == 1
    assert published().count() == 2


@pytest.mark.timeout(60)
def test_a_run_published_late_does_not_push_the_next_runs_later():
    task = schedule('every minute', seconds=60)
    on_grid = timezone.now() - timedelta(seconds=60.7)  # the last run was 60.7 s ago: due 0.7 s ago
    ScheduledTask.objects.filter(pk=task.pk).update(last_run_time=on_grid)
    assert Scheduler().publish_due() == 1
    task.refresh_from_db()
    assert task.last_run_time == on_grid + timedelta(seconds=60)  # the slot it stands for, not "now"


@pytest.mark.timeout(60)
def test_claim_is_a_compare_and_set_on_last_run_time():
    task = schedule('contended', seconds=60)
    mine, theirs = ScheduledTask.objects.get(pk=task.pk), ScheduledTask.objects.get(pk=task.pk)
    now = timezone.now()
    assert Scheduler.claim(mine, now) is True
    assert Scheduler.claim(theirs, now + timedelta(microseconds=1)) is False  # read the old value: loses
    task.refresh_from_db()
    assert task.last_run_time == now

    # A claim on a schedule deactivated since it was read loses too.
    ScheduledTask.objects.filter(pk=task.pk).update(active=False)
    assert Scheduler.claim(task, timezone.now()) is False


class LockstepScheduler(Scheduler):
    """Two of these claim each schedule at the same moment: both have read it before either claims."""

    def __init__(self, barrier):
        super().__init__()
        self.barrier = barrier

    def claim(self, schedule, now):
        self.barrier.wait()
        return super().claim(schedule, now)


@pytest.mark.timeout(90)
def test_two_schedulers_racing_publish_each_due_run_once():
    names = [f'race {i:02d}' for i in range(15)]
    for name in names:
        schedule(name, seconds=60)

    barrier = threading.Barrier(2, timeout=30)
    threads = [run_in_thread(LockstepScheduler(barrier).publish_due) for _ in range(2)]
    for thread, _ in threads:
        thread.join(60)
        assert not thread.is_alive()
    results = [result[0] for _, result in threads]
    for result in results:
        assert not isinstance(result, BaseException), result
    print(f'FIGURE race_published_by_each_scheduler={results}')
    assert sum(results) == len(names)
    assert published().count() == len(names)
    assert wait_for(lambda: queue_depth('other') == len(names), 5, what=f'{len(names)} messages')
    assert ScheduledTask.objects.filter(task_name__in=names, last_run_time__isnull=True).count() == 0


@pytest.mark.timeout(60)
def test_publish_failure_gives_the_run_back_and_other_schedules_go_on(caplog):
    caplog.set_level(logging.INFO, logger='carrot')
    with with_unreachable_queue():
        dead = ScheduledTask.objects.create(task=ADD, task_name='a unreachable', queue='unreachable',
                                            interval_type='seconds', interval_count=60, task_args='[1, 2]')
        alive = schedule('b reachable', seconds=60)

        scheduler = Scheduler()
        scheduler.publish_due()
        dead.refresh_from_db(), alive.refresh_from_db()
        assert dead.last_run_time is None        # given back: tried again on a later tick
        assert alive.last_run_time is not None   # not held up by the failure before it
        assert published('other').count() == 1
        failed = MessageLog.objects.get(queue='unreachable')
        assert failed.status == MessageLog.FAILED and 'could not be published' in failed.exception
        assert any(r.levelno == logging.ERROR and 'a unreachable' in r.getMessage() for r in caplog.records)

        # The loop keeps running: it retries the failing schedule and keeps publishing the other one.
        ScheduledTask.objects.filter(pk=alive.pk).update(interval_count=1)
        stopping = threading.Event()
        loop = Scheduler(stopping=stopping)
        thread, result = run_in_thread(loop.run)
        started = time.monotonic()
        try:
            wait_for(lambda: loop.published >= 3
                     and MessageLog.objects.filter(queue='unreachable').count() >= 3, 20,
                     what='three runs of the reachable schedule and two more tries of the other')
        finally:
            stopping.set()
            thread.join(10)
        attempts = MessageLog.objects.filter(queue='unreachable').count()
        print(f'FIGURE scheduler_loop_unreachable_attempts={attempts} reachable_runs={loop.published} '
              f'in {time.monotonic() - started:.1f}s')
        assert not thread.is_alive() and result == [None]
        dead.refresh_from_db()
        assert dead.last_run_time is None
        assert MessageLog.objects.filter(queue='unreachable').exclude(status=MessageLog.FAILED).count() == 0


@pytest.mark.timeout(60)
def test_broken_schedule_does_not_block_the_others(caplog):
    caplog.set_level(logging.INFO, logger='carrot')
    ScheduledTask.objects.create(task='os.system', task_name='a not a task', queue='other',
                                 interval_type='seconds', interval_count=60, task_args='["true"]')
    ScheduledTask.objects.create(task=ADD, task_name='b no such queue', queue='nowhere',
                                 interval_type='seconds', interval_count=60, task_args='[1, 2]')
    schedule('c fine', seconds=60)
    Scheduler().publish_due()
    assert published('other').count() == 1
    assert published('other').get().task == ADD
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any('a not a task' in m and 'not registered' in m for m in messages), messages
    assert any('b no such queue' in m and 'nowhere' in m for m in messages), messages


@pytest.mark.timeout(60)
def test_cleanup_schedule_is_synced_when_the_scheduler_starts():
    ScheduledTask.objects.filter(task_name=CLEANUP_TASK_NAME).delete()
    stopping = threading.Event()
    scheduler = Scheduler(stopping=stopping)
    scheduler.on_tick = stopping.set  # one tick
    thread, result = run_in_thread(scheduler.run)
    thread.join(30)
    assert result == [None]
    cleanup = ScheduledTask.objects.get(task_name=CLEANUP_TASK_NAME)
    assert cleanup.active and cleanup.task == 'carrot.helper_tasks.cleanup'
    assert cleanup.interval == timedelta(hours=1)
    assert cleanup.last_run_time is not None  # ... and published on that first tick
    assert MessageLog.objects.filter(task='carrot.helper_tasks.cleanup',
                                     status=MessageLog.PUBLISHED).count() == 1

    # Turned off in the settings: the schedule is deactivated at the next start (and back on again).
    with override_settings(CARROT={**settings.CARROT, 'cleanup_after_days': None,
                                   'cleanup_failed_after_days': None}):
        sync_cleanup_schedule()
        assert not ScheduledTask.objects.get(task_name=CLEANUP_TASK_NAME).active
    sync_cleanup_schedule()
    assert ScheduledTask.objects.get(task_name=CLEANUP_TASK_NAME).active
    assert ScheduledTask.objects.filter(task_name=CLEANUP_TASK_NAME).count() == 1


# --- in carrot-supervisor's scheduler child ----------------------------------------------------------

EDIT_BOUND = 2.0  # the spec: a change to a ScheduledTask takes effect within 2 s
OBSERVE = 3.5     # how long a test watches for publications that should have stopped


def runs_of(args):
    """Publications of add(*args) (each test schedule has arguments of its own), oldest first."""
    import json
    return list(MessageLog.objects.filter(task=ADD, task_args=json.dumps(list(args)))
                .exclude(status=MessageLog.FAILED).order_by('publish_time'))


def first_run_after(args, moment, timeout, supervisor):
    return wait_for(lambda: [r for r in runs_of(args) if r.publish_time > moment][:1], timeout,
                    what=f'a run of add{tuple(args)} after {moment:%H:%M:%S.%f}',
                    tail=supervisor.diagnostics)[0]


def ms(delta):
    return round(delta.total_seconds() * 1000)


@pytest.fixture
def start_supervisor(subprocess_env, tmp_path, request):
    """start_supervisor(*args, name=..., env=...) -> a running Supervisor, killed (whole tree) at the end."""
    def start(*args, name='supervisor', env=None):
        supervisor = Supervisor(env or subprocess_env, tmp_path, *args, name=name)
        request.addfinalizer(supervisor.stop)
        return supervisor
    return start


@pytest.mark.timeout(120)
def test_schedule_changes_take_effect_within_two_seconds(start_supervisor):
    supervisor = start_supervisor('--queues', 'default')
    supervisor.wait_ready()
    scheduler_pid = supervisor.scheduler().pid
    args = [7, 0]

    # Created: published at once.
    created = timezone.now()
    task = create_scheduled_task(ADD, {'seconds': 60}, task_name='live', queue='other', task_args=args)
    first = first_run_after(args, created, 10, supervisor)
    print(f'FIGURE schedule_create_to_publish_ms={ms(first.publish_time - created)}')
    assert first.publish_time - created <= timedelta(seconds=EDIT_BOUND)

    # Interval shortened (60 s -> 1 s), a little over a second after that run: runs again at once.
    time.sleep(max(0.0, (first.publish_time + timedelta(seconds=1.2) - timezone.now()).total_seconds()))
    edited = timezone.now()
    ScheduledTask.objects.filter(pk=task.pk).update(interval_count=1)
    second = first_run_after(args, edited, 10, supervisor)
    print(f'FIGURE schedule_edit_to_publish_ms={ms(second.publish_time - edited)}')
    assert second.publish_time - edited <= timedelta(seconds=EDIT_BOUND)
    third = first_run_after(args, second.publish_time, 5, supervisor)  # and every second from then on
    assert timedelta(seconds=0.75) <= third.publish_time - second.publish_time <= timedelta(seconds=3)

    # Interval lengthened (1 s -> 60 s): the runs stop.
    changes = {}
    for change, update in [('lengthen', dict(interval_count=60)), ('deactivate', dict(active=False))]:
        if change == 'deactivate':  # running every second again first, so there is something to stop
            ScheduledTask.objects.filter(pk=task.pk).update(interval_count=1, last_run_time=None)
            first_run_after(args, timezone.now(), 5, supervisor)
            first_run_after(args, timezone.now(), 5, supervisor)
        changed = timezone.now()
        ScheduledTask.objects.filter(pk=task.pk).update(**update)
        time.sleep(OBSERVE)
        after = [r.publish_time - changed for r in runs_of(args) if r.publish_time > changed]
        changes[change] = after
        print(f'FIGURE schedule_{change}_last_publish_after_change_ms={ms(max(after)) if after else 0}')
        assert all(delay <= timedelta(seconds=EDIT_BOUND) for delay in after), (change, after)

    # Reactivated: runs again (it is overdue) within the bound.
    reactivated = timezone.now()
    ScheduledTask.objects.filter(pk=task.pk).update(active=True, interval_count=1)
    resumed = first_run_after(args, reactivated, 10, supervisor)
    print(f'FIGURE schedule_reactivate_to_publish_ms={ms(resumed.publish_time - reactivated)}')
    assert resumed.publish_time - reactivated <= timedelta(seconds=EDIT_BOUND)

    # Deleted: the runs stop.
    first_run_after(args, resumed.publish_time, 5, supervisor)
    deleted = timezone.now()
    ScheduledTask.objects.filter(pk=task.pk).delete()
    time.sleep(OBSERVE)
    after = [r.publish_time - deleted for r in runs_of(args) if r.publish_time > deleted]
    print(f'FIGURE schedule_delete_last_publish_after_change_ms={ms(max(after)) if after else 0}')
    assert all(delay <= timedelta(seconds=EDIT_BOUND) for delay in after), after

    assert supervisor.scheduler().pid == scheduler_pid  # all of it without a restart
    assert supervisor.log_text().count('spawned scheduler') == 1
    assert ' ERROR ' not in supervisor.log_text(), supervisor.diagnostics()


def published_runs(log: str, name: str) -> list[tuple[str, str, str]]:
    """(uuid, slot, claim's base) of each run of schedule `name` a scheduler's log says it published."""
    line = re.compile(rf'scheduler: published {re.escape(repr(name))} \({re.escape(ADD)}\) as (\S+), '
                      r'the run of (\S+) \(claimed after ([^)]+)\)')
    return line.findall(log)


@pytest.mark.timeout(120)
def test_two_supervisors_publish_each_run_once(start_supervisor):
    # Both have a scheduler; they consume different queues, as two hosts of one deployment might.
    first = start_supervisor('--queues', 'default', name='first')
    second = start_supervisor('--queues', 'other', name='second')
    first.wait_ready(), second.wait_ready()
    schedulers = first.scheduler(), second.scheduler()

    # Both schedulers started at the same moment and found the cleanup schedule due (never run).
    wait_for(lambda: MessageLog.objects.filter(task='carrot.helper_tasks.cleanup').exists(), 10,
             what='the cleanup run', tail=first.diagnostics)
    # Ten one-second schedules: a tick that publishes ten takes a while, which drifts the two schedulers'
    # ticks across each other, so they do contend for the same runs.
    names = [f'shared {i}' for i in range(10)]
    created = timezone.now()
    for i, name in enumerate(names):
        create_scheduled_task(ADD, {'seconds': 1}, task_name=name, queue='other', task_args=[8, i])
    time.sleep(6.0)
    # Stop the runs and let a tick in progress finish, so the rows and the log lines describe the same
    # runs (a row is written just before its log line).
    ScheduledTask.objects.filter(task_name__in=names).update(active=False)
    elapsed = (timezone.now() - created).total_seconds()
    time.sleep(1.5)
    logs = first.log_text(), second.log_text()
    by, counts = [0, 0], []
    for i, name in enumerate(names):
        runs = runs_of([8, i])
        uuids = {str(r.uuid) for r in runs}
        claims = [claim for log in logs for claim in published_runs(log, name)]
        for n, log in enumerate(logs):
            by[n] += sum(uuid in uuids for uuid, _, _ in published_runs(log, name))
        counts.append(len(runs))
        assert len(runs) <= elapsed / 1 + 1, (name, [r.publish_time for r in runs])
        assert len(runs) >= elapsed / 2, (name, [r.publish_time for r in runs])  # it did run, about every second
        # Never twice for one run, judged on the claims the schedulers logged rather than on the gaps
        # between publish times (a run a whole interval late and the next one on time come milliseconds
        # apart on a busy machine): each slot is published once, each claim starts from a different base,
        # and every base but the first is a slot some scheduler published -- one chain of claims.
        slots = [slot for _, slot, _ in claims]
        bases = [base for _, _, base in claims]
        assert sorted({uuid for uuid, _, _ in claims}) == sorted(uuids), (name, claims)
        assert len(set(slots)) == len(slots) and len(set(bases)) == len(bases), (name, claims)
        assert set(bases) <= set(slots) | {'no run before'} and bases.count('no run before') == 1, (name, claims)
    print(f'FIGURE two_schedulers_runs_per_schedule={counts} in {elapsed:.1f}s, published_by={by}')
    assert sum(by) == sum(counts)  # each run is in exactly one scheduler's log
    assert MessageLog.objects.filter(task='carrot.helper_tasks.cleanup').count() == 1
    assert all(s.is_running() for s in schedulers)
    assert [first.scheduler().pid, second.scheduler().pid] == [s.pid for s in schedulers]


@pytest.mark.timeout(120)
def test_scheduler_survives_an_unreachable_broker(start_supervisor, subprocess_env, tmp_path):
    extra = tmp_path / 'extra.py'
    extra.write_text(f"CARROT['queues'] = CARROT['queues'] + [\n"
                     f"    {{'name': 'unreachable', 'host': {DEAD_BROKER!r}, 'consumable': False}}]\n")
    supervisor = start_supervisor('--queues', 'default', env=dict(subprocess_env, CARROT_TEST_EXTRA=str(extra)))
    supervisor.wait_ready()
    scheduler_pid = supervisor.scheduler().pid

    dead = ScheduledTask.objects.create(task=ADD, task_name='a unreachable', queue='unreachable',
                                        interval_type='seconds', interval_count=1, task_args='[9, 1]')
    schedule('b reachable', seconds=1, task_args=[9, 2])
    started = timezone.now()

    def failures():
        return [line for line in supervisor.log_text().splitlines()
                if 'a unreachable' in line and 'could not be published' in line]
    wait_for(lambda: len(failures()) >= 3 and len(runs_of([9, 2])) >= 3, 20, tail=supervisor.diagnostics,
             what='three failed tries of the unreachable schedule and three runs of the other')
    elapsed = (timezone.now() - started).total_seconds()
    print(f'FIGURE supervisor_unreachable_publish_attempts={len(failures())} '
          f'reachable_runs={len(runs_of([9, 2]))} in {elapsed:.1f}s')
    assert [line.rsplit('retrying in ', 1)[1] for line in failures()[:3]] == ['1s', '2s', '4s']  # backing off
    dead.refresh_from_db()
    assert dead.last_run_time is None                          # each failed run was given back
    assert supervisor.scheduler().pid == scheduler_pid         # the scheduler did not die
    assert supervisor.log_text().count('spawned scheduler') == 1
    assert supervisor.popen.poll() is None


@pytest.mark.timeout(120)
@pytest.mark.skipif(settings.DATABASES['default']['ENGINE'] != 'django.db.backends.postgresql',
                    reason='the database session is ended with pg_terminate_backend')
def test_scheduler_survives_losing_its_database_connection(start_supervisor):
    from django.db import connection

    supervisor = start_supervisor('--queues', 'default')
    supervisor.wait_ready()
    scheduler = supervisor.scheduler()
    args = [10, 0]
    schedule('steady', seconds=1, task_args=args)
    first = first_run_after(args, timezone.now(), 5, supervisor)
    # Its row is visible as soon as its INSERT commits, before the confirm and the PUBLISHED update: a session
    # killed in between is the publish's to log (the row's update), not the scheduler's. Kill it between ticks.
    wait_for(lambda: MessageLog.objects.get(pk=first.pk).status != 'WAITING', 5, what='the run marked PUBLISHED',
             tail=supervisor.diagnostics)

    # The scheduler's own session, found by the client port of its connection to PostgreSQL.
    port = int(settings.DATABASES['default'].get('PORT') or 5432)
    ports = [c.laddr.port for c in scheduler.net_connections('tcp') if c.raddr and c.raddr.port == port]
    assert len(ports) == 1, ports
    with connection.cursor() as cursor:
        cursor.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = %s', ports)
        assert cursor.fetchall() == [(True,)]
    killed = timezone.now()

    resumed = first_run_after(args, killed, 15, supervisor)
    print(f'FIGURE scheduler_db_session_killed_to_next_publish_ms={ms(resumed.publish_time - killed)}')
    # Logged, and retried on the next tick.
    wait_for(lambda: 'scheduler: OperationalError' in supervisor.log_text(), 5,
             what='the scheduler to log the lost connection', tail=supervisor.diagnostics)
    error, = [line for line in supervisor.log_text().splitlines() if 'scheduler: OperationalError' in line]
    assert error.endswith('retrying in 1s'), error
    first_run_after(args, resumed.publish_time, 5, supervisor)  # and it goes on
    assert supervisor.scheduler().pid == scheduler.pid
    assert supervisor.log_text().count('spawned scheduler') == 1


# --- broken rows (publish helper) ---------------------------------------------------------------------

def broken(name, **fields):
    values = dict(task=ADD, task_name=name, queue='other', interval_type='seconds', interval_count=60,
                  task_args='[1, 2]', content='{}')
    values.update(fields)
    return ScheduledTask.objects.create(**values)


BROKEN_ROWS = {
    'bad json': (dict(task_args='[1,'), 'the positional arguments are not valid JSON'),
    'deep nesting': (dict(task_args='[' * 40 + ']' * 40), 'nested too deeply (at most 32 levels)'),
    'too long': (dict(task_args='[' * 100_000 + ']' * 100_000), 'too long (200000 characters, at most 65536)'),
    'kwargs not an object': (dict(content='[1]'), 'the keyword arguments must be a JSON object, e.g. {"order_id": 42}, got list'),
    'huge interval': (dict(interval_type='days', interval_count=10 ** 9), 'longer than the longest allowed'),
    'calendar overflow': (dict(interval_type='days', interval_count=5,
                               last_run_time=timezone.make_aware(timezone.datetime(9999, 12, 30))),
                          'past the end of the calendar'),
    'unknown unit': (dict(interval_type='fortnights'), "the interval unit 'fortnights' is not one of"),
    'zero interval': (dict(interval_count=0), 'must be a whole number of seconds, at least 1 (got 0)'),
    'not a task': (dict(task='os.system', task_args='["true"]'), 'task os.system is not registered'),
    'unknown queue': (dict(queue='nowhere'), "no queue called 'nowhere'"),
    'too large': (dict(task_args='["' + 'x' * 2000 + '", 1]'), 'more than CARROT["max_message_size"]'),
    'wrong arguments': (dict(task_args='[1, 2, 3]'), 'the arguments do not fit add(a, b): too many positional'),
}


@pytest.mark.timeout(60)
def test_broken_rows_are_skipped_marked_and_logged_once_each(caplog):
    caplog.set_level(logging.INFO, logger='carrot')
    rows = {name: broken(name, **fields) for name, (fields, _) in BROKEN_ROWS.items()}
    good = schedule('z good', seconds=1)
    with override_settings(CARROT={**settings.CARROT, 'max_message_size': 1000}):
        scheduler = Scheduler()
        for tick in range(3):
            scheduler.publish_due()
            if tick == 0:
                assert published().count() == 1  # the good one, in the same tick as all the broken ones
            ScheduledTask.objects.filter(pk=good.pk).update(last_run_time=None)
        assert published().count() == 3
        for name, (_, reason) in BROKEN_ROWS.items():
            rows[name].refresh_from_db()
            assert reason in rows[name].problem, (name, rows[name].problem)
            lines = [r for r in caplog.records if f"'{name}'" in r.getMessage()]
            assert len(lines) == 1, (name, [r.getMessage() for r in lines])   # one line, not one per tick
            assert lines[0].levelno == logging.ERROR and 'is skipped until it is fixed' in lines[0].getMessage()
        assert MessageLog.objects.exclude(task=ADD).count() == 0
        good.refresh_from_db()
        assert good.problem == ''

        # Fixed: the problem is cleared (one line) and the schedule runs on that tick.
        ScheduledTask.objects.filter(pk=rows['bad json'].pk).update(task_args='[3, 4]')
        caplog.clear()
        scheduler.publish_due()
        scheduler.publish_due()
        rows['bad json'].refresh_from_db()
        assert rows['bad json'].problem == '' and rows['bad json'].last_run_time is not None
        messages = [r.getMessage() for r in caplog.records if "'bad json'" in r.getMessage()]
        assert messages[0] == f"scheduler: 'bad json' ({ADD}) is fixed and runs again"
        assert messages[1].startswith(f"scheduler: published 'bad json' ({ADD}) as "
                                      f"{MessageLog.objects.get(task_args='[3, 4]').uuid}, the run of ")
        assert len(messages) == 2


def test_schedule_problem_says_why_without_asking_the_broker():
    from carrot.schedule.scheduler import schedule_problem
    assert schedule_problem(schedule('fine')) == ''
    assert 'not valid JSON' in schedule_problem(broken('bad', task_args='{nope'))
    assert schedule_problem(broken('unreachable but fine', queue='default')) == ''
    # 200 characters fit the column, but 400 bytes are more than AMQP carries: said before any run.
    too_wide = broken('too wide', routing_key='é' * 200)
    assert 'the routing key is too long' in schedule_problem(too_wide)
    with pytest.raises(ValidationError, match='too long'):
        too_wide.full_clean()


@pytest.mark.timeout(60)
def test_a_schedule_the_broker_refuses_is_marked_until_a_run_goes_through(caplog):
    refused = schedule('refused', seconds=1, exchange='amq.direct', routing_key='nobody-is-bound')
    scheduler = Scheduler()
    assert scheduler.publish_due() == 0
    refused.refresh_from_db()
    assert refused.problem.startswith('the broker refused the last run: RabbitMQ returned the message as '
                                      'unroutable')
    assert refused.last_run_time is not None  # the run is spent, not retried at once
    assert MessageLog.objects.get(task=ADD).status == 'FAILED'
    Scheduler().publish_due()  # another scheduler (or this one restarted) keeps the mark
    refused.refresh_from_db()
    assert refused.problem.startswith('the broker refused the last run')

    ScheduledTask.objects.filter(pk=refused.pk).update(exchange='', routing_key='other', last_run_time=None)
    assert scheduler.publish_due() == 1
    refused.refresh_from_db()
    assert refused.problem == ''
    assert published().count() == 1


@pytest.mark.timeout(60)
def test_housekeeping_relays_waiting_messages():
    import uuid

    from carrot.run.housekeeping import Housekeeping, relay_duty
    waiting = MessageLog.objects.create(status='WAITING', queue='other', routing_key='other', task=ADD,
                                        uuid=str(uuid.uuid4()), task_args='[5, 5]', content='{}',
                                        publish_time=timezone.now() - timedelta(minutes=1))
    stopping = threading.Event()
    duty = relay_duty()
    housekeeping = Housekeeping([duty], stopping=stopping)
    housekeeping.on_tick = stopping.set  # one tick
    thread, result = run_in_thread(housekeeping.run)
    thread.join(30)
    assert result == [None]
    waiting.refresh_from_db()
    assert waiting.status == 'PUBLISHED' and duty.run.__self__.relayed == 1
    assert wait_for(lambda: queue_depth('other') == 1, 5, what='the relayed message')


@pytest.mark.timeout(60)
def test_a_duty_that_fails_unexpectedly_backs_off_and_the_others_go_on(caplog):
    """A bug in one duty (here a ZeroDivisionError) is logged with its traceback once per failing streak;
    it neither ends housekeeping (the child would be restarted into the same bug, again and again) nor
    stops the other duties."""
    from carrot.backoff import Backoff
    from carrot.run.housekeeping import Duty, Housekeeping
    calls = {'buggy': 0, 'fine': 0}

    def buggy():
        calls['buggy'] += 1
        return 1 / 0

    def fine():
        calls['fine'] += 1

    stopping = threading.Event()
    # A minute's backoff, without jitter: the fine duty's fifty ticks fall inside it however slow the machine.
    backing_off = Backoff(base=60.0, cap=60.0, jitter=False)
    housekeeping = Housekeeping([Duty('a buggy duty', buggy, every=0.01, backoff=backing_off),
                                 Duty('a fine duty', fine, every=0.01)], stopping=stopping, tick=0.01)
    housekeeping.on_tick = lambda: calls['fine'] >= 50 and stopping.set()
    with caplog.at_level(logging.WARNING, logger='carrot.housekeeping'):
        thread, result = run_in_thread(housekeeping.run)
        thread.join(30)
    assert result == [None]
    assert calls['fine'] >= 50 and calls['buggy'] == 1  # backed off after its failure
    failures = [r for r in caplog.records if 'a buggy duty failed unexpectedly' in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is ZeroDivisionError


def test_a_duty_that_keeps_failing_is_recalled_every_ten_minutes_not_every_try(caplog):
    """The first line of a failing streak scrolls away; an operator reading the log an hour later still
    learns the relay has not worked since -- once per ten minutes, not once per backoff."""
    from carrot.run.housekeeping import STILL_FAILING_EVERY, Duty

    def away():
        raise OSError('the broker is away')

    duty = Duty('the relay', away)
    with caplog.at_level(logging.INFO, logger='carrot.housekeeping'):
        for second in range(0, 3 * int(STILL_FAILING_EVERY) + 1, 30):  # a try every 30 s (the backoff's cap)
            duty.perform(1000.0 + second)
        duty.run = lambda: None
        duty.perform(1000.0 + 3 * STILL_FAILING_EVERY + 30)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith('housekeeping: the relay failed (OSError: the broker is away)')
    assert lines[1:4] == [f'housekeeping: the relay still fails after {minutes * 60} s (OSError: the broker is '
                          f'away); retrying with backoff' for minutes in (10, 20, 30)]
    assert lines[4:] == ['housekeeping: the relay works again']


# --- the cleanup task ---------------------------------------------------------------------------------

def test_cleanup_deletes_failed_rows_older_than_cleanup_failed_after_days():
    from carrot import helper_tasks
    now = timezone.now()

    def failed(name, days, field='failure_time'):
        MessageLog.objects.create(uuid=name, task=ADD, status='FAILED', **{field: now - timedelta(days=days)})

    failed('failed 40 days ago', 40), failed('failed 5 days ago', 5)
    failed('no failure time, published 40 days ago', 40, field='publish_time')
    MessageLog.objects.create(uuid='waiting 40 days', task=ADD, status='WAITING',
                              publish_time=now - timedelta(days=40))  # never deleted: it still has to go out
    with override_settings(CARROT={**settings.CARROT, 'cleanup_after_days': None}):
        assert helper_tasks.cleanup() == 2
    assert set(MessageLog.objects.values_list('uuid', flat=True)) == {'failed 5 days ago', 'waiting 40 days'}
    with override_settings(CARROT={**settings.CARROT, 'cleanup_failed_after_days': 1}):
        assert helper_tasks.cleanup() == 1
    with override_settings(CARROT={**settings.CARROT, 'cleanup_after_days': None,
                                   'cleanup_failed_after_days': None}):
        sync_cleanup_schedule()
        assert not ScheduledTask.objects.get(task_name=CLEANUP_TASK_NAME).active
    with override_settings(CARROT={**settings.CARROT, 'cleanup_after_days': None}):
        sync_cleanup_schedule()  # FAILED rows still need cleaning: the schedule stays on
        assert ScheduledTask.objects.get(task_name=CLEANUP_TASK_NAME).active


@pytest.mark.timeout(120)
def test_a_host_without_a_scheduler_relays_a_message_published_while_the_broker_refused_it(
        start_supervisor, subprocess_env, tmp_path, locked_vhost):
    from carrot.utilities import publish_message
    queue = {'name': 'locked', 'host': locked_vhost.url, 'consumable': False}
    extra = tmp_path / 'extra.py'
    extra.write_text(f"CARROT['queues'] = CARROT['queues'] + [{queue!r}]\n")
    supervisor = start_supervisor('--queues', 'default', '--no-scheduler',
                                  env=dict(subprocess_env, CARROT_TEST_EXTRA=str(extra)))
    supervisor.wait_ready()

    with override_settings(CARROT={**settings.CARROT, 'queues': [*settings.CARROT['queues'], queue]}):
        log = publish_message(ADD, 30, 12, queue='locked')  # the broker refuses us: it waits
    assert log.status == 'WAITING'
    wait_for(lambda: 'is unavailable; waiting messages are kept' in supervisor.log_text(), 30,
             what='the relay to try the refusing broker', tail=supervisor.diagnostics)
    log.refresh_from_db()
    assert log.status == 'WAITING'

    locked_vhost.unlock()
    unlocked = time.monotonic()
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'PUBLISHED', 30,
             what='the relay to send it once the broker lets us in', tail=supervisor.diagnostics)
    print(f'FIGURE relay_unlock_to_published_s={time.monotonic() - unlocked:.1f}')
    # The row is updated before the relay logs the batch: wait for the lines too.
    wait_for(lambda: 'relay: sent 1 message(s)' in supervisor.log_text(), 10, what='the relay to log it',
             tail=supervisor.diagnostics)
    text = supervisor.log_text()
    assert text.count('is unavailable; waiting messages are kept') == 1  # one line per outage
    assert 'takes messages again' in text and 'relay: sent 1 message(s)' in text
    connection = locked_vhost.connect()
    try:
        method, properties, body = connection.channel().basic_get('locked', auto_ack=True)
    finally:
        connection.close()
    assert properties.message_id == log.uuid and properties.headers == {'type': ADD}
    assert supervisor.log_text().count('spawned housekeeping') == 1 and 'spawned scheduler' not in supervisor.log_text()


def test_the_published_line_names_the_run_and_the_claims_base(caplog):
    """Which run each scheduler published, and from which last run it claimed it: what tells two hosts'
    schedulers apart in their logs when both published near one moment."""
    caplog.set_level(logging.INFO, logger='carrot')
    row = schedule('logged run', seconds=60)
    Scheduler().publish_due()
    row.refresh_from_db()
    first = row.last_run_time
    earlier = first - timedelta(seconds=60)
    ScheduledTask.objects.filter(pk=row.pk).update(last_run_time=earlier)  # as if that run were a minute old
    Scheduler().publish_due()
    lines = [r.getMessage() for r in caplog.records if "published 'logged run'" in r.getMessage()]
    moment = first.isoformat(timespec='milliseconds')
    assert len(lines) == 2, lines
    assert lines[0].endswith(f'the run of {moment} (claimed after no run before)'), lines[0]
    assert lines[1].endswith(f"the run of {moment} (claimed after {earlier.isoformat(timespec='milliseconds')})"), \
        lines[1]
