"""carrot-supervisor from outside: command line, process model, titles, connections, pidfile, sd_notify.

Each test starts the real `carrot-supervisor` (``python -m carrot.cli``) in a subprocess against the
real RabbitMQ and database of the test run, and checks what a user sees: exit codes, the log, the
process table (psutil) and MessageLog rows. See tests/harness.py. The signals and the
supervision of children are tested in test_supervisor_signals.py and test_supervisor_supervision.py.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from django.db import connection

from carrot import __version__
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import queue_depth, rabbitmqctl
from tests.harness import MASTER_TITLE, figure, wait_all_completed, wait_for, wait_status, worker_pid
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

BROKER_PORT = 5672
PG_PORT = 5432


# -- command line -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_check_prints_the_slot_plan_and_exits_0(start_supervisor):
    result = start_supervisor.run('--check', extra="CARROT['queues'][0]['concurrency'] = 2\n",
                                  scheduler=True)
    assert result.returncode == 0, result
    lines = result.output.splitlines()
    assert 'settings: tests.testproject.settings' in lines
    assert re.search(r'^  default: concurrency 2, consumed, broker amqp://guest:\*\*\*@127\.0\.0\.1:5672/',
                     result.output, re.M), result.output
    assert 'guest:guest' not in result.output  # the password is masked
    slots = lines[lines.index('slots:') + 1:lines.index('ok')]
    assert slots == ['  consumer default#1', '  consumer default#2', '  consumer other#1', '  scheduler', '  housekeeping']


@pytest.mark.timeout(60)
def test_check_with_queues_and_no_scheduler_shows_the_reduced_plan(start_supervisor):
    result = start_supervisor.run('--check', '--queues', 'other')
    assert result.returncode == 0, result
    lines = result.output.splitlines()
    assert lines[lines.index('slots:') + 1:lines.index('ok')] == ['  consumer other#1', '  housekeeping']


@pytest.mark.timeout(60)
def test_settings_come_from_django_settings_module_when_not_given(start_supervisor):
    result = start_supervisor.run('--check', settings=False)  # the env has DJANGO_SETTINGS_MODULE
    assert result.returncode == 0, result
    assert 'settings: tests.testproject.settings' in result.output


@pytest.mark.timeout(60)
def test_an_invalid_carrot_value_exits_3_naming_the_key(start_supervisor):
    extra = "CARROT['queues'][0]['concurrency'] = 0\n"
    checked = start_supervisor.run('--check', extra=extra)
    assert checked.returncode == 3, checked
    assert 'configuration errors:' in checked.output
    assert "carrot.E003: CARROT['queues'][0]['concurrency'] must be a positive integer, got 0" in checked.output

    started = start_supervisor.run()  # not --check: the same refusal, in the log, and nothing started
    assert started.returncode == 3, started
    assert "CARROT['queues'][0]['concurrency'] must be a positive integer" in started.log
    assert 'spawned' not in started.log


@pytest.mark.timeout(60)
def test_settings_that_do_not_import_exit_3(start_supervisor):
    result = start_supervisor.run('--check', extra="CARROT = {\n")  # a syntax error in the settings
    assert result.returncode == 3, result
    assert 'cannot load settings tests.testproject.settings: SyntaxError' in result.output


@pytest.mark.timeout(60)
def test_no_settings_at_all_exits_3(start_supervisor, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k != 'DJANGO_SETTINGS_MODULE'}
    result = start_supervisor.run(settings=False, env=env)
    assert result.returncode == 3, result
    assert 'no settings: pass --settings myproj.settings or set DJANGO_SETTINGS_MODULE' in result.log


@pytest.mark.timeout(60)
def test_queues_naming_an_unknown_queue_exits_3(start_supervisor):
    result = start_supervisor.run('--queues', 'default,nosuchqueue')
    assert result.returncode == 3, result
    assert "--queues names queues that are not in CARROT['queues']: nosuchqueue" in result.log


@pytest.mark.timeout(60)
def test_an_unreachable_broker_exits_4(start_supervisor):
    extra = "CARROT['queues'][1]['host'] = 'amqp://guest:guest@127.0.0.1:1/'\n"
    checked = start_supervisor.run('--check', extra=extra)
    assert checked.returncode == 4, checked
    assert 'broker errors:' in checked.output
    assert 'broker amqp://guest:***@127.0.0.1:1/%2F is unreachable' in checked.output, checked
    assert 'guest:guest' not in checked.output

    started = start_supervisor.run(extra=extra)
    assert started.returncode == 4, started
    assert re.search(r'broker amqp://guest:\*\*\*@127\.0\.0\.1:1/\S* is unreachable', started.log)
    assert 'spawned' not in started.log


@pytest.mark.timeout(30)
def test_version(start_supervisor):
    result = start_supervisor.run('--version', logfile=False)
    assert result.returncode == 0, result
    assert result.output.strip() == f'carrot-supervisor {__version__}'


@pytest.mark.timeout(30)
def test_a_bad_flag_value_exits_2(start_supervisor):
    result = start_supervisor.run('--graceful-timeout', '0')
    assert result.returncode == 2, result
    assert 'must be positive' in result.output


@pytest.mark.timeout(60)
def test_loglevel_flag_filters_the_log(start_supervisor):
    supervisor = start_supervisor('--loglevel', 'WARNING')
    supervisor.wait_slots(['consumer default#1', 'consumer other#1'])
    victim = supervisor.by_slot()['consumer other#1'].pid
    os.kill(victim, signal.SIGKILL)
    supervisor.wait_log(rf'WARNING carrot\.supervisor: consumer other#1 \(pid {victim}\) exited with signal SIGKILL')
    supervisor.wait_slots(['consumer default#1', 'consumer other#1'], exclude_pids={victim})
    wait_status(publish_message(tasks.add, 1, 1), 'COMPLETED', 15, supervisor.tail)
    assert not re.search(r'\] (INFO|DEBUG) ', supervisor.log()), supervisor.tail()


# -- process model and titles -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_process_titles_say_what_each_process_does(start_supervisor):
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready(['consumer default#1', 'consumer other#1', 'scheduler', 'housekeeping'])
    assert supervisor.title() == MASTER_TITLE
    assert kids['consumer default#1'].title == 'carrot-supervisor: consumer default#1 idle'
    assert kids['consumer other#1'].title == 'carrot-supervisor: consumer other#1 idle'
    assert kids['scheduler'].title == 'carrot-supervisor: scheduler'

    log = publish_message(tasks.sleep, 3)
    pid = kids['consumer default#1'].pid
    running = re.compile(r'carrot-supervisor: consumer default#1 running tests\.testapp\.tasks\.sleep '
                         r'(\d+\.\d)s$')

    def seconds_shown():
        match = running.match(supervisor.by_slot().get('consumer default#1').title)
        return float(match.group(1)) if match else None

    first = supervisor.wait_for(seconds_shown, 10, 'a "running ... sleep" title')
    later = supervisor.wait_for(lambda: (seconds_shown() or 0) >= first + 1, 5, 'the seconds to go up')
    assert later
    wait_status(log, 'COMPLETED', 15, supervisor.tail)
    supervisor.wait_slots(['consumer default#1', 'consumer other#1', 'scheduler', 'housekeeping'])
    assert supervisor.by_slot()['consumer default#1'].pid == pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize('first', ['DJANGO_SETTINGS_MODULE', 'PYTHONPATH'])
def test_titles_are_set_when_a_variable_the_master_rewrites_comes_first_in_its_environment(
        start_supervisor, subprocess_env, first):
    """The master rewrites DJANGO_SETTINGS_MODULE (and PYTHONPATH, given --pythonpath) before it sets any title.
    With that variable first in its environment (a systemd unit with a single Environment= line), setproctitle
    then found no room for the titles: every process read as the python command line, in ps, top and to
    anything that tells the processes apart by their titles."""
    env = {first: subprocess_env[first], **{k: v for k, v in subprocess_env.items() if k != first}}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ('--pythonpath', root) if first == 'PYTHONPATH' else ()
    supervisor = start_supervisor(*flags, env=env)
    kids = supervisor.wait_ready(['consumer default#1', 'consumer other#1', 'housekeeping'])
    assert supervisor.title() == MASTER_TITLE
    assert kids['consumer default#1'].title == 'carrot-supervisor: consumer default#1 idle'
    assert kids['housekeeping'].title == 'carrot-supervisor: housekeeping'


@pytest.mark.timeout(60)
def test_queues_flag_consumes_only_the_named_queues(start_supervisor):
    supervisor = start_supervisor('--queues', 'other')
    supervisor.wait_ready(['consumer other#1'])
    on_default = publish_message(tasks.add, 1, 2)
    on_other = publish_message(tasks.add, 3, 4, queue='other')
    wait_status(on_other, 'COMPLETED', 15, supervisor.tail)
    time.sleep(1)
    assert MessageLog.objects.get(pk=on_default.pk).status == MessageLog.PUBLISHED
    assert queue_depth('default') == 1
    assert {k.slot for k in supervisor.children()} == {'consumer other#1', 'housekeeping'}


@pytest.mark.timeout(60)
def test_a_supervisor_started_as_the_readme_shows_reports_to_the_workers_tab(start_supervisor):
    """No pidfile, no --status-file, no scheduler: the status still reaches the database (through a
    private file the master removes at exit), so the monitor's Workers tab lists this host."""
    from carrot.models import SupervisorStatus

    supervisor = start_supervisor(status_file=False)

    def private_dirs():
        return [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f'carrot-supervisor-{supervisor.pid}-')]

    assert '--status-file' not in supervisor.args and '--no-scheduler' in supervisor.args
    kids = supervisor.wait_ready(['consumer default#1', 'consumer other#1', 'housekeeping'])
    expected = {slot: kid.pid for slot, kid in kids.items()}

    def reported():
        row = SupervisorStatus.objects.filter(pid=supervisor.pid).first()
        return row and {slot['name']: slot['pid'] for slot in row.document['slots']} == expected

    wait_for(reported, 20, what='the supervisor to report its children', tail=supervisor.tail)
    assert len(private_dirs()) == 1
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(30) == 0
    assert private_dirs() == []  # removed at exit


