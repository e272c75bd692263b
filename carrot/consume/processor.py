"""The message processor: claim the log row, run the task, record how it went -> a Disposition.

No pika here: the processor gets an IncomingMessage (carrot.amqp.wire) and says what the session should
do with the delivery. It runs in the consumer's task thread, with that thread's DB connection.

The claim (carrot.consume.claim) makes sure a message runs at most once at a time, on any host; the
row is found (or, for messages from other publishers, inserted) by carrot.consume.logrows. A message whose
row is IN_PROGRESS under a live worker is not run now: it is parked in the delay levels and comes back
after a delay.

A copy whose row is gone never runs
    carrot sends a message into the delay levels (a delayed publish, a retry, a parked copy) only once its
    row is committed. One that comes out and finds no row lost it on the way -- deleted in the monitor or
    the admin, requeued as another message, cleaned up -- and is dead-lettered unrun, not taken for a
    message from another publisher (which would run a cancelled, purged or finished task again). So is a
    copy of any kind whose id was requeued as another message (a delivery a worker held, prefetched, while
    its purged row was requeued): that message's row names the id as its origin.

Not before its time
    The row, not the message, says when a task may run: a message that arrives before its row's
    run_after (a clock ahead of the publisher's, a "run now" that was undone, a copy from before a retry
    was scheduled) is parked again for the rest, unclaimed and unrun.

What ends how
    COMPLETED row: ACK (a duplicate). FAILED row: DEAD_LETTER. A task that raises and may be retried
    (carrot.consume.retry): the attempt is kept, the row SCHEDULED for the retry, RETRY_LATER. Bad input,
    unregistered task, a task that raises for good, anything unexpected: FAILED + DEAD_LETTER. No
    message_id: ADOPT (republished with one). Every attempt that does not succeed is kept as a
    TaskAttempt (failed, retried, worker lost).
    Database unreachable or its tables missing: the message is held and the step retried with backoff
    -- never a requeue loop, and never a second run of a task whose result could not be written.
"""
from __future__ import annotations

import logging
import threading
import traceback
import uuid
from datetime import timedelta
from typing import Callable

from django.db import DatabaseError, connections
from django.utils import timezone

from carrot import registry, text
from carrot.amqp.disposition import ACK, ACK_AFTER_FLUSH, DEAD_LETTER, REQUEUE, Disposition, adopt, retry_later
from carrot.amqp import delays, wire
from carrot.amqp.wire import IncomingMessage
from carrot.config import CarrotConfig, QueueConfig
from carrot.config.schema import TRACK_ALL, TRACK_NONE
from carrot.commits import flush_to_disk
from carrot.consume import ahead as claims_ahead
from carrot.consume import claim, djangotask, retry
from carrot.consume.dbretry import (DatabaseRetry, StopRequested, drop_broken_connections,
                                    reset_connections_left_in_transaction)
from carrot.consume.logrows import (REDUCED_FIELDS, bound_result, bound_row, completion_skips_the_orm,
                                    get_or_insert_row, insert_foreign_row, insert_row, new_row, record_attempt,
                                    same_call, set_failed_fields, write_completion)
from carrot.consume.runner import LOG_FORMAT, TASK_LOGGER, TaskOutcome, exception_class_path, run_task
from carrot.consume.unflushed import UnflushedResults
from carrot.dbfaults import describe_database_fault, may_pass, of_the_session
from carrot.exceptions import BadMessage, TaskNotRegistered, WorkerLost
from carrot.models import MessageLog, TaskAttempt

# What a success changes in the claimed row: an UPDATE of these alone is a third of a full-row one. The start
# too: a row claimed in a window has it only in memory until now (carrot.consume.ahead).
COMPLETION_FIELDS = ('status', 'completion_time', 'output', 'log', 'started_time', 'lease_expires')
# Every column a full save writes (all but the primary key).
_ALL_FIELDS = tuple(f.name for f in MessageLog._meta.concrete_fields if not f.primary_key)
RETRY_BASE = 2.0  # seconds a message of a busy row is parked the first time; doubled each time after
WINDOW_WAIT = 5.0  # seconds a give-back of claims ahead waits for a window being claimed (carrot.consume.ahead)


# -- the processor -----------------------------------------------------------------------------------

