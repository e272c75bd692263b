"""Fault scenarios against real, private RabbitMQ and PostgreSQL instances (issue 6 §9).

Run through `scripts/chaos` (which makes sure the virtualenv exists). Every scenario starts one or two
`carrot-supervisor` processes on a private RabbitMQ node (port 5673) and a private PostgreSQL cluster
(port 5433) that this script creates, stops, starts and finally removes -- the shared services on
5672/5432 are never touched. Tasks record each execution as one line in a file (task, token, pid), so
duplicates are measured, not assumed.

Per scenario the table shows: messages published, rows COMPLETED, executions recorded, lost (a message
that should have run and never did), duplicated executions allowed (the earlier execution's worker was
killed mid-task -- the documented at-least-once window) and unallowed (anything else), and wall time.
Exit status: 0 when no scenario lost a message, ran one twice without cause, or broke; 1 otherwise.

    scripts/chaos              all scenarios (about 12 minutes)
    scripts/chaos --short      a subset (under 3 minutes; part of .ci/run through tests/test_chaos.py)
    scripts/chaos -k rabbit    scenarios whose name contains "rabbit"
    scripts/chaos --list       the scenario names
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cluster import Cluster  # scripts/cluster.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = 'tests.testproject.settings'
RABBIT_NODE = 'carrot-chaos@localhost'
RABBIT_PORT = 5673
RABBIT_DIST_PORT = 25673
CLUSTER_PORT = 5686  # the quorum scenario's cluster: 5686-5688 (scripts/cluster.py)
PG_PORT = 5433
DB_NAME = 'carrot_chaos'
RECORD = 'tests.testapp.tasks.record_execution'
RECORD_AND_DIE = 'tests.testapp.tasks.record_and_die'
TITLE = 'carrot-supervisor: '


class ChaosError(Exception):
    """A scenario could not be carried out (a service did not start, a wait ran out)."""


def log(text: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {text}', flush=True)


def run(cmd, timeout=120, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ChaosError(f'{" ".join(map(str, cmd))} exited {result.returncode}: {result.stderr[-2000:]}'
                         f'{result.stdout[-2000:]}')
    return result


def wait_until(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ChaosError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


# -- private services -------------------------------------------------------------------------------

class PrivateRabbit:
    """A RabbitMQ node of our own (carrot-chaos@localhost on 5673), data in a temp dir."""

    def __init__(self, base: Path):
        self.base = base
        self.env = None

    def start(self):
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / 'rabbitmq.conf').write_text(f'listeners.tcp.local = 127.0.0.1:{RABBIT_PORT}\n')
        (self.base / 'enabled_plugins').write_text('[].\n')
        with contextlib.suppress(KeyError, PermissionError):
            shutil.chown(self.base, 'rabbitmq', 'rabbitmq')
            for child in self.base.iterdir():
                shutil.chown(child, 'rabbitmq', 'rabbitmq')
        self.env = dict(os.environ, RABBITMQ_NODENAME=RABBIT_NODE, RABBITMQ_NODE_PORT=str(RABBIT_PORT),
                        RABBITMQ_DIST_PORT=str(RABBIT_DIST_PORT),
                        RABBITMQ_MNESIA_BASE=str(self.base / 'mnesia'),
                        RABBITMQ_LOG_BASE=str(self.base / 'log'),
                        RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / 'enabled_plugins'),
                        RABBITMQ_PID_FILE=str(self.base / 'pid'),
                        RABBITMQ_CONFIG_FILE=str(self.base / 'rabbitmq.conf'))
        if self.node_running():
            raise ChaosError(f'a RabbitMQ node {RABBIT_NODE} is already running (a chaos run left behind? '
                             f'stop it with: rabbitmqctl -n {RABBIT_NODE} stop)')
        run(['rabbitmq-server', '-detached'], env=self.env, cwd=tempfile.gettempdir())
        wait_until(lambda: self.ctl('await_startup', check=False, timeout=30).returncode == 0, 90,
                   f'RabbitMQ {RABBIT_NODE} to start')

    def ctl(self, *args, check=True, timeout=60):
        return run(['rabbitmqctl', '-q', '-n', RABBIT_NODE, *args], check=check, timeout=timeout,
                   cwd=tempfile.gettempdir())

    def node_running(self) -> bool:
        return run(['rabbitmqctl', '-q', '-n', RABBIT_NODE, 'ping'], check=False, timeout=30,
                   cwd=tempfile.gettempdir()).returncode == 0

    def stop_app(self):
        """The broker goes away (connections dropped, port closed); the node keeps its data."""
        self.ctl('stop_app')

    def start_app(self):
        self.ctl('start_app')
        self.ctl('await_startup')

    def shutdown(self):
        with contextlib.suppress(Exception):
            self.ctl('stop', check=False, timeout=60)
        pid_file = self.base / 'pid'
        with contextlib.suppress(Exception):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGKILL)  # only our node's pid, from its own pid file


class PrivatePostgres:
    """A PostgreSQL cluster of our own on 5433, initdb'd into a temp dir as the postgres user."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / 'data'
        bins = sorted(glob.glob('/usr/lib/postgresql/*/bin'))
        if not bins:
            raise ChaosError('no PostgreSQL binaries under /usr/lib/postgresql/*/bin (run scripts/services '
                             '--postgres once)')
        self.bin = Path(bins[-1])

    def as_postgres(self, *cmd, timeout=120, check=True):
        prefix = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []
        return run([*prefix, *map(str, cmd)], timeout=timeout, check=check, cwd=tempfile.gettempdir())

    def start_fresh(self):
        self.base.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(KeyError, PermissionError):
            shutil.chown(self.base, 'postgres', 'postgres')
        self.as_postgres(self.bin / 'initdb', '-D', self.data, '-A', 'trust', '-U', 'postgres', '--no-sync')
        self.start()
        run(['psql', '-h', '127.0.0.1', '-p', str(PG_PORT), '-U', 'postgres', '-c',
             f'create database {DB_NAME}'])

    def start(self):
        self.as_postgres(self.bin / 'pg_ctl', '-D', self.data, '-l', self.base / 'postgres.log', '-w',
                         '-o', f'-p {PG_PORT} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off '
                               f'-c max_connections=200', 'start')

    def stop(self):
        self.as_postgres(self.bin / 'pg_ctl', '-D', self.data, '-m', 'fast', '-w', 'stop')

    def restart(self):
        self.as_postgres(self.bin / 'pg_ctl', '-D', self.data, '-m', 'fast', '-w', '-l',
                         self.base / 'postgres.log', '-o',
                         f'-p {PG_PORT} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off '
                         f'-c max_connections=200', 'restart')

    def crash(self):
        """Stop at once, as a crash would: what is in PostgreSQL's WAL buffers and not yet written is gone."""
        self.as_postgres(self.bin / 'pg_ctl', '-D', self.data, '-m', 'immediate', '-w', 'stop')

    def shutdown(self):
        if self.data.exists():
            self.as_postgres(self.bin / 'pg_ctl', '-D', self.data, '-m', 'immediate', '-w', 'stop',
                             check=False)