@pytest.mark.timeout(60)
def test_no_scheduler_flag_runs_no_scheduler_child(start_supervisor):
    with_scheduler = start_supervisor(scheduler=True)
    with_scheduler.wait_ready(['consumer default#1', 'consumer other#1', 'scheduler', 'housekeeping'])
    with_scheduler.stop()
    without = start_supervisor()  # the harness passes --no-scheduler
    assert '--no-scheduler' in without.args
    without.wait_ready(['consumer default#1', 'consumer other#1'])
    time.sleep(1)
    assert 'scheduler' not in without.by_slot()
    assert 'carrot.schedule.scheduler' not in without.log()


@pytest.mark.timeout(60)
def test_carrot_keys_give_the_defaults_and_flags_win(start_supervisor):
    extra = "CARROT.update(scheduler=False, graceful_timeout=60, task_time_limit=1)\n"
    supervisor = start_supervisor('--graceful-timeout', '1', '--task-time-limit', '30', extra=extra,
                                  scheduler=True)  # no --no-scheduler: CARROT['scheduler'] decides
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'])
    assert 'scheduler' not in supervisor.by_slot()
    log = publish_message(tasks.sleep, 4)
    wait_status(log, 'IN_PROGRESS', 10, supervisor.tail)
    time.sleep(2)  # past CARROT's task_time_limit: the flag's 30 s wins
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    # --graceful-timeout 1 won over CARROT's 60: the task in hand was killed.
    assert re.search(r'consumer default#1 \(pid \d+\) still running 1\.0s after TERM; killing', supervisor.log())


