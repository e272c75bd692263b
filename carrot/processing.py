"""The message processor: claim the log row, run the task, record how it went -> a Disposition.

No pika here: the processor gets an IncomingMessage (carrot.messages) and says what the session should
do with the delivery. It runs in the consumer's task slot thread, with that thread's DB connection.

The claim (at most one execution of a message at a time, on any host)
    The row is found by the message's uuid (inserted first, tolerating a concurrent insert, for
    messages from other publishers) and taken with one conditional UPDATE: from PUBLISHED or WAITING,
    or from IN_PROGRESS when the worker named in it is known dead *and* still the one that was read
    (a compare-and-set on worker and attempts, so two claimers can never both win). A worker is known
    dead when the lease it renews (CARROT['claim_lease']) has run out, or when it is on this host and
    its process is gone. A message whose row is IN_PROGRESS under a live worker is not run now: it is
    parked in <queue>.wait and comes back after a delay.

What ends how
    COMPLETED row: ACK (a duplicate). FAILED row: DEAD_LETTER. Bad input, unregistered task, a task that
    raises, anything unexpected: FAILED + DEAD_LETTER. No message_id: ADOPT (republished with one).
    Database unreachable or its tables missing: the message is held and the step retried with backoff
    -- never a requeue loop, and never a second run of a task whose result could not be written.
"""
from __future__ import annotations

import ast
import collections
import enum
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import psutil
from django.db import DatabaseError, InterfaceError, OperationalError, ProgrammingError, connections
from django.db.models import F, Q
from django.utils import timezone

from carrot import registry, text
from carrot.backoff import Outage
from carrot.config import CarrotConfig, QueueConfig
from carrot.exceptions import BadMessage, CarrotError, TaskNotRegistered
from carrot.messages import IncomingMessage
from carrot.models import MessageLog
from carrot.runner import TaskOutcome, run_task

# What a reduced row writes: the outcome, without the texts the database may have refused.
REDUCED_FIELDS = ('status', 'completion_time', 'failure_time', 'lease_expires', 'output', 'log',
                  'traceback', 'exception')
RETRY_BASE = 2.0  # seconds a message waits in <queue>.wait the first time; doubled each time after


class Action(enum.Enum):
    ACK = 'ack'                    # done: completed, or a duplicate of a completed message
    DEAD_LETTER = 'dead-letter'    # failed for good: rejected without requeue, so it goes to <queue>.dead
    RETRY_LATER = 'retry-later'    # not now (another worker runs it): park in <queue>.wait for `delay`
    ADOPT = 'adopt'                # no message_id: republish it with `new_id`, ack this copy
    REQUEUE = 'requeue'            # give it back untouched (only when stopping before it was claimed)


@dataclass(frozen=True)
class Disposition:
    action: Action
    delay: float | None = None
    new_id: str | None = None

    def __str__(self):
        extra = f' {self.delay:g}s' if self.delay is not None else f' {self.new_id}' if self.new_id else ''
        return f'{self.action.value}{extra}'


ACK = Disposition(Action.ACK)
DEAD_LETTER = Disposition(Action.DEAD_LETTER)
REQUEUE = Disposition(Action.REQUEUE)


def retry_later(delay: float) -> Disposition:
    return Disposition(Action.RETRY_LATER, delay=delay)


def adopt(new_id: str) -> Disposition:
    return Disposition(Action.ADOPT, new_id=new_id)


class StopRequested(Exception):
    """The consumer is stopping (or lost the delivery) while the database is down, before any claim."""


# -- who is running what ------------------------------------------------------------------------------

def worker_id() -> str:
    return f'{socket.gethostname()}:{os.getpid()}'


# Message ids this process is processing right now (a multiset: two consumers in threads of one process
# may hold deliveries of the same id). A row IN_PROGRESS under this process's own worker id is only
# "dead" if no slot of this process holds it.
_held = collections.Counter()
_held_lock = threading.Lock()


