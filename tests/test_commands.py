"""manage.py carrot, carrot-workers and carrot_daemon, run as a user runs them.

Every command runs as `<this interpreter> /abs/path/tests/manage.py ...` from the test's tmp_path, with
a PATH that holds no Python and no PYTHONPATH: anything that hard-codes `python3`, a manage.py path or
the current directory fails here (django-carrot #100).
"""
import os
import re
import shlex
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


def without_state(title):
    """A consumer's title without what it is doing now (idle, or running a task for so long)."""
    return re.sub(r' (idle|running \S+ [\d.]+s)$', '', title)


def workers(master):
    """The master's consumer, scheduler and housekeeping children (not the warm image it forks them from)."""
    return [c for c in master.children() if not title_of(c).startswith('carrot-supervisor: image')]


# --- manage.py carrot / carrot-workers ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_carrot_check_prints_the_slot_plan(manage):
    result = manage('carrot', '--check')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'settings: tests.testproject.settings' in result.stdout
    slots = result.stdout.split('slots:\n', 1)[1].split()
    assert ' '.join(slots) == 'consumer default#1 consumer other#1 scheduler housekeeping ok', result.stdout

    result = manage('carrot', '--check', '--no-scheduler', '--queues', 'other')
    assert result.returncode == 0, result.stdout + result.stderr
    assert ' '.join(result.stdout.split('slots:\n', 1)[1].split()) == 'consumer other#1 housekeeping ok'


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
    assert f'[{process.pid}] INFO carrot.supervisor: ' in supervisor.log_text()  # the master logs as itself
    # A consumer may already be running the cleanup the scheduler publishes at start: idle or running.
    titles = sorted(without_state(title_of(child)) for child in workers(master))
    assert titles == ['carrot-supervisor: consumer default#1', 'carrot-supervisor: consumer other#1',
                      'carrot-supervisor: housekeeping', 'carrot-supervisor: scheduler'], titles
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
    table = output.split('\n\n', 1)[0]  # the status snapshot's section, if any, follows a blank line
    for line in table.splitlines()[1:]:
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
    wait_for(lambda: len(workers(master)) == 4 and 'ready:' in logfile.read_text(), 30,
             what='four children', tail=logfile.read_text)
    time.sleep(1.0)  # so every uptime is at least a second
    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split() == ['PID', 'RSS', 'MiB', 'UPTIME', 'TITLE']
    rows = status_rows(result.stdout)
    print(f'status output:\n{result.stdout}')
    # A consumer may be running the cleanup the scheduler publishes at start: compare without the state.
    expected = {pid: MASTER_TITLE}
    expected.update({child.pid: without_state(title_of(child)) for child in master.children()})
    assert {p: without_state(title) for p, (_, _, title) in rows.items()} == expected
    assert sorted(without_state(title_of(child)) for child in workers(master)) == [
        'carrot-supervisor: consumer default#1', 'carrot-supervisor: consumer other#1',
        'carrot-supervisor: housekeeping', 'carrot-supervisor: scheduler']
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
    titles = sorted(title_of(c) for c in workers(psutil.Process(first)))
    assert titles == ['carrot-supervisor: consumer default#1 idle', 'carrot-supervisor: consumer other#1 idle',
                      'carrot-supervisor: housekeeping']

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


# --- the log file: mode 0640, never through a symlink, reopened the same way (ops) ---------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the common default: the file's 0640 must come from carrot, not the umask
    yield
    os.umask(old)


def log_line(handler, text):
    import logging
    handler.handle(logging.makeLogRecord({'msg': text, 'levelno': logging.INFO, 'levelname': 'INFO'}))
    handler.flush()


def mode_of(path):
    return oct(os.stat(path, follow_symlinks=False).st_mode & 0o777)


def test_log_file_is_created_mode_0640(tmp_path, umask_022):
    from carrot.run.logfile import LogFileHandler
    path = tmp_path / 'carrot.log'
    handler = LogFileHandler(str(path))
    try:
        log_line(handler, 'task arguments here')
    finally:
        handler.close()
    assert mode_of(path) == oct(0o640)
    assert path.read_text() == 'task arguments here\n'


@pytest.mark.parametrize('dangling', [False, True])
def test_log_file_that_is_a_symlink_is_refused(tmp_path, dangling):
    from carrot.run.logfile import LogFileError, LogFileHandler
    target = tmp_path / 'elsewhere'
    if not dangling:
        target.write_text('not yours\n')
    link = tmp_path / 'carrot.log'
    link.symlink_to(target)
    with pytest.raises(LogFileError, match=f'refusing to log to {link}: it is a symbolic link'):
        LogFileHandler(str(link))
    assert target.exists() != dangling  # a dangling link is not followed to create its target either
    if not dangling:
        assert target.read_text() == 'not yours\n'


