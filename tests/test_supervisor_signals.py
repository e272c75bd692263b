"""Signals to the carrot-supervisor master: TERM/INT, QUIT, HUP, USR1, TTIN/TTOU.

Real signals to a real master; assertions on exit codes, the process table (psutil), the log and
MessageLog rows. See tests/harness.py.
"""
import os
import re
import shutil
import signal
import time
from collections import Counter

import pytest
from django.test import override_settings

from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import queue_depth, raw_connection
from tests.harness import (Sampler, alive, figure, publish_raw, wait_all_completed, wait_for,
                                      wait_status, worker_pid)
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

SLOTS = ['consumer default#1', 'consumer other#1']


# -- TERM, INT, QUIT ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['TERM', 'INT'])
def test_graceful_stop_finishes_and_acks_the_task_in_hand(start_supervisor, signum):
    supervisor = start_supervisor()
    kids = supervisor.wait_ready(SLOTS)
    log = publish_message(tasks.sleep, 3)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    supervisor.signal(signum)
    supervisor.wait_log(r'graceful stop: waiting up to 30\.0s for 3 children')
    assert supervisor.running()
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS
    assert supervisor.wait_exit(20) == 0
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.attempts) == (MessageLog.COMPLETED, 1)
    assert worker_pid(row) == kids['consumer default#1'].pid
    assert queue_depth('default') == 0  # acked: nothing went back to the queue
    text = supervisor.log()
    assert re.search(rf'consumer default#1 \(pid {kids["consumer default#1"].pid}\) exited with exit code 0',
                     text)
    assert 'killing' not in text
    assert not any(alive(k.pid) for k in kids.values())


@pytest.mark.timeout(60)
def test_term_when_idle_stops_promptly_with_exit_code_0(start_supervisor):
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready([*SLOTS, 'scheduler', 'housekeeping'])
    sent = time.monotonic()
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    figure('term_to_exit_idle_ms', (time.monotonic() - sent) * 1000)
    assert not any(alive(k.pid) for k in kids.values())
    assert re.search(r'master \d+ stopped \(exit code 0\)', supervisor.log())


@pytest.mark.timeout(60)
def test_graceful_timeout_kills_the_task_and_its_message_runs_on_the_next_start(start_supervisor, tmp_path):
    first = start_supervisor('--graceful-timeout', '1')
    kids = first.wait_ready(SLOTS)
    log = publish_message(tasks.slow_once, str(tmp_path / 'marker'), 20)
    wait_status(log, 'IN_PROGRESS', 10, first.tail)
    sent = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(10) == 0
    figure('term_to_exit_past_graceful_timeout_ms', (time.monotonic() - sent) * 1000)
    pid = kids['consumer default#1'].pid
    assert re.search(rf'consumer default#1 \(pid {pid}\) still running 1\.0s after TERM; killing', first.log())
    assert re.search(rf'consumer default#1 \(pid {pid}\) exited with signal SIGKILL', first.log())
    wait_for(lambda: queue_depth('default') == 1, 5, 'the unacked message to return to the queue', first.tail)
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS

    second = start_supervisor()
    second.wait_ready(SLOTS)
    row = wait_status(log, 'COMPLETED', 20, second.tail)
    assert (row.attempts, row.output) == (2, '"fast"')  # nothing lost: it ran again, to the end


