"""The one process harness of the test suite: start real processes, look at them from outside, wait with
a bound, and make sure nothing a test started outlives it.

- `wait_for`: every wait is bounded and fails saying what was awaited (and the logs).
- `Supervisor` / `Starter` (fixture `start_supervisor`): ``python -m carrot.cli --settings
  tests.testproject.settings --logfile <tmp>/<name>.log --status-file <tmp>/<name>.status.json`` with the
  test's database and vhost; stopped with QUIT, then whatever is left of its tree SIGKILLed. What a test
  sees: the process table (titles), the log, the status snapshot, the exit code, the MessageLog rows.
- `SupervisorCommand`: carrot-supervisor or a manage.py command in a session of its own, in tmp_path, whose
  whole process group is killed (and the directory swept) at the end.
- `SampleMaster` (fixture `start_master` in tests/supervisor/conftest.py): tests/supervisor/sample_master.py,
  the supervisor package without Django.
- `NotifySocket` (fixture `notify_socket`): a stand-in for systemd's NOTIFY_SOCKET.

Measured figures are printed as ``FIGURE name=value`` lines (collect them with ``pytest -s``).
The fixtures are registered in tests/conftest.py and tests/supervisor/conftest.py.
"""
from __future__ import annotations

import os
import re
import signal
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest


ROOT = Path(__file__).resolve().parents[1]
MANAGE_PY = str(ROOT / 'tests' / 'manage.py')
SETTINGS = 'tests.testproject.settings'
PREFIX = 'carrot-supervisor: '
MASTER_TITLE = f'{PREFIX}master [{SETTINGS}]'


def wait_for(predicate, timeout, what='the condition', tail=None, interval=0.05, fail=None):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds
    saying `what` (a string, or a callable giving one) was awaited, followed by `tail()` (e.g. logs).
    `fail(text)` reports the timeout: pytest.fail by default; inside a hypothesis test pass
    `fail=assertion_failure`, since hypothesis shrinks on exceptions, not on pytest's outcomes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            (fail or _pytest_fail)(f'timed out after {timeout}s waiting for {text}{tail() if tail else ""}')
        time.sleep(interval)


def _pytest_fail(text):
    pytest.fail(text, pytrace=False)


def assertion_failure(text):
    raise AssertionError(text)


def figure(name, value, unit=''):
    print(f'FIGURE {name}={value:.0f}{unit}' if isinstance(value, float) else f'FIGURE {name}={value}{unit}')


def title_of(proc: psutil.Process) -> str:
    """The process title; setproctitle pads the command line, so strip it. '' if it is gone."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return ''
        return ' '.join(proc.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ''


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has finished: it holds no socket and runs no code)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Kid:
    """A child of the master as the process table shows it."""
    pid: int
    title: str
    slot: str   # 'consumer default#1', 'scheduler', 'housekeeping'
    state: str  # 'idle', 'running tests.testapp.tasks.sleep 1.5s', '' (scheduler, or starting)

    @property
    def queue(self) -> str | None:
        match = re.match(r'consumer (.+)#\d+$', self.slot)
        return match.group(1) if match else None


def parse_title(title: str) -> tuple[str, str] | None:
    """(slot, state) of a child's title; None for anything else (the master, an image)."""
    if not title.startswith(PREFIX):
        return None
    rest = title[len(PREFIX):]
    if rest.startswith('consumer '):
        words = rest.split(' ', 2)
        if len(words) < 2:
            return None
        return f'consumer {words[1]}', (words[2] if len(words) > 2 else '')
    for single in ('scheduler', 'housekeeping'):
        if rest == single or rest.startswith(single + ' '):
            return single, rest[len(single):].strip()
    return None


