"""manage.py carrot_daemon start|stop|restart|status: carrot-supervisor as a background daemon.

For servers without systemd; under systemd use scripts/carrot-supervisor.service instead.

A pidfile can outlive its master (a crash, a reboot) and its pid can be reused by any process. So
`stop`, `status` and `restart` act only on a process that is a carrot-supervisor master -- its command
line names carrot-supervisor (or carrot.cli) and it started before the pidfile was written -- and
never on whatever else the pid now names: such a pidfile is reported as stale and removed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil
from django.core.management.base import BaseCommand, CommandError

from carrot.run.logfile import LogFileError, open_log_file
from carrot.management.commands.carrot import python_path_for_children, supervisor_argv
from carrot.config.options import add_arguments, status_file_for
from carrot.run.status import read_snapshot
from carrot.text import escape_controls

DEFAULT_PIDFILE = 'carrot.pid'
DEFAULT_LOGFILE = 'carrot.log'
START_TIMEOUT = 30.0
PROC_NAME = 'carrot-supervisor'
# psutil derives a start time from the boot time, which /proc gives in whole seconds.
START_TIME_SLACK = 1.0


def names_supervisor(process: psutil.Process) -> bool:
    """Whether the process runs carrot-supervisor: by its title once set, by its argv before."""
    argv = process.cmdline()
    if ' '.join(argv).startswith(f'{PROC_NAME}: '):
        return True
    return any(os.path.basename(arg) == PROC_NAME or arg == 'carrot.cli' for arg in argv[:3])


def is_master(process: psutil.Process) -> bool:
    """A carrot-supervisor process that is not one of a master's children."""
    if not names_supervisor(process):
        return False
    title = ' '.join(process.cmdline())
    if title.startswith(f'{PROC_NAME}: '):
        return title.startswith(f'{PROC_NAME}: master')
    parent = process.parent()  # a child that has not set its title yet looks like its master
    return parent is None or not names_supervisor(parent)


def settings_of(argv: list[str]) -> str | None:
    """The settings module a master runs with: from its title ("carrot-supervisor: master [<settings>]"),
    or, before it set its title, from --settings on its command line; None when neither says."""
    title = ' '.join(argv)
    prefix = f'{PROC_NAME}: master ['
    if title.startswith(prefix):
        return title[len(prefix):].split(']', 1)[0] or None
    for index, arg in enumerate(argv):
        if arg == '--settings' and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith('--settings='):
            return arg.split('=', 1)[1]
    return None


@dataclass
class PidfileLookup:
    """What a pidfile names: a running master (`process`), or why it names none (`stale`)."""
    path: str
    text: str = ''
    pid: int | None = None
    process: psutil.Process | None = None
    stale: str | None = None  # why the file names no master, when it exists
    settings: str | None = None  # the settings module the master runs with, when its title says