@pytest.mark.timeout(60)
@pytest.mark.parametrize('how', ['second TERM', 'QUIT'])
def test_fast_stop_kills_children_at_once_and_their_messages_return(start_supervisor, tmp_path, how):
    supervisor = start_supervisor()  # graceful timeout: the default 30 s
    kids = supervisor.wait_ready(SLOTS)
    log = publish_message(tasks.slow_once, str(tmp_path / 'marker'), 30)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    if how == 'second TERM':
        supervisor.signal(signal.SIGTERM)
        supervisor.wait_log(r'graceful stop: waiting up to 30\.0s')
        time.sleep(0.5)
        assert supervisor.running()  # the first TERM waits for the task
    sent = time.monotonic()
    supervisor.signal(signal.SIGTERM if how == 'second TERM' else signal.SIGQUIT)
    assert supervisor.wait_exit(5) == 0
    figure(f'{how.replace(" ", "_").lower()}_to_exit_ms', (time.monotonic() - sent) * 1000)
    text = supervisor.log()
    if how == 'second TERM':
        assert 'second stop request: fast stop' in text
    assert re.search(r'fast stop: killing \d children', text)
    pid = kids['consumer default#1'].pid
    assert re.search(rf'consumer default#1 \(pid {pid}\) exited with signal SIGKILL', text)
    assert not any(alive(k.pid) for k in kids.values())
    wait_for(lambda: queue_depth('default') == 1, 5, 'the unacked message to return to the queue')
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS


# -- HUP ------------------------------------------------------------------------------------------

RELOADED = """
CARROT['queues'] = [q for q in CARROT['queues'] if q['name'] != 'other']
CARROT['queues'][0]['concurrency'] = 3
CARROT['queues'].append({'name': 'added'})
"""
NEW_SLOTS = ['consumer default#1', 'consumer default#2', 'consumer default#3', 'consumer added#1']


@pytest.fixture
def added_queue():
    """The queue the reload test adds; deleted afterwards (conftest only empties the configured ones)."""
    yield 'added'
    connection = raw_connection()
    channel = connection.channel()
    channel.queue_delete('added')
    channel.queue_delete('added.dead')
    connection.close()


