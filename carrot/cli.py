"""carrot-supervisor: the prefork master that runs carrot's consumers and scheduler.

    carrot-supervisor --settings myproj.settings [--queues a,b] [--pidfile P] [--logfile L] ...

Exit codes (also in README.rst):
    0  stopped cleanly
    2  bad command line (argparse)
    3  bad configuration: no settings module, settings that do not import, an invalid CARROT
    4  a broker was unreachable at start
    5  the pidfile is held by a live master (or cannot be written)
    6  every slot was parked: its children kept crashing (see the log for why)
"""
from __future__ import annotations

import argparse
import functools
import logging
import logging.handlers
import os
import sys

from supervisor import EXIT_BROKER, EXIT_CONFIG, Arbiter, Plan

from carrot import __version__
from carrot.image import ImageBuilder, SettingsSummary, SettingsUnreadable, read_settings

LOG_FORMAT = '%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s'
PROC_NAME = 'carrot-supervisor'


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'must be positive, got {text}')
        return value
    parse.__name__ = kind.__name__
    return parse


# The flags that shape what the master runs, shared with `manage.py carrot` and `carrot_daemon`.
WORKER_OPTIONS = (
    ('--pidfile', dict(help='write the master pid here; refuse to start if a live master holds it')),
    ('--logfile', dict(help='append logs here instead of stderr (reopened on USR1 and rotation)')),
    ('--loglevel', dict(default='INFO', type=str.upper, choices=['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'])),
    ('--no-scheduler', dict(action='store_true', help='run no scheduler child')),
    ('--queues', dict(help='consume only these queues (comma-separated names)')),
    ('--graceful-timeout', dict(type=_positive(float), metavar='SECONDS',
                                help='on TERM, wait this long for tasks in hand before killing (default 30)')),
    ('--max-tasks-per-child', dict(type=_positive(int), metavar='N', help='replace a consumer after about N tasks')),
    ('--max-memory-per-child', dict(type=_positive(int), metavar='MiB',
                                    help='replace a consumer after a task once it has grown by this much')),
    ('--task-time-limit', dict(type=_positive(float), metavar='SECONDS',
                               help='fail a task that runs longer, and replace its worker')),
    ('--status-file', dict(metavar='PATH', help='write the status snapshot (JSON) here (default: beside the '
                                                'pidfile, <pidfile without .pid>.status.json)')),
    ('--autoreload', dict(action='store_true', help='development: reload when a Python file of the project '
                                                    'changes (Django\'s autoreloader)')),
    ('--heartbeat-timeout', dict(type=_positive(float), metavar='SECONDS',
                                 help='kill a child that shows no sign of life for this long (default 60)')),
    ('--max-consecutive-failures', dict(type=_positive(int), metavar='N',
                                        help='stop (exit code 6) when one slot has died young N times in a row '
                                             '(default 10)')),
    ('--backoff-cap', dict(type=_positive(float), metavar='SECONDS',
                           help='longest wait before restarting a slot that keeps dying young (default 30)')),
)


def add_worker_options(parser) -> None:
    for flag, options in WORKER_OPTIONS:
        parser.add_argument(flag, **options)


def worker_options_argv(options: dict) -> list[str]:
    """The flags for parsed WORKER_OPTIONS values (how manage.py commands hand them to the master)."""
    argv = []
    for flag, _ in WORKER_OPTIONS:
        value = options.get(flag[2:].replace('-', '_'))
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROC_NAME, description='Run carrot consumers (one process per slot) and the scheduler.')
    parser.add_argument('--settings', help='Django settings module (default: $DJANGO_SETTINGS_MODULE)')
    parser.add_argument('--pythonpath', action='append', default=[],
                        help='a directory to add to sys.path (may repeat)')
    add_worker_options(parser)
    parser.add_argument('--check', action='store_true',
                        help='validate the settings and broker reachability, print the slot plan, and exit')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return parser