def _hold(message_id: str) -> None:
    with _held_lock:
        _held[message_id] += 1


def _release(message_id: str) -> None:
    with _held_lock:
        _held[message_id] -= 1
        if _held[message_id] <= 0:
            del _held[message_id]


def _held_elsewhere(message_id: str, own_holds: int) -> bool:
    with _held_lock:
        return _held[message_id] > own_holds


def worker_is_dead(row: MessageLog, now, own_holds: int = 0) -> bool:
    """Whether the worker named in an IN_PROGRESS row is known dead (so its claim may be taken over).
    `own_holds`: how many holds on this id the caller itself has (see _hold)."""
    if row.lease_expires is None or row.lease_expires <= now:
        return True  # not renewed in time (or claimed by a carrot that kept no lease)
    host, _, pid_text = (row.worker or '').rpartition(':')
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host: only its lease tells
    pid = int(pid_text)
    if pid == os.getpid():
        return not _held_elsewhere(row.uuid, own_holds)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


# -- database faults ---------------------------------------------------------------------------------

# PostgreSQL SQLSTATEs that mean "the tables are not usable now", not "this row is bad".
_TRANSIENT_SQLSTATES = {'42P01',  # undefined_table (not migrated, renamed)
                        '42703',  # undefined_column (migrations behind the code)
                        '42501'}  # insufficient_privilege (grants being changed)


def is_transient(exc: BaseException) -> bool:
    """A database fault that waiting may cure (unreachable, restarting, locked, tables missing)."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, ProgrammingError):
        return getattr(exc.__cause__, 'sqlstate', None) in _TRANSIENT_SQLSTATES
    return False


def drop_broken_connections() -> None:
    """Before each message, close this thread's connections that the last task left unusable (errors,
    autocommit switched off) or that outlived a positive CONN_MAX_AGE, so one task's mess does not fail
    the next message. Unlike Django's per-request close_old_connections(), the default CONN_MAX_AGE=0
    does not mean "reconnect for every message": a worker is not a request, and that would cost more
    than the task."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if connection.get_autocommit() != connection.settings_dict['AUTOCOMMIT'] or \
                (connection.errors_occurred and not connection.is_usable()):
            connection.close()
        elif connection.errors_occurred:
            connection.errors_occurred = False
        elif connection.settings_dict.get('CONN_MAX_AGE') and connection.close_at is not None \
                and time.monotonic() >= connection.close_at:
            connection.close()


def describe_database_fault(exc: BaseException) -> str:
    message = text.for_log(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 200)
    if 'no such table' in message or 'does not exist' in message:
        return f'{message}; are the carrot tables migrated? run manage.py migrate'
    return f'{type(exc).__name__}: {message}'


# -- the processor -----------------------------------------------------------------------------------

class Hooks:
    """What the processor asks of the consumer it serves (the 1.x extension points live there)."""

    def get_message_log(self, message: IncomingMessage) -> MessageLog:
        raise NotImplementedError

    def fail(self, log: MessageLog, err) -> None:
        raise NotImplementedError