@pytest.mark.timeout(90)
def test_hup_applies_edited_queues_without_exceeding_concurrency_or_losing_tasks(start_supervisor, tmp_path,
                                                                                 settings, added_queue):
    supervisor = start_supervisor(extra='# as in the settings\n')
    old = supervisor.wait_ready(SLOTS)
    lines = tmp_path / 'lines.txt'
    sampler = Sampler(supervisor)
    sampler.start()
    logs = []
    try:
        for i in range(20):
            logs.append(publish_message(tasks.append_line, str(lines), f'task {i}'))
            time.sleep(0.05)
        start_supervisor.write_extra(RELOADED)
        hup_at = time.monotonic()
        supervisor.signal(signal.SIGHUP)
        i = 20
        # Keep publishing through the reload, and a little after it.
        while time.monotonic() - hup_at < 10:
            logs.append(publish_message(tasks.append_line, str(lines), f'task {i}'))
            i += 1
            time.sleep(0.05)
            if 'reload done' in supervisor.log() and i >= 80:
                break
        new = supervisor.wait_slots(NEW_SLOTS, exclude_pids={k.pid for k in old.values()})
        for _ in range(10):
            logs.append(publish_message(tasks.append_line, str(lines), f'task {i}'))
            i += 1
    finally:
        sampler.stop()

    # Every task ran exactly once.
    rows = wait_all_completed(logs, 40, supervisor.tail)
    assert all(r.attempts == 1 for r in rows), [(r.output, r.attempts) for r in rows if r.attempts != 1]
    written = Counter(lines.read_text().splitlines())
    assert written == Counter(f'task {n}' for n in range(i)), \
        {line: n for line, n in written.items() if n != 1} or 'lines missing'
    assert 'already COMPLETED' not in supervisor.log()
    workers = {worker_pid(r) for r in rows}
    assert old['consumer default#1'].pid in workers  # old and new children both took part
    assert workers & {k.pid for k in new.values()}

    # At no sampled moment did a queue have more consumers than configured, or a slot two children.
    assert sampler.samples, 'no samples'
    most = Counter()
    for _, kids in sampler.samples:
        per_slot = Counter(k.slot for k in kids)
        assert max(per_slot.values(), default=0) <= 1, f'a slot with two children: {kids}'
        for queue, count in Counter(k.queue for k in kids if k.queue).items():
            most[queue] = max(most[queue], count)
    assert most == {'default': 3, 'other': 1, 'added': 1}, most

    # The new set: all new pids; the old children are gone.
    # HUP-to-new-children: until every new slot has a new child that is consuming (its title shows
    # 'idle' or 'running ...', set once its broker connection is up).
    complete = [t for t, kids in sampler.samples
                if sorted(k.slot for k in kids if k.queue) == sorted(NEW_SLOTS) and all(k.state for k in kids if k.queue)
                and not {k.pid for k in kids} & {k.pid for k in old.values()}]
    assert complete, f'no sample showed the complete new set of children: {sampler.samples[-1]}'
    figure('hup_to_new_children_ms', (complete[0] - hup_at) * 1000)
    assert not any(alive(k.pid) for k in old.values())
    done = re.search(r'reload done in ([\d.]+)s', supervisor.log())
    assert done
    figure('hup_reload_done_by_master_ms', float(done.group(1)) * 1000)
    assert 'consumer other' not in ' '.join(k.slot for k in supervisor.children())

    # The added queue is consumed.
    carrot = {**settings.CARROT, 'queues': [*settings.CARROT['queues'], {'name': 'added'}]}
    with override_settings(CARROT=carrot):
        on_added = publish_message(tasks.add, 5, 6, queue='added')
    row = wait_status(on_added, 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == new['consumer added#1'].pid


TASK_CODE = 'def version():\n    return {}\n'


@pytest.mark.timeout(60)
def test_hup_runs_edited_task_code(start_supervisor, tmp_path):
    code = tmp_path / 'code'
    code.mkdir()
    module = code / 'hup_tasks.py'
    module.write_text(TASK_CODE.format(1))
    supervisor = start_supervisor('--pythonpath', str(code), extra="CARROT['task_modules'] = ['hup_tasks']\n")
    old = supervisor.wait_ready(SLOTS)

    def run_version():
        message_id = publish_raw('default', 'hup_tasks.version')
        return supervisor.wait_for(
            lambda: MessageLog.objects.filter(uuid=message_id, status=MessageLog.COMPLETED).first(), 15,
            f'hup_tasks.version ({message_id}) to complete')

    assert run_version().output == '1'
    module.write_text(TASK_CODE.format(2))
    shutil.rmtree(code / '__pycache__', ignore_errors=True)
    later = time.time() + 10
    os.utime(module, (later, later))  # a .pyc cached in the same second must not win
    assert run_version().output == '1'  # nothing changes without a reload

    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'reload done', after=mark)
    supervisor.wait_slots(SLOTS, exclude_pids={k.pid for k in old.values()})
    assert run_version().output == '2'