# -- the project under test ------------------------------------------------------------------------

class Project:
    """Environment and settings shared by this process and the supervisors it starts."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.extra = workdir / 'carrot_extra.py'
        self.executions = workdir / 'executions.txt'
        self.env = dict(os.environ)
        self.env.update(
            DJANGO_SETTINGS_MODULE=SETTINGS, CARROT_TEST_DB='postgres', CARROT_TEST_DB_NAME=DB_NAME,
            PGHOST='127.0.0.1', PGPORT=str(PG_PORT), PGUSER='postgres', CARROT_TEST_VHOST='/',
            CARROT_TEST_EXTRA=str(self.extra),
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
        self.write_settings()

    def settings_text(self) -> str:
        carrot = {
            'default_broker': f'amqp://guest:guest@127.0.0.1:{RABBIT_PORT}/',
            'queues': [{'name': 'default', 'concurrency': 2}, {'name': 'poison', 'concurrency': 1}],
            'max_attempts': 3,
            'cleanup_after_days': None,
        }
        return f'CARROT = {carrot!r}\n'

    def write_settings(self, text: str | None = None):
        tmp = self.extra.with_suffix('.tmp')
        tmp.write_text(self.settings_text() if text is None else text)
        os.replace(tmp, self.extra)

    def setup_django(self):
        os.environ.update(self.env)
        sys.path.insert(0, str(ROOT))
        import django
        django.setup()
        from django.core.management import call_command
        call_command('migrate', verbosity=0)


class Supervisor:
    """A carrot-supervisor master started by a scenario, in a session of its own."""

    def __init__(self, project: Project, name: str, queues='default', scheduler=True, extra_flags=()):
        self.name = name
        self.log_path = project.workdir / f'{name}.log'
        self.out = open(project.workdir / f'{name}.out', 'ab')
        args = [sys.executable, '-m', 'carrot.cli', '--settings', SETTINGS, '--logfile', str(self.log_path),
                '--queues', queues, *extra_flags]
        if not scheduler:
            args.append('--no-scheduler')
        self.proc = subprocess.Popen(args, env=project.env, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.seen: set[int] = set()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def wait_ready(self, timeout=60, after=0):
        wait_until(lambda: re.search(r'ready: \d+ children up', self.log()[after:]) or self._dead(), timeout,
                   f'{self.name} to be ready')
        if not self.running():
            raise ChaosError(f'{self.name} exited with {self.proc.returncode} before it was ready')

    def _dead(self):
        return self.proc.poll() is not None

    def running(self) -> bool:
        return self.proc.poll() is None

    def children(self, kind='consumer') -> list[psutil.Process]:
        found = []
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return found
        for kid in kids:
            try:
                title = ' '.join(kid.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self.seen.add(kid.pid)
            if title.startswith(TITLE + kind):
                found.append(kid)
        return found

    def all_children_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def signal(self, signum):
        if self.running():
            os.kill(self.pid, signum)

    def stop(self, timeout=40):
        """TERM (graceful), then SIGKILL what is left of the process group."""
        if self.running():
            self.all_children_pids()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        pids = self.seen | self.all_children_pids()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.running():
            self.proc.kill()
        self.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc = psutil.Process(pid)
                if proc.ppid() in (self.pid, 1) and 'carrot' in ' '.join(proc.cmdline()):
                    proc.kill()
        self.out.close()


# -- one scenario's bookkeeping -------------------------------------------------------------------

@dataclass
class Result:
    name: str
    published: int = 0
    completed: int = 0
    executions: int = 0
    lost: int = 0
    dup_allowed: int = 0
    dup_unallowed: int = 0
    wall: float = 0.0
    notes: list = field(default_factory=list)
    error: str = ''

    @property
    def ok(self) -> bool:
        return not (self.lost or self.dup_unallowed or self.error)


class Run:
    """What a scenario published and what happened to it."""

    def __init__(self, chaos: 'Chaos', name: str):
        self.chaos = chaos
        self.project = chaos.project
        self.result = Result(name)
        self.tokens: dict[str, str] = {}        # token -> message uuid
        self.expected_to_fail: set[str] = set()  # tokens of tasks that kill their worker on purpose
        self.killed: set[int] = set()            # worker pids killed by the scenario (or by their task)
        self.sigkilled_masters: set[int] = set()
        # The database server crashed: a result it lost may run its task again (README, "Speed").
        self.database_crashed = False
        self.supervisors: list[Supervisor] = []
        self.started = time.monotonic()

    # publishing

    def publish(self, count, seconds=0.05, queue='default', task=RECORD, raise_errors=False) -> list[str]:
        from carrot.utilities import publish_message
        tokens = []
        for _ in range(count):
            token = f'{self.result.name}-{uuid.uuid4().hex[:12]}'
            args = (str(self.project.executions), token) + ((seconds,) if task == RECORD else ())
            try:
                message = publish_message(task, *args, queue=queue)
                self.tokens[token] = message.uuid
            except Exception as exc:  # counted as lost unless it runs anyway
                if raise_errors:
                    raise
                self.tokens[token] = None
                self.note_once(f'publish raised {type(exc).__name__}: {exc}'[:160])
            tokens.append(token)
        self.result.published += count
        return tokens

    def publish_raw(self, token: str, message_id: str, seconds: float, queue='default', copies=1):
        """Publish in the wire format with raw pika: `copies` identical messages with one message_id."""
        import pika
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            '127.0.0.1', RABBIT_PORT, '/', pika.PlainCredentials('guest', 'guest')))
        channel = connection.channel()
        channel.confirm_delivery()
        body = json.dumps({'args': [str(self.project.executions), token, seconds], 'kwargs': {}}).encode()
        for _ in range(copies):
            channel.basic_publish('', queue, body, pika.BasicProperties(
                headers={'type': RECORD}, message_id=message_id, content_type='application/json',
                delivery_mode=2, priority=0), mandatory=True)
        connection.close()

    # faults

    def start_supervisor(self, name=None, **kwargs) -> Supervisor:
        sup = Supervisor(self.project, name or f'{self.result.name}-{len(self.supervisors) + 1}', **kwargs)
        self.supervisors.append(sup)
        return sup

    def kill_random_consumer(self, sup: Supervisor, queue=None) -> int | None:
        kids = [k for k in sup.children() if queue is None or f' {queue}#' in ' '.join(_cmdline(k))]
        if not kids:
            return None
        victim = random.choice(kids)
        self.killed.add(victim.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
        return victim.pid

    def note(self, text: str):
        self.result.notes.append(text)

    def note_once(self, text: str):
        if text not in self.result.notes:
            self.result.notes.append(text)

    # judging

    def executions(self) -> dict[str, list[int]]:
        found = defaultdict(list)
        try:
            lines = self.project.executions.read_text().splitlines()
        except FileNotFoundError:
            return found
        for line in lines:
            token, _, pid = line.partition(' ')
            if token in self.tokens:
                found[token].append(int(pid))
        return found

    def rows(self) -> dict[str, str]:
        """message uuid -> status (retrying while the database is away)."""
        from django.db import DatabaseError, connections

        from carrot.models import MessageLog
        uuids = [u for u in self.tokens.values() if u]
        for _ in range(100):
            try:
                return dict(MessageLog.objects.filter(uuid__in=uuids).values_list('uuid', 'status'))
            except DatabaseError:
                connections.close_all()
                time.sleep(0.5)
        raise ChaosError('the database stayed unreachable for 50 s while reading results')

    def given_up(self) -> set[str]:
        """Uuids of messages FAILED because their worker was lost max_attempts times."""
        from carrot.models import MessageLog
        uuids = [u for u in self.tokens.values() if u]
        return set(MessageLog.objects.filter(uuid__in=uuids, status='FAILED', exception__icontains='worker lost')
                   .values_list('uuid', flat=True))

    def settled(self) -> bool:
        """Every message that should run ran and is COMPLETED; those expected to fail are FAILED."""
        executions = self.executions()
        rows = self.rows()
        for token, message_uuid in self.tokens.items():
            status = rows.get(message_uuid)
            if token in self.expected_to_fail or (self.killed and status == 'FAILED'):
                if status != 'FAILED':
                    return False
            elif not executions.get(token) or status != 'COMPLETED':
                return False
        return True

    def wait_settled(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.settled():
                return True
            if self.supervisors and not any(s.running() for s in self.supervisors):
                self.note_once('no supervisor running while messages were left')
                return False
            time.sleep(0.5)
        self.note(f'not settled within {timeout}s')
        return False

    def judge(self):
        executions = self.executions()
        rows = self.rows()
        r = self.result
        r.completed = sum(1 for status in rows.values() if status == 'COMPLETED')
        r.executions = sum(len(pids) for pids in executions.values())
        statuses = Counter(rows.get(u, 'no row') if u else 'publish raised' for u in self.tokens.values())
        for token, pids in executions.items():
            for earlier in pids[:-1]:
                # Allowed only when the earlier execution's worker died mid-task (killed by us or by its
                # own task): then the ack never happened, and RabbitMQ rightly delivered it again.
                if earlier in self.killed or token in self.expected_to_fail or self.database_crashed:
                    r.dup_allowed += 1
                else:
                    r.dup_unallowed += 1
        given_up = self.given_up() if self.killed else set()
        for token, message_uuid in self.tokens.items():
            if token in self.expected_to_fail or executions.get(token):
                continue
            if message_uuid in given_up:
                continue  # killed mid-task max_attempts times: FAILED + dead-lettered, as documented
            r.lost += 1
        if given_up:
            self.note(f'{len(given_up)} FAILED "worker lost" after max_attempts kills (dead-lettered, as documented)')
        phantom = sum(1 for t, u in self.tokens.items()
                      if u and rows.get(u) == 'COMPLETED' and not executions.get(t))
        if phantom:
            self.note(f'{phantom} COMPLETED without running')
        if set(statuses) - {'COMPLETED'} and not self.expected_to_fail:
            self.note('statuses ' + ', '.join(f'{k} {v}' for k, v in sorted(statuses.items())))
        elif self.expected_to_fail:
            self.note('statuses ' + ', '.join(f'{k} {v}' for k, v in sorted(statuses.items())))
        # A task that ran must say so in its row: one stuck before COMPLETED lost its record (and its
        # message, acked, will not bring it back).
        unrecorded = [t for t, pids in executions.items() if t not in self.expected_to_fail and
                      rows.get(self.tokens.get(t)) not in ('COMPLETED', 'FAILED')]
        if unrecorded and not r.error:
            r.error = f'{len(unrecorded)} task(s) ran but their rows never reached COMPLETED'
        unsettled = [t for t in self.expected_to_fail if rows.get(self.tokens[t]) != 'FAILED']
        if unsettled:
            r.error = f'{len(unsettled)} message(s) that kill their worker did not end FAILED'
        for sup in self.supervisors:
            code = sup.proc.poll()
            if code is not None and code != 0 and sup.pid not in self.sigkilled_masters:
                # A master that gave up (exit 6) or crashed broke the scenario, whatever the counts say.
                r.error = (r.error + '; ' if r.error else '') + f'{sup.name} exited {code}'

    def finish(self):
        for sup in self.supervisors:
            sup.stop()
        self.result.wall = time.monotonic() - self.started


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


class Every(threading.Thread):
    """Call `action()` every `interval` seconds on a thread until stopped (errors are remembered)."""

    def __init__(self, interval, action):
        super().__init__(daemon=True)
        self.interval = interval
        self.action = action
        self.stopped = threading.Event()
        self.errors: list[str] = []
        self.calls = 0

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                self.action()
                self.calls += 1
            except Exception as exc:
                self.errors.append(f'{type(exc).__name__}: {exc}')

    def stop(self):
        self.stopped.set()
        self.join(10)


# -- scenarios --------------------------------------------------------------------------------------

def kill_children(run: Run, seconds=20, count=150, task_seconds=0.2):
    """Consumer children SIGKILLed every 0.5 s under load; then the load drains."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(count, seconds=task_seconds)
    killer = Every(0.5, lambda: run.kill_random_consumer(sup))
    killer.start()
    time.sleep(seconds)
    killer.stop()
    run.note(f'{len(run.killed)} children killed')
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode} while children were killed')
    run.wait_settled(120)


