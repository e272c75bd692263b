"""Every option of carrot-supervisor, declared once.

One table, `OPTIONS`, says for each option its name, command-line flag, `CARROT` key (if the settings
can give its default), kind, default and help. From it come:

- the flags of `carrot-supervisor` and of `manage.py carrot`, `carrot-workers` and `carrot_daemon`
  (`add_arguments`), and the command line a manage.py command hands to the master (`argv_for`);
- the supervisor keys of the `CARROT` setting: `SupervisorSettings`, the frozen dataclass that
  `carrot.config.CarrotConfig` extends, and the parsing of those keys in carrot/config.py;
- the options table in README.rst (`rst_table`, printed by `python -m carrot.config.options --rst`;
  tests/test_options.py fails when README.rst's copy differs).

A flag given on the command line wins over the `CARROT` key of the same name. This module imports
nothing from Django or pika: the master uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Kind:
    """What values an option takes, on the command line and in `CARROT`."""
    name: str
    metavar: str | None
    convert: Callable[[str], Any] | None  # command-line text -> value (argparse's type)
    python_type: Any                       # the SupervisorSettings field's type
    validator: str | None = None           # the carrot.config parser method that checks a CARROT value


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'must be positive, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid <name> value"
    return parse


LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')

SECONDS = Kind('seconds', 'SECONDS', _positive(float), float, 'positive_number')
COUNT = Kind('count', 'N', _positive(int), int, 'positive_int')
MEBIBYTES = Kind('mebibytes', 'MiB', _positive(int), int, 'positive_int')
SWITCH = Kind('switch', None, None, bool, 'boolean')  # a flag without a value
PATH = Kind('path', 'PATH', str, str)
NAMES = Kind('names', 'a,b', str, str)
LEVEL = Kind('level', 'LEVEL', str.upper, str)


@dataclass(frozen=True)
class Option:
    name: str
    flag: str
    kind: Kind
    help: str
    default: Any = None
    setting: str | None = None  # the CARROT key that gives the default, if any
    optional: bool = False      # the CARROT key may be None (the limit is off)

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value under (`--no-scheduler` -> `no_scheduler`)."""
        return self.flag[2:].replace('-', '_')

    @property
    def negates(self) -> bool:
        """A `--no-...` switch turns off a setting that is on by default."""
        return self.kind is SWITCH and self.flag.startswith('--no-')

    @property
    def choices(self):
        return LOG_LEVELS if self.kind is LEVEL else None

    def argument(self) -> dict:
        """`add_argument` keywords for this option."""
        if self.kind is SWITCH:
            return dict(action='store_true', help=_escape(self.help))
        # An option that CARROT can set has no argparse default: "not given" must stay None so that
        # the setting applies.
        return dict(type=self.kind.convert, metavar=self.kind.metavar, choices=self.choices,
                    default=None if self.setting else self.default, help=_escape(self._help_with_default()))

    def _help_with_default(self) -> str:
        if self.setting:
            shown = 'off' if self.default is None else _plain(self.default)
            return f"{self.help} (default: CARROT['{self.setting}'], else {shown})"
        if self.default is not None:
            return f'{self.help} (default: {self.default})'
        return self.help


def _plain(value) -> str:
    return f'{value:g}' if isinstance(value, float) else str(value)  # 30.0 -> '30'


def _escape(text: str) -> str:
    return text.replace('%', '%%')  # argparse %-formats help texts


OPTIONS: tuple[Option, ...] = (
    Option('pidfile', '--pidfile', PATH,
           'write the master pid here; refuse to start while a live master holds it'),
    Option('logfile', '--logfile', PATH,
           'append logs here instead of stderr; created with mode 0640 (it holds task arguments), never '
           'through a symlink; reopened on USR1 and when logrotate moves it'),
    Option('status_file', '--status-file', PATH,
           'write the status snapshot (JSON) here; default: beside the pidfile, <pidfile without .pid>'
           '.status.json (none without a pidfile)'),
    Option('loglevel', '--loglevel', LEVEL, 'DEBUG, INFO, WARNING, ERROR or CRITICAL', default='INFO'),
    Option('queues', '--queues', NAMES, 'consume only these queues (comma-separated names)'),
    Option('scheduler', '--no-scheduler', SWITCH,
           'run no scheduler child (in CARROT: False runs none)',
           default=True, setting='scheduler'),
    Option('autoreload', '--autoreload', SWITCH,
           "development: reload when a Python file of the project changes (Django's autoreloader)"),
    Option('graceful_timeout', '--graceful-timeout', SECONDS,
           'on TERM, how long to wait for the tasks in hand before killing their children',
           default=30.0, setting='graceful_timeout'),
    Option('heartbeat_timeout', '--heartbeat-timeout', SECONDS,
           'kill and replace a child that shows no sign of life for this long',
           default=60.0, setting='heartbeat_timeout'),
    Option('task_time_limit', '--task-time-limit', SECONDS,
           'fail a task still running after this long (FAILED, dead-lettered, its worker replaced)',
           setting='task_time_limit', optional=True),
    Option('max_tasks_per_child', '--max-tasks-per-child', COUNT,
           'replace a consumer after about N tasks (N to N+10%, so they do not all go at once)',
           setting='max_tasks_per_child', optional=True),
    Option('max_memory_per_child', '--max-memory-per-child', MEBIBYTES,
           'replace a consumer after a task once it has grown by this much since it started',
           setting='max_memory_per_child', optional=True),
    Option('max_consecutive_failures', '--max-consecutive-failures', COUNT,
           'park a slot that has died young N times in a row (retried with a backoff of up to 60 s, the '
           'other slots run on); exit code 6 only when every slot is parked',
           default=10, setting='max_consecutive_failures'),
    Option('backoff_cap', '--backoff-cap', SECONDS,
           'the longest wait before restarting a slot that keeps dying young',
           default=30.0, setting='backoff_cap'),
)