def configure_logging(args) -> logging.Handler:
    if args.logfile:
        # Watched: logrotate moving the file is noticed on the next line, USR1 or not.
        handler = logging.handlers.WatchedFileHandler(args.logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(args.loglevel)
    logging.getLogger('pika').setLevel(max(logging.WARNING, logging.getLevelName(args.loglevel)))
    return handler


def reopen_handler(handler: logging.Handler) -> None:
    if isinstance(handler, logging.FileHandler):
        handler.acquire()
        try:
            if handler.stream:
                handler.stream.close()
            handler.stream = handler._open()
        finally:
            handler.release()


def describe(summary: SettingsSummary, plan: Plan) -> str:
    lines = ['queues:']
    for queue in summary.queues:
        lines.append(f'  {queue.name}: concurrency {queue.concurrency}, '
                     f'{"consumed" if queue.consumable else "not consumed"}, broker {queue.broker}')
    lines.append('slots:')
    lines += [f'  {slot.name}' for slot in plan.slots()]
    return '\n'.join(lines)


def status_file_for(args) -> str | None:
    if args.status_file:
        return os.path.abspath(args.status_file)
    if args.pidfile:
        root, ext = os.path.splitext(os.path.abspath(args.pidfile))
        return f'{root if ext == ".pid" else root + ext}.status.json'
    return None


def check(builder: ImageBuilder, settings_module: str) -> int:
    """--check: read the settings here, try the brokers, print the plan."""
    try:
        summary = read_settings(settings_module, check_brokers=True, loglevel=builder.loglevel)
        plan = builder.plan_for(summary)
    except SettingsUnreadable as exc:
        print(f'configuration errors:\n{exc}')
        return EXIT_CONFIG
    print(f'settings: {settings_module}\n{describe(summary, plan)}')
    if summary.broker_errors:
        print('broker errors:\n' + '\n'.join(f'  {e}' for e in summary.broker_errors))
        return EXIT_BROKER
    print('ok')
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in reversed(args.pythonpath):
        sys.path.insert(0, os.path.abspath(path))
    if args.pythonpath:
        # Any task that runs a Python subprocess should see the same path.
        os.environ['PYTHONPATH'] = os.pathsep.join(
            [os.path.abspath(p) for p in args.pythonpath] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    if '' not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like manage.py: the project is importable from where it runs
    handler = configure_logging(args)
    log = logging.getLogger('carrot.supervisor')

    settings_module = args.settings or os.environ.get('DJANGO_SETTINGS_MODULE')
    if not settings_module:
        log.error('no settings: pass --settings myproj.settings or set DJANGO_SETTINGS_MODULE')
        return EXIT_CONFIG
    os.environ['DJANGO_SETTINGS_MODULE'] = settings_module

    status_file = status_file_for(args)
    flags = {name: getattr(args, name, None) for name in (
        'graceful_timeout', 'heartbeat_timeout', 'max_consecutive_failures', 'backoff_cap', 'task_time_limit',
        'max_tasks_per_child', 'max_memory_per_child')}
    builder = ImageBuilder(
        settings_module, flags, no_scheduler=args.no_scheduler, loglevel=args.loglevel, status_file=status_file,
        autoreload=args.autoreload,
        queues=[q.strip() for q in args.queues.split(',') if q.strip()] if args.queues else None)
    if args.check:
        return check(builder, settings_module)

    # The master never imports the project: the image (carrot/image.py) reads the settings, and the
    # options below are replaced by the settings' (or the flags') values once it is up.
    arbiter = Arbiter(
        builder, title=f'master [{settings_module}]', proc_name=PROC_NAME,
        graceful_timeout=args.graceful_timeout or 30.0, heartbeat_timeout=args.heartbeat_timeout or 60.0,
        max_consecutive_failures=args.max_consecutive_failures or 10, backoff_cap=args.backoff_cap or 30.0,
        pidfile=args.pidfile, status_file=status_file, status_extra={'settings': settings_module},
        reopen_logs=functools.partial(reopen_handler, handler), logger=logging.getLogger('carrot.supervisor'))
    return arbiter.run()


def run() -> None:
    sys.exit(main())


if __name__ == '__main__':
    run()
