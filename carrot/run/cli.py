"""carrot-supervisor: the prefork master that runs carrot's consumers, scheduler and housekeeping.

    carrot-supervisor --settings myproj.settings [--queues a,b] [--pidfile P] [--logfile L] ...

The master is the generic `supervisor.Arbiter`; this module reads the command line, sets up the log and
hands the Arbiter what each image builds (carrot.run.build.ImageBuilder). Exit codes are those of
supervisor/exitcodes.py (README.rst lists them with carrot's reasons); 2 is argparse's bad command line.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile

from supervisor import EXIT_BROKER, EXIT_CONFIG, Arbiter, Plan
from supervisor.procs import make_room_for_titles
from supervisor.signals import release_master_signals

from carrot import __version__
from carrot.run.build import ImageBuilder, SettingsSummary, SettingsUnreadable, read_settings
from carrot.run.logfile import LogFileError, LogFileHandler
from carrot.config.options import BY_NAME, SETTINGS, add_arguments, flag_value, status_file_for
from carrot.text import LogFormatter

LOG_FORMAT = '%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s'
PROC_NAME = 'carrot-supervisor'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROC_NAME, description='Run carrot consumers (one process per slot) and the scheduler.')
    parser.add_argument('--settings', help='Django settings module (default: $DJANGO_SETTINGS_MODULE)')
    parser.add_argument('--pythonpath', action='append', default=[],
                        help='a directory to add to sys.path (may repeat)')
    add_arguments(parser)  # the options shared with the manage.py commands (carrot/config/options.py)
    parser.add_argument('--check', action='store_true',
                        help='validate the settings and broker reachability, print the slot plan, and exit')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return parser


def configure_logging(args) -> logging.Handler:
    if args.logfile:
        # Watched: logrotate moving the file is noticed on the next line, USR1 or not. Created mode 0640,
        # never through a symlink (LogFileError): it holds task arguments.
        handler = LogFileHandler(args.logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(LOG_FORMAT))
    # The handler keeps --loglevel: loggers may be lower (a task's lines are kept for its MessageLog down to
    # CARROT['task_log_level']) without those lines reaching the supervisor's log.
    handler.setLevel(args.loglevel)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(args.loglevel)
    logging.getLogger('pika').setLevel(max(logging.WARNING, logging.getLevelName(args.loglevel)))
    return handler


def reopen_handler(handler: logging.Handler) -> None:
    if isinstance(handler, LogFileHandler):
        handler.reopen()


def describe(summary: SettingsSummary, plan: Plan) -> str:
    lines = ['queues:']
    for queue in summary.queues:
        lines.append(f'  {queue.name}: concurrency {queue.concurrency}, '
                     f'{"consumed" if queue.consumable else "not consumed"}, broker {queue.broker}')
    lines.append('slots:')
    lines += [f'  {slot.name}' for slot in plan.slots()]
    return '\n'.join(lines)


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
    make_room_for_titles()  # before os.environ changes below (PYTHONPATH, DJANGO_SETTINGS_MODULE)
    args = build_parser().parse_args(argv)
    for path in reversed(args.pythonpath):
        sys.path.insert(0, os.path.abspath(path))
    if args.pythonpath:
        # Any task that runs a Python subprocess should see the same path.
        os.environ['PYTHONPATH'] = os.pathsep.join(
            [os.path.abspath(p) for p in args.pythonpath] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    if '' not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like manage.py: the project is importable from where it runs
    try:
        handler = configure_logging(args)
    except LogFileError as exc:
        print(f'{PROC_NAME}: {exc}', file=sys.stderr)
        return EXIT_CONFIG
    log = logging.getLogger('carrot.supervisor')

    settings_module = args.settings or os.environ.get('DJANGO_SETTINGS_MODULE')
    if not settings_module:
        log.error('no settings: pass --settings myproj.settings or set DJANGO_SETTINGS_MODULE')
        return EXIT_CONFIG
    os.environ['DJANGO_SETTINGS_MODULE'] = settings_module

    if args.check:
        release_master_signals()  # no master loop will take them: Ctrl-C works as usual
        return check(builder_for(args, settings_module), settings_module)
    status_file = status_file_for(args.pidfile, args.status_file)
    if status_file is None:
        # Housekeeping copies the snapshot into the database, where the monitor's Workers tab shows it. With
        # no pidfile there is no agreed place for the file: a directory of this master's own, gone at exit.
        with private_status_file() as status_file:
            return supervise(args, settings_module, status_file, handler)
    return supervise(args, settings_module, status_file, handler)


def builder_for(args, settings_module: str, status_file: str | None = None) -> ImageBuilder:
    """What each image runs to build itself, from the command line (a flag not given is None: CARROT decides)."""
    return ImageBuilder(
        settings_module, {option.name: flag_value(args, option.name) for option in SETTINGS},
        no_scheduler=args.no_scheduler, loglevel=args.loglevel, status_file=status_file, autoreload=args.autoreload,
        queues=[q.strip() for q in args.queues.split(',') if q.strip()] if args.queues else None)


@contextlib.contextmanager
def private_status_file():
    # Mode 0700, a name nobody can predict; the pid in it says whose it is.
    directory = tempfile.mkdtemp(prefix=f'carrot-supervisor-{os.getpid()}-')
    try:
        yield os.path.join(directory, 'status.json')
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def supervise(args, settings_module: str, status_file: str, handler: logging.Handler) -> int:
    builder = builder_for(args, settings_module, status_file)
    flags = builder.flags

    # The master never imports the project: the image (carrot/run/build.py) reads the settings, and the
    # options below are replaced by the settings' (or the flags') values once it is up.
    arbiter = Arbiter(
        builder, title=f'master [{settings_module}]', proc_name=PROC_NAME,
        **{name: flags[name] if flags[name] is not None else BY_NAME[name].default for name in Arbiter.OPTIONS},
        pidfile=args.pidfile, status_file=status_file, status_extra={'settings': settings_module},
        reopen_logs=functools.partial(reopen_handler, handler), logger=logging.getLogger('carrot.supervisor'))
    return arbiter.run()


def run() -> None:
    sys.exit(main())

