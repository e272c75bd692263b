"""carrot-supervisor: the prefork master that runs carrot's consumers and scheduler.

    carrot-supervisor --settings myproj.settings [--queues a,b] [--pidfile P] [--logfile L] ...

Exit codes (also in README.rst):
    0  stopped cleanly
    2  bad command line (argparse)
    3  bad configuration: no settings module, settings that do not import, an invalid CARROT, carrot's
       tables missing (run manage.py migrate), a log file that is a symlink or cannot be opened
    4  a broker was unreachable at start
    5  the pidfile is held by a live master (or cannot be written)
    6  a slot's children kept crashing (see the log for why)
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from supervisor import EXIT_BROKER, EXIT_CONFIG, Arbiter, Plan, SlotGroup

from carrot import __version__
from carrot.logfile import LogFileError, LogFileHandler
from carrot.options import add_arguments, flag_value
from carrot.planner import SettingsSummary, SettingsUnreadable, read_settings
from carrot.worker import WorkerOptions, consumer_main, scheduler_main

LOG_FORMAT = '%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s'
PROC_NAME = 'carrot-supervisor'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROC_NAME, description='Run carrot consumers (one process per slot) and the scheduler.')
    parser.add_argument('--settings', help='Django settings module (default: $DJANGO_SETTINGS_MODULE)')
    parser.add_argument('--pythonpath', action='append', default=[],
                        help='a directory to add to sys.path (may repeat)')
    add_arguments(parser)  # the options shared with the manage.py commands (carrot/options.py)
    parser.add_argument('--check', action='store_true',
                        help='validate the settings and broker reachability, print the slot plan, and exit')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return parser


class Supervisor:
    """Turns the settings and the flags into the arbiter's plan and options."""

    def __init__(self, args: argparse.Namespace, settings_module: str):
        self.args = args
        self.settings_module = settings_module
        self.queue_filter = [q.strip() for q in args.queues.split(',') if q.strip()] if args.queues else None
        self.first_summary: SettingsSummary | None = None

    def option(self, summary: SettingsSummary, name: str):
        flag = flag_value(self.args, name)
        return flag if flag is not None else summary.options[name]

    def plan_for(self, summary: SettingsSummary) -> Plan:
        queues = [q for q in summary.queues if q.consumable]
        if self.queue_filter is not None:
            unknown = [name for name in self.queue_filter if summary.queue(name) is None]
            if unknown:
                raise SettingsUnreadable(f"--queues names queues that are not in CARROT['queues']: "
                                         f"{', '.join(unknown)}")
            queues = [summary.queue(name) for name in self.queue_filter]
        options = WorkerOptions(
            settings_module=self.settings_module, loglevel=self.args.loglevel,
            task_time_limit=self.option(summary, 'task_time_limit'),
            max_tasks_per_child=self.option(summary, 'max_tasks_per_child'),
            max_memory_per_child=self.option(summary, 'max_memory_per_child'))
        groups = [SlotGroup(f'consumer {q.name}', q.concurrency, functools.partial(consumer_main, q.name, options),
                            scalable=True, fingerprint=q) for q in queues]
        if self.option(summary, 'scheduler'):
            groups.append(SlotGroup('scheduler', 1, functools.partial(scheduler_main, options), numbered=False))
        return Plan(tuple(groups))

    def load_plan(self) -> Plan:
        """The arbiter's load_plan: the settings read at start the first time, afresh on every HUP."""
        summary, self.first_summary = self.first_summary, None
        if summary is None:
            summary = read_settings(self.settings_module)
        return self.plan_for(summary)


def configure_logging(args) -> logging.Handler:
    if args.logfile:
        # Watched: logrotate moving the file is noticed on the next line, USR1 or not. Created mode 0640,
        # never through a symlink (LogFileError): it holds task arguments.
        handler = LogFileHandler(args.logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in reversed(args.pythonpath):
        sys.path.insert(0, os.path.abspath(path))
    if args.pythonpath:
        # Children fork from this process, but the throwaway settings reader and any task that runs
        # a Python subprocess should see the same path.
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

    supervisor = Supervisor(args, settings_module)
    try:
        summary = read_settings(settings_module, check_brokers=True)
        plan = supervisor.plan_for(summary)
    except SettingsUnreadable as exc:
        log.error('%s', exc)
        if args.check:
            print(f'configuration errors:\n{exc}')
        return EXIT_CONFIG
    if args.check:
        print(f'settings: {settings_module}\n{describe(summary, plan)}')
    for error in summary.broker_errors:
        log.error('%s', error)
    if summary.broker_errors:
        if args.check:
            print('broker errors:\n' + '\n'.join(f'  {e}' for e in summary.broker_errors))
        return EXIT_BROKER
    if args.check:
        print('ok')
        return 0

    supervisor.first_summary = summary
    arbiter = Arbiter(
        supervisor.load_plan, title=f'master [{settings_module}]', proc_name=PROC_NAME,
        graceful_timeout=supervisor.option(summary, 'graceful_timeout'),
        heartbeat_timeout=supervisor.option(summary, 'heartbeat_timeout'),
        max_consecutive_failures=supervisor.option(summary, 'max_consecutive_failures'),
        backoff_cap=supervisor.option(summary, 'backoff_cap'),
        pidfile=args.pidfile, reopen_logs=functools.partial(reopen_handler, handler),
        logger=logging.getLogger('carrot.supervisor'))
    return arbiter.run()


def run() -> None:
    sys.exit(main())


if __name__ == '__main__':
    run()