class MessageProcessor:
    """Claim, run and record one message at a time; `process()` returns what to do with the delivery."""

    def __init__(self, queue: QueueConfig, config: CarrotConfig, logger: logging.Logger, name: str,
                 hooks: Hooks | None = None, stopping: threading.Event | None = None,
                 run: Callable[..., TaskOutcome] = run_task):
        self.queue = queue
        self.config = config
        self.logger = logger
        self.name = name
        self.hooks = hooks or DefaultHooks(self)
        self.stopping = stopping or threading.Event()
        self.run = run
        self.worker = worker_id()
        self.database = Outage(logger, name, 'the database')
        self.abandoned: threading.Event | None = None  # set: the delivery in hand is gone (see process)

    # -- one message

    def process(self, message: IncomingMessage, abandoned: threading.Event | None = None) -> Disposition:
        """Never raises: whatever goes wrong ends as a disposition (and a FAILED row, where it can).
        `abandoned` is set by the consumer when the delivery is gone (broker connection lost): waiting
        for the database to claim it is pointless then, as RabbitMQ delivers it again."""
        self.abandoned = abandoned
        self._claimed: MessageLog | None = None  # the row this worker holds for `message`, once claimed
        if message.message_id is not None:
            _hold(message.message_id)
        try:
            drop_broken_connections()
            return self._process(message)
        except StopRequested:
            self.logger.warning('%s: %s while the database is unavailable; %s (%s) goes back to the queue '
                                'unclaimed', self.name, 'stopping' if self.stopping.is_set() else
                                'lost the delivery', message.shown_task, message.message_id)
            return REQUEUE
        except Exception as exc:
            return self._unexpected(message, exc)
        finally:
            if message.message_id is not None:
                _release(message.message_id)

    def _process(self, message: IncomingMessage) -> Disposition:
        if message.is_bad:
            return self._refuse(message, message.problem)
        if message.message_id is None:
            new_id = str(uuid.uuid4())
            self.logger.info('%s: %s arrived without a message_id; republishing it as %s so its attempts '
                             'are counted', self.name, message.shown_task, new_id)
            return adopt(new_id)
        row = self._database(lambda: self.hooks.get_message_log(message), 'reading the log row')
        if not same_call(row, message):
            return self._conflict(message, row)
        verdict = self._database(lambda: self.claim(row, message), 'claiming the message')
        if verdict is not None:
            return verdict
        self._claimed = row
        return self._run_claimed(row, message)

    # -- the claim

    def claim(self, row: MessageLog, message: IncomingMessage) -> Disposition | None:
        """Take the row for this worker (returns None: run it now), or say what to do instead."""
        for _ in range(5):  # each lost compare-and-set re-reads the row; five is more than enough
            now = timezone.now()
            if row.status == MessageLog.COMPLETED:
                self.logger.warning('%s: %s (%s) is already COMPLETED; acking the duplicate delivery '
                                    'without running it again', self.name, message.shown_task, row.uuid)
                return ACK
            if row.status == MessageLog.FAILED:
                self.logger.warning('%s: %s (%s) is already FAILED; dead-lettering this delivery without '
                                    'running it', self.name, message.shown_task, row.uuid)
                return DEAD_LETTER
            if row.status == MessageLog.IN_PROGRESS:
                if not worker_is_dead(row, now, own_holds=1):
                    delay = min(self.config.claim_lease, RETRY_BASE * 2 ** message.waits)
                    self.logger.info('%s: %s (%s) is running on %s; trying again in %gs', self.name,
                                     message.shown_task, row.uuid, text.for_log(row.worker, 100), delay)
                    return retry_later(delay)
                if row.attempts >= self.config.max_attempts:
                    return self._worker_lost(row, message)
                taken = self._take(row, now, Q(status=MessageLog.IN_PROGRESS, worker=row.worker,
                                               attempts=row.attempts))
            elif row.status in (MessageLog.PUBLISHED, MessageLog.WAITING):
                taken = self._take(row, now, Q(status__in=(MessageLog.PUBLISHED, MessageLog.WAITING)))
            else:
                self._fail_row(row, BadMessage(f'its log row has an unknown status '
                                               f'{text.for_log(row.status, 40)!r}'))
                return DEAD_LETTER
            if taken:
                return None
            row.refresh_from_db()
        return retry_later(RETRY_BASE)

    def _take(self, row: MessageLog, now, condition: Q, count_attempt: bool = True) -> bool:
        """The conditional UPDATE; True if this worker now holds the row (refreshed into `row`)."""
        changes = dict(status=MessageLog.IN_PROGRESS, started_time=now, worker=self.worker,
                       lease_expires=now + timedelta(seconds=self.config.claim_lease))
        if count_attempt:
            changes.update(attempts=F('attempts') + 1, exception='', traceback='', failure_time=None)
        if not MessageLog.objects.filter(pk=row.pk).filter(condition).update(**changes):
            return False
        # Won: the row is as read plus these changes (attempts only ever moves by a claim, and a
        # concurrent claim would have made this one match nothing), so no second read is needed.
        if count_attempt:
            changes['attempts'] = row.attempts + 1
        for name, value in changes.items():
            setattr(row, name, value)
        return True

    def _worker_lost(self, row: MessageLog, message: IncomingMessage) -> Disposition:
        now = timezone.now()
        if not self._take(row, now, Q(status=MessageLog.IN_PROGRESS, worker=row.worker,
                                      attempts=row.attempts), count_attempt=False):
            return retry_later(RETRY_BASE)  # someone else took it meanwhile; look again later
        self._fail_row(row, CarrotError(
            f'worker lost after {row.attempts} attempts: the process running this task died or lost its '
            f'connection each time (CARROT["max_attempts"] is {self.config.max_attempts})'))
        return DEAD_LETTER

    def renew_lease(self, message_id: str) -> bool:
        """Push the lease of a row this worker holds forward (called from the connection thread)."""
        lease = timezone.now() + timedelta(seconds=self.config.claim_lease)
        return bool(MessageLog.objects.filter(uuid=message_id, status=MessageLog.IN_PROGRESS,
                                              worker=self.worker).update(lease_expires=lease))

    # -- running and recording

    def _run_claimed(self, row: MessageLog, message: IncomingMessage) -> Disposition:
        self.logger.info('%s: running %s (%s), attempt %d', self.name, message.shown_task, row.uuid,
                         row.attempts)
        try:
            func = registry.get_task(message.task)
        except TaskNotRegistered as exc:
            self._fail_row(row, exc)
            return DEAD_LETTER
        outcome = self.run(func, list(message.args), dict(message.kwargs),
                           log_limit=self.config.max_stored_text)
        row.log = outcome.log
        if not outcome.succeeded:
            row.traceback = outcome.traceback
            self._fail_row(row, outcome.exception)
            return DEAD_LETTER
        row.status = MessageLog.COMPLETED
        row.completion_time = timezone.now()
        row.output = outcome.output
        row.lease_expires = None
        self.save(row, interruptible=False)
        self.logger.info('%s: %s (%s) completed', self.name, message.shown_task, row.uuid)
        return ACK

    def _fail_row(self, row: MessageLog, err) -> None:
        """FAILED through the consumer's fail() (1.x extension point: failure callbacks run there)."""
        row.lease_expires = None
        try:
            self._database(lambda: self.hooks.fail(row, err), 'recording the failure', interruptible=False)
        except Exception as exc:  # a broken fail() override or an unwritable row: still FAILED
            self.logger.error('%s: fail() raised %s for %s; writing a reduced FAILED row', self.name,
                              text.for_log(f'{type(exc).__name__}: {exc}'), row.uuid)
            row.status = MessageLog.FAILED
            row.failure_time = row.failure_time or timezone.now()
            row.exception = row.exception or text.for_log(err, 1000)
            self.save(row, interruptible=False)

    def save(self, row: MessageLog, interruptible: bool = True) -> None:
        """Write `row`, bounded to its columns. A transient fault is waited out (the ack waits too); a
        row the database refuses for good is written reduced, so a task that ran is never run again
        because its result could not be stored."""
        bound_row(row, self.config.max_stored_text)
        try:
            self._database(row.save, 'recording the result', interruptible=interruptible)
        except DatabaseError as exc:
            reason = text.for_log(f'{type(exc).__name__}: {exc}', 500)
            self.logger.error('%s: the database refused the log row of %s (%s); writing it without '
                              'output, log and traceback', self.name, row.uuid, reason)
            row.output = row.log = row.traceback = None
            row.exception = text.cut(f'{row.exception or ""}\n[carrot could not store the full row: '
                                     f'{reason}]'.strip(), self.config.max_stored_text)
            try:
                self._database(lambda: row.save(update_fields=REDUCED_FIELDS), 'recording the result',
                               interruptible=interruptible)
            except DatabaseError:
                self.logger.exception('%s: even the reduced log row of %s could not be written; the '
                                      'message is settled anyway so the task does not run again',
                                      self.name, row.uuid)

    # -- refusals

    def _refuse(self, message: IncomingMessage, problem: str) -> Disposition:
        """FAILED + dead-letter for a message that cannot be run, on its own row when its id is taken."""
        self.logger.error('%s: refusing %s (%s): %s', self.name, message.shown_task,
                          text.for_log(message.message_id, 100), text.for_log(problem, 500))
        row = None
        if message.message_id is not None:
            row = self._database(lambda: self.hooks.get_message_log(message), 'reading the log row')
            if not same_call(row, message) or row.status not in (MessageLog.PUBLISHED, MessageLog.WAITING,
                                                                 MessageLog.FAILED):
                row = None
            elif row.status == MessageLog.FAILED:
                return DEAD_LETTER  # recorded by an earlier delivery of this very message
        if row is None:
            row = self._database(lambda: insert_row(message, self.queue, str(uuid.uuid4()),
                                                    self.config.max_stored_text), 'recording the failure')
        self._fail_row(row, BadMessage(problem))
        return DEAD_LETTER

    def _conflict(self, message: IncomingMessage, row: MessageLog) -> Disposition:
        problem = (f'its message_id {message.message_id} already belongs to the log of a different '
                   f'message (task {row.task} with other arguments); this message was not run and '
                   f'that log was left alone')
        own = self._database(lambda: insert_row(message, self.queue, str(uuid.uuid4()),
                                                self.config.max_stored_text), 'recording the conflict')
        self.logger.error('%s: refusing %s: %s', self.name, message.shown_task, text.for_log(problem, 500))
        self._fail_row(own, BadMessage(problem))
        return DEAD_LETTER

    def _unexpected(self, message: IncomingMessage, exc: Exception) -> Disposition:
        """Anything that is not a known transient fault ends as FAILED + dead-letter, never a requeue."""
        self.logger.error('%s: unexpected error processing %s (%s); failing and dead-lettering it',
                          self.name, message.shown_task, text.for_log(message.message_id, 100),
                          exc_info=exc)
        problem = (f'carrot could not process this message: {type(exc).__name__}: '
                   f'{text.for_log(exc, 500)}')
        try:
            # The claimed row if there is one (else it would stay IN_PROGRESS for ever), else a new one.
            row = self._claimed or self._database(
                lambda: insert_row(message, self.queue, str(uuid.uuid4()), self.config.max_stored_text),
                'recording the failure', interruptible=False)
            row.traceback = ''.join(traceback.format_exception(exc))
            self._fail_row(row, BadMessage(problem))
        except Exception:
            self.logger.exception('%s: could not even record that failure', self.name)
        return DEAD_LETTER

    # -- database retries

    def _should_give_up(self) -> bool:
        return self.stopping.is_set() or (self.abandoned is not None and self.abandoned.is_set())

    def _database(self, step: Callable, what: str, interruptible: bool = True):
        """Run a database step, waiting out transient faults with backoff. Other errors propagate."""
        while True:
            try:
                result = step()
            except DatabaseError as exc:
                if not is_transient(exc):
                    raise
                connections.close_all()  # this thread's connections; a fresh one is opened next try
                delay = self.database.failed(f'{what}: {describe_database_fault(exc)}', exc)
                if interruptible and self._should_give_up():
                    raise StopRequested from None
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not (interruptible and self._should_give_up()):
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            self.database.recovered()
            return result


