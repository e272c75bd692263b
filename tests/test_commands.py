"""manage.py carrot, carrot-workers and carrot_daemon, run as a user runs them.

Every command runs as `<this interpreter> /abs/path/tests/manage.py ...` from the test's tmp_path, with
a PATH that holds no Python and no PYTHONPATH: anything that hard-codes `python3`, a manage.py path or
the current directory fails here (django-carrot #100).
"""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import queue_depth
from tests.harness import MANAGE_PY, sweep, title_of, wait_for
from tests.harness import SupervisorCommand as Supervisor

pytestmark = pytest.mark.django_db(transaction=True)

MASTER_TITLE = 'carrot-supervisor: master [tests.testproject.settings]'


@pytest.fixture
def env(subprocess_env, tmp_path):
    """The test's database and vhost; no PYTHONPATH, and a PATH without any Python on it."""
    env = dict(subprocess_env)
    env.pop('PYTHONPATH', None)
    env.pop('DJANGO_SETTINGS_MODULE')  # tests/manage.py sets it, as a project's manage.py does
    empty = tmp_path / 'empty-bin'
    empty.mkdir()
    env['PATH'] = str(empty)
    return env


@pytest.fixture
def manage(env, tmp_path, request):
    """manage(*args, timeout=...) -> CompletedProcess of `python /abs/tests/manage.py *args` in tmp_path."""
    request.addfinalizer(lambda: sweep(tmp_path))  # a daemon is in a session of its own; find it by cwd

    def run(*args, timeout=60, extra_env=None):
        return subprocess.run([sys.executable, MANAGE_PY, *args], env=dict(env, **(extra_env or {})),
                              cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    return run


def ms(seconds):
    return round(seconds * 1000)


# --- manage.py carrot / carrot-workers ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_carrot_check_prints_the_slot_plan(manage):
    result = manage('carrot', '--check')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'settings: tests.testproject.settings' in result.stdout
    slots = result.stdout.split('slots:\n', 1)[1].split()
    assert ' '.join(slots) == 'consumer default#1 consumer other#1 scheduler ok', result.stdout

    result = manage('carrot', '--check', '--no-scheduler', '--queues', 'other')
    assert result.returncode == 0, result.stdout + result.stderr
    assert ' '.join(result.stdout.split('slots:\n', 1)[1].split()) == 'consumer other#1 ok'


@pytest.mark.timeout(60)
def test_carrot_check_fails_with_the_reasons(manage, tmp_path):
    unreachable = tmp_path / 'unreachable.py'
    unreachable.write_text("CARROT = dict(CARROT, default_broker='amqp://guest:guest@127.0.0.1:1/')\n"
                           "CARROT['queues'] = [dict(q, host=CARROT['default_broker'])\n"
                           "                    for q in CARROT['queues']]\n")
    result = manage('carrot', '--check', extra_env={'CARROT_TEST_EXTRA': str(unreachable)})
    assert result.returncode == 4, result.stdout + result.stderr  # documented: broker unreachable at start
    assert 'broker errors:' in result.stdout and '127.0.0.1:1' in result.stdout

    invalid = tmp_path / 'invalid.py'
    invalid.write_text("CARROT = dict(CARROT, queues=[{'name': 'default', 'concurency': 2}])\n")
    result = manage('carrot', '--check', extra_env={'CARROT_TEST_EXTRA': str(invalid)})
    assert result.returncode == 3, result.stdout + result.stderr  # documented: bad configuration
    assert 'concurency' in result.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize('command', ['carrot', 'carrot-workers'])
def test_carrot_runs_the_supervisor_in_the_foreground_in_the_same_process(command, env, tmp_path, request):
    supervisor = Supervisor(env, tmp_path, name=command, command=[sys.executable, MANAGE_PY, command])
    request.addfinalizer(supervisor.stop)
    supervisor.wait_ready()
    process = supervisor

    # exec: the manage.py process *is* the master (same pid), so TERM from systemd or a shell reaches it.
    master = psutil.Process(process.pid)
    assert title_of(master) == MASTER_TITLE
    assert f'master {process.pid} ' in supervisor.log_text()
    # A consumer may already be running the cleanup the scheduler publishes at start: idle or running.
    titles = sorted(re.sub(r' (idle|running \S+ [\d.]+s)$', '', title_of(child)) for child in master.children()
                    if not title_of(child).startswith('carrot-supervisor: image '))  # the warm image
    assert titles == ['carrot-supervisor: consumer default#1', 'carrot-supervisor: consumer other#1',
                      'carrot-supervisor: scheduler'], titles
    children = master.children()

    # It works: a published task runs in one of its children.
    log = publish_message('tests.testapp.tasks.add', 2, 3)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == MessageLog.COMPLETED, 20,
             what='the task to run', tail=supervisor.diagnostics)

    process.popen.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert process.popen.wait(timeout=45) == 0, supervisor.diagnostics()
    print(f'FIGURE manage_{command.replace("-", "_")}_term_to_exit_ms={ms(time.monotonic() - started)}')
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


# --- manage.py carrot_daemon -------------------------------------------------------------------------

def read_pid(path):
    return int(path.read_text().strip())


def status_rows(output):
    """{pid: (rss_mib, uptime, title)} from `carrot_daemon status`."""
    rows = {}
    for line in output.splitlines()[1:]:
        match = re.fullmatch(r'\s*(\d+)\s+([\d.]+)\s+((?:\d+h)?\d+m\d\ds)\s+(.+)', line)
        assert match, f'unexpected status line {line!r} in\n{output}'
        rows[int(match[1])] = (float(match[2]), match[3], match[4])
    return rows


def wait_until_in_progress(log, logfile):
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == MessageLog.IN_PROGRESS, 20,
             what=f'{log.task} to start', tail=lambda: logfile.read_text() if logfile.exists() else '')