# -- connections ----------------------------------------------------------------------------------

def remote_ports(proc: psutil.Process) -> set[int]:
    return {c.raddr.port for c in proc.net_connections(kind='inet') if c.raddr}


def open_paths(proc: psutil.Process) -> set[str]:
    return {f.path for f in proc.open_files()}


@pytest.mark.timeout(60)
def test_master_holds_no_database_or_broker_connection_and_children_do(start_supervisor):
    supervisor = start_supervisor(scheduler=True)
    kids = supervisor.wait_ready(['consumer default#1', 'consumer other#1', 'scheduler', 'housekeeping'])
    # Make every consumer use its database connection (the scheduler uses its own on every tick).
    wait_all_completed([publish_message(tasks.add, 1, 1), publish_message(tasks.add, 2, 2, queue='other')],
                       15, supervisor.tail)
    master_ports = remote_ports(supervisor.master)
    assert BROKER_PORT not in master_ports and PG_PORT not in master_ports, master_ports
    vendor = connection.vendor
    db_file = os.path.realpath(connection.settings_dict['NAME']) if vendor == 'sqlite' else None
    if db_file:
        assert db_file not in open_paths(supervisor.master)
    for slot in ('consumer default#1', 'consumer other#1'):
        proc = psutil.Process(kids[slot].pid)
        assert BROKER_PORT in remote_ports(proc), (slot, proc.net_connections())
        if vendor == 'postgresql':
            assert PG_PORT in remote_ports(proc), (slot, proc.net_connections())
        else:
            assert db_file in open_paths(proc), (slot, open_paths(proc))
    scheduler = psutil.Process(kids['scheduler'].pid)
    if vendor == 'postgresql':
        assert PG_PORT in remote_ports(scheduler)
    else:
        assert db_file in open_paths(scheduler)
    # The children's connections are their own, not copies of one inherited socket.
    sockets = {}
    for kid in kids.values():
        for conn in psutil.Process(kid.pid).net_connections(kind='inet'):
            if conn.raddr and conn.raddr.port in (BROKER_PORT, PG_PORT):
                assert conn.laddr not in sockets, f'{kid.slot} shares {conn.laddr} with {sockets[conn.laddr]}'
                sockets[conn.laddr] = kid.slot


