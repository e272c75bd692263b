"""Reading the settings for the supervisor master, which never imports the project itself.

The master must stay free of Django, the project's code and any socket, so that every child it forks
imports the project fresh (a HUP then runs edited code) and inherits no connection. So the settings are
read in a short-lived forked process that sets Django up, validates CARROT, optionally tries each broker,
and sends back a small JSON summary over a pipe. A settings file broken by an edit only breaks that
throwaway process.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

from supervisor.child import die_with_parent

READ_TIMEOUT = 120.0  # a settings module that imports for longer than this is treated as broken


class SettingsUnreadable(Exception):
    """The settings could not be read, or CARROT is invalid; the text lists every reason."""


@dataclass(frozen=True)
class QueueSummary:
    name: str
    concurrency: int
    consumable: bool
    broker: str  # masked URL


@dataclass(frozen=True)
class SettingsSummary:
    """What the master needs from the settings: the queues and CARROT's supervisor defaults."""
    queues: tuple[QueueSummary, ...]
    options: dict
    broker_errors: tuple[str, ...] = field(default=())

    def queue(self, name: str) -> QueueSummary | None:
        return next((q for q in self.queues if q.name == name), None)


def read_settings(settings_module: str, check_brokers: bool = False) -> SettingsSummary:
    """Summarise `settings_module` from a throwaway child process; SettingsUnreadable on any problem."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the throwaway child
        code = 1
        try:
            # Like the supervisor's children, die with the master (found by a test: a master SIGKILLed
            # during a HUP left this process running for as long as the settings took to import).
            die_with_parent()
            os.close(read_fd)
            code = _summarise_in_child(settings_module, check_brokers, write_fd)
        finally:
            # Never unwind into the caller's frames: an exception here (the pipe broken because the
            # master died, say) would otherwise return into the master's HUP handler, and this process
            # would carry on as a second master (found by a test).
            os._exit(code)
    os.close(write_fd)
    try:
        payload = _read_all(read_fd, pid)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    try:
        data = json.loads(payload.decode() or '{}')
    except ValueError:
        data = {}
    if 'problems' in data and data['problems']:
        raise SettingsUnreadable('\n'.join(data['problems']))
    if 'queues' not in data:
        raise SettingsUnreadable(f'reading settings {settings_module} failed without saying why')
    return SettingsSummary(
        queues=tuple(QueueSummary(**q) for q in data['queues']),
        options=data['options'], broker_errors=tuple(data.get('broker_errors', ())))


def _read_all(fd: int, pid: int) -> bytes:
    chunks, deadline = [], time.monotonic() + READ_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            raise SettingsUnreadable(f'reading the settings took longer than {READ_TIMEOUT:.0f}s')
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b''.join(chunks)
            chunks.append(chunk)


def _summarise_in_child(settings_module: str, check_brokers: bool, write_fd: int) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)  # the master's handlers would wake the master
    signal.set_wakeup_fd(-1)  # ... and so would its wakeup fd (the master's self-pipe), inherited by fork
    try:
        data = summarise(settings_module, check_brokers)
        code = 0
    except BaseException as exc:  # whatever a broken settings module raises, report it
        frames = traceback.extract_tb(exc.__traceback__)
        where = f' (at {frames[-1].filename}:{frames[-1].lineno})' if frames else ''
        data = {'problems': [f'cannot load settings {settings_module}: {type(exc).__name__}: {exc}{where}']}
        code = 1
    with os.fdopen(write_fd, 'wb') as pipe:
        pipe.write(json.dumps(data).encode())
    sys.stdout.flush(), sys.stderr.flush()
    return code


def summarise(settings_module: str, check_brokers: bool) -> dict:
    """Set Django up with `settings_module` and describe CARROT (runs in the throwaway child)."""
    os.environ['DJANGO_SETTINGS_MODULE'] = settings_module
    import django
    django.setup()
    from carrot.checks import run_carrot_checks
    from carrot.config import config_from_settings
    from carrot.options import settings_values
    from django.conf import settings

    config, _ = config_from_settings(settings)
    problems = [f'{e.id}: {e.msg}' for e in run_carrot_checks()]
    if problems:
        return {'problems': problems}
    data = {
        'queues': [dict(name=q.name, concurrency=q.concurrency, consumable=q.consumable, broker=str(q.broker))
                   for q in config.queues],
        'options': settings_values(config),
    }
    if check_brokers:
        data['broker_errors'] = broker_errors(config)
    return data


def broker_errors(config) -> list[str]:
    """Try every broker a consumer or the scheduler would use; one line per unreachable broker."""
    from carrot.broker import connect

    errors = []
    brokers = {q.broker for q in config.consumable_queues} | {config.default_broker}
    for broker in sorted(brokers, key=str):
        try:
            connect(broker).close()
        except Exception as exc:
            errors.append(f'broker {broker} is unreachable: {type(exc).__name__}: {exc or "no answer"}')
    return errors