class DefaultHooks(Hooks):
    """The hooks when the processor is used on its own (tests, tools): rows by uuid, a plain fail()."""

    def __init__(self, processor: MessageProcessor):
        self.processor = processor

    def get_message_log(self, message):
        return get_or_insert_row(message, self.processor.queue, self.processor.config.max_stored_text)

    def fail(self, log, err, traceback_text=None):
        mark_failed(log, err, traceback_text)
        self.processor.save(log, interruptible=False)


# -- rows ----------------------------------------------------------------------------------------------

def insert_row(message: IncomingMessage, queue: QueueConfig, message_id: str, limit: int) -> MessageLog:
    """A new PUBLISHED row for `message` under `message_id`."""
    task_args, content = message.stored_arguments
    return MessageLog.objects.create(
        uuid=message_id, status=MessageLog.PUBLISHED, queue=queue.name, exchange=message.exchange,
        routing_key=message.routing_key or queue.name, priority=message.priority,
        task=text.for_column(message.shown_task, 200), task_args=text.for_column(task_args, limit),
        content=text.for_column(content, limit), publish_time=timezone.now())


def get_or_insert_row(message: IncomingMessage, queue: QueueConfig, limit: int) -> MessageLog:
    """The row of `message`'s id; inserted first for messages from other publishers. The insert
    tolerates a concurrent one of the same uuid (INSERT ... ON CONFLICT DO NOTHING, then read)."""
    try:
        return MessageLog.objects.get(uuid=message.message_id)  # the usual case: carrot published it
    except MessageLog.DoesNotExist:
        pass
    task_args, content = message.stored_arguments
    MessageLog.objects.bulk_create([MessageLog(
        uuid=message.message_id, status=MessageLog.PUBLISHED, queue=queue.name, exchange=message.exchange,
        routing_key=message.routing_key or queue.name, priority=message.priority,
        task=text.for_column(message.shown_task, 200), task_args=text.for_column(task_args, limit),
        content=text.for_column(content, limit), publish_time=timezone.now())], ignore_conflicts=True)
    return MessageLog.objects.get(uuid=message.message_id)