@pytest.mark.timeout(60)
def test_daemon_status_and_stop_when_not_running(manage, tmp_path):
    pidfile = tmp_path / 'carrot.pid'
    started = time.monotonic()
    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    # What every manage.py command costs before it does anything (for reading the other figures).
    print(f'FIGURE manage_py_command_overhead_ms={ms(time.monotonic() - started)}')
    assert result.returncode == 3, result.stdout + result.stderr  # LSB: program is not running
    assert 'not running' in result.stdout

    pidfile.write_text('999999999\n')  # stale: no such process
    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    assert result.returncode == 3 and 'not running' in result.stdout

    result = manage('carrot_daemon', 'stop', '--pidfile', str(pidfile))
    assert result.returncode == 0 and 'not running' in result.stdout


@pytest.mark.timeout(120)
def test_daemon_start_status_and_graceful_stop(manage, tmp_path):
    pidfile, logfile = tmp_path / 'run' / 'carrot.pid', tmp_path / 'carrot.log'
    pidfile.parent.mkdir()
    options = ['--pidfile', str(pidfile), '--logfile', str(logfile)]

    started = time.monotonic()
    result = manage('carrot_daemon', 'start', *options)
    print(f'FIGURE daemon_start_returns_ms={ms(time.monotonic() - started)}')
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(pidfile)
    assert f'pid {pid}' in result.stdout
    master = psutil.Process(pid)
    assert title_of(master) == MASTER_TITLE
    assert master.ppid() != os.getpid()  # detached: not a child of whoever ran `start`
    assert os.getsid(pid) == pid

    again = manage('carrot_daemon', 'start', *options)
    assert again.returncode != 0 and f'already running (pid {pid}' in again.stderr
    assert read_pid(pidfile) == pid

    # status: the master and every child, with title, pid, RSS and uptime.
    wait_for(lambda: len(master.children()) == 4 and 'ready:' in logfile.read_text(), 30,  # 3 + the image
             what='three children', tail=logfile.read_text)
    time.sleep(1.0)  # so every uptime is at least a second
    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split() == ['PID', 'RSS', 'MiB', 'UPTIME', 'TITLE']
    rows = status_rows(result.stdout)
    print(f'status output:\n{result.stdout}')
    expected = {pid: MASTER_TITLE}
    expected.update({child.pid: title_of(child) for child in master.children()})
    assert {p: title for p, (_, _, title) in rows.items()} == expected
    assert sorted(t for t in expected.values() if t != MASTER_TITLE) == [
        'carrot-supervisor: consumer default#1 idle', 'carrot-supervisor: consumer other#1 idle',
        'carrot-supervisor: image 1', 'carrot-supervisor: scheduler']
    for p, (rss, uptime, _) in rows.items():
        assert rss > 5, (p, rss)                          # a Python process with Django: megabytes
        assert uptime != '0m00s' and uptime.startswith('0m'), (p, uptime)

    # stop: graceful, the task in hand completes before the master goes.
    log = publish_message('tests.testapp.tasks.sleep', 3)
    wait_until_in_progress(log, logfile)
    children = master.children()
    started = time.monotonic()
    result = manage('carrot_daemon', 'stop', *options)
    print(f'FIGURE daemon_graceful_stop_with_3s_task_ms={ms(time.monotonic() - started)}')
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'stopped (pid {pid})' in result.stdout
    assert not psutil.pid_exists(pid)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    log.refresh_from_db()
    assert log.status == MessageLog.COMPLETED and log.output == '3'
    assert not pidfile.exists()
    assert manage('carrot_daemon', 'status', '--pidfile', str(pidfile)).returncode == 3


@pytest.mark.timeout(120)
def test_daemon_restart_and_hard_stop(manage, tmp_path):
    pidfile, logfile = tmp_path / 'carrot.pid', tmp_path / 'carrot.log'
    options = ['--pidfile', str(pidfile), '--logfile', str(logfile), '--no-scheduler']
    assert manage('carrot_daemon', 'start', *options).returncode == 0
    first = read_pid(pidfile)
    wait_for(lambda: 'ready:' in logfile.read_text(), 30, what='the first master', tail=logfile.read_text)
    titles = sorted(title_of(c) for c in psutil.Process(first).children())
    assert titles == ['carrot-supervisor: consumer default#1 idle', 'carrot-supervisor: consumer other#1 idle',
                      'carrot-supervisor: image 1']

    started = time.monotonic()
    result = manage('carrot_daemon', 'restart', *options)
    print(f'FIGURE daemon_restart_ms={ms(time.monotonic() - started)}')
    assert result.returncode == 0, result.stdout + result.stderr
    second = read_pid(pidfile)
    assert second != first and not psutil.pid_exists(first)
    assert title_of(psutil.Process(second)) == MASTER_TITLE
    wait_for(lambda: logfile.read_text().count('ready:') == 2, 30, what='the second master',
             tail=logfile.read_text)

    # stop --hard: at once; the task in hand is killed and its message goes back to the queue.
    log = publish_message('tests.testapp.tasks.sleep', 30)
    wait_until_in_progress(log, logfile)
    children = psutil.Process(second).children()
    started = time.monotonic()
    result = manage('carrot_daemon', 'stop', '--hard', *options)
    print(f'FIGURE daemon_hard_stop_with_30s_task_ms={ms(time.monotonic() - started)}')
    assert result.returncode == 0, result.stdout + result.stderr
    assert not psutil.pid_exists(second)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    log.refresh_from_db()
    assert log.status == MessageLog.IN_PROGRESS  # not waited for: it never finished
    assert wait_for(lambda: queue_depth('default') == 1, 10, what='the message back in its queue')