def duplicate_delivery(run: Run):
    """The same message twice at once: two identical copies (no row yet), and a publisher 'retry' of a
    message whose row publish_message wrote. Two consumers take both copies at the same moment."""
    sup = run.start_supervisor()
    sup.wait_ready()
    for _ in range(5):
        token = f'{run.result.name}-{uuid.uuid4().hex[:12]}'
        message_id = str(uuid.uuid4())
        run.tokens[token] = message_id
        run.publish_raw(token, message_id, seconds=1.5, copies=2)
        run.result.published += 1
    for token in run.publish(5, seconds=1.5):
        from carrot.models import MessageLog
        log = MessageLog.objects.get(uuid=run.tokens[token])
        run.publish_raw(token, log.uuid, seconds=1.5)  # the retry after a lost confirm
    run.wait_settled(90)
    # A copy may still wait in the queue for its retry; give it time to be settled.
    time.sleep(5)


def rabbitmq_outages(run: Run, outages=2, down=10):
    """RabbitMQ stopped for `down` s mid-run, `outages` times (the second catches backoff state)."""
    sup = run.start_supervisor()
    sup.wait_ready()
    for number in range(outages):
        run.publish(100, seconds=0.1)  # work in hand and waiting on both sides of every outage
        time.sleep(2)
        run.chaos.rabbit.stop_app()
        time.sleep(down)
        run.chaos.rabbit.start_app()
        first = _first_progress(run, timeout=60)
        run.note(f'outage {number + 1}: work resumed {first:.1f}s after the broker was back'
                 if first is not None else f'outage {number + 1}: no progress 60s after the broker was back')
    run.wait_settled(120)


