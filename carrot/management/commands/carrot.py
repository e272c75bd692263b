"""manage.py carrot: run carrot-supervisor in the foreground with this project's settings.

The process replaces itself with the supervisor (same pid, so signals and systemd work as for
carrot-supervisor): the master must not have the project imported, and manage.py has imported it.
"""
import os
import sys

from django.core.management.base import BaseCommand

from carrot.config.options import add_arguments, argv_for


def supervisor_argv(settings_module, options):
    """The carrot-supervisor command line for these options (this interpreter, no hard-coded paths)."""
    argv = [sys.executable, '-m', 'carrot.cli', '--settings', settings_module, *argv_for(options)]
    if options.get('check'):
        argv.append('--check')
    return argv


def python_path_for_children():
    """The paths manage.py made importable (its own directory above all), for the new process."""
    paths = [p for p in sys.path if p]
    existing = os.environ.get('PYTHONPATH')
    return os.pathsep.join(paths + ([existing] if existing else []))


class Command(BaseCommand):
    help = 'Run the carrot supervisor (consumers and scheduler) in the foreground.'
    requires_system_checks = []

    def add_arguments(self, parser):
        add_arguments(parser)
        parser.add_argument('--check', action='store_true', help='validate settings, database tables and brokers, print the slot plan, then exit')

    def handle(self, *args, **options):
        settings_module = os.environ['DJANGO_SETTINGS_MODULE']
        env = dict(os.environ, PYTHONPATH=python_path_for_children())
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, supervisor_argv(settings_module, options), env)
