"""The warm image (issue 7 §1-2): children forked from one image per settings generation, reloads that
never stall the master, files broken on disk that never reach a child, hung children's stacks.

From outside, as a user meets it: a real carrot-supervisor, real signals and kills, the process table
(psutil), the status snapshot and the MessageLog rows.
"""
import json
import os
import re
import signal
import time

import psutil
import pytest

from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.harness import alive, figure, publish_raw, wait_for, wait_status, worker_pid
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

SLOTS = ['consumer default#1', 'consumer other#1']
IMAGE_TITLE = re.compile(r'carrot-supervisor: image (\d+)')


def images(supervisor):
    """(pid, generation) of the master's image processes."""
    found = []
    for proc in psutil.Process(supervisor.pid).children():
        title = supervisor.title_of(proc.pid) or ''
        match = IMAGE_TITLE.match(title)
        if match:
            found.append((proc.pid, int(match.group(1))))
    return found


def wait_generation(supervisor, generation, slots, timeout=20):
    """Until the snapshot shows image `generation` (a number, or a set of the acceptable ones) up and every
    slot of `slots` on it, idle."""
    acceptable = {generation} if isinstance(generation, int) else set(generation)

    def settled():
        document = supervisor.status() or {}
        entries = {s['name']: s for s in document.get('slots', ()) if s['name'] in slots or s['name'] != 'housekeeping'}
        if document.get('generation') not in acceptable or sorted(entries) != sorted(slots):
            return None
        if any(e['generation'] != document['generation'] or e['state'] != 'idle' for e in entries.values()):
            return None
        return entries
    return supervisor.wait_for(settled, timeout, f'every slot on image generation {generation}')


