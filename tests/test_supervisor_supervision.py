"""carrot-supervisor keeps its children running: respawn, crash loops, hangs, limits, the master's death.

Real children are killed, stopped and starved with real signals; the tests assert on the process table
(psutil), the master's log and MessageLog rows. See tests/harness.py.
"""
import os
import re
import signal
import time

import psutil
import pytest

from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import dead_letters, queue_depth
from tests.harness import alive, figure, wait_all_completed, wait_for, wait_status, worker_pid
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

SLOTS = ['consumer default#1', 'consumer other#1']
MIN_UPTIME = 5.0  # the master's threshold between "ran stably" and "died young" (supervisor.arbiter)


def wait_stable(seen_at):
    """Wait until a child first seen at monotonic time `seen_at` has lived past the master's
    min_uptime, so that its death is no young death. (psutil's create_time() is no good here: it is
    derived from the boot time, which /proc gives in whole seconds.)"""
    time.sleep(max(0.0, seen_at + MIN_UPTIME + 0.3 - time.monotonic()))


@pytest.mark.timeout(60)
def test_a_killed_consumer_is_replaced_within_a_second_and_its_task_redelivered(start_supervisor):
    supervisor = start_supervisor()
    kids = supervisor.wait_ready(SLOTS)
    wait_stable(seen_at=time.monotonic())
    victim = kids['consumer default#1']
    log = publish_message(tasks.sleep, 2)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)

    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()

    def replacement():
        kid = supervisor.by_slot().get('consumer default#1')
        return kid if kid and kid.pid != victim.pid else None

    new = supervisor.wait_for(replacement, 5, 'a new child in consumer default#1', interval=0.005)
    respawn = time.monotonic() - killed
    figure('respawn_ms', respawn * 1000)
    assert respawn < 1.0, f'slot refilled after {respawn:.3f}s'
    supervisor.wait_log(rf'consumer default#1 \(pid {victim.pid}\) exited with signal SIGKILL after [\d.]+s')

    row = wait_status(log, 'COMPLETED', 20, supervisor.tail)
    assert row.attempts == 2
    assert worker_pid(row) == new.pid
    assert supervisor.by_slot()['consumer other#1'].pid == kids['consumer other#1'].pid
    assert 'keeps dying young' not in supervisor.log()