def test_log_file_rotation_reopens_safely_and_never_through_a_planted_symlink(tmp_path, umask_022, capsys):
    from carrot.run.logfile import LogFileHandler
    path, target = tmp_path / 'carrot.log', tmp_path / 'target'
    target.write_text('')
    handler = LogFileHandler(str(path))
    try:
        log_line(handler, 'one')
        os.rename(path, tmp_path / 'carrot.log.1')            # logrotate moves it: the next line reopens
        log_line(handler, 'two')
        assert path.read_text() == 'two\n' and mode_of(path) == oct(0o640)

        os.rename(path, tmp_path / 'carrot.log.2')
        path.symlink_to(target)                                  # someone plants a link at the path
        log_line(handler, 'three')                               # dropped, not raised, not followed
        log_line(handler, 'four')
        assert target.read_text() == ''
        err = capsys.readouterr().err
        assert err.count('it is a symbolic link') == 1, err       # said once, not once per line

        handler.reopen()                                         # USR1: the same rule
        assert target.read_text() == ''
        path.unlink()
        log_line(handler, 'five')                                # the link is gone: a new file again
        assert path.read_text() == 'five\n' and mode_of(path) == oct(0o640)
        handler.reopen()
        log_line(handler, 'six')
        assert path.read_text() == 'five\nsix\n'
    finally:
        handler.close()
    assert (tmp_path / 'carrot.log.1').read_text() == 'one\n'