class Hooks:
    """What the processor asks of the consumer it serves (the 1.x extension points live there)."""

    def get_message_log(self, message: IncomingMessage) -> MessageLog:
        raise NotImplementedError

    def fail(self, log: MessageLog, err) -> None:
        raise NotImplementedError

    def finds_rows_as_carrot_does(self) -> bool:
        """False when get_message_log is overridden: every row is then found through it."""
        return False

    def another_message_waits(self) -> bool:
        """Whether the next delivery is in hand already: a result may then skip the disk, its flush taken
        by a later commit (carrot.consume.unflushed)."""
        return False

    def messages_in_hand(self) -> list[IncomingMessage]:
        """The deliveries held behind the one being processed, which this processor may claim ahead
        (carrot.consume.ahead); none when they may go back unrun before their claim could be given back."""
        return []


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
        self.worker = claim.worker_id()
        self._database = DatabaseRetry(logger, name, self._should_give_up)
        self.abandoned: threading.Event | None = None  # set: the delivery in hand is gone (see process)
        self._returning = claim.can_take_on_arrival()
        self.results = UnflushedResults(MessageLog.objects.db, write_durably=self._write_durably,
                                        write_many_durably=self._write_many_durably)
        # The rows claimed ahead for the deliveries held behind the running one (carrot.consume.ahead).
        self.ahead = claims_ahead.AheadClaims()
        self._window_lock = threading.Lock()
        self._claims_ahead = self._returning and config.claim_ahead and queue.track == TRACK_ALL and \
            not queue.is_quorum and connections[MessageLog.objects.db].vendor == 'postgresql'
        # Set by process(): the number (carrot.consume.unflushed) of this message's result when it was
        # written without waiting for the disk; its delivery is acked once that number is settled.
        self.unflushed_number: int | None = None

    # -- one message

    def process(self, message: IncomingMessage, abandoned: threading.Event | None = None) -> Disposition:
        """Never raises: whatever goes wrong ends as a disposition (and a FAILED row, where it can).
        `abandoned` is set by the consumer when the delivery is gone (broker connection lost): waiting
        for the database to claim it is pointless then, as RabbitMQ delivers it again."""
        self.abandoned = abandoned
        self._claimed: MessageLog | None = None  # the row this worker holds for `message`, once claimed
        self._start_written = True  # whether that claim wrote its start (not one of a window: see ahead)
        self.unflushed_number = None
        if message.message_id is not None:
            claim.hold(message.message_id)
        try:
            drop_broken_connections()
            disposition = self._process(message)
        except StopRequested:
            self.logger.warning('%s: %s while the database is unavailable; %s (%s) goes back to the queue '
                                'unclaimed', self.name, 'stopping' if self.stopping.is_set() else
                                'lost the delivery', message.shown_task, message.message_id)
            disposition = REQUEUE
        except BaseException as exc:  # a hook or override raising KeyboardInterrupt must not end the worker
            disposition = self._unexpected(message, exc)
        finally:
            if message.message_id is not None:
                claim.release(message.message_id)
        if disposition.on_disk and self.results.pending:
            self._flush_results()  # nothing after this to flush them: the earlier deliveries wait on it
        return disposition

    def _flush_everything(self) -> None:
        # Not results.usable(): a fault here must be waited out (the caller retries), never taken for "no".
        if self.results.may_skip_the_disk():
            flush_to_disk(MessageLog.objects.db)

    def _flush_results(self) -> None:
        try:
            self._database(self.results.flush, 'flushing results to disk', interruptible=False)
        except Exception:  # their deliveries wait; the consumer flushes again (or they go back unacked)
            self.logger.exception('%s: could not flush the results written without waiting', self.name)

    def _process(self, message: IncomingMessage) -> Disposition:
        if message.is_bad:
            return self._refuse(message, message.problem)
        if message.message_id is None:
            new_id = str(uuid.uuid4())
            self.logger.info('%s: %s arrived without a message_id; republishing it as %s so its attempts '
                             'are counted', self.name, message.shown_task, new_id)
            return adopt(new_id)
        if self.queue.track != TRACK_ALL:
            untracked = self._untracked(message)
            if untracked is not None:
                return untracked
        if self.ahead:
            row = self._claimed_ahead(message)
            if row is not None:  # taken with an earlier delivery's claim: nothing to write now
                self._claimed = row
                return self._run_claimed(row, message)
        # Read and claim a waiting row in one statement, unless a consumer finds its rows its own way.
        if self._takes_fast(message):
            row = self._take_on_arrival(message)
            if row is not None:  # due, waiting, this very call: taken
                self._claimed = row
                return self._run_claimed(row, message)
        row = self._row_or_orphaned(message)
        if not isinstance(row, MessageLog):
            return row
        if not same_call(row, message):
            return self._conflict(message, row)
        verdict = self._database(lambda: self.claim(row, message), 'claiming the message')
        if verdict is not None:
            return verdict
        self._claimed = row
        return self._run_claimed(row, message)

    def _takes_fast(self, message: IncomingMessage) -> bool:
        """Whether `message` is claimed by take_on_arrival (one statement) before anything else is read."""
        return self._returning and not message.is_bad and message.message_id is not None and \
            self.hooks.finds_rows_as_carrot_does()

    def _take_on_arrival(self, message: IncomingMessage) -> MessageLog | None:
        """claim.take_on_arrival, with the deferred result of the task before in the same statement when
        there is one; that statement is tried once: refused, the result is written by a flush (a commit that
        waits for the disk, an outage waited out), and the claim alone follows.

        A delivery that goes another way leaves a deferred result to the flush after it (process() makes
        one after a disposition that is on disk; the lease thread one once its task has run for
        FLUSH_DURING_TASK_AFTER): the same flush that result would have waited for.

        With deliveries held behind this one, they are claimed ahead in the same statement, which writes
        every deferred result (carrot.consume.ahead)."""
        if self._claims_ahead and _runs_without_its_start(message):
            taken = _NOT_TRIED
            # One window at a time, and never while deliveries given back are being un-claimed: a claim
            # ahead made for a delivery given back meanwhile would wait for its lease.
            with self._window_lock:
                behind = self._to_claim_ahead(message)
                if behind or self.results.deferred_count() > 1:
                    taken = self._take_window(message, behind)
            if taken is _REFUSED:
                self.write_deferred_results()  # refused together: written apart, the claim alone follows
            elif taken is not _NOT_TRIED:
                return taken
        deferred = self.results.take_deferred()
        task_args, content = message.stored_arguments
        call = (message.message_id, text.for_column(message.shown_task, 200), task_args, content, self.worker,
                self.config.claim_lease)
        if deferred is not None:
            try:
                started, row = claim.complete_then_take(deferred.row, *call)
            except BaseException as exc:
                self.results.give_back(deferred)  # written by the flush below, or the next claim or flush
                if not isinstance(exc, DatabaseError):
                    raise
                if not may_pass(exc):  # not an outage (which the flush waits out and logs)
                    self.logger.warning('%s: a result and the next claim could not go in one statement (%s); '
                                        'writing them apart', self.name, describe_database_fault(exc))
                self.write_deferred_results()
            else:
                # started None: its row was deleted meanwhile, so nothing of it is left to flush.
                self.results.wrote_deferred(deferred, started, on_disk=started is None)
                claim.release(deferred.row.uuid)
                return row
        return self._database(lambda: claim.take_on_arrival(*call), 'claiming the message')

    def _call_of(self, message: IncomingMessage) -> tuple[str, str, str, str]:
        task_args, content = message.stored_arguments
        return message.message_id, text.for_column(message.shown_task, 200), task_args, content

    def _to_claim_ahead(self, message: IncomingMessage) -> list[IncomingMessage]:
        """The deliveries in hand behind `message` that may be claimed ahead with it: the ones carrot claims
        in one statement, not claimed ahead already, one delivery per message id."""
        seen = {message.message_id}
        behind = []
        for held in self.hooks.messages_in_hand():
            if held.message_id not in seen and held not in self.ahead and self._takes_fast(held) and \
                    _runs_without_its_start(held):
                seen.add(held.message_id)
                behind.append(held)
        return behind

    def _take_window(self, message: IncomingMessage, behind: list[IncomingMessage]):
        """claims_ahead.take_window for `message` and the deliveries `behind` it, with every deferred result:
        the row of `message` (or None, as take_on_arrival), or _REFUSED when the database refused the
        statement (the deferred results are deferred again: the caller writes them, and claims `message`
        alone)."""
        deferred = self.results.take_all_deferred()
        try:
            written, started, rows = claims_ahead.take_window(
                [d.row for d in deferred], [self._call_of(m) for m in (message, *behind)], self.worker,
                self.config.claim_lease)
        except BaseException as exc:
            self.results.give_back(*deferred)
            # Its answer lost (the connection, an interrupt), it may have committed: the rows it claimed
            # ahead are not known here, so every one it may have claimed is given back.
            self._unclaim_unknown(behind)
            if not isinstance(exc, DatabaseError):
                raise
            if not may_pass(exc):  # not an outage (which the flush waits out and logs)
                self.logger.warning('%s: claiming ahead was refused (%s); claiming one delivery at a time',
                                    self.name, describe_database_fault(exc))
            return _REFUSED
        for result in deferred:
            # A row deleted meanwhile was not written: nothing of it is left to flush.
            self.results.wrote_deferred(result, started, on_disk=result.row.pk not in written)
            claim.release(result.row.uuid)
        for held, row in zip(behind, rows[1:]):
            if row is not None:
                self.ahead.add(held, row)
        if rows[0] is not None:
            rows[0].started_time = timezone.now()  # in memory: written with the result
            self._start_written = False
        return rows[0]

    def _unclaim_unknown(self, behind: list[IncomingMessage]) -> None:
        """After a window statement whose outcome is unknown: un-claim what it may have claimed ahead for
        `behind` (never a row this process holds: a result deferred, the task running). Best effort: what
        stays claimed is taken over once its lease has run out."""
        rows = [MessageLog(uuid=m.message_id) for m in behind if not claim.is_held(m.message_id)]
        try:
            claims_ahead.unclaim(rows, self.worker)
        except Exception as exc:
            self.logger.warning('%s: could not give back what a window may have claimed ahead (%s); it is taken '
                                'over once its lease has run out', self.name, text.for_log(exc, 200))

    def _claimed_ahead(self, message: IncomingMessage) -> MessageLog | None:
        """The row claimed ahead for `message`, started now; None when there is none, or when it was claimed
        too long ago to be sure of its lease (then the normal claim takes it over, uncounted)."""
        found = self.ahead.take(message)
        if found is None:
            return None
        row, age = found
        if age >= claims_ahead.fresh_for(self.config.claim_lease):
            self.logger.info('%s: %s (%s) was claimed ahead %.1fs ago; claiming it again', self.name,
                             message.shown_task, row.uuid, age)
            return None
        row.started_time = timezone.now()
        self._start_written = False
        return row

    def give_back_claims_ahead(self, messages: list[IncomingMessage] | None = None) -> int:
        """Un-claim the rows claimed ahead for `messages` (None: for every delivery), which go back to the
        queue unrun (any thread; see carrot.consume.ahead). When that fails, the rows of `messages` stay
        claimed ahead for them and the error is raised; with None they are left to their lease."""
        # A window being claimed first (a statement's milliseconds); a task thread stuck in one (a locked
        # table) must not stop the connection thread from carrying on.
        if not self._window_lock.acquire(timeout=WINDOW_WAIT):
            raise TimeoutError(f'a claim of a window took more than {WINDOW_WAIT:g}s')
        try:
            rows = self.ahead.take_all(messages)
            if not rows:
                return 0
            try:
                return claims_ahead.unclaim(rows, self.worker)
            except BaseException:
                if messages is not None:
                    self.ahead.give_back(rows, messages)
                raise
        finally:
            self._window_lock.release()

    def write_deferred_results(self) -> None:
        """Write the results deferred to the next claim and flush, waiting out an outage (any thread)."""
        self._database(self.results.flush, 'recording the result', interruptible=False)

    def _write_durably(self, row: MessageLog) -> tuple[bool, object]:
        """A deferred result written by a flush (carrot.consume.unflushed), in a commit that waits for the
        disk, on whichever thread flushes. Refused for good, it is written reduced, as any result is."""
        try:
            written = write_completion(row, wait_for_disk=True)
        except DatabaseError as exc:
            if may_pass(exc) or of_the_session(exc):
                raise  # waited out by the flush's caller
            self.save(row, interruptible=False, fields=COMPLETION_FIELDS)  # waits for the disk
            written = (False, None)  # nothing of it left to flush
        claim.release(row.uuid)
        return written

    def _write_many_durably(self, rows: list[MessageLog]) -> tuple[set, object]:
        """Deferred results written together by a flush, in one commit that waits for the disk (a window's,
        carrot.consume.ahead); refused, the flush writes them one by one."""
        try:
            written, started = claims_ahead.write_completions(rows)
        except DatabaseError as exc:
            if may_pass(exc) or of_the_session(exc):
                raise  # waited out by the flush's caller
            written, started = set(), None
            for row in rows:  # one by one: a row refused for good is written reduced (_write_durably)
                one, its_start = self._write_durably(row)
                if one:
                    written.add(row.pk)
                    started = its_start
            return written, started
        for row in rows:
            claim.release(row.uuid)
        return written, started

    # -- queues that track less ('track': 'failures' or 'none')

    def _untracked(self, message: IncomingMessage) -> Disposition | None:
        """Run a message of a queue that logs only failures (or nothing) without a row, or return None to
        take the tracked way: when it has a row (written because the broker was down when it was
        published, or for a retry) or is a django.tasks Task (whose result lives in its row).

        Without a row there is no claim: a delivery is run by the one consumer RabbitMQ gave it to, and
        a copy -- a redelivery after a lost connection, a duplicate publish -- runs again (at least once,
        as Celery's acks_late). A first delivery (never redelivered, never round the delay levels) has
        no row by construction, so it is run without asking the database at all."""
        try:
            func = registry.get_task(message.task)
        except TaskNotRegistered:
            return None  # refused the tracked way: a FAILED row says why
        if registry.django_task(func):
            return None
        if not _first_delivery(message):
            found = self._database(lambda: MessageLog.objects.filter(uuid=message.message_id).exists(),
                                   'reading the log row')
            if found:
                return None
            if _from_delay_levels(message):
                return self._orphaned(message, DELAYED_COPY)
        outcome = self.run(func, list(message.args), dict(message.kwargs), log_limit=self.config.max_stored_text)
        task_log = self._clean_up_after_task(message, outcome.log)
        if outcome.succeeded:
            return ACK
        delay = retry.next_delay(retry.policy_for(message.task, func, self.config), outcome.error, 0)
        if delay is None and self.queue.track == TRACK_NONE:
            self.logger.error('%s: %s (%s) failed: %s', self.name, message.shown_task, message.message_id,
                              text.for_log(outcome.exception, 1000))
            return DEAD_LETTER
        # A failure is logged in full, and a retry needs a row to count on: write it now, as if claimed.
        row = self._database(lambda: self._insert_claimed(message), 'recording the failure', interruptible=False)
        if row is None:
            return retry_later(RETRY_BASE)  # a row appeared meanwhile (a copy): look again later
        self._claimed = row
        row.log = task_log
        return self._failed(row, message, outcome, delay)

    def _insert_claimed(self, message: IncomingMessage) -> MessageLog | None:
        """The row of an untracked message that failed, as the claim would have left it; None if the id
        has a row already."""
        row = new_row(message, self.queue, message.message_id, self.config.max_stored_text)
        now = timezone.now()
        row.status, row.attempts, row.worker, row.started_time = MessageLog.IN_PROGRESS, 1, self.worker, now
        if not MessageLog.objects.bulk_create([row], ignore_conflicts=True) or \
                not MessageLog.objects.filter(uuid=row.uuid, worker=self.worker, attempts=1,
                                              status=MessageLog.IN_PROGRESS).exists():
            return None
        row.pk = MessageLog.objects.only('pk').get(uuid=row.uuid).pk
        row._state.adding = False
        return row

    def _row_or_orphaned(self, message: IncomingMessage) -> MessageLog | Disposition:
        """The row of a delivery the fast claim did not take: read, or inserted for a message from another
        publisher -- never for a copy whose row is gone, which is dead-lettered (the module docstring)."""
        rows = MessageLog.objects.filter(uuid=message.message_id)
        if not self.hooks.finds_rows_as_carrot_does():  # a 1.x get_message_log reads it, once carrot has asked
            if not self._database(rows.exists, 'reading the log row'):
                lost = self._database(lambda: _how_its_row_went(message), 'reading the log row')
                if lost is not None:
                    return self._orphaned(message, lost)
            return self._database(lambda: self.hooks.get_message_log(message), 'reading the log row')
        row = self._database(rows.first, 'reading the log row')
        if row is not None:
            return row
        lost = self._database(lambda: _how_its_row_went(message), 'reading the log row')
        if lost is not None:
            return self._orphaned(message, lost)
        return self._database(lambda: insert_foreign_row(message, self.queue, self.config.max_stored_text),
                              'recording the message')

    def _orphaned(self, message: IncomingMessage, how: str) -> Disposition:
        """A copy whose row is gone (see the module docstring): `how` says what tells it."""
        self.logger.warning('%s: %s (%s) %s; dead-lettered without running', self.name, message.shown_task,
                            message.message_id, how)
        return DEAD_LETTER

    # -- the claim

    def _too_early(self, row: MessageLog, message: IncomingMessage) -> Disposition | None:
        """Park a message that came before its row's run_after for the rest of the wait."""
        if row.run_after is None or row.status not in claim.TAKEABLE:
            return None
        left = (row.run_after - timezone.now()).total_seconds()
        if left <= 0:
            return None
        self.logger.info('%s: %s (%s) may run at %s; parked for another %.1fs', self.name, message.shown_task,
                         row.uuid, row.run_after.isoformat(), left)
        return retry_later(left)

    def claim(self, row: MessageLog, message: IncomingMessage) -> Disposition | None:
        """Take the row for this worker (returns None: run it now), or say what to do instead."""
        for _ in range(5):  # each lost compare-and-set re-reads the row; five is more than enough
            early = self._too_early(row, message)
            if early is not None:
                return early
            now = timezone.now()
            if row.status == MessageLog.COMPLETED:
                self.logger.warning('%s: %s (%s) is already COMPLETED; acking the duplicate delivery '
                                    'without running it again', self.name, message.shown_task, row.uuid)
                # Its worker may have written that result without waiting for the disk and died before a
                # flush: this ack must not come before one.
                self._database(self._flush_everything, 'flushing results to disk', interruptible=False)
                return ACK
            if row.status == MessageLog.FAILED:
                self.logger.warning('%s: %s (%s) is already FAILED; dead-lettering this delivery without '
                                    'running it', self.name, message.shown_task, row.uuid)
                return DEAD_LETTER
            if row.status == MessageLog.IN_PROGRESS:
                if not claim.worker_is_dead(row, now, own_holds=1):
                    delay = min(self.config.claim_lease, RETRY_BASE * 2 ** message.waits)
                    self.logger.info('%s: %s (%s) is running on %s; trying again in %gs', self.name,
                                     message.shown_task, row.uuid, text.for_log(row.worker, 100), delay)
                    return retry_later(delay, busy=True)
                if row.started_time is None:
                    # Claimed in a window by a worker that died (carrot.consume.ahead): not a lost attempt,
                    # the claim's count is this run's.
                    taken = self._take(row, claim.from_lost_worker(row), count_attempt=False)
                else:
                    # Retries are counted apart: only the runs whose worker was lost count towards max_attempts.
                    if row.attempts - row.retries >= self.config.max_attempts:
                        return self._worker_lost(row, message)
                    self._keep_lost_attempt(row)
                    taken = self._take(row, claim.from_lost_worker(row))
            elif row.status in claim.TAKEABLE:
                taken = self._take(row, claim.from_waiting(now))
            else:
                self._fail_row(row, BadMessage(f'its log row has an unknown status '
                                               f'{text.for_log(row.status, 40)!r}'))
                return DEAD_LETTER
            if taken:
                return None
            try:
                row.refresh_from_db()
            except MessageLog.DoesNotExist:
                return self._orphaned(message, DELETED_AS_IT_CAME)
        return retry_later(RETRY_BASE)

    def _take(self, row: MessageLog, condition, count_attempt: bool = True) -> bool:
        return claim.take(row, self.worker, self.config.claim_lease, condition, count_attempt)

    def _worker_lost(self, row: MessageLog, message: IncomingMessage) -> Disposition:
        self._keep_lost_attempt(row)
        if not self._take(row, claim.from_lost_worker(row), count_attempt=False):
            return retry_later(RETRY_BASE)  # someone else took it meanwhile; look again later
        self._fail_row(row, WorkerLost(
            f'worker lost after {row.attempts - row.retries} attempts: the process running this task died or '
            f'lost its connection each time (CARROT["max_attempts"] is {self.config.max_attempts})'))
        return DEAD_LETTER

    def _keep_lost_attempt(self, row: MessageLog) -> None:
        """Keep the attempt of a dead worker (before a claim overwrites its worker and start)."""
        self._keep_attempt(row, TaskAttempt.LOST, exception_class=exception_class_path(WorkerLost()),
                           exception=f'worker lost: {row.worker} died or lost its connection while it ran the task',
                           finished=None)

    def _keep_attempt(self, row: MessageLog, outcome: str, finished=False, **fields) -> None:
        """Keep the attempt `row` holds now as a TaskAttempt; a database that refuses it costs the history
        that one line, never the task's result."""
        finished = timezone.now() if finished is False else finished
        try:
            self._database(lambda: record_attempt(row, outcome, self.config.max_stored_text, finished=finished,
                                                  **fields), 'recording the attempt', interruptible=False)
        except DatabaseError:
            if not _still_there(row):
                self.logger.warning('%s: attempt %d of %s is not kept: its log row was deleted while it ran',
                                    self.name, row.attempts, row.uuid)
                return
            self.logger.exception('%s: attempt %d of %s could not be kept', self.name, row.attempts, row.uuid)

    def renew_lease(self, message_id: str) -> bool:
        """Push the lease of a row this worker holds forward (called from the connection thread)."""
        return claim.renew_lease(message_id, self.worker, self.config.claim_lease)

    # -- running and recording

    def _run_claimed(self, row: MessageLog, message: IncomingMessage) -> Disposition:
        # One line per task at INFO, when it ends: the process title and the Workers tab show what runs.
        if _kept_by_a_handler(self.logger, logging.DEBUG):
            self.logger.debug('%s: running %s (%s), attempt %d', self.name, message.shown_task, row.uuid,
                              row.attempts)
        try:
            func = registry.get_task(message.task)
        except TaskNotRegistered as exc:
            self._keep_attempt(row, TaskAttempt.FAILED, exception_class=exception_class_path(exc),
                               exception=str(exc))
            self._fail_row(row, exc)
            return DEAD_LETTER
        # A django.tasks Task runs the way Django's tasks API says (context, signals, strict JSON).
        django_run = djangotask.DjangoRun(func, row, self.config) if registry.django_task(func) else None
        outcome = self.run(django_run or func, list(message.args), dict(message.kwargs),
                           log_limit=self.config.max_stored_text)
        row.log = self._clean_up_after_task(message, outcome.log)
        if not outcome.succeeded:
            delay = retry.next_delay(retry.policy_for(message.task, func, self.config), outcome.error,
                                     row.retries)
            disposition = self._failed(row, message, outcome, delay)
            if disposition is DEAD_LETTER and django_run is not None:
                django_run.finished(row)
            return disposition
        row.status = MessageLog.COMPLETED
        row.completion_time = timezone.now()
        row.output = outcome.output
        row.lease_expires = None
        # A task_finished receiver may read the result back: a django.tasks result is written at once.
        on_disk = self._record_success(row, may_defer=django_run is None)
        if django_run is not None:
            django_run.finished(row)
        self.logger.info('%s: %s (%s) completed in %.3fs, attempt %d', self.name, message.shown_task, row.uuid,
                         (row.completion_time - row.started_time).total_seconds(), row.attempts)
        return ACK if on_disk else ACK_AFTER_FLUSH

    def _record_success(self, row: MessageLog, may_defer: bool = True) -> bool:
        """Write a success; returns False when its commit did not wait for the disk (the next delivery is
        in hand, and a later commit flushes this one: carrot.consume.unflushed)."""
        if not completion_skips_the_orm():  # someone listens to MessageLog's save signals: the ORM's save
            self.save(row, interruptible=False, fields=COMPLETION_FIELDS)
            return True  # what waits for a flush is flushed by process() before it returns
        bound_result(row, self.config.max_stored_text)
        skip = self.hooks.another_message_waits()
        # Not behind a claim ahead when this claim wrote its start: a worker dying in the task after it
        # would count this one's attempt as lost (carrot.consume.ahead).
        if may_defer and skip and self._returning and self.results.usable() and \
                self.hooks.finds_rows_as_carrot_does() and not (self._start_written and self.ahead):
            # Written with the next delivery's claim (carrot.consume.unflushed); held till then, so no
            # claimer in this process takes the row, IN_PROGRESS meanwhile, for a dead worker's.
            # Seldom any, unless claimed ahead: every way here passed a claim, which wrote it, unless a
            # flush had it in hand. Behind a claim ahead, results gather for the next claim or the last.
            if self.results.deferred and not self._claims_ahead:
                self.write_deferred_results()
            claim.hold(row.uuid)
            self.unflushed_number = self.results.defer(row)
            return False

        def write() -> bool:
            skipping = skip and self.results.usable()
            upto = self.results.stamp()
            if not skipping and self._claims_ahead and self.results.deferred:
                return self._write_window(row, upto)
            written, server_started = write_completion(row, wait_for_disk=not skipping)
            if not written:  # deleted meanwhile: nothing of it to flush (nor did this commit flush anything)
                return True
            if skipping:
                self.unflushed_number = self.results.wrote_unflushed(server_started)
                return False
            self.results.wrote_flushed(server_started, upto)
            return True
        try:
            return self._database(write, 'recording the result', interruptible=False)
        except DatabaseError:  # refused for good: save() writes it reduced
            self.save(row, interruptible=False, fields=COMPLETION_FIELDS)
            return True

    def _write_window(self, row: MessageLog, upto: int) -> bool:
        """The last success of a window written with the results deferred before it, in one commit that
        waits for the disk (carrot.consume.ahead)."""
        deferred = self.results.take_all_deferred()
        try:
            written, started = claims_ahead.write_completions([*(d.row for d in deferred), row])
        except BaseException:
            self.results.give_back(*deferred)
            raise
        for result in deferred:
            self.results.wrote_deferred(result, None, on_disk=True)
            claim.release(result.row.uuid)
        if row.pk in written:
            self.results.wrote_flushed(started, upto)
        return True

    def _failed(self, row: MessageLog, message: IncomingMessage, outcome: TaskOutcome,
                delay: float | None) -> Disposition:
        """A run that raised: retried in `delay` seconds, or (None) kept as a failed attempt and FAILED."""
        if delay is not None:
            return self._retry(row, message, outcome, delay)
        self._keep_attempt(row, TaskAttempt.FAILED, exception_class=outcome.exception_class,
                           exception=outcome.exception, traceback=outcome.traceback, log=outcome.log)
        row.traceback = outcome.traceback
        self._fail_row(row, outcome.exception)
        return DEAD_LETTER

    def _clean_up_after_task(self, message: IncomingMessage, log: str | None) -> str | None:
        """Whatever transaction state the task left its connections in, carrot's own writes (the result)
        and the next task go to a clean one: a connection left in a transaction or read-only is replaced
        (what the task did not commit is rolled back). Returns the task's `log` with a line that says so."""
        try:
            left = reset_connections_left_in_transaction()
        except Exception:  # never worth the result: the next message's drop_broken_connections tries again
            self.logger.exception('%s: could not check the database connections after %s', self.name,
                                  message.message_id)
            return log
        for alias, how in left.items():
            note = (f'the task left the database connection {alias!r} {how}; carrot rolled back what it had '
                    f'not committed and recorded the result on a fresh connection')
            self.logger.warning('%s: %s (%s): %s', self.name, message.shown_task, message.message_id, note)
            line = logging.Formatter(LOG_FORMAT).format(logging.LogRecord(
                TASK_LOGGER, logging.WARNING, __file__, 0, 'carrot: %s', (note,), None))
            log = f'{log}\n{line}' if log else line
        return log

    def _retry(self, row: MessageLog, message: IncomingMessage, outcome: TaskOutcome, delay: float) -> Disposition:
        """Keep the failed attempt, schedule the row for the retry, and park the message until then."""
        now = timezone.now()
        self._keep_attempt(row, TaskAttempt.RETRIED, exception_class=outcome.exception_class,
                           exception=outcome.exception, traceback=outcome.traceback, log=outcome.log, finished=now)
        row.status = MessageLog.SCHEDULED
        row.run_after = now + timedelta(seconds=delay)
        row.retries += 1
        row.exception, row.traceback, row.lease_expires = outcome.exception, outcome.traceback, None
        if not self.save(row, interruptible=False):  # deleted while it ran: that was the last attempt
            return DEAD_LETTER
        self.logger.warning('%s: %s (%s) failed (%s); retry %d in %.1fs', self.name, message.shown_task, row.uuid,
                            text.for_log(outcome.exception, 200), row.retries, delay)
        return retry_later(delay)

    def _fail_row(self, row: MessageLog, err) -> None:
        """FAILED through the consumer's fail() (1.x extension point: failure callbacks run there)."""
        row.lease_expires = None
        try:
            self._database(lambda: self.hooks.fail(row, err), 'recording the failure', interruptible=False)
        except BaseException as exc:  # a broken fail() override or an unwritable row: still FAILED
            self.logger.error('%s: fail() raised %s for %s; writing a reduced FAILED row', self.name,
                              text.for_log(f'{type(exc).__name__}: {exc}'), row.uuid)
            row.status = MessageLog.FAILED
            row.failure_time = row.failure_time or timezone.now()
            row.exception = row.exception or text.for_log(err, 1000)
            self.save(row, interruptible=False)

    def record_failure(self, row: MessageLog, err, traceback_text: str | None = None) -> None:
        """Mark `row` FAILED with `err` and write it (what every fail() hook does first)."""
        set_failed_fields(row, err, traceback_text)
        self.save(row, interruptible=False)

    def save(self, row: MessageLog, interruptible: bool = True, fields: tuple[str, ...] | None = None) -> bool:
        """Write `row` (only `fields`, when given), bounded to its columns; False when the row has been
        deleted meanwhile (in the monitor or the admin), which is never written again: a deleted task stays
        deleted, a retry of it included. A transient fault is waited out (the ack waits too); a row the
        database refuses for good is written reduced, so a task that ran is never run again because its
        result could not be stored."""
        bound_row(row, self.config.max_stored_text)

        def update() -> bool:
            # update_fields makes Django's save an UPDATE alone: no INSERT when it matches nothing.
            try:
                row.save(update_fields=fields or _ALL_FIELDS)
            except DatabaseError:
                if _still_there(row):
                    raise
                return False
            return True
        try:
            if self._database(update, 'recording the result', interruptible=interruptible):
                return True
            self.logger.warning('%s: the log row of %s (%s) was deleted while its task ran; it is not written '
                                'again', self.name, text.for_log(row.task), row.uuid)
            return False
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
        return True

    # -- refusals

    def _refuse(self, message: IncomingMessage, problem: str) -> Disposition:
        """FAILED + dead-letter for a message that cannot be run, on its own row when its id is taken."""
        self.logger.error('%s: refusing %s (%s): %s', self.name, message.shown_task,
                          text.for_log(message.message_id, 100), text.for_log(problem, 500))
        row = None
        if message.message_id is not None:
            row = self._database(lambda: self.hooks.get_message_log(message), 'reading the log row')
            if not same_call(row, message) or row.status not in (*claim.TAKEABLE, MessageLog.FAILED):
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

    def _unexpected(self, message: IncomingMessage, exc: BaseException) -> Disposition:
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
        except BaseException:
            self.logger.exception('%s: could not even record that failure', self.name)
        return DEAD_LETTER

    # -- database retries

    def _should_give_up(self) -> bool:
        return self.stopping.is_set() or (self.abandoned is not None and self.abandoned.is_set())