class Supervisor:
    """One carrot-supervisor master process started by a test."""

    def __init__(self, workdir: Path, env: dict, flags, name: str):
        self.workdir = workdir
        self.name = name
        self.log_path = workdir / f'{name}.log'
        self.status_path = workdir / f'{name}.status.json'
        self.out_path = workdir / f'{name}.out'
        self.env = env
        self.args = [sys.executable, '-m', 'carrot.cli', *flags]
        self.output = open(self.out_path, 'ab')
        self.started_at = time.monotonic()
        # A session of its own, so the finalizer can also kill the process group (an image, a
        # task's subprocess) and a test's signals go to the master only.
        self.proc = subprocess.Popen(self.args, env=env, cwd=ROOT, stdout=self.output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.master = psutil.Process(self.pid)
        self.seen: dict[int, psutil.Process] = {self.pid: self.master}

    # -- what can be seen ----------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def status(self) -> dict | None:
        """The master's status snapshot (carrot/run/status.py), or None before it wrote one."""
        from carrot.run.status import read_snapshot
        return read_snapshot(self.status_path)

    def slot_status(self, name) -> dict | None:
        document = self.status() or {}
        return next((s for s in document.get('slots', ()) if s['name'] == name), None)

    def output_text(self) -> str:
        try:
            return self.out_path.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def tail(self, lines=60) -> str:
        out = self.output_text()
        return (f'\n--- {self.log_path.name} (last {lines} lines) ---\n' +
                '\n'.join(self.log().splitlines()[-lines:]) +
                (f'\n--- {self.out_path.name} ---\n{out[-3000:]}' if out.strip() else '') +
                f'\n--- process table ---\n{self.describe_children()}')

    def describe_children(self) -> str:
        try:
            return '\n'.join(f'{k.pid} {k.title}' for k in self.children()) or '(no children)'
        except Exception as exc:  # only for a failure message
            return f'(cannot list children: {exc})'

    def children(self) -> list[Kid]:
        """Live children of the master that hold a slot (consumers, scheduler, housekeeping), by the
        process table."""
        found = []
        try:
            procs = self.master.children()
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            self.seen.setdefault(proc.pid, proc)
            title = title_of(proc)
            parsed = parse_title(title) if title else None
            if parsed:
                found.append(Kid(proc.pid, title, *parsed))
        return found

    def by_slot(self, housekeeping: bool = False) -> dict[str, Kid]:
        """slot -> child; the housekeeping child (on every host) only when asked for."""
        return {kid.slot: kid for kid in self.children() if housekeeping or kid.slot != 'housekeeping'}

    def title(self) -> str | None:
        return title_of(self.master)

    @staticmethod
    def title_of(pid: int) -> str:
        try:
            return title_of(psutil.Process(pid))
        except psutil.NoSuchProcess:
            return ''

    def running(self) -> bool:
        return self.proc.poll() is None

    # -- waiting -------------------------------------------------------------------------------

    def wait_for(self, predicate, timeout, what, interval=0.05):
        return wait_for(predicate, timeout, what, self.tail, interval)

    def wait_log(self, pattern, timeout=10, after=0) -> re.Match:
        """Wait for a log line matching the regex `pattern` (searching from character `after`)."""
        return self.wait_for(lambda: re.search(pattern, self.log()[after:], re.M), timeout,
                             f'{pattern!r} in {self.log_path.name}')

    def wait_slots(self, slots, timeout=15, state='idle', exclude_pids=()) -> dict[str, Kid]:
        """Wait until exactly `slots` each hold one child whose consumer title shows `state` (the
        scheduler and housekeeping show none), none of them in `exclude_pids`; slot -> Kid. Housekeeping
        (on every host) counts only where `slots` names it."""
        wanted = sorted(slots)

        def settled():
            kids = [k for k in self.children() if k.slot != 'housekeeping' or 'housekeeping' in wanted]
            if sorted(k.slot for k in kids) != wanted:
                return None
            if any(k.pid in exclude_pids for k in kids):
                return None
            if any(k.queue and not k.state.startswith(state) for k in kids):
                return None
            return {k.slot: k for k in kids}

        return self.wait_for(settled, timeout, f'children {wanted} ({state})')

    def wait_ready(self, slots, timeout=20) -> dict[str, Kid]:
        """Wait for the master's "ready" line and for `slots` to be up and idle."""
        self.wait_log(r'ready: \d+ children up', timeout)
        return self.wait_slots(slots, timeout)

    def wait_exit(self, timeout) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f'carrot-supervisor (pid {self.pid}) did not exit within {timeout}s{self.tail()}',
                        pytrace=False)

    # -- acting --------------------------------------------------------------------------------

    def signal(self, signum):
        os.kill(self.pid, signum)

    def stop(self, timeout=10) -> int | None:
        """QUIT (fast stop), wait, then SIGKILL the whole tree. Safe to call twice."""
        if self.proc.poll() is None:
            self.children()  # remember the current children, to kill any the master leaves behind
            try:
                self.proc.send_signal(signal.SIGQUIT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_tree()
        return self.proc.returncode

    def kill_tree(self):
        procs = list(self.seen.values())
        if self.proc.poll() is None:
            try:
                procs += self.master.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            try:
                proc.kill()  # psutil refuses if the pid now belongs to another process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the group we created; the leader may be gone already
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        psutil.wait_procs(procs, timeout=10)
        self.output.close()
        survivors = [p.pid for p in procs if p.pid != self.pid and _still_running(p)]
        assert not survivors, f'processes outlived the test: {survivors}'


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Finished:
    """A carrot-supervisor run that has exited: its exit code, stdout+stderr, and log file."""
    args: list
    returncode: int
    output: str
    log: str


class Starter:
    """What the `start_supervisor` fixture returns: call it to start a supervisor."""

    def __init__(self, env: dict, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.started: list[Supervisor] = []
        self.extra_path = workdir / 'carrot_extra.py'

    def __call__(self, *flags, extra: str | None = None, scheduler=False, settings=True, logfile=True,
                 status_file=True, env: dict | None = None, name: str | None = None) -> Supervisor:
        """Start ``carrot-supervisor --settings tests.testproject.settings --logfile ... *flags``.

        `extra` is Python exec'd at the end of the test settings (CARROT_TEST_EXTRA); the file stays
        in place, so `write_extra()` + HUP reloads an edit. ``--no-scheduler`` unless `scheduler`;
        ``--status-file`` beside the log unless `status_file` is false.
        """
        name = name or f'supervisor{len(self.started) + 1}'
        environ = dict(self.env if env is None else env)
        if extra is not None:
            self.write_extra(extra)
        if self.extra_path.exists():
            environ['CARROT_TEST_EXTRA'] = str(self.extra_path)
        args = []
        if settings:
            args += ['--settings', SETTINGS]
        if logfile:
            args += ['--logfile', str(self.workdir / f'{name}.log')]
            if status_file:
                args += ['--status-file', str(self.workdir / f'{name}.status.json')]
        if not scheduler:
            args.append('--no-scheduler')
        supervisor = Supervisor(self.workdir, environ, [*args, *flags], name)
        self.started.append(supervisor)
        return supervisor

    def run(self, *flags, timeout=60, **kwargs) -> 'Finished':
        """Run a carrot-supervisor that is expected to exit by itself (--check, --version, a refusal)."""
        supervisor = self(*flags, **kwargs)
        code = supervisor.wait_exit(timeout)
        supervisor.kill_tree()
        return Finished(supervisor.args, code, supervisor.output_text(), supervisor.log())

    def write_extra(self, text: str):
        """Replace the CARROT_TEST_EXTRA file in one step (a reader never sees half of it)."""
        tmp = self.extra_path.with_suffix('.tmp')
        tmp.write_text(text)
        os.replace(tmp, self.extra_path)

    def cleanup(self):
        errors = []
        for supervisor in self.started:
            try:
                supervisor.stop()
            except BaseException as exc:  # keep cleaning up the others
                errors.append(exc)
        if errors:
            raise errors[0]


# -- messages and logs ----------------------------------------------------------------------------

def worker_pid(log) -> int | None:
    """The pid in MessageLog.worker ('host:pid')."""
    return int(log.worker.rsplit(':', 1)[1]) if log.worker else None


def wait_status(log, status, timeout, tail=None):
    """Wait until MessageLog `log` has `status`; returns the fresh row."""
    from carrot.models import MessageLog

    def reached():
        fresh = MessageLog.objects.get(pk=log.pk)
        return fresh if fresh.status == status else None

    def what():
        fresh = MessageLog.objects.get(pk=log.pk)
        return f'{log.task} ({log.uuid}) to be {status}; it is {fresh.status} (attempts {fresh.attempts}, ' \
               f'exception {fresh.exception!r})'

    return wait_for(reached, timeout, what, tail)


def wait_all_completed(logs, timeout, tail=None):
    """Wait until every log in `logs` is COMPLETED (failing at once if one FAILED); fresh rows."""
    from carrot.models import MessageLog
    pks = [log.pk for log in logs]

    def done():
        rows = list(MessageLog.objects.filter(pk__in=pks))
        failed = [r for r in rows if r.status == MessageLog.FAILED]
        if failed:
            pytest.fail(f'task failed: {failed[0].task} {failed[0].exception}' + (tail() if tail else ''),
                        pytrace=False)
        return rows if all(r.status == MessageLog.COMPLETED for r in rows) and len(rows) == len(pks) else None

    def what():
        statuses = {}
        for row in MessageLog.objects.filter(pk__in=pks):
            statuses[row.status] = statuses.get(row.status, 0) + 1
        return f'{len(pks)} tasks to complete; statuses now {statuses}'

    return wait_for(done, timeout, what, tail, interval=0.1)


def publish_raw(queue_name: str, task_path: str, *args, **kwargs) -> str:
    """Publish in carrot's wire format without a MessageLog or a check that the task is registered
    here (for task modules only the supervisor's children can import); the consumer creates the log.
    Returns the message id."""
    from carrot.amqp import wire
    from carrot.amqp.publisher import publisher_for
    from carrot.config import get_config

    queue = get_config().queue(queue_name)
    message_id = str(uuid.uuid4())
    publisher_for(queue.broker).publish(queue, wire.encode_body(args, kwargs),
                                        wire.message_properties(task_path, message_id, 0))
    return message_id


class Sampler(threading.Thread):
    """Samples the supervisor's children every `interval` seconds on a thread until stopped."""

    def __init__(self, supervisor: Supervisor, interval=0.05):
        super().__init__(daemon=True)
        self.supervisor = supervisor
        self.interval = interval
        self.samples: list[tuple[float, list[Kid]]] = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic(), self.supervisor.children()))
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(5)