@pytest.mark.timeout(60)
def test_children_have_distinct_postgresql_sessions(start_supervisor):
    if connection.vendor != 'postgresql':
        pytest.skip('server-side sessions exist only on PostgreSQL (run with CARROT_TEST_DB=postgres)')
    supervisor = start_supervisor(extra="CARROT['queues'][0]['concurrency'] = 3\n")
    supervisor.wait_ready(['consumer default#1', 'consumer default#2', 'consumer default#3',
                           'consumer other#1'])
    # Tasks that take a while, so that all three consumers get some (prefetch 1 each).
    logs = [publish_message(tasks.backend_pid, 0.5) for _ in range(9)]
    rows = wait_all_completed(logs, 30, supervisor.tail)
    backends = {}
    for row in rows:
        backends.setdefault(worker_pid(row), set()).add(int(row.output))
    assert len(backends) == 3, backends
    assert all(len(pids) == 1 for pids in backends.values()), f'a worker changed sessions: {backends}'
    sessions = [next(iter(pids)) for pids in backends.values()]
    assert len(set(sessions)) == 3, f'children share a PostgreSQL session: {backends}'
    with connection.cursor() as cursor:
        cursor.execute('select pg_backend_pid()')
        assert cursor.fetchone()[0] not in sessions  # nor the test's own session
        cursor.execute('select pid from pg_stat_activity where pid = any(%s)', [sessions])
        assert sorted(r[0] for r in cursor.fetchall()) == sorted(sessions)  # live server processes
    # ... and each session belongs to a worker that is a child of this master.
    assert set(backends) <= {k.pid for k in supervisor.children()}


@pytest.mark.timeout(60)
def test_broker_heartbeats_flow_while_a_long_task_runs(start_supervisor):
    extra = "CARROT['default_broker'] += '?heartbeat=2'\n"
    supervisor = start_supervisor(extra=extra)
    kids = supervisor.wait_ready(['consumer default#1', 'consumer other#1'])
    # The consumers' connections really negotiated a 2 s heartbeat.
    listed = rabbitmqctl('list_connections', '--silent', 'vhost', 'timeout').stdout
    vhost = os.environ['CARROT_TEST_VHOST']
    timeouts = [line.split('\t')[1] for line in listed.splitlines() if line.split('\t')[0] == vhost]
    assert timeouts.count('2') >= 2, listed

    log = publish_message(tasks.sleep, 10)  # five times the heartbeat
    started = time.monotonic()
    row = wait_status(log, 'COMPLETED', 25, supervisor.tail)
    print(f'FIGURE heartbeat_task_s={time.monotonic() - started:.1f}')
    time.sleep(2.5)  # time for a redelivery to show, were the ack lost
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.attempts) == (MessageLog.COMPLETED, 1)
    assert worker_pid(row) == kids['consumer default#1'].pid
    assert queue_depth('default') == 0
    text = supervisor.log()
    assert 'already COMPLETED' not in text
    assert not re.search(r'connection to .* lost', text), supervisor.tail()
    assert supervisor.by_slot()['consumer default#1'].pid == kids['consumer default#1'].pid


