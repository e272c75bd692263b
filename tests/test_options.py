"""Each supervisor option is declared once (carrot/config/options.py); the flags of carrot-supervisor and the
manage.py commands, the CARROT keys and README.rst's table all come from that declaration."""
import dataclasses
import os
import subprocess
import sys

import pytest
from django.core.management import load_command_class

from carrot.config import options
from carrot.run.cli import build_parser
from carrot.config import CarrotConfig, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.rst')
BEGIN, END = '.. BEGIN options table', '.. END options table'

MANAGE_COMMANDS = ('carrot', 'carrot-workers', 'carrot_daemon')


def readme_table():
    text = open(README).read()
    assert BEGIN in text and END in text, f'README.rst lost its {BEGIN!r} / {END!r} markers'
    block = text.split(BEGIN, 1)[1].split('\n', 1)[1].split(END, 1)[0]
    return block.strip('\n')


def manage_parser(name):
    return load_command_class('carrot', name).create_parser('manage.py', name)


def test_readme_options_table_is_the_declared_one():
    assert readme_table() == options.rst_table(), (
        'README.rst\'s options table differs from carrot/config/options.py: paste the output of '
        '`python -m carrot.config.options --rst` between its markers')


def test_python_m_carrot_options_rst_prints_the_table():
    result = subprocess.run([sys.executable, '-m', 'carrot.config.options', '--rst'], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip('\n') == options.rst_table()
    for option in options.OPTIONS:
        assert option.flag in result.stdout


def test_the_table_names_every_option_once():
    names = [o.name for o in options.OPTIONS]
    flags = [o.flag for o in options.OPTIONS]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    assert set(options.BY_NAME) == set(names)
    # The keys the brief and README promise the settings can give.
    assert {o.setting for o in options.SETTINGS} == {
        'graceful_timeout', 'heartbeat_timeout', 'task_time_limit', 'max_tasks_per_child',
        'max_memory_per_child', 'scheduler', 'max_consecutive_failures', 'backoff_cap'}


@pytest.mark.parametrize('command', MANAGE_COMMANDS)
def test_manage_py_commands_take_every_flag_as_carrot_supervisor_does(command):
    cli = build_parser()
    manage = manage_parser(command)
    argv = ['--pidfile', 'p.pid', '--logfile', 'l.log', '--status-file', 's.json', '--loglevel', 'debug', '--queues', 'a,b',
            '--no-scheduler', '--autoreload', '--graceful-timeout', '2.5', '--heartbeat-timeout', '9',
            '--task-time-limit', '4', '--max-tasks-per-child', '7', '--max-memory-per-child', '300',
            '--max-consecutive-failures', '3', '--backoff-cap', '1.5']
    extra = ['start'] if command == 'carrot_daemon' else []
    from_cli = vars(cli.parse_args(argv))
    from_manage = vars(manage.parse_args(extra + argv))
    for option in options.OPTIONS:
        assert from_manage[option.dest] == from_cli[option.dest], option.flag
    assert from_cli['loglevel'] == 'DEBUG' and from_cli['graceful_timeout'] == 2.5
    assert from_cli['max_tasks_per_child'] == 7 and from_cli['no_scheduler'] is True


def test_argv_for_hands_the_flags_on_unchanged():
    parser = build_parser()
    argv = ['--queues', 'a', '--no-scheduler', '--task-time-limit', '4', '--backoff-cap', '1.5']
    parsed = vars(parser.parse_args(argv))
    again = vars(parser.parse_args(options.argv_for(parsed)))
    assert {o.dest: again[o.dest] for o in options.OPTIONS} == {o.dest: parsed[o.dest] for o in options.OPTIONS}
    # Options not given are not passed on, so the master reads them from CARROT.
    assert '--graceful-timeout' not in options.argv_for(parsed)
    assert options.argv_for(vars(parser.parse_args([]))) == ['--loglevel', 'INFO']


@pytest.mark.parametrize('argv', [['--graceful-timeout', '0'], ['--max-tasks-per-child', '-1'],
                                  ['--backoff-cap', 'soon'], ['--loglevel', 'loud']])
def test_bad_flag_values_are_refused_by_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_flags_without_a_value_leave_the_setting_in_charge():
    args = build_parser().parse_args([])
    for option in options.SETTINGS:
        assert options.flag_value(args, option.name) is None, option.flag
    args = build_parser().parse_args(['--no-scheduler', '--graceful-timeout', '3'])
    assert options.flag_value(args, 'scheduler') is False
    assert options.flag_value(args, 'graceful_timeout') == 3.0


def test_carrot_config_has_each_setting_with_its_declared_default():
    fields = {f.name: f for f in dataclasses.fields(CarrotConfig)}
    config, problems = parse_config({})
    assert problems == []
    for option in options.SETTINGS:
        assert option.setting in fields, option.setting
        assert getattr(config, option.setting) == option.default, option.setting
    assert options.settings_values(config) == {o.name: o.default for o in options.SETTINGS}


def test_carrot_settings_are_parsed_and_checked_as_declared():
    good = {'graceful_timeout': 5, 'heartbeat_timeout': 2.5, 'task_time_limit': None,
            'max_tasks_per_child': 100, 'max_memory_per_child': 256, 'scheduler': False,
            'max_consecutive_failures': 4, 'backoff_cap': 12}
    config, problems = parse_config(good)
    assert problems == []
    assert options.settings_values(config) == good

    bad = {'graceful_timeout': 0, 'heartbeat_timeout': 'long', 'task_time_limit': -1,
           'max_tasks_per_child': 1.5, 'max_memory_per_child': True, 'scheduler': 'yes',
           'max_consecutive_failures': None, 'backoff_cap': [1]}
    config, problems = parse_config(bad)
    assert sorted(p.id for p in problems) == ['carrot.E003'] * len(bad)
    for key in bad:
        assert any(f"CARROT['{key}']" in p.message for p in problems), key
    # Bad values fall back to the declared defaults, so the rest of the config stays usable.
    assert options.settings_values(config) == {o.name: o.default for o in options.SETTINGS}


def test_optional_settings_accept_none_and_the_others_do_not():
    for option in options.SETTINGS:
        problems = parse_config({option.setting: None})[1]
        assert (problems == []) == option.optional, (option.setting, problems)


def test_the_status_file_is_beside_the_pidfile_unless_given():
    assert options.status_file_for('/run/carrot/carrot.pid') == '/run/carrot/carrot.status.json'
    assert options.status_file_for('/run/carrot/master') == '/run/carrot/master.status.json'
    assert options.status_file_for('/run/carrot.pid', '/tmp/s.json') == '/tmp/s.json'
    assert options.status_file_for(None) is None
