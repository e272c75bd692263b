"""The other "carrot" (djangocarrot) used ``from carrot.utils import WorkerService``; it is here.

``WorkerService().start()`` runs carrot-supervisor for this project's settings in the foreground: it
returns when the supervisor stops, with its exit code. The supervisor is a process of its own (its master
must not have the project imported, and this process has); TERM, INT, HUP, USR1, TTIN and TTOU sent to
this process are passed on to it (it runs in a session of its own), so it can be run under systemd, in a
terminal (Ctrl-C stops it gracefully, a second Ctrl-C at once) or from a script. ``manage.py carrot-workers`` does the same from the command line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)


class WorkerService:
    """carrot-supervisor in the foreground. `options` are the supervisor's options by name, as
    ``manage.py carrot`` takes them (``queues='default,files'``, ``no_scheduler=True``, ``loglevel='DEBUG'``,
    ``logfile=...``, ``pidfile=...``)."""

    def __init__(self, settings: str | None = None, **options):
        self.settings = settings
        self.options = options
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        from carrot.management.commands.carrot import supervisor_argv

        settings_module = self.settings or os.environ.get('DJANGO_SETTINGS_MODULE')
        if not settings_module:
            raise RuntimeError('WorkerService needs the settings module: set DJANGO_SETTINGS_MODULE or pass '
                               'WorkerService(settings=...)')
        return supervisor_argv(settings_module, self.options)

    def start(self) -> int:
        """Run the supervisor until it stops; its exit code (0: a clean stop)."""
        from carrot.management.commands.carrot import python_path_for_children

        env = dict(os.environ, PYTHONPATH=python_path_for_children())
        # A session of its own: a terminal's Ctrl-C reaches this process alone, which passes it on once
        # (twice would be the supervisor's fast stop).
        self.process = subprocess.Popen(self.argv(), env=env, start_new_session=True)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED:
                previous[signum] = signal.signal(signum, self._forward)
        try:
            while True:
                try:
                    return self.process.wait()
                except KeyboardInterrupt:  # a signal handler other than ours (not the main thread)
                    self.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self) -> None:
        """Ask the supervisor for a graceful stop (as TERM does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def _forward(self, signum, frame) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


__all__ = ['WorkerService']