# -- pidfile ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_pidfile_holds_the_master_pid_and_refuses_a_second_master(start_supervisor, tmp_path):
    pidfile = tmp_path / 'carrot.pid'
    first = start_supervisor('--pidfile', str(pidfile))
    kids = first.wait_ready(['consumer default#1', 'consumer other#1'])
    assert pidfile.read_text() == f'{first.pid}\n'

    second = start_supervisor.run('--pidfile', str(pidfile), name='second')
    assert second.returncode == 5, second
    assert f'pidfile {pidfile} is held by running process {first.pid}; not starting' in second.log
    assert 'spawned' not in second.log
    assert pidfile.read_text() == f'{first.pid}\n'
    assert {k.pid for k in first.children() if k.slot != 'housekeeping'} == {k.pid for k in kids.values()}

    first.signal(signal.SIGTERM)
    assert first.wait_exit(15) == 0
    assert not pidfile.exists()


@pytest.mark.timeout(60)
def test_a_stale_pidfile_is_replaced(start_supervisor, tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    pidfile = tmp_path / 'carrot.pid'
    pidfile.write_text(f'{dead.pid}\n')
    supervisor = start_supervisor('--pidfile', str(pidfile))
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'])
    assert pidfile.read_text() == f'{supervisor.pid}\n'
    assert f'replacing stale pidfile {pidfile} (process {dead.pid} is not running)' in supervisor.log()
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    assert not pidfile.exists()


@pytest.mark.timeout(60)
def test_pidfile_is_left_alone_on_exit_when_it_no_longer_holds_our_pid(start_supervisor, tmp_path):
    pidfile = tmp_path / 'carrot.pid'
    supervisor = start_supervisor('--pidfile', str(pidfile))
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'])
    pidfile.write_text(f'{os.getpid()}\n')  # say, a newer master took it over
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(15) == 0
    assert pidfile.read_text() == f'{os.getpid()}\n'


# -- sd_notify ----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sd_notify_ready_status_watchdog_reloading_stopping(start_supervisor, subprocess_env, notify_socket):
    env = dict(subprocess_env, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC='1000000')
    supervisor = start_supervisor(env=env, scheduler=True)
    slots = ['consumer default#1', 'consumer other#1', 'scheduler', 'housekeeping']

    ready = notify_socket.wait_for(supervisor, 'READY', '1')
    # READY=1 comes once every child is up: at that moment the process table shows every consumer
    # consuming -- idle, or already running the cleanup task the scheduler publishes at its first tick.
    kids = supervisor.by_slot(housekeeping=True)
    assert sorted(kids) == sorted(slots), kids
    assert all(k.state == 'idle' or k.state.startswith('running ') for k in kids.values() if k.queue), kids
    status = notify_socket.messages[ready][2].get('STATUS') or \
        notify_socket.messages[notify_socket.wait_for(supervisor, 'STATUS')][2]['STATUS']
    assert status.startswith('4 children up'), status

    first_dog = notify_socket.wait_for(supervisor, 'WATCHDOG', '1')
    second_dog = notify_socket.wait_for(supervisor, 'WATCHDOG', '1', after=first_dog + 1, timeout=5)
    interval = notify_socket.messages[second_dog][0] - notify_socket.messages[first_dog][0]
    assert interval < 1.0, interval  # within WATCHDOG_USEC, or systemd would kill the service
    figure('watchdog_interval_ms', interval * 1000)

    mark = len(notify_socket.messages)
    supervisor.signal(signal.SIGHUP)
    reloading = notify_socket.wait_for(supervisor, 'RELOADING', '1', after=mark)
    assert 'MONOTONIC_USEC' in notify_socket.messages[reloading][2]
    notify_socket.wait_for(supervisor, 'READY', '1', after=reloading + 1)
    new = supervisor.by_slot(housekeeping=True)
    assert sorted(new) == sorted(slots) and not {k.pid for k in new.values()} & {k.pid for k in kids.values()}

    mark = len(notify_socket.messages)
    supervisor.signal(signal.SIGTERM)
    notify_socket.wait_for(supervisor, 'STOPPING', '1', after=mark)
    assert supervisor.wait_exit(15) == 0
    notify_socket.receive()
    senders = {pid for _, pid, _ in notify_socket.messages}
    assert senders == {supervisor.pid}, f'only the master talks to systemd, got {senders}'
    statuses = [m[2]['STATUS'] for m in notify_socket.messages if 'STATUS' in m[2]]
    assert any(s.startswith('stopping') for s in statuses), statuses
