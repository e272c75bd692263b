"""manage.py carrot_daemon start|stop|restart|status: carrot-supervisor as a background daemon.

For servers without systemd; under systemd use scripts/carrot-supervisor.service instead.
"""
import os
import signal
import subprocess
import sys
import time

import psutil
from django.core.management.base import BaseCommand, CommandError

from carrot.options import add_arguments
from carrot.management.commands.carrot import python_path_for_children, supervisor_argv

DEFAULT_PIDFILE = 'carrot.pid'
DEFAULT_LOGFILE = 'carrot.log'
START_TIMEOUT = 30.0


def read_pid(pidfile):
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


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

    def start(self, options):
        pidfile = options['pidfile']
        pid = read_pid(pidfile)
        if pid:
            raise CommandError(f'carrot is already running (pid {pid}, pidfile {pidfile})')
        argv = supervisor_argv(os.environ['DJANGO_SETTINGS_MODULE'], options)
        env = dict(os.environ, PYTHONPATH=python_path_for_children())
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if read_pid(pidfile) == process.pid:
                self.stdout.write(f'carrot started (pid {process.pid}); logging to {options["logfile"]}')
                return
            if process.poll() is not None:
                raise CommandError(f'carrot-supervisor exited with code {process.returncode}; see '
                                   f'{options["logfile"]}')
            time.sleep(0.1)
        raise CommandError(f'carrot-supervisor (pid {process.pid}) did not write {pidfile} within '
                           f'{START_TIMEOUT:.0f}s; see {options["logfile"]}')

    def stop(self, options):
        pidfile = options['pidfile']
        pid = read_pid(pidfile)
        if not pid:
            self.stdout.write(f'carrot is not running (no live pid in {pidfile})')
            return
        os.kill(pid, signal.SIGQUIT if options['hard'] else signal.SIGTERM)
        timeout = options['timeout'] or (options.get('graceful_timeout') or 30) + 15
        try:
            psutil.Process(pid).wait(timeout=timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            raise CommandError(f'carrot (pid {pid}) did not stop within {timeout:.0f}s')
        self.stdout.write(f'carrot stopped (pid {pid})')

    def restart(self, options):
        self.stop(options)
        self.start(options)

    def status(self, options):
        pid = read_pid(options['pidfile'])
        if not pid:
            self.stdout.write(f'carrot is not running (no live pid in {options["pidfile"]})')
            sys.exit(3)  # the LSB status code for "not running"
        master = psutil.Process(pid)
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


def _duration(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