_REFUSED = object()  # _take_window: the database refused the statement
_NOT_TRIED = object()  # _take_on_arrival: nothing to claim ahead, nor results to write together


def _runs_without_its_start(message: IncomingMessage) -> bool:
    """Whether `message` may be claimed in a window, its start written only with its result
    (carrot.consume.ahead): not a django.tasks Task, whose result, read while it runs, says when it started."""
    try:
        return not registry.django_task(registry.get_task(message.task))
    except TaskNotRegistered:
        return True  # refused once it is its turn, as from any claim


def _kept_by_a_handler(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` from `logger` reaches a handler whose level keeps it. The task logger
    ('carrot', lowered to CARROT['task_log_level'] so a task's own lines reach its row) lowers the level of
    every carrot logger with it; a worker's debug line a task was made, only for the handlers to drop it,
    for a tenth of its logging time."""
    if not logger.isEnabledFor(level):
        return False
    current = logger
    while current is not None:
        if any(level >= handler.level for handler in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _first_delivery(message: IncomingMessage) -> bool:
    """Whether this is the message as its publisher sent it: not redelivered, not back from the delay levels
    (a delayed publish, a retry, a parked copy), not dead-lettered before, and not sent from a row (the
    relay's or the sweep's copy: wire.LOGGED_HEADER)."""
    headers = getattr(message.properties, 'headers', None) or {}
    return not message.redelivered and not message.waits and delays.TARGET_HEADER not in headers \
        and wire.DEATH_HEADER not in headers and wire.LOGGED_HEADER not in headers


DELAYED_COPY = ('came out of the delay levels, but its log row is gone (deleted, requeued as another message '
                'or cleaned up meanwhile)')
DELETED_AS_IT_CAME = 'lost its log row as it was about to be claimed (deleted or requeued meanwhile)'
REQUEUED_COPY = 'was requeued as another message meanwhile (a copy held by a worker while its row was requeued)'


def _how_its_row_went(message: IncomingMessage) -> str | None:
    """Why a message whose id has no row is a copy of a task whose row went, not a message from another
    publisher to be logged and run: it came out of the delay levels, or its id was requeued as another
    message (that message's row names it as its origin). None: nothing says so."""
    if _from_delay_levels(message):
        return DELAYED_COPY
    if MessageLog.objects.filter(origin=message.message_id).exists():
        return REQUEUED_COPY
    return None


def _still_there(row: MessageLog) -> bool:
    """Whether `row` is still in the table (True when that cannot be read: the error is then the news)."""
    try:
        return MessageLog.objects.filter(pk=row.pk).exists()
    except DatabaseError:
        return True


def _from_delay_levels(message: IncomingMessage) -> bool:
    """Whether `message` came out of carrot's delay levels, where carrot sent it from its committed row: it
    names its queue for the way out, and RabbitMQ has dead-lettered it out of level queues only. A copy
    that was dead-lettered from a work queue since (and moved back from ``<queue>.dead`` by hand) was not
    sent by carrot, whatever headers it kept."""
    headers = getattr(message.properties, 'headers', None) or {}
    if delays.TARGET_HEADER not in headers:
        return False
    deaths = headers.get(wire.DEATH_HEADER)
    if not isinstance(deaths, (list, tuple)):
        return True  # none yet: a copy with no delay left, sent straight through the levels
    return all(isinstance(death, dict) and _text(death.get('queue')).startswith(f'{delays.PREFIX}.')
               for death in deaths)


def _text(value) -> str:
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value or '')


class DefaultHooks(Hooks):
    """The hooks when the processor is used on its own (tests, tools): rows by uuid, a plain fail()."""

    def __init__(self, processor: MessageProcessor):
        self.processor = processor

    def get_message_log(self, message):
        return get_or_insert_row(message, self.processor.queue, self.processor.config.max_stored_text)

    def finds_rows_as_carrot_does(self) -> bool:
        return type(self).get_message_log is DefaultHooks.get_message_log

    def fail(self, log, err, traceback_text=None):
        self.processor.record_failure(log, err, traceback_text)