@pytest.mark.timeout(60)
def test_a_child_that_exits_by_itself_is_replaced(start_supervisor):
    supervisor = start_supervisor()
    kids = supervisor.wait_ready(SLOTS)
    leaver = kids['consumer other#1']
    os.kill(leaver.pid, signal.SIGTERM)  # to the child itself: it stops consuming and exits 0
    supervisor.wait_log(rf'consumer other#1 \(pid {leaver.pid}\) exited with exit code 0 after [\d.]+s')
    new = supervisor.wait_slots(SLOTS, exclude_pids={leaver.pid}, timeout=10)
    assert new['consumer default#1'].pid == kids['consumer default#1'].pid
    assert 'keeps dying young' not in supervisor.log()  # a clean exit is no failure, young or not
    row = wait_status(publish_message(tasks.add, 1, 1, queue='other'), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == new['consumer other#1'].pid


@pytest.mark.timeout(60)
def test_a_crash_looping_slot_backs_off_and_other_slots_carry_on(start_supervisor):
    extra = ("CARROT['queues'].append({'name': 'broken', "
             "'consumer_class': 'tests.testapp.consumers.BrokenConsumer'})\n")
    supervisor = start_supervisor(extra=extra)
    supervisor.wait_log(r'spawned consumer broken#1')
    kids = supervisor.wait_slots(SLOTS)
    supervisor.wait_log(r'slot consumer broken#1 keeps dying young \(3 consecutive\)', 20)
    text = supervisor.log()
    assert 'RuntimeError: BrokenConsumer cannot start (on purpose)' in text
    assert re.search(r'consumer broken#1 \(pid \d+\) exited with exit code 1 after [\d.]+s', text)
    delays = [float(d) for d in re.findall(r'slot consumer broken#1 keeps dying young \(\d+ consecutive\); '
                                           r'next start in ([\d.]+)s', text)]
    assert delays[:3] == [0.5, 1.0, 2.0], delays  # exponential
    # The other slots carry on with the children they had, and still run tasks.
    assert {slot: kid.pid for slot, kid in supervisor.by_slot().items() if slot != 'consumer broken#1'} == \
        {slot: kid.pid for slot, kid in kids.items()}
    rows = wait_all_completed([publish_message(tasks.add, 1, 2), publish_message(tasks.add, 3, 4, queue='other')],
                              15, supervisor.tail)
    assert {worker_pid(r) for r in rows} == {kids['consumer default#1'].pid, kids['consumer other#1'].pid}
    assert supervisor.running()


@pytest.mark.timeout(60)
def test_a_slot_that_keeps_crashing_is_parked_and_the_others_run_on(start_supervisor):
    extra = ("CARROT['queues'].append({'name': 'broken', "
             "'consumer_class': 'tests.testapp.consumers.BrokenConsumer'})\n")
    supervisor = start_supervisor('--max-consecutive-failures', '4', '--backoff-cap', '1', extra=extra,
                                  scheduler=True)
    kids = supervisor.wait_slots(SLOTS + ['scheduler', 'housekeeping'])
    supervisor.wait_log(r'slot consumer broken#1 died young 4 times in a row \(last: exit code 1 after [\d.]+s\); '
                        r'parked: retrying with a backoff of up to 60s', 30)
    text = supervisor.log()
    delays = [float(d) for d in re.findall(r'keeps dying young \(\d+ consecutive\); next start in ([\d.]+)s',
                                           text)]
    assert delays == [0.5, 1.0, 1.0], delays  # doubling, capped at --backoff-cap, then parked
    # Parked is reported in the master's title, the snapshot and sd_notify's STATUS (tested there).
    supervisor.wait_for(lambda: 'parked: consumer broken#1' in (supervisor.title() or ''), 5, 'the title')
    broken = supervisor.wait_for(lambda: (supervisor.slot_status('consumer broken#1') or {}).get('state') == 'parked'
                                 and supervisor.slot_status('consumer broken#1'), 10, 'the snapshot to say parked')
    assert 'died young 4 times' in broken['problem']
    assert 0 < broken['next_start'] <= 60
    # The master runs on; so do the other slots (same children) and the scheduler.
    time.sleep(1)
    assert supervisor.running()
    assert {slot: kid.pid for slot, kid in supervisor.by_slot(housekeeping=True).items()} == {s: k.pid for s, k in kids.items()}
    rows = wait_all_completed([publish_message(tasks.add, 1, 2), publish_message(tasks.add, 3, 4, queue='other')],
                              15, supervisor.tail)
    assert {worker_pid(r) for r in rows} == {kids['consumer default#1'].pid, kids['consumer other#1'].pid}
    assert 'giving up' not in supervisor.log()


@pytest.mark.timeout(60)
def test_the_master_gives_up_with_exit_code_6_only_when_every_slot_is_parked(start_supervisor):
    extra = ("for queue in CARROT['queues']:\n"
             "    queue['consumer_class'] = 'tests.testapp.consumers.BrokenConsumer'\n")
    supervisor = start_supervisor('--max-consecutive-failures', '3', '--backoff-cap', '0.5', extra=extra)
    assert supervisor.wait_exit(40) == 6
    text = supervisor.log()
    assert re.search(r'slot consumer default#1 died young 3 times in a row .*; parked', text), supervisor.tail()
    assert re.search(r'slot consumer other#1 died young 3 times in a row .*; parked', text), supervisor.tail()
    assert 'every slot is parked: children kept crashing; giving up' in text
    assert 'stopped (exit code 6)' in text


@pytest.mark.timeout(60)
def test_a_hung_child_is_killed_after_the_heartbeat_timeout_and_replaced(start_supervisor):
    supervisor = start_supervisor('--heartbeat-timeout', '3')
    kids = supervisor.wait_ready(SLOTS)
    hung = kids['consumer default#1']
    os.kill(hung.pid, signal.SIGSTOP)  # hung: no heartbeats, no progress
    stopped = time.monotonic()
    supervisor.wait_log(rf'consumer default#1 \(pid {hung.pid}\) missed heartbeats for \d+s; killing', 10)
    detected = time.monotonic() - stopped
    figure('hang_detected_ms', detected * 1000)
    # Silence is counted from the last heartbeat, sent up to 0.3 s (timeout/10) before the SIGSTOP.
    assert detected >= 2.5, f'killed {detected:.2f}s after it stopped, before the 3 s heartbeat timeout'
    supervisor.wait_log(rf'consumer default#1 \(pid {hung.pid}\) exited with signal SIGKILL')
    new = supervisor.wait_slots(SLOTS, exclude_pids={hung.pid}, timeout=10)
    assert not alive(hung.pid)
    assert new['consumer other#1'].pid == kids['consumer other#1'].pid
    row = wait_status(publish_message(tasks.add, 2, 2), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == new['consumer default#1'].pid


@pytest.mark.timeout(60)
def test_a_long_task_is_not_a_hang(start_supervisor):
    supervisor = start_supervisor('--heartbeat-timeout', '3')
    kids = supervisor.wait_ready(SLOTS)
    row = wait_status(publish_message(tasks.sleep, 8), 'COMPLETED', 20, supervisor.tail)
    assert (row.attempts, worker_pid(row)) == (1, kids['consumer default#1'].pid)
    assert supervisor.by_slot()['consumer default#1'].pid == kids['consumer default#1'].pid
    assert 'missed heartbeats' not in supervisor.log()


@pytest.mark.timeout(60)
def test_a_task_over_the_time_limit_fails_is_dead_lettered_and_its_worker_replaced(start_supervisor,
                                                                                   raw_channel):
    supervisor = start_supervisor('--task-time-limit', '2')
    kids = supervisor.wait_ready(SLOTS)
    log = publish_message(tasks.sleep, 30)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    started = time.monotonic()
    row = wait_status(log, 'FAILED', 6, supervisor.tail)
    figure('time_limit_failed_after_ms', (time.monotonic() - started) * 1000)
    assert 'time limit of 2s exceeded' in row.exception, row.exception
    assert row.attempts == 1

    old = kids['consumer default#1'].pid
    new = supervisor.wait_slots(SLOTS, exclude_pids={old}, timeout=10)
    assert not alive(old)  # the process that ran the overrunning task is gone, and the task with it
    assert [props.message_id for props, _ in dead_letters(raw_channel, 'default')] == [str(log.uuid)]
    follow = wait_status(publish_message(tasks.add, 20, 22), 'COMPLETED', 15, supervisor.tail)
    assert (follow.output, worker_pid(follow)) == ('42', new['consumer default#1'].pid)
    time.sleep(1)
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.attempts) == (MessageLog.FAILED, 1)  # not redelivered
    assert queue_depth('default') == 0
    assert 'this worker exits and is replaced' in supervisor.log()


@pytest.mark.timeout(60)
def test_max_tasks_per_child_recycles_children(start_supervisor):
    supervisor = start_supervisor('--max-tasks-per-child', '3')
    supervisor.wait_ready(SLOTS)
    logs = [publish_message(tasks.add, i, i) for i in range(10)]
    rows = wait_all_completed(logs, 40, supervisor.tail)
    assert sorted(int(r.output) for r in rows) == [2 * i for i in range(10)]
    assert all(r.attempts == 1 for r in rows), [(r.uuid, r.attempts) for r in rows]
    per_worker = {}
    for row in rows:
        per_worker[worker_pid(row)] = per_worker.get(worker_pid(row), 0) + 1
    assert len(per_worker) >= 3, per_worker
    assert max(per_worker.values()) <= 3, per_worker  # 3 + 10% jitter rounds down to 3
    assert 'ran 3 tasks (max_tasks_per_child); recycling' in supervisor.log()
    assert 'already COMPLETED' not in supervisor.log()
    supervisor.wait_slots(SLOTS)


@pytest.mark.timeout(60)
def test_max_memory_per_child_recycles_a_child_after_the_task_that_grew_it(start_supervisor):
    supervisor = start_supervisor('--max-memory-per-child', '20')
    kids = supervisor.wait_ready(SLOTS)
    first = kids['consumer default#1'].pid
    small = wait_status(publish_message(tasks.add, 1, 1), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(small) == first
    time.sleep(1)
    assert supervisor.by_slot()['consumer default#1'].pid == first  # a small task recycles nothing

    big = wait_status(publish_message(tasks.hog, 60), 'COMPLETED', 15, supervisor.tail)
    assert (worker_pid(big), big.attempts) == (first, 1)
    new = supervisor.wait_slots(SLOTS, exclude_pids={first}, timeout=10)
    supervisor.wait_log(r'consumer default#1: grew by \d+ MiB \(limit 20 MiB\); recycling')
    supervisor.wait_log(rf'consumer default#1 \(pid {first}\) exited with exit code 0')
    after = wait_status(publish_message(tasks.add, 2, 2), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(after) == new['consumer default#1'].pid


@pytest.mark.timeout(60)
def test_children_die_with_the_master_and_their_task_returns_to_the_queue(start_supervisor):
    first = start_supervisor()
    kids = first.wait_ready(SLOTS)
    log = publish_message(tasks.sleep, 2)
    wait_status(log, 'IN_PROGRESS', 10, first.tail)

    os.kill(first.pid, signal.SIGKILL)
    killed = time.monotonic()
    first.wait_exit(5)
    wait_for(lambda: not any(alive(k.pid) for k in kids.values()), 5,
             lambda: f'children {[k.pid for k in kids.values() if alive(k.pid)]} to exit after their master')
    figure('orphans_gone_ms', (time.monotonic() - killed) * 1000)
    wait_for(lambda: queue_depth('default') == 1, 5, 'the unacked message to return to the queue')
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS

    second = start_supervisor()
    second.wait_ready(SLOTS)
    row = wait_status(log, 'COMPLETED', 20, second.tail)
    assert row.attempts == 2
    assert worker_pid(row) == second.by_slot()['consumer default#1'].pid


@pytest.mark.timeout(60)
def test_a_master_killed_while_reading_settings_for_a_reload_leaves_no_process(start_supervisor, tmp_path):
    marker = tmp_path / 'slow-settings'
    extra = f'import os, time\nif os.path.exists({str(marker)!r}):\n    time.sleep(4)\n'
    supervisor = start_supervisor(extra=extra)
    kids = supervisor.wait_ready(SLOTS)
    before = {p.pid for p in psutil.Process(supervisor.pid).children()}  # the children and image 1
    marker.touch()
    supervisor.signal(signal.SIGHUP)  # the master forks a new image, which reads the settings

    def reader():
        procs = [p for p in psutil.Process(supervisor.pid).children() if p.pid not in before]
        return procs[0] if procs else None

    settings_reader = supervisor.wait_for(reader, 5, "the new image")
    os.kill(supervisor.pid, signal.SIGKILL)
    killed = time.monotonic()
    supervisor.wait_exit(5)
    group = [*kids.values(), settings_reader]
    wait_for(lambda: not any(alive(p.pid) for p in group), 8,
             lambda: f'every child of the dead master to exit; alive: '
                     f'{[(p.pid, supervisor.title_of(p.pid)) for p in group if alive(p.pid)]}')
    figure('reader_gone_after_master_killed_ms', (time.monotonic() - killed) * 1000)
    assert time.monotonic() - killed < 5
    time.sleep(4.5)  # past the reader's sleep: nothing took up the dead master's work
    assert 'reload failed' not in supervisor.log(), supervisor.tail()
    assert not [p for p in psutil.process_iter() if _in_group(p, supervisor.pid)]


def _in_group(proc, pgid):
    try:
        return os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.Error):
        return False