def _first_progress(run: Run, timeout, executions=5) -> float | None:
    """Seconds until `executions` more tasks ran (or all are done): how fast work resumed."""
    start = time.monotonic()
    seen = sum(len(p) for p in run.executions().values())
    while time.monotonic() - start < timeout:
        if sum(len(p) for p in run.executions().values()) >= seen + executions or run.settled():
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def publish_while_rabbitmq_down(run: Run):
    """Publishing while RabbitMQ is down, in and out of transactions: nothing lost once it is back."""
    from django.db import transaction
    sup = run.start_supervisor()
    sup.wait_ready()
    run.chaos.rabbit.stop_app()
    try:
        started = time.monotonic()
        run.publish(10, seconds=0.05)
        try:
            with transaction.atomic():
                run.publish(10, seconds=0.05)
        except Exception as exc:  # README: a send failing after the commit cannot raise into your code
            run.note(f'leaving transaction.atomic() raised {type(exc).__name__}: {exc}'[:200])
        run.note(f'20 publishes took {time.monotonic() - started:.1f}s with the broker down')
    finally:
        time.sleep(3)
        run.chaos.rabbit.start_app()
    run.wait_settled(90)


def postgres_restart(run: Run):
    """PostgreSQL restarted mid-run."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(150, seconds=0.1)
    time.sleep(4)
    run.chaos.postgres.restart()
    run.wait_settled(120)


def postgres_down(run: Run, down=15):
    """PostgreSQL stopped for 15 s mid-run."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(150, seconds=0.1)
    time.sleep(4)
    run.chaos.postgres.stop()
    time.sleep(down)
    run.chaos.postgres.start()
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode} during the outage')
    run.wait_settled(150)