def look_up(pidfile: str) -> PidfileLookup:
    lookup = PidfileLookup(pidfile)
    try:
        with open(pidfile) as f:
            lookup.text = text = f.read(64)
        written = os.stat(pidfile).st_mtime
    except FileNotFoundError:
        return lookup
    except OSError as exc:
        raise CommandError(f'cannot read pidfile {pidfile}: {exc.strerror}')
    try:
        lookup.pid = int(text.strip())
        if lookup.pid <= 0:
            raise ValueError
    except ValueError:
        lookup.stale = f'it holds no pid ({text.strip()[:20]!r})'
        return lookup
    try:
        process = psutil.Process(lookup.pid)
        with process.oneshot():
            started = process.create_time()
            master = is_master(process)
            what = ' '.join(process.cmdline())[:80] or process.name()
            lookup.settings = settings_of(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        lookup.stale = f'process {lookup.pid} is not running'
        return lookup
    except psutil.AccessDenied:
        # Neither ours to judge nor to remove: probably a master started by another user.
        raise CommandError(f'pidfile {pidfile} names process {lookup.pid}, which this user may not inspect; '
                           f'run this command as the user that started carrot')
    if not master:
        lookup.stale = f'process {lookup.pid} is not a carrot-supervisor master (it is {what!r})'
    elif started > written + START_TIME_SLACK:
        lookup.stale = f'process {lookup.pid} started after the pidfile was written, so it is another master'
    else:
        lookup.process = process
    return lookup


def remove_stale(lookup: PidfileLookup, write) -> None:
    """Say why the pidfile is stale and remove it, unless it changed meanwhile (a master just started)."""
    write(f'pidfile {lookup.path} is stale: {lookup.stale}; nothing was signalled; removing it')
    try:
        with open(lookup.path) as f:
            unchanged = f.read(64) == lookup.text
        if unchanged:
            os.unlink(lookup.path)
    except FileNotFoundError:
        pass


class Command(BaseCommand):
    help = 'Start, stop, restart or show the status of carrot-supervisor running as a daemon.'
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument('mode', choices=['start', 'stop', 'restart', 'status'])
        add_arguments(parser)
        parser.add_argument('--hard', action='store_true',
                            help='stop at once: tasks in hand are killed and return to their queue')
        parser.add_argument('--timeout', type=float, default=None,
                            help='how long stop waits for the master (default: graceful timeout + 15 s)')

    def handle(self, *args, mode, **options):
        options['pidfile'] = os.path.abspath(options.get('pidfile') or DEFAULT_PIDFILE)
        options['logfile'] = os.path.abspath(options.get('logfile') or DEFAULT_LOGFILE)
        getattr(self, mode)(options)

    def master(self, options) -> psutil.Process | None:
        """The running master the pidfile names, or None (a stale pidfile is reported and removed)."""
        lookup = look_up(options['pidfile'])
        if lookup.stale:
            remove_stale(lookup, self.stdout.write)
        ours = os.environ.get('DJANGO_SETTINGS_MODULE')
        if lookup.process is not None and lookup.settings and ours and lookup.settings != ours:
            # Another project's live master (two projects given the same pidfile): never signalled, and
            # its pidfile is its own.
            raise CommandError(f'pidfile {lookup.path} names the master of another project (pid {lookup.pid}, '
                               f'settings {escape_controls(lookup.settings)[:100]}), not of {ours}; nothing was '
                               f'signalled. Give this project a pidfile of its own (--pidfile).')
        return lookup.process

    def start(self, options):
        pidfile, logfile = options['pidfile'], options['logfile']
        running = self.master(options)
        if running:
            raise CommandError(f'carrot is already running (pid {running.pid}, pidfile {pidfile})')
        try:
            open_log_file(logfile).close()  # the master's own output goes nowhere: refuse a bad path here
        except LogFileError as exc:
            raise CommandError(str(exc))
        argv = supervisor_argv(os.environ['DJANGO_SETTINGS_MODULE'], options)
        env = dict(os.environ, PYTHONPATH=python_path_for_children())
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if look_up(pidfile).pid == process.pid:
                self.stdout.write(f'carrot started (pid {process.pid}); logging to {logfile}')
                return
            if process.poll() is not None:
                raise CommandError(f'carrot-supervisor exited with code {process.returncode}; see {logfile}')
            time.sleep(0.1)
        raise CommandError(f'carrot-supervisor (pid {process.pid}) did not write {pidfile} within '
                           f'{START_TIMEOUT:.0f}s; see {logfile}')

    def stop(self, options):
        master = self.master(options)
        if not master:
            self.stdout.write(f'carrot is not running (no master in {options["pidfile"]})')
            return
        try:
            # psutil checks the pid still names the process it looked at (no reuse in between).
            master.send_signal(signal.SIGQUIT if options['hard'] else signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
        timeout = options['timeout'] or (options.get('graceful_timeout') or 30) + 15
        try:
            master.wait(timeout=timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            raise CommandError(f'carrot (pid {master.pid}) did not stop within {timeout:.0f}s')
        self.stdout.write(f'carrot stopped (pid {master.pid})')

    def restart(self, options):
        self.stop(options)
        self.start(options)

    def status(self, options):
        master = self.master(options)
        if not master:
            self.stdout.write(f'carrot is not running (no master in {options["pidfile"]})')
            sys.exit(3)  # the LSB status code for "not running"
        now = time.time()
        self.stdout.write(f'{"PID":>7}  {"RSS MiB":>8}  {"UPTIME":>9}  TITLE')
        for process in [master] + master.children():
            try:
                with process.oneshot():
                    title = ' '.join(process.cmdline()).strip() or process.name()
                    rss = process.memory_info().rss / 2 ** 20
                    uptime = now - process.create_time()
            except psutil.NoSuchProcess:
                continue
            self.stdout.write(f'{process.pid:>7}  {rss:>8.1f}  {_duration(uptime):>9}  {title}')
        status_file = status_file_for(options['pidfile'], options.get('status_file'))
        document = read_snapshot(status_file) if status_file else None
        if document and document.get('pid') == master.pid:
            self.stdout.write('')
            self.stdout.write('\n'.join(describe_snapshot(document, status_file)))


def describe_snapshot(document: dict, path: str) -> list[str]:
    """The master's status snapshot (carrot/run/status.py) as lines: its state, then one line per slot."""
    lines = [f"{_shown(document.get('state'))}, settings generation {_shown(document.get('generation'))}, "
             f"{_shown(document.get('restarts'))} restarts (from {path}, updated {_shown(document.get('updated'))})",
             f"{'SLOT':24}  {'PID':>7}  {'STATE':9}  {'AGE':>7}  {'RESTARTS':>8}  TASK / PROBLEM"]
    for slot in document.get('slots') or ():
        if not isinstance(slot, dict):
            continue
        age = slot.get('task_age')
        age = f'{age:.1f}s' if isinstance(age, (int, float)) and not isinstance(age, bool) else '-'
        what = slot.get('task') or slot.get('problem') or ''
        lines.append(f"{_shown(slot.get('name')):24}  {_shown(slot.get('pid')):>7}  {_shown(slot.get('state')):9}  "
                     f"{age:>7}  {_shown(slot.get('restarts')):>8}  {_shown(what, 80)}")
    return lines


def _shown(value, limit=40) -> str:
    """A snapshot value fit for a terminal: control characters escaped, long text cut to fit its column."""
    text = escape_controls('-' if value is None else str(value))
    return text if len(text) <= limit else text[:limit - 1] + '…'


def _duration(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