# -- sd_notify ----------------------------------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; knows which pid sent each message."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='carrot-notify-')  # short: AF_UNIX paths are limited
        self.path = os.path.join(self.dir, 'notify')
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, int, dict]] = []  # (time, sender pid, assignments)

    def receive(self):
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (socket.timeout, BlockingIOError):
            return
        sender = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = int.from_bytes(payload[:4], sys.byteorder)
        fields = dict(line.split('=', 1) for line in data.decode().splitlines() if '=' in line)
        self.messages.append((time.monotonic(), sender, fields))

    def wait_for(self, supervisor, key, value=None, timeout=15, after=0):
        """The index of the first message from `after` on that sets `key` (to `value`)."""
        def find():
            self.receive()
            for index in range(after, len(self.messages)):
                fields = self.messages[index][2]
                if key in fields and (value is None or fields[key] == value):
                    return index + 1  # truthy even for index 0
            return None
        return supervisor.wait_for(find, timeout, lambda: f'{key}={value or "..."} on NOTIFY_SOCKET; got '
                                   f'{[m[2] for m in self.messages]}') - 1

    def close(self):
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


# -- commands in a session of their own (manage.py carrot, carrot_daemon) -------------------------------

def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(['pid']):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return members


def kill_group(pgid: int, popen: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """SIGKILL every process of group `pgid` and wait until none is left (fails the test otherwise)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    wait_for(lambda: not group_members(pgid), timeout, what=f'process group {pgid} to be gone',
             tail=lambda: f': {[(p.pid, title_of(p)) for p in group_members(pgid)]}')


def in_directory(path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(['pid']):
        try:
            if process.pid != os.getpid() and process.cwd() == str(path) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return found


def sweep(path, timeout: float = 10.0) -> list[str]:
    """SIGKILL every process running in directory `path`; returns what it found, for the test to report."""
    found = in_directory(path)
    for process in found:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    wait_for(lambda: not in_directory(path), timeout, what=f'the processes in {path} to be gone')
    return [f'{p.pid} {title_of(p)}' for p in found]


class Process:
    """A command run in its own session (and in tmp_path) with output to a file; `stop()` kills its tree."""

    def __init__(self, argv, env, tmp_path, name, cwd=None):
        cwd = cwd or tmp_path
        self.tmp_path = tmp_path
        self.name = name
        self.argv = argv
        self.output_path = tmp_path / f'{name}.out'
        self.output = open(self.output_path, 'wb')
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.output,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        self.pgid = self.pid

    def output_text(self) -> str:
        self.output.flush()
        return self.output_path.read_text(errors='replace')

    def stop(self) -> None:
        kill_group(self.pgid, self.popen)
        sweep(self.tmp_path)
        self.output.close()


class SupervisorCommand(Process):
    """carrot-supervisor started as `python -m carrot.cli --logfile <tmp>/<name>.log ...` (or as another
    `command` that takes the same flags, such as manage.py carrot)."""

    def __init__(self, env, tmp_path, *args, name='supervisor', command=(sys.executable, '-m', 'carrot.cli')):
        self.logfile = tmp_path / f'{name}.log'
        argv = [*command, '--logfile', str(self.logfile), *args]
        super().__init__(argv, env, tmp_path, name)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def diagnostics(self) -> str:
        return (f'\n--- {self.name} log ---\n{self.log_text()[-4000:]}'
                f'\n--- output ---\n{self.output_text()[-2000:]}')

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def child_titled(self, prefix: str) -> psutil.Process | None:
        for child in self.children():
            if title_of(child).startswith(f'{PREFIX}{prefix}'):
                return child
        return None

    def wait_ready(self, timeout=30.0) -> None:
        """Until the master logs that every child is up."""
        wait_for(lambda: ' ready: ' in self.log_text() or self.popen.poll() is not None, timeout,
                 what=f'{self.name} to be ready', tail=self.diagnostics)
        assert self.popen.poll() is None, f'{self.name} exited with {self.popen.returncode}{self.diagnostics()}'

    def scheduler(self, timeout=10.0) -> psutil.Process:
        return wait_for(lambda: self.child_titled('scheduler'), timeout, what=f'the scheduler of {self.name}',
                        tail=self.diagnostics)


# -- the supervisor package alone: tests/supervisor/sample_master.py -------------------------------------

SAMPLE = ROOT / "tests" / "supervisor" / "sample_master.py"
# What sample_master's child bodies put after the slot name in their titles.
STATES = {"idle", "working", "stopping", "hung", "crashing"}


class SampleMaster:
    """One sample_master.py process and what the test can see of it."""

    def __init__(self, state_dir: Path, groups, *, env=None, pidfile=None, proc_name=None, **options):
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc_name = proc_name or f"carrot-test-{uuid.uuid4().hex[:8]}"
        self.write_plan(groups)
        args = [sys.executable, str(SAMPLE), "--state-dir", str(state_dir), "--proc-name", self.proc_name]
        if pidfile is not None:
            args += ["--pidfile", str(pidfile)]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.output = open(state_dir / "output.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.output, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.pid = self.proc.pid

    # -- plan and signals --

    def write_plan(self, groups):
        self.write_raw_plan(json.dumps({"groups": groups}))

    def write_raw_plan(self, text):
        tmp = self.state_dir / "plan.json.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.state_dir / "plan.json")

    def signal(self, signum):
        os.kill(self.pid, signum)

    # -- what can be seen --

    def log(self) -> str:
        try:
            return (self.state_dir / "master.log").read_text()
        except FileNotFoundError:
            return ""

    def tail(self, lines=40) -> str:
        output = (self.state_dir / "output.log").read_text(errors="replace")
        return "\n--- master.log ---\n" + "\n".join(self.log().splitlines()[-lines:]) + (
            f"\n--- output ---\n{output[-3000:]}" if output.strip() else "")

    def title_of(self, pid) -> str:
        return " ".join(part for part in psutil.Process(pid).cmdline() if part)

    def children(self) -> list[tuple[int, str | None, str | None]]:
        """(pid, slot, state) of every live child; slot None while it still has the master's title."""
        found = []
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return found
        prefix = f"{self.proc_name}: "
        for kid in kids:
            try:
                if kid.status() == psutil.STATUS_ZOMBIE:
                    continue
                title = self.title_of(kid.pid)
            except psutil.NoSuchProcess:
                continue
            rest = title[len(prefix):] if title.startswith(prefix) else ""
            if rest.startswith("image "):
                continue  # the warm image that forks the children, not a slot's child
            if not rest or rest == "master":
                found.append((kid.pid, None, None))
                continue
            slot, _, state = rest.rpartition(" ")
            if state not in STATES:
                slot, state = rest, None
            found.append((kid.pid, slot, state))
        return found

    def by_slot(self) -> dict[str, int]:
        return {slot: pid for pid, slot, _ in self.children() if slot}

    def wait_up(self, slots, timeout=10, state="idle") -> dict[str, int]:
        """Wait until exactly `slots` have one child each, all showing `state`; slot -> pid."""
        slots = set(slots)

        def settled():
            kids = self.children()
            names = [slot for _, slot, _ in kids]
            if sorted(names, key=str) != sorted(slots) or any(s != state for _, _, s in kids):
                return None
            return {slot: pid for pid, slot, _ in kids}

        return wait_for(settled, timeout, lambda: f"children {sorted(slots)} ({state}); "
                        f"have {self.children()}{self.tail()}")

    def wait_log(self, text, timeout=10):
        wait_for(lambda: text in self.log(), timeout, lambda: f"{text!r} in the log{self.tail()}")

    def wait_exit(self, timeout) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"master did not exit within {timeout}s{self.tail()}", pytrace=False)

    def records(self, slot=None) -> list[dict]:
        """What the children wrote when they started, oldest first."""
        directory = self.state_dir / "children"
        if not directory.exists():
            return []
        found = [json.loads(path.read_text()) for path in directory.glob("*.json")]
        return sorted((r for r in found if slot is None or r["slot"] == slot), key=lambda r: r["started"])

    def cleanup(self):
        if self.proc.poll() is None:
            # A fast stop first: the master kills and reaps its children, leaving no zombies to init.
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        # Then whatever is left, found by name rather than by remembered pid (a pid seen earlier may
        # belong to someone else by now).
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid in (os.getpid(), self.pid):
                continue
            if self.proc_name in " ".join(proc.info["cmdline"] or []):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.output.close()
