"""Starting carrot-supervisor (and manage.py commands) as real processes, waiting on them with a bound,
and making sure nothing a test started outlives it.

Every process is started in a session of its own, so its whole tree (master, children, the throwaway
settings reader) shares one process group that `kill_group` can kill at once, even a child forked an
instant before. It also runs in the test's own tmp_path, which `sweep` uses to find anything that left
the group (a daemon starts a session of its own).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from tests.waiting import wait_for  # noqa: F401 (also imported from here by tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGE_PY = os.path.join(ROOT, 'tests', 'manage.py')
TITLE = 'carrot-supervisor'


def title_of(process: psutil.Process) -> str:
    try:
        return ' '.join(process.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ''


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


class Supervisor(Process):
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
            if title_of(child).startswith(f'{TITLE}: {prefix}'):
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