def same_call(row: MessageLog, message: IncomingMessage) -> bool:
    """Whether `row` logs this very message: the same task with the same arguments."""
    if row.task != text.for_column(message.shown_task, 200):
        return False
    task_args, content = message.stored_arguments
    if message.is_bad:
        return _same_text(row.task_args, task_args) and _same_text(row.content, content)
    return _same_value(row.task_args, task_args, list(message.args), ast_ok=True) and \
        _same_value(row.content, content, message.kwargs)


def _same_text(stored: str | None, ours: str) -> bool:
    stored = stored or ''
    if stored == ours:
        return True
    marker = text.CUT_MARKER.split('{')[0]
    return marker in stored and ours.startswith(stored[:stored.index(marker)])  # a cut copy of ours


def _same_value(stored: str | None, ours_text: str, ours, ast_ok: bool = False) -> bool:
    if _same_text(stored, ours_text):
        return True
    if not stored:
        return not ours
    try:
        value = json.loads(stored)
    except (ValueError, RecursionError):
        if not ast_ok:
            return False
        try:  # django-carrot 1.x stored positional arguments as a Python tuple repr
            value = ast.literal_eval(stored)
        except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
            return False
    if isinstance(value, tuple):
        value = list(value)
    return value == ours


def bound_row(row: MessageLog, limit: int) -> None:
    """Bound every text field of `row` to its column (cut with a marker; NUL escaped)."""
    for name in ('exception', 'traceback', 'output', 'log', 'task_args', 'content'):
        setattr(row, name, text.for_column(getattr(row, name), limit))
    for name in ('task', 'worker', 'queue', 'exchange', 'routing_key'):
        setattr(row, name, text.for_column(getattr(row, name), 200))


def mark_failed(log: MessageLog, err, traceback_text: str | None = None) -> None:
    """Set the FAILED fields of `log` from `err` (not saved)."""
    log.status = MessageLog.FAILED
    log.failure_time = timezone.now()
    log.lease_expires = None
    # carrot's own errors already read as sentences; other exceptions are prefixed with their type.
    plain = not isinstance(err, BaseException) or isinstance(err, CarrotError)
    log.exception = text.for_column(str(err) if plain else f'{type(err).__name__}: {err}', None)
    if traceback_text is not None:
        log.traceback = traceback_text