BY_NAME = {option.name: option for option in OPTIONS}
SETTINGS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.setting)


def _settings_field(option: Option):
    python_type = option.kind.python_type | None if option.optional else option.kind.python_type
    return option.setting, python_type, dataclasses.field(default=option.default)


# The supervisor's keys of the CARROT setting, with their defaults; carrot.config.CarrotConfig extends it.
SupervisorSettings = dataclasses.make_dataclass(
    'SupervisorSettings', [_settings_field(option) for option in SETTINGS], frozen=True)
SupervisorSettings.__module__ = __name__  # make_dataclass's module= is Python 3.12+
SupervisorSettings.__doc__ = 'The CARROT keys that give carrot-supervisor its defaults (carrot.config.options).'


def add_arguments(parser) -> None:
    """Add every option's flag to an argparse parser (carrot-supervisor's or a manage.py command's)."""
    for option in OPTIONS:
        parser.add_argument(option.flag, dest=option.dest, **option.argument())


def argv_for(values: dict) -> list[str]:
    """The flags for parsed option values keyed by dest (how manage.py commands hand them on)."""
    argv = []
    for option in OPTIONS:
        value = values.get(option.dest)
        if value is True and option.kind is SWITCH:
            argv.append(option.flag)
        elif value is not None and value is not False:
            argv += [option.flag, str(value)]
    return argv


def status_file_for(pidfile: str | None, status_file: str | None = None) -> str | None:
    """Where a master's status snapshot is: --status-file, else beside the pidfile (carrot.pid ->
    carrot.status.json), else nowhere."""
    if status_file:
        return os.path.abspath(status_file)
    if pidfile:
        root, ext = os.path.splitext(os.path.abspath(pidfile))
        return f'{root if ext == ".pid" else root + ext}.status.json'
    return None


def settings_values(config) -> dict:
    """{name: value} of the supervisor keys of a parsed CARROT (what the master needs from it)."""
    return {option.name: getattr(config, option.setting) for option in SETTINGS}


def flag_value(args, name: str):
    """The value the command line gave option `name`, or None if it gave none."""
    option = BY_NAME[name]
    value = getattr(args, option.dest, None)
    if option.kind is SWITCH:
        return (not option.negates) if value else None
    return value


# -- README.rst ---------------------------------------------------------------------------------------

MEANING_WIDTH = 64


def _cell_flag(option: Option) -> str:
    metavar = f' {option.kind.metavar}' if option.kind.metavar else ''
    return f'``{option.flag}{metavar}``'


def _cell_default(option: Option, rst=False) -> str:
    if option.default is None:
        return ('``None``' if rst else 'None') if option.setting else ''
    return _plain(option.default)


def rst_table() -> str:
    """README.rst's table of the options: flag, CARROT key, default, meaning (an RST simple table)."""
    header = ('flag', '``CARROT`` key', 'default', 'meaning')
    rows = []
    for option in OPTIONS:
        meaning = textwrap.wrap(option.help, MEANING_WIDTH, break_on_hyphens=False)
        rows.append((_cell_flag(option), f'``{option.setting}``' if option.setting else '',
                     _cell_default(option, rst=True), meaning[0]))
        # A line whose first column is blank continues the row above it.
        rows += [('', '', '', line) for line in meaning[1:]]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    border = ' '.join('=' * width for width in widths)

    def line(cells):
        return ' '.join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return '\n'.join([border, line(header), border, *map(line, rows), border])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m carrot.config.options',
                                     description="carrot-supervisor's options, declared once")
    parser.add_argument('--rst', action='store_true', help="print README.rst's options table")
    args = parser.parse_args(argv)
    if args.rst:
        print(rst_table())
    else:
        for option in OPTIONS:
            print(f"{option.flag:28} {option.setting or '-':26} {_cell_default(option) or '-':8} {option.help}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