@pytest.mark.timeout(60)
def test_supervisor_and_daemon_refuse_a_log_file_that_is_a_symlink(manage, env, tmp_path):
    target = tmp_path / 'elsewhere'
    target.write_text('not yours\n')
    link = tmp_path / 'carrot.log'
    link.symlink_to(target)
    result = subprocess.run([sys.executable, '-m', 'carrot.cli', '--logfile', str(link)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stdout + result.stderr  # bad configuration
    assert f'refusing to log to {link}: it is a symbolic link' in result.stderr

    pidfile = tmp_path / 'carrot.pid'
    result = manage('carrot_daemon', 'start', '--pidfile', str(pidfile), '--logfile', str(link))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'refusing to log to {link}: it is a symbolic link' in result.stderr
    assert not pidfile.exists()
    assert target.read_text() == 'not yours\n'


# --- carrot_daemon acts only on a carrot-supervisor master (ops) ------------------------------------

def detached(tmp_path, *argv, name=None):
    """pid of `argv` run in the background, not our child (so a signal to it is reaped by init, not
    left a zombie), in tmp_path (so the manage fixture's sweep ends it), with argv[0] set to `name`."""
    script = f'exec -a {shlex.quote(name or argv[0])} {shlex.join(argv)} </dev/null >/dev/null 2>&1 & echo $!'
    pid = int(subprocess.run(['bash', '-c', script], cwd=tmp_path, capture_output=True, text=True,
                             timeout=10, check=True).stdout)
    wait_for(lambda: psutil.Process(pid).cmdline()[:1] == [name or argv[0]], 10, what='the process to start')
    return psutil.Process(pid)


def alive(process):
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


@pytest.mark.timeout(120)
def test_daemon_never_signals_the_unrelated_process_a_stale_pidfile_names(manage, tmp_path):
    sleeper = detached(tmp_path, 'sleep', '60')
    pidfile, logfile = tmp_path / 'carrot.pid', tmp_path / 'carrot.log'
    options = ['--pidfile', str(pidfile), '--logfile', str(logfile), '--no-scheduler']
    stale = (f'pidfile {pidfile} is stale: process {sleeper.pid} is not a carrot-supervisor master '
             f"(it is 'sleep 60'); nothing was signalled; removing it")

    for mode, code in (('status', 3), ('stop', 0), ('stop', 0), ('restart', 0)):
        pidfile.write_text(f'{sleeper.pid}\n')
        result = manage('carrot_daemon', mode, *options)
        assert result.returncode == code, (mode, result.stdout + result.stderr)
        assert stale in result.stdout, (mode, result.stdout)
        assert alive(sleeper), mode
        if mode != 'restart':
            assert not pidfile.exists(), mode
            assert 'not running' in result.stdout

    # restart went on to start a master of its own, which stop then finds and stops.
    master = read_pid(pidfile)
    assert master != sleeper.pid and title_of(psutil.Process(master)) == MASTER_TITLE
    result = manage('carrot_daemon', 'stop', *options)
    assert result.returncode == 0 and f'stopped (pid {master})' in result.stdout, result.stdout + result.stderr
    assert alive(sleeper)


@pytest.mark.timeout(60)
def test_daemon_trusts_a_supervisor_title_only_from_before_the_pidfile(manage, tmp_path):
    pidfile = tmp_path / 'carrot.pid'
    options = ['--pidfile', str(pidfile), '--timeout', '10']
    impostor = detached(tmp_path, 'sleep', '60', name='carrot-supervisor')

    # A pidfile written an hour before the process started: the pid was reused by this one.
    pidfile.write_text(f'{impostor.pid}\n')
    an_hour_ago = time.time() - 3600
    os.utime(pidfile, (an_hour_ago, an_hour_ago))
    result = manage('carrot_daemon', 'stop', *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f'process {impostor.pid} started after the pidfile was written, so it is another master'
            in result.stdout)
    assert alive(impostor) and not pidfile.exists()

    # A consumer child is not a master either, whatever its start time.
    consumer = detached(tmp_path, 'sleep', '60', name='carrot-supervisor: consumer default#1 idle')
    pidfile.write_text(f'{consumer.pid}\n')
    result = manage('carrot_daemon', 'status', *options)
    assert result.returncode == 3 and 'is not a carrot-supervisor master' in result.stdout, result.stdout
    assert alive(consumer)

    # The control: the same process with a pidfile written after it started is taken for a master.
    pidfile.write_text(f'{impostor.pid}\n')
    result = manage('carrot_daemon', 'stop', *options)
    assert result.returncode == 0 and f'carrot stopped (pid {impostor.pid})' in result.stdout, \
        result.stdout + result.stderr
    assert not alive(impostor)


@pytest.mark.timeout(60)
def test_daemon_status_shows_the_masters_status_snapshot(manage, tmp_path):
    import json
    pidfile, snapshot = tmp_path / 'carrot.pid', tmp_path / 'carrot.status.json'
    master = detached(tmp_path, 'sleep', '60', name='carrot-supervisor: master [tests.testproject.settings]')
    pidfile.write_text(f'{master.pid}\n')
    document = {'version': 1, 'host': 'h', 'pid': master.pid, 'state': 'running', 'generation': 2,
                'restarts': 4, 'updated': '2026-11-21T20:45:03+00:00', 'slots': [
                    {'name': 'consumer default#1', 'pid': 4301, 'state': 'running', 'task_age': 3.14,
                     'task': 'tests.testapp.tasks.sleep\x1b[2J', 'restarts': 0},
                    {'name': 'consumer other#1', 'pid': None, 'state': 'parked', 'task': None,
                     'task_age': None, 'restarts': 5, 'problem': 'children kept dying young'}]}
    snapshot.write_text(json.dumps(document))

    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(status_rows(result.stdout)) == [master.pid]
    section = result.stdout.split('\n\n', 1)[1].splitlines()
    assert section[0] == (f'running, settings generation 2, 4 restarts (from {snapshot}, '
                          f'updated 2026-11-21T20:45:03+00:00)')
    assert section[2].split() == ['consumer', 'default#1', '4301', 'running', '3.1s', '0',
                                  'tests.testapp.tasks.sleep\\x1b[2J']  # the escape is shown, not sent
    assert section[3].split() == ['consumer', 'other#1', '-', 'parked', '-', '5', 'children', 'kept',
                                  'dying', 'young']

    # A snapshot left by another master (another pid) is not shown as this one's.
    snapshot.write_text(json.dumps(dict(document, pid=master.pid + 1)))
    result = manage('carrot_daemon', 'status', '--pidfile', str(pidfile))
    assert result.returncode == 0 and '\n\n' not in result.stdout.strip(), result.stdout


def test_a_child_that_has_not_set_its_title_yet_is_not_taken_for_its_master(tmp_path):
    from carrot.management.commands.carrot_daemon import is_master
    # A "master" (argv[0] carrot-supervisor) with a forked child that still carries the same argv.
    parent = detached(tmp_path, 'bash', '-c', '(exec -a carrot-supervisor sleep 60) & wait',
                      name='carrot-supervisor')
    try:
        child = wait_for(lambda: next(iter(parent.children()), None), 10, what='the child')
        wait_for(lambda: child.cmdline()[:1] == ['carrot-supervisor'], 10, what='the child to exec')
        assert is_master(parent)
        assert not is_master(child)
    finally:
        for process in [*parent.children(), parent]:
            process.kill()


@pytest.mark.timeout(60)
def test_daemon_never_signals_the_master_of_another_project(manage, tmp_path):
    """Two projects given the same pidfile: `stop` with a pidfile naming another project's live master
    (its title names other settings) signals nothing and leaves that master's pidfile alone."""
    pidfile = tmp_path / 'carrot.pid'
    options = ['--pidfile', str(pidfile), '--timeout', '10']
    other = detached(tmp_path, 'sleep', '60', name='carrot-supervisor: master [otherproject.settings]')
    for mode in ('stop', 'status', 'start', 'restart'):
        pidfile.write_text(f'{other.pid}\n')
        result = manage('carrot_daemon', mode, *options)
        assert result.returncode != 0, (mode, result.stdout)
        assert 'names the master of another project' in result.stderr and 'otherproject.settings' in result.stderr, \
            (mode, result.stderr)
        assert alive(other) and pidfile.read_text() == f'{other.pid}\n', mode
    # The same title with this project's settings is this project's master: stop signals it.
    ours = detached(tmp_path, 'sleep', '60', name='carrot-supervisor: master [tests.testproject.settings]')
    pidfile.write_text(f'{ours.pid}\n')
    result = manage('carrot_daemon', 'stop', *options)
    assert result.returncode == 0 and f'carrot stopped (pid {ours.pid})' in result.stdout, result.stdout + result.stderr
    assert alive(other)