@pytest.mark.timeout(60)
def test_children_are_forked_by_the_image_and_belong_to_the_master(start_supervisor):
    supervisor = start_supervisor()
    supervisor.wait_log(r'ready: \d+ children up', timeout=20)
    figure('start_to_ready_ms', (time.monotonic() - supervisor.started_at) * 1000)  # from Popen: Python start too
    kids = supervisor.wait_ready(SLOTS)
    [(image_pid, generation)] = images(supervisor)
    assert generation == 1
    master = psutil.Process(supervisor.pid)
    for kid in kids.values():
        assert psutil.Process(kid.pid).ppid() == supervisor.pid  # re-parented: the master reaps them
    assert psutil.Process(image_pid).ppid() == supervisor.pid
    # The master imported neither Django nor pika: no database file or broker socket, and no
    # site-packages/django file mapped.
    maps = open(f'/proc/{supervisor.pid}/maps').read()
    assert 'psycopg' not in maps and '_sqlite3' not in maps
    assert not [c for c in master.net_connections() if c.raddr and c.raddr[1] == 5672]
    # The snapshot says the same as the process table.
    entries = wait_generation(supervisor, 1, SLOTS)
    assert {name: e['pid'] for name, e in entries.items()} == {s: k.pid for s, k in kids.items()}
    document = supervisor.status()
    assert document['image'] == {'pid': image_pid, 'generation': 1, 'state': 'up', 'error': None}
    assert document['pid'] == supervisor.pid and document['state'] == 'running'
    assert document['settings'] == 'tests.testproject.settings'
    # Memory: children share the image's pages (gc frozen before the fork).
    for kid in kids.values():
        info = psutil.Process(kid.pid).memory_full_info()
        figure(f'idle_child_uss_kib[{kid.slot}]', info.uss // 1024)
        assert info.uss <= 15 * 2**20, f'{kid.slot}: USS {info.uss / 2**20:.1f} MiB'
    # The image builds with the collector off (it only slowed the imports down); a child collects a task's
    # garbage as usual, and the image's heap stays frozen in it.
    row = wait_status(publish_message(tasks.collector_state), 'COMPLETED', 15, supervisor.tail)
    state = json.loads(row.output)
    assert state['enabled'] is True and state['frozen'] > 10_000, state


@pytest.mark.timeout(60)
def test_a_killed_child_is_replaced_from_the_image_and_consumes_at_once(start_supervisor):
    supervisor = start_supervisor()
    kids = supervisor.wait_ready(SLOTS)
    [(image_pid, _)] = images(supervisor)
    times = []
    victim = kids['consumer default#1']
    for _ in range(5):
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()

        def consuming():
            kid = supervisor.by_slot().get('consumer default#1')
            return kid if kid and kid.pid != victim.pid and kid.state == 'idle' else None

        new = supervisor.wait_for(consuming, 5, 'a consuming replacement', interval=0.002)
        times.append(time.monotonic() - killed)
        assert psutil.Process(new.pid).ppid() == supervisor.pid
        victim = new
    times.sort()
    figure('respawn_to_consuming_median_ms', times[len(times) // 2] * 1000)
    assert times[len(times) // 2] < 1.0, times  # the bound for the test; the figure is the point
    assert images(supervisor) == [(image_pid, 1)]  # the same image served every respawn
    row = wait_status(publish_message(tasks.add, 1, 2), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == victim.pid
    assert 'keeps dying young' not in supervisor.log()


@pytest.mark.timeout(90)
def test_a_settings_file_broken_on_disk_never_reaches_a_child(start_supervisor):
    supervisor = start_supervisor(extra='# fine\n')
    kids = supervisor.wait_ready(SLOTS)
    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = (\n")  # a syntax error, no HUP yet
    victim = kids['consumer default#1']
    os.kill(victim.pid, signal.SIGKILL)
    new = supervisor.wait_slots(SLOTS, exclude_pids={victim.pid}, timeout=10)
    row = wait_status(publish_message(tasks.add, 2, 3), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == new['consumer default#1'].pid

    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'reload failed: SettingsUnreadable: cannot load settings tests\.testproject\.settings: '
                        r'SyntaxError.*; keeping the running children', after=mark)
    time.sleep(0.5)
    assert {s: k.pid for s, k in supervisor.by_slot().items()} == {s: k.pid for s, k in new.items()}
    assert [g for _, g in images(supervisor)] == [1]
    document = supervisor.status()
    assert document['generation'] == 1
    assert document['image']['state'] == 'up'  # the serving one; the failed one has gone

    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = 2\n")
    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'reload done', after=mark, timeout=20)
    wait_generation(supervisor, 3, ['consumer default#1', 'consumer default#2', 'consumer other#1'])


@pytest.mark.timeout(90)
def test_the_loop_never_blocks_while_a_slow_image_builds(start_supervisor, subprocess_env, tmp_path,
                                                         notify_socket):
    marker = tmp_path / 'slow'
    extra = f'import os, time\nif os.path.exists({str(marker)!r}):\n    time.sleep(10)\n'
    env = dict(subprocess_env, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC='1000000')
    supervisor = start_supervisor(extra=extra, env=env)
    kids = supervisor.wait_ready(SLOTS)
    marker.touch()
    supervisor.signal(signal.SIGHUP)
    hup = time.monotonic()
    time.sleep(0.5)
    victim = kids['consumer other#1']
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    new = supervisor.wait_slots(SLOTS, exclude_pids={victim.pid}, timeout=5)
    replaced = time.monotonic() - killed
    figure('respawn_during_slow_reload_ms', replaced * 1000)
    assert replaced < 1.0, replaced
    # The watchdog kept ticking while the new image imported the settings.
    mark = len(notify_socket.messages)
    first = notify_socket.wait_for(supervisor, 'WATCHDOG', '1', after=mark, timeout=3)
    notify_socket.wait_for(supervisor, 'WATCHDOG', '1', after=first + 1, timeout=3)
    assert time.monotonic() - hup < 9, 'the image should still be building'
    assert [g for _, g in images(supervisor)] == [1, 2]
    # TERM during the reload: a clean stop, no process left behind (the harness checks that).
    tree = [k.pid for k in new.values()] + [pid for pid, _ in images(supervisor)]
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    wait_for(lambda: not any(alive(pid) for pid in tree), 5, 'every child and image to be gone')
    assert 'reload done' not in supervisor.log()


@pytest.mark.timeout(90)
def test_two_quick_hups_end_in_the_newest_settings(start_supervisor):
    supervisor = start_supervisor(extra='# fine\n')
    supervisor.wait_ready(SLOTS)
    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = 2\n")
    supervisor.signal(signal.SIGHUP)
    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = 3\n")
    supervisor.signal(signal.SIGHUP)
    wanted = ['consumer default#1', 'consumer default#2', 'consumer default#3', 'consumer other#1']
    # Two HUPs this close may reach the master as one (a signal pending twice is delivered once, as on a
    # busy machine): either way the end is the newest settings on one image -- generation 3, or 2.
    entries = wait_generation(supervisor, {2, 3}, wanted)
    assert len(entries) == 4
    time.sleep(1)
    assert sorted(supervisor.by_slot()) == wanted
    generation = entries['consumer default#1']['generation']
    assert [g for _, g in images(supervisor)] == [generation]
    if generation == 2:  # only if the master saw one HUP
        assert supervisor.log().count('received SIGHUP') == 1


@pytest.mark.timeout(120)
def test_a_broken_file_during_a_rollover_keeps_the_rollover_going(start_supervisor, tmp_path):
    supervisor = start_supervisor('--graceful-timeout', '20', extra='# fine\n')
    kids = supervisor.wait_ready(SLOTS)
    log = publish_message(tasks.sleep, 4)  # keeps the old default#1 busy: the rollover takes a while
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    start_supervisor.write_extra("CARROT['queues'][1]['concurrency'] = 2\n")
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'image generation 2 \(pid \d+\) is up')
    start_supervisor.write_extra("CARROT['queues'][1]['concurrency'] = (\n")  # broken, mid-rollover
    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'reload failed: .*; keeping the running children', after=mark, timeout=20)
    # The rollover to generation 2 completes; the busy child finished its task first.
    entries = wait_generation(supervisor, 2, ['consumer default#1', 'consumer other#1', 'consumer other#2'])
    assert kids['consumer default#1'].pid not in {e['pid'] for e in entries.values()}
    row = wait_status(log, 'COMPLETED', 20, supervisor.tail)
    assert row.attempts == 1 and worker_pid(row) == kids['consumer default#1'].pid


@pytest.mark.timeout(90)
def test_a_dead_image_is_replaced_and_the_children_rolled_over(start_supervisor):
    supervisor = start_supervisor()
    kids = supervisor.wait_ready(SLOTS)
    [(image_pid, _)] = images(supervisor)
    os.kill(image_pid, signal.SIGKILL)
    supervisor.wait_log(rf'image generation 1 \(pid {image_pid}\) exited with signal SIGKILL; starting a new image')
    entries = wait_generation(supervisor, 2, SLOTS)
    assert not {e['pid'] for e in entries.values()} & {k.pid for k in kids.values()}
    row = wait_status(publish_message(tasks.add, 1, 1), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == entries['consumer default#1']['pid']


@pytest.mark.timeout(90)
def test_a_hung_child_gets_sigabrt_and_its_stacks_reach_the_log(start_supervisor):
    supervisor = start_supervisor('--heartbeat-timeout', '2')
    kids = supervisor.wait_ready(SLOTS)
    message_id = publish_raw('default', 'tests.testapp.tasks.hold_the_gil')
    hung = kids['consumer default#1']
    supervisor.wait_log(rf'consumer default#1 \(pid {hung.pid}\) missed heartbeats for \d+s; killing', 20)
    supervisor.wait_log(rf'consumer default#1 \(pid {hung.pid}\) exited with signal (SIGABRT|SIGKILL)')
    text = supervisor.log()
    assert re.search(r'Thread 0x[0-9a-f]+ \(most recent call first\)', text), supervisor.tail()
    assert 'hold_the_gil' in text  # the task's frame is in the dump
    supervisor.wait_slots(SLOTS, exclude_pids={hung.pid}, timeout=10)
    assert MessageLog.objects.filter(uuid=message_id).exists()


AUTORELOAD_CODE = 'def version():\n    return {}\n'


@pytest.mark.timeout(120)
def test_autoreload_rolls_over_on_an_edit_and_keeps_the_old_code_on_a_broken_one(start_supervisor, tmp_path):
    code = tmp_path / 'code'
    code.mkdir()
    module = code / 'ar_tasks.py'
    module.write_text(AUTORELOAD_CODE.format(1))
    supervisor = start_supervisor('--autoreload', '--pythonpath', str(code),
                                  extra="CARROT['task_modules'] = ['ar_tasks']\n")
    supervisor.wait_ready(SLOTS)
    supervisor.wait_for(lambda: any('autoreload watcher (image 1)' in (supervisor.title_of(p.pid) or '')
                                    for p in psutil.Process(supervisor.pid).children(recursive=True)),
                        10, 'the watcher of image 1')

    def run_version():
        message_id = publish_raw('default', 'ar_tasks.version')
        return supervisor.wait_for(
            lambda: MessageLog.objects.filter(uuid=message_id, status=MessageLog.COMPLETED).first(), 20,
            f'ar_tasks.version ({message_id}) to complete').output

    def edit(text, bump):
        module.write_text(text)
        later = time.time() + bump  # a later mtime than any the watcher has seen
        os.utime(module, (later, later))

    assert run_version() == '1'
    mark = len(supervisor.log())
    edit(AUTORELOAD_CODE.format(2), 10)
    supervisor.wait_log(r'autoreload: .*ar_tasks\.py changed; reloading', after=mark, timeout=20)
    supervisor.wait_log(r'reload done', after=mark, timeout=30)
    wait_generation(supervisor, 2, SLOTS)
    assert run_version() == '2'

    mark = len(supervisor.log())
    edit('def version(:\n', 20)  # broken
    supervisor.wait_log(r'reload failed: .*SyntaxError.*; keeping the running children', after=mark, timeout=30)
    assert run_version() == '2'  # the old code runs on

    mark = len(supervisor.log())
    edit(AUTORELOAD_CODE.format(3), 30)  # the next good edit reloads
    supervisor.wait_log(r'reload done', after=mark, timeout=30)
    assert run_version() == '3'


@pytest.mark.timeout(90)
def test_the_status_snapshot_shows_each_slot_and_its_task_and_reaches_the_database(start_supervisor):
    from carrot.models import SupervisorStatus
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready(SLOTS + ['scheduler', 'housekeeping'])
    log = publish_message(tasks.sleep, 8)
    entry = supervisor.wait_for(
        lambda: (supervisor.slot_status('consumer default#1') or {}).get('task') == 'tests.testapp.tasks.sleep'
        and supervisor.slot_status('consumer default#1'), 10, 'the snapshot to show the task running')
    assert entry['state'] == 'running'  # (the scheduler's cleanup run at start may come first)
    assert entry['pid'] == kids['consumer default#1'].pid
    assert entry['task'] == 'tests.testapp.tasks.sleep' and entry['task_id'] == str(log.uuid)
    # Ages are refreshed at least every 5 s while nothing else changes.
    supervisor.wait_for(lambda: (supervisor.slot_status('consumer default#1')['task_age'] or 0) >= 2, 8,
                        'the task age to be refreshed')
    assert supervisor.slot_status('scheduler')['state'] == 'idle'
    # The scheduler child copies the document into the SupervisorStatus table.
    row = supervisor.wait_for(lambda: SupervisorStatus.objects.filter(pid=supervisor.pid).first(), 15,
                              'a SupervisorStatus row for this master')
    assert {s['name'] for s in row.document['slots']} == set(SLOTS + ['scheduler', 'housekeeping'])
    assert row.generation == 1
    wait_status(log, 'COMPLETED', 20, supervisor.tail)
    supervisor.wait_for(lambda: supervisor.slot_status('consumer default#1')['state'] == 'idle', 5, 'idle again')
    # Stopped: the file is removed, a stale snapshot never describes a master that is gone.
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(20) == 0
    assert supervisor.status() is None


@pytest.mark.timeout(90)
def test_a_child_never_outlives_its_generation_by_more_than_the_graceful_timeout(start_supervisor):
    supervisor = start_supervisor('--graceful-timeout', '2', extra='# fine\n')
    kids = supervisor.wait_ready(SLOTS)
    log = publish_message(tasks.sleep, 30)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    busy = kids['consumer default#1']
    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = 1  # touched\n")
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'image generation 2 \(pid \d+\) is up')
    up = time.monotonic()
    supervisor.wait_log(rf'consumer default#1 \(pid {busy.pid}\) still running 2\.0s after it was retired; killing',
                        timeout=10)
    supervisor.wait_for(lambda: not alive(busy.pid), 5, 'the old child to be gone')
    gone = time.monotonic() - up
    figure('old_generation_child_gone_after_ms', gone * 1000)
    assert gone < 2 + 2, gone  # the graceful timeout, plus the loop's and the test's own latency
    wait_generation(supervisor, 2, SLOTS)
    # Its message went back to the queue and is taken up again by the new child.
    supervisor.wait_for(lambda: MessageLog.objects.get(pk=log.pk).attempts == 2, 15, 'the redelivery')