def postgres_crash(run: Run, tasks=1500):
    """PostgreSQL crashed (an immediate stop: its unwritten WAL is gone) in the middle of a drain of short
    tasks, while consumers hold results written without waiting for the disk (prefetch 8); started again 3 s
    later. Nothing may be lost; a task whose claim or result the crash took may run again."""
    from carrot.models import MessageLog
    run.publish(tasks, seconds=0)
    time.sleep(1)  # the publisher's rows (which did not wait for the disk either) written out by now
    sup = run.start_supervisor()
    sup.wait_ready()
    deadline = time.monotonic() + 60
    while MessageLog.objects.filter(status='COMPLETED').count() < tasks // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    run.chaos.postgres.crash()
    run.database_crashed = True
    time.sleep(3)
    run.chaos.postgres.start()
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode} during the outage')
    run.wait_settled(120)


def master_sigkill(run: Run):
    """The master SIGKILLed under load: its children die with it; a new supervisor loses nothing."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(100, seconds=0.2)
    time.sleep(3)
    children = sup.all_children_pids()
    run.killed |= children
    run.sigkilled_masters.add(sup.pid)
    os.kill(sup.pid, signal.SIGKILL)
    sup.proc.wait(10)
    try:
        wait_until(lambda: not any(psutil.pid_exists(p) and _not_zombie(p) for p in children), 10,
                   'the children of the killed master to die')
    except ChaosError:
        orphans = [p for p in children if psutil.pid_exists(p) and _not_zombie(p)]
        run.note(f'{len(orphans)} children outlived the master')
        for pid in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    again = run.start_supervisor()
    again.wait_ready()
    run.wait_settled(120)


def _not_zombie(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def term_under_load(run: Run):
    """TERM under load: tasks in hand finish and are acked; exit 0; a new supervisor drains the rest."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(100, seconds=0.2)
    time.sleep(3)
    sup.signal(signal.SIGTERM)
    try:
        code = sup.proc.wait(45)
        if code != 0:
            run.note(f'TERM: exit code {code}')
    except subprocess.TimeoutExpired:
        run.note('TERM: not stopped within 45s')
        sup.kill()
    again = run.start_supervisor()
    again.wait_ready()
    run.wait_settled(120)


def self_killing_tasks(run: Run):
    """Tasks that kill their own worker on one queue while another queue works."""
    sup = run.start_supervisor(queues='default,poison')
    sup.wait_ready()
    poison = run.publish(5, queue='poison', task=RECORD_AND_DIE)
    run.expected_to_fail.update(poison)
    run.publish(100, seconds=0.1)
    run.wait_settled(150)
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode}')


def broken_settings_while_killing(run: Run, seconds=15):
    """Settings broken on disk while children are killed: the master keeps the other slots and itself
    up; once the settings are fixed, the load drains. (--max-consecutive-failures 4 --backoff-cap 2
    shrink "about two minutes of young deaths" to a few seconds.)"""
    sup = run.start_supervisor(extra_flags=('--max-consecutive-failures', '4', '--backoff-cap', '2'))
    sup.wait_ready()
    run.publish(150, seconds=0.1)
    time.sleep(2)
    run.project.write_settings('raise RuntimeError("settings broken on disk by scripts/chaos")\n')
    killer = Every(0.5, lambda: run.kill_random_consumer(sup))
    killer.start()
    time.sleep(seconds)
    killer.stop()
    run.project.write_settings()
    run.note(f'{len(run.killed)} children killed while the settings were broken')
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode} while the settings were broken')
    run.wait_settled(120)


def two_supervisors(run: Run):
    """Two supervisors on one queue (two hosts, or a botched deploy): each message runs once."""
    first = run.start_supervisor()
    second = run.start_supervisor()
    first.wait_ready()
    second.wait_ready()
    run.publish(200, seconds=0.05)
    run.wait_settled(120)