BROKEN_EDITS = {
    'syntax error': ("CARROT['queues'][0]['concurrency'] = (\n",
                     r'reload failed: SettingsUnreadable: cannot load settings tests\.testproject\.settings: '
                     r'SyntaxError'),
    'invalid value': ("CARROT['queues'][0]['concurrency'] = 'three'\n",
                      r"reload failed: SettingsUnreadable: carrot\.E003: CARROT\['queues'\]\[0\]\['concurrency'\] "
                      r"must be a positive integer, got 'three'"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize('edit', list(BROKEN_EDITS))
def test_hup_with_broken_settings_keeps_the_running_children(start_supervisor, edit):
    supervisor = start_supervisor(extra='# fine\n')
    kids = supervisor.wait_ready(SLOTS)
    broken, reason = BROKEN_EDITS[edit]
    start_supervisor.write_extra(broken)
    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(reason + r'.*; keeping the running children', after=mark)
    time.sleep(1)
    assert {s: k.pid for s, k in supervisor.by_slot().items()} == {s: k.pid for s, k in kids.items()}
    row = wait_status(publish_message(tasks.add, 1, 2), 'COMPLETED', 15, supervisor.tail)
    assert worker_pid(row) == kids['consumer default#1'].pid
    assert 'reload done' not in supervisor.log()

    start_supervisor.write_extra("CARROT['queues'][0]['concurrency'] = 2\n")  # fixed
    mark = len(supervisor.log())
    supervisor.signal(signal.SIGHUP)
    supervisor.wait_log(r'reload done', after=mark)
    supervisor.wait_slots(['consumer default#1', 'consumer default#2', 'consumer other#1'],
                          exclude_pids={k.pid for k in kids.values()})


# -- USR1, TTIN, TTOU ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_usr1_reopens_the_log_file(start_supervisor):
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready([*SLOTS, 'scheduler', 'housekeeping'])
    rotated = supervisor.log_path.with_name(supervisor.log_path.name + '.1')
    os.rename(supervisor.log_path, rotated)  # as logrotate does
    supervisor.signal(signal.SIGUSR1)
    supervisor.wait_log(r'received SIGUSR1')
    row = wait_status(publish_message(tasks.add, 1, 1), 'COMPLETED', 15, supervisor.tail)
    row_other = wait_status(publish_message(tasks.add, 2, 2, queue='other'), 'COMPLETED', 15, supervisor.tail)
    supervisor.wait_log(rf'\[{worker_pid(row)}\] INFO carrot\.consumer: consumer default#1: .* completed')
    supervisor.wait_log(rf'\[{worker_pid(row_other)}\] INFO carrot\.consumer: consumer other#1: .* completed')
    time.sleep(0.5)
    # Nothing is written to the moved file any more; the children are the same ones (USR1 kills no one).
    before = rotated.read_text()
    assert 'received SIGUSR1' not in before
    assert str(row.uuid) not in before and str(row_other.uuid) not in before
    assert {s: k.pid for s, k in supervisor.by_slot(housekeeping=True).items()} == {s: k.pid for s, k in kids.items()}
    assert 'reopening logs failed' not in supervisor.log()
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    assert rotated.read_text() == before
    assert re.search(r'stopped \(exit code 0\)', supervisor.log())


@pytest.mark.timeout(60)
def test_ttin_and_ttou_add_and_remove_one_consumer_per_queue_never_below_one(start_supervisor):
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready([*SLOTS, 'scheduler', 'housekeeping'])
    supervisor.signal(signal.SIGTTIN)
    grown = supervisor.wait_slots([*SLOTS, 'consumer default#2', 'consumer other#2', 'scheduler', 'housekeeping'])
    assert all(grown[s].pid == k.pid for s, k in kids.items())  # the others are left alone
    supervisor.wait_log(r'scaling: consumer default 1 -> 2, consumer other 1 -> 2')

    supervisor.signal(signal.SIGTTOU)
    supervisor.wait_log(r'scaling: consumer default 2 -> 1, consumer other 2 -> 1')
    shrunk = supervisor.wait_slots([*SLOTS, 'scheduler', 'housekeeping'])
    assert {s: k.pid for s, k in shrunk.items()} == {s: k.pid for s, k in kids.items()}  # #2 went
    supervisor.wait_log(rf'consumer default#2 \(pid {grown["consumer default#2"].pid}\) exited with exit code 0')

    mark = len(supervisor.log())
    supervisor.signal(signal.SIGTTOU)
    supervisor.wait_log(r'no scalable group can change size by -1', after=mark)
    time.sleep(0.5)
    assert {s: k.pid for s, k in supervisor.by_slot(housekeeping=True).items()} == {s: k.pid for s, k in kids.items()}
    rows = wait_all_completed([publish_message(tasks.add, 1, 1), publish_message(tasks.add, 1, 1, queue='other')],
                              15, supervisor.tail)
    assert {worker_pid(r) for r in rows} == {kids['consumer default#1'].pid, kids['consumer other#1'].pid}