def hup_storm(run: Run, seconds=10):
    """(extra) HUP every 0.3 s under load: children are replaced after their task; nothing runs twice."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(150, seconds=0.1)
    storm = Every(0.3, lambda: sup.signal(signal.SIGHUP))
    storm.start()
    time.sleep(seconds)
    storm.stop()
    if not sup.running():
        run.note(f'master exited {sup.proc.returncode} in the HUP storm')
    run.wait_settled(120)


def ttin_ttou_storm(run: Run, seconds=10):
    """(extra) TTIN/TTOU alternating every 0.2 s under load, then TERM and HUP 50 ms apart."""
    sup = run.start_supervisor()
    sup.wait_ready()
    run.publish(150, seconds=0.1)
    signals = [signal.SIGTTIN, signal.SIGTTOU]
    storm = Every(0.2, lambda: sup.signal(random.choice(signals)))
    storm.start()
    time.sleep(seconds)
    storm.stop()
    sup.signal(signal.SIGTERM)
    time.sleep(0.05)
    sup.signal(signal.SIGHUP)
    try:
        code = sup.proc.wait(45)
        if code != 0:
            run.note(f'TERM then HUP: exit code {code}')
    except subprocess.TimeoutExpired:
        run.note('TERM then HUP: not stopped within 45s')
    again = run.start_supervisor()
    again.wait_ready()
    run.wait_settled(120)


def _lock_log_table(seconds: float) -> None:
    """LOCK TABLE carrot_messagelog IN ACCESS EXCLUSIVE MODE from a session of its own, for `seconds`
    (what a plain CREATE INDEX, many migrations and VACUUM FULL take)."""
    import psycopg
    with psycopg.connect(host='127.0.0.1', port=PG_PORT, user='postgres', dbname=DB_NAME) as pg:
        pg.execute('LOCK TABLE carrot_messagelog IN ACCESS EXCLUSIVE MODE')
        time.sleep(seconds)
        pg.rollback()


def log_table_locked(run: Run, seconds=15, heartbeat_timeout=5):
    """The log table locked (ACCESS EXCLUSIVE) for 3x the heartbeat timeout under load: no child is killed
    as hung, no task runs twice, the work resumes once the lock is released (issue 14)."""
    sup = run.start_supervisor(extra_flags=('--heartbeat-timeout', str(heartbeat_timeout)))
    sup.wait_ready()
    run.publish(60, seconds=0.3)
    time.sleep(2)
    _lock_log_table(seconds)
    run.wait_settled(120)
    killed = re.findall(r': ((?:consumer \S+|scheduler|housekeeping) \(pid \d+\)) missed heartbeats', sup.log())
    if killed:
        run.result.error = f'killed as hung during the lock: {", ".join(sorted(set(killed)))}'
    run.note(f'lock held {seconds}s against a {heartbeat_timeout}s heartbeat timeout; '
             f'{len(killed)} child(ren) killed as hung')


def misbehaving_tasks(run: Run):
    """Tasks that misbehave towards their worker among ordinary ones (issue 14): BaseExceptions, a
    connection left in a transaction, processes forked and left behind. The ordinary tasks run once each,
    the misbehaving ones end as they should, no consumer dies and nothing they started is left."""
    from carrot.models import MessageLog
    from carrot.utilities import publish_message
    sup = run.start_supervisor()
    sup.wait_ready()
    pids_file = run.project.workdir / 'forked.txt'
    hostile = {}
    for kind in ('KeyboardInterrupt', 'GeneratorExit', 'SystemExit', 'custom'):
        hostile[publish_message('tests.testapp.tasks.raises_base', kind).uuid] = 'FAILED'
    for kind in ('begin', 'atomic', 'autocommit', 'broken'):
        hostile[publish_message('tests.testapp.tasks.leaves_transaction', kind, f'chaos-{uuid.uuid4().hex}').uuid] \
            = 'COMPLETED'
    for how in ('fork', 'daemon', 'exec', 'both'):
        hostile[publish_message('tests.testapp.tasks.fork_and_return', str(pids_file), 300, how).uuid] = 'COMPLETED'
    run.publish(40, seconds=0.05)
    run.wait_settled(90)
    wait_until(lambda: MessageLog.objects.filter(uuid__in=list(hostile)).exclude(
        status__in=('PUBLISHED', 'IN_PROGRESS')).count() == len(hostile), 60, 'the misbehaving tasks to settle')
    wrong = [f'{u[:8]} {s}' for u, s in MessageLog.objects.filter(uuid__in=list(hostile)).values_list('uuid', 'status')
             if s != hostile[u]]
    time.sleep(1)
    left = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
    alive = [pid for pid in left if psutil.pid_exists(pid) and _not_zombie(pid)]
    deaths = re.findall(r'consumer \S+ \(pid \d+\) exited with', sup.log())
    problems = ([f'ended wrong: {", ".join(wrong)}'] if wrong else []) + \
        ([f'{len(alive)} forked process(es) left running'] if alive else []) + \
        ([f'{len(deaths)} consumer(s) died'] if deaths else [])
    if problems:
        run.result.error = '; '.join(problems)
    run.note(f'{len(hostile)} misbehaving tasks settled as expected, {len(left)} processes they started all gone'
             if not problems else 'misbehaving tasks: ' + '; '.join(problems))


def requeue_twice_at_once(run: Run, rows=200):
    """Failed rows requeued by two staff users at the same moment while consumers run (issue 14): one
    copy per row, each task runs once."""
    from django.db import connections
    from django.utils import timezone

    from carrot.models import MessageLog
    from carrot.monitor import actions
    sup = run.start_supervisor()
    sup.wait_ready()
    now = timezone.now()
    tokens = [f'{run.result.name}-{uuid.uuid4().hex[:12]}' for _ in range(rows)]
    MessageLog.objects.bulk_create([
        MessageLog(uuid=str(uuid.uuid4()), status='FAILED', task=RECORD, queue='default', failure_time=now,
                   publish_time=now, task_args=json.dumps([str(run.project.executions), token, 0.02]), content='{}')
        for token in tokens])
    run.result.published += rows
    barrier = threading.Barrier(2)
    outcomes = []

    def requeue():
        try:
            barrier.wait(10)
            outcomes.append(actions.requeue_failed().count)
        finally:
            connections.close_all()
    threads = [threading.Thread(target=requeue) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    by_token = {}
    for message_uuid, task_args in MessageLog.objects.filter(task=RECORD).values_list('uuid', 'task_args'):
        token = json.loads(task_args)[1]
        if token in tokens:
            if token in by_token:
                run.result.error = f'two copies of {token}'
            by_token[token] = message_uuid
    run.tokens.update({token: by_token.get(token) for token in tokens})
    run.note(f'two requeues at once requeued {" + ".join(map(str, outcomes))} of {rows} rows')
    run.wait_settled(90)


def quorum_leader_killed(run: Run, tasks=3000, task_seconds=0.02, down=10):
    """Issue 15: a 3-node RabbitMQ cluster (scripts/cluster.py, ports 5686-5688), three supervisors each
    with two consumers of one quorum queue and a scheduler, a schedule every second; the node that leads
    the queue is SIGKILLed a third of the way through and started again `down` s later. Every task
    COMPLETED once, each supervisor ran >= 15 %, the schedule once per interval, work on within 5 s."""
    from django.test import override_settings
    from django.utils import timezone

    from carrot.amqp.publisher import close_publishers
    from carrot.models import MessageLog, ScheduledTask
    from tests.cluster_tally import read_executions, tally

    nodes = Cluster(run.chaos.workdir / 'cluster', name='carrot-chaos-cluster', first_port=CLUSTER_PORT)
    log(f'starting a 3-node RabbitMQ cluster ({nodes.name}-1..3, ports {CLUSTER_PORT}-{CLUSTER_PORT + 2})')
    run.note(f'cluster up in {nodes.start():.0f}s')
    carrot = {'default_broker': nodes.urls, 'cleanup_after_days': None,
              'queues': [{'name': 'default', 'queue_type': 'quorum', 'concurrency': 2}]}
    run.project.write_settings(f'CARROT = {carrot!r}\n')
    schedule = None
    sampler = None
    try:
        with override_settings(CARROT=carrot):
            close_publishers()
            schedule = ScheduledTask.objects.create(
                task=RECORD, task_name='chaos every second', queue='default', interval_type='seconds',
                interval_count=1, task_args=json.dumps([str(run.project.executions), 'schedule']))
            # Published before the supervisors start, so the kill comes a third of the way through the
            # work however fast it is published; the scheduler publishes through the kill.
            started = time.monotonic()
            run.publish(tasks, seconds=task_seconds, raise_errors=True)
            run.note(f'{tasks} published in {time.monotonic() - started:.0f}s')
            supervisors = [run.start_supervisor(f'host{n}') for n in (1, 2, 3)]
            for sup in supervisors:
                sup.wait_ready(timeout=90)
            sampler = Every(0.5, lambda: [sup.children() for sup in supervisors])
            sampler.start()
            uuids = [u for u in run.tokens.values() if u]
            wait_until(lambda: MessageLog.objects.filter(uuid__in=uuids, status='COMPLETED').count()
                       >= tasks // 3, 600, 'a third of the tasks to complete', interval=0.5)
            leader = nodes.leader_of('default')
            killed_at = timezone.now()
            nodes.kill_node(leader)
            log(f'node {leader} (leader of the queue) killed')
            time.sleep(down)
            nodes.start_node(leader)
            log(f'node {leader} started again')
            run.wait_settled(900)
            ScheduledTask.objects.filter(pk=schedule.pk).update(active=False)
            time.sleep(2)  # the last run may still be running
            sampler.stop()
            for sup in supervisors:
                sup.children()
            rows = {row['uuid']: {'status': row['status'], 'worker': row['worker'], 'started': row['started_time'],
                                  'completed': row['completion_time']}
                    for row in MessageLog.objects.values('uuid', 'status', 'worker', 'started_time',
                                                         'completion_time')}
            schedule_times = list(MessageLog.objects.filter(task=RECORD, task_args__contains='"schedule"',
                                                            status='COMPLETED').values_list('publish_time', flat=True))
            result = tally(run.tokens, rows, read_executions(run.project.executions),
                           {sup.name: set(sup.seen) for sup in supervisors}, schedule_token='schedule',
                           schedule_times=schedule_times, killed_at=killed_at, killed_node=leader)
            run.note(result.figures())
            if result.problems():
                run.result.error = '; '.join(result.problems())
    finally:
        if sampler is not None:
            sampler.stop()
        for sup in run.supervisors:
            sup.stop()
        if schedule is not None:
            ScheduledTask.objects.filter(pk=schedule.pk).delete()
        close_publishers()
        nodes.stop()


SCENARIOS = {
    'kill-children-every-0.5s': kill_children,
    'same-message-twice-at-once': duplicate_delivery,
    'rabbitmq-stopped-10s-twice': rabbitmq_outages,
    'publish-while-rabbitmq-down': publish_while_rabbitmq_down,
    'postgres-restarted': postgres_restart,
    'postgres-stopped-15s': postgres_down,
    'postgres-crashed-mid-drain': postgres_crash,
    'master-sigkilled': master_sigkill,
    'term-under-load': term_under_load,
    'self-killing-tasks-other-queue-works': self_killing_tasks,
    'settings-broken-children-killed': broken_settings_while_killing,
    'two-supervisors-one-queue': two_supervisors,
    'hup-storm': hup_storm,
    'ttin-ttou-storm-then-term-hup': ttin_ttou_storm,
    'log-table-locked-3x-heartbeat-timeout': log_table_locked,
    'misbehaving-tasks-among-ordinary-ones': misbehaving_tasks,
    'requeue-twice-at-once-under-load': requeue_twice_at_once,
    'quorum-leader-killed': quorum_leader_killed,
}
SHORT = {
    'kill-children-every-0.5s': lambda run: kill_children(run, seconds=8, count=60),
    'same-message-twice-at-once': duplicate_delivery,
    'rabbitmq-stopped-10s-twice': lambda run: rabbitmq_outages(run, outages=1),
    'master-sigkilled': master_sigkill,
    'postgres-crashed-mid-drain': postgres_crash,
    'log-table-locked-3x-heartbeat-timeout': log_table_locked,
    'misbehaving-tasks-among-ordinary-ones': misbehaving_tasks,
}


# -- the run ------------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.rabbit = PrivateRabbit(workdir / 'rabbitmq')
        self.postgres = PrivatePostgres(workdir / 'postgres')
        self.project: Project | None = None

    def start_services(self):
        log(f'starting a private RabbitMQ ({RABBIT_NODE}, port {RABBIT_PORT}) and PostgreSQL (port {PG_PORT})')
        self.rabbit.start()
        self.postgres.start_fresh()
        self.project = Project(self.workdir / 'project')
        self.project.setup_django()

    def reset(self):
        """Between scenarios: empty queues and tables, settings restored, services up."""
        from django.db import connections

        from carrot.amqp.publisher import close_publishers
        from carrot.models import MessageLog
        import pika
        if not self.rabbit.node_running():
            raise ChaosError('the private RabbitMQ node is gone')
        with contextlib.suppress(ChaosError):
            self.rabbit.start_app()
        with contextlib.suppress(ChaosError):
            self.postgres.start()
        close_publishers()
        connections.close_all()
        self.project.write_settings()
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            '127.0.0.1', RABBIT_PORT, '/', pika.PlainCredentials('guest', 'guest')))
        channel = connection.channel()
        for queue in ('default', 'poison'):
            channel.queue_delete(queue)
            channel.queue_delete(f'{queue}.dead')
        connection.close()
        MessageLog.objects.all().delete()
        with contextlib.suppress(FileNotFoundError):
            self.project.executions.unlink()

    def run_scenario(self, name, body) -> Result:
        log(f'--- {name}')
        self.reset()
        run = Run(self, name)
        try:
            body(run)
            run.judge()
        except Exception as exc:
            run.result.error = f'{type(exc).__name__}: {exc}'
            log(traceback.format_exc())
            with contextlib.suppress(Exception):
                run.judge()
        finally:
            run.finish()
        r = run.result
        log(f'{name}: published {r.published} completed {r.completed} executions {r.executions} lost {r.lost} '
            f'dup {r.dup_allowed}/{r.dup_unallowed} {r.wall:.0f}s {"; ".join(r.notes)} {r.error}')
        return r

    def shutdown(self):
        log('stopping the private services')
        self.postgres.shutdown()
        self.rabbit.shutdown()


def table(results: list[Result]) -> str:
    header = ('scenario', 'published', 'completed', 'executions', 'lost', 'dup allowed', 'dup unallowed',
              'wall', 'result', 'notes')
    rows = [header] + [(r.name, str(r.published), str(r.completed), str(r.executions), str(r.lost),
                        str(r.dup_allowed), str(r.dup_unallowed), f'{r.wall:.0f}s', 'ok' if r.ok else 'FAIL',
                        '; '.join(r.notes + ([r.error] if r.error else []))[:300]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        lines.append('  '.join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row[:-1])) + '  ' + row[-1])
        if index == 0:
            lines.append('-' * (sum(widths) + 2 * len(widths) + 5))
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='scripts/chaos', description=__doc__.split('\n\n')[0])
    parser.add_argument('--short', action='store_true', help='a subset that runs in under 3 minutes')
    parser.add_argument('-k', dest='pattern', help='only scenarios whose name contains this')
    parser.add_argument('--list', action='store_true', help='list the scenarios and exit')
    parser.add_argument('--keep', action='store_true', help='keep the work directory (logs) even if all pass')
    args = parser.parse_args(argv)
    scenarios = SHORT if args.short else SCENARIOS
    if args.pattern:
        scenarios = {k: v for k, v in scenarios.items() if args.pattern in k}
    if args.list:
        print('\n'.join(scenarios))
        return 0
    if not scenarios:
        print('no scenario matches', file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix='carrot-chaos-'))
    os.chmod(workdir, 0o755)
    chaos = Chaos(workdir)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f'signal {signum}')
    signal.signal(signal.SIGTERM, on_signal)

    results: list[Result] = []
    started = time.monotonic()
    try:
        chaos.start_services()
        for name, body in scenarios.items():
            results.append(chaos.run_scenario(name, body))
    except BaseException as exc:
        log(f'chaos run aborted: {type(exc).__name__}: {exc}')
        results.append(Result('(aborted)', error=f'{type(exc).__name__}: {exc}'))
    finally:
        chaos.shutdown()
    failed = [r for r in results if not r.ok]
    print()
    print(table(results))
    print(f'\n{len(results)} scenario(s) in {time.monotonic() - started:.0f}s; '
          f'{len(failed)} failed' + (f': {", ".join(r.name for r in failed)}' if failed else ''))
    project_dir = workdir / 'project'
    if failed or args.keep:
        keep = Path(tempfile.gettempdir()) / f'{workdir.name}-logs'
        with contextlib.suppress(Exception):
            shutil.copytree(project_dir, keep)
            print(f'supervisor logs kept in {keep}')
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
