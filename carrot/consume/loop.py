"""The 1.x ``Consumer``: consume one queue, one task at a time, ack only once its log is written.

It composes three parts, each with one job:

- the session (carrot.amqp.session): the AMQP connection, consuming and settling -- the only pika user;
- the processor (carrot.consume.processor): claim the log row, run the task, record it -> a Disposition;
- the task thread (carrot.consume.task_thread): the executor thread the processor runs in.

Threads: the thread that calls `run()` owns the connection and keeps its I/O flowing (AMQP heartbeats,
the supervisor's heartbeat through `on_tick`, SIGTERM, the claim lease); the processor runs in the task
thread, with its own DB connection. The task thread goes on from a delivery to the next one held (a run,
`_run_from`); the connection thread settles the deliveries it finished, in order, and starts the next run.
See README.rst, "Delivery guarantees".
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Callable

from django.db import DatabaseError, connections
from django.utils import timezone

from carrot import registry, text
from carrot.amqp import wire
from carrot.amqp.connection import describe_connection_error
from carrot.amqp.disposition import ACK, DEAD_LETTER, REQUEUE, Action, Disposition
from carrot.amqp.session import SESSION_ERRORS, ConsumeSession
from carrot.amqp.wire import DefaultMessageSerializer, IncomingMessage
from carrot.backoff import Outage
from carrot.config import BrokerConfig, QueueConfig, get_config
from carrot.config.parse import parse_broker
from carrot.consume.claim import worker_id
from carrot.consume.logrows import get_or_insert_row, insert_row, record_attempt
from carrot.consume.processor import Hooks, MessageProcessor
from carrot.consume.runner import TASK_LOGGER, exception_class_path
from carrot.consume.task_thread import Delivery, TaskThread
from carrot.exceptions import QueueMismatchError, TaskTimeLimitExceeded
from carrot.consume.offload import Offload
from carrot.models import MessageLog, TaskAttempt

__all__ = ['Consumer', 'Disposition', 'worker_id']

IDLE_POLL = 0.5         # seconds the loop waits for broker I/O between ticks (bounds stop latency)
RECONNECT_BASE = 1.0    # first wait before reconnecting to the broker; doubled per failure ...
RECONNECT_CAP = 30.0    # ... up to this (jittered), and reset once a connection succeeds
CLASH_RETRY = 30.0      # seconds between tries to declare a queue that clashes with the existing one
CLASH_REMINDER = 600.0  # ... and between the ERROR lines saying so
# A result written without waiting for the disk waits for a later commit to flush it before its delivery is
# acked (carrot.consume.unflushed); when the task after it runs this long, the lease thread flushes instead.
FLUSH_DURING_TASK_AFTER = 0.2
FLUSH_RETRY = 1.0  # seconds between tries of a flush that failed
# Deliveries held beyond the running one (prefetch above 1) go back to the queue once the first of them has
# waited this long, so an idle consumer can run them; this consumer takes new ones once its task is done.
GIVE_BACK_HELD_AFTER = 0.5


class Consumer:
    """Consume one queue. Subclass to customise (set as a queue's ``consumer_class``).

    Extension points kept from django-carrot 1.x: ``serializer``, ``get_message_log(properties, body)``,
    ``get_task_type(properties, body)``, ``fail(log, err)`` and ``add_failure_callback(callback)`` where
    the callback is called as ``callback(log, exception)`` after a task is marked FAILED.
    """
    serializer = DefaultMessageSerializer()

    def __init__(self, host, queue, logger: logging.Logger | None = None, name: str | None = None,
                 durable: bool = True, queue_arguments: dict | None = None,
                 exchange_arguments: dict | None = None):
        # durable, queue_arguments and exchange_arguments are accepted for 1.x subclasses; carrot always
        # declares its queues durable with the arguments of carrot.amqp.declare (by queue type).
        self.config = get_config()
        self.queue = queue if isinstance(queue, QueueConfig) else self.config.queue(queue)
        self.broker = _broker_of(host) or self.queue.broker
        self.logger = logger or logging.getLogger('carrot.consumer')
        self.name = name or f'{self.queue.name}#1'
        self.failure_callbacks: list[Callable] = []
        self.stopping = threading.Event()
        self.on_tick: Callable[[], None] | None = None        # called every loop turn (supervisor heartbeat)
        self.on_status: Callable[[str], None] | None = None   # told 'idle' / 'running <task> 3.1s'
        # Called in the task thread after each message is processed (the supervised child ends there
        # whatever processes the task left running).
        self.after_task: Callable[[], None] | None = None
        self.task_time_limit: float | None = self.config.task_time_limit
        self.messages_settled = 0
        self.delivery: Delivery | None = None
        # Deliveries in hand beyond the running one (a queue's 'prefetch' above 1), in arrival order.
        self._held: collections.deque[Delivery] = collections.deque()
        # The task thread goes on from one delivery to the next held one by itself (a run), instead of
        # waiting for this thread to hand it over: the two threads exchange deliveries under this lock.
        self._handover = threading.Lock()
        self._runs_on = False            # whether the task thread may go on to a held delivery (_next_in_run)
        self._done_in_run: list[Delivery] = []  # done in a run that went on: settled by this thread, in order
        self._being_settled = 0          # of those, taken and not settled yet: _next_in_run counts them
        # Deliveries done whose results were committed without waiting for the disk: acked after a flush.
        self._unflushed: list[Delivery] = []
        self._flush_future = None        # a flush on the lease thread (see _flush_when_stuck)
        self._next_flush = 0.0           # monotonic time before which a failed flush is not tried again
        self._next_give_back = 0.0       # ... and a give-back whose claims ahead could not be given back
        self._max_messages: int | None = None
        self._paused = False             # consuming stopped while a long task runs (held deliveries given back)
        self._processor: MessageProcessor | None = None
        self._thread: TaskThread | None = None
        self._current_message: IncomingMessage | None = None
        self._lease_renewed = 0.0
        self._lease_future = None        # the renewal in flight on the lease thread
        self._lease_offload: Offload | None = None
        # One line when renewing the lease starts failing, a reminder a minute, one when it works again.
        self._lease_outage = Outage(self.logger, self.name, 'the database (for the claim lease)')

    @property
    def processor(self) -> MessageProcessor:
        """The message processor, made on first use (after the supervisor has set `stopping`)."""
        if self._processor is None or self._processor.stopping is not self.stopping:
            self._processor = MessageProcessor(self.queue, self.config, self.logger, self.name,
                                               hooks=_ConsumerHooks(self), stopping=self.stopping)
        return self._processor

    # -- extension points -------------------------------------------------------------------------

    def add_failure_callback(self, callback: Callable) -> None:
        self.failure_callbacks.append(callback)

    def get_task_type(self, properties, body) -> str:
        return self.serializer.get_task_type(properties, body)

    def get_message_log(self, properties, body) -> MessageLog:
        """The log row of this message, inserted first if it came from another publisher."""
        message = self._current_message
        if message is None or message.properties is not properties:
            message = self.decode(None, properties, body)
        if message.message_id is None:
            import uuid
            return insert_row(message, self.queue, str(uuid.uuid4()), self.config.max_stored_text)
        return get_or_insert_row(message, self.queue, self.config.max_stored_text)

    def fail(self, log: MessageLog, err, traceback_text: str | None = None) -> None:
        """Mark `log` FAILED with `err`, then run the failure callbacks. The loop dead-letters the message."""
        self.logger.error('%s: task %s (%s) failed: %s', self.name, text.for_log(log.task),
                          text.for_log(log.uuid), text.for_log(err, 1000))
        self.processor.record_failure(log, err, traceback_text)
        for callback in self.failure_callbacks:
            try:
                callback(log, err)
            except BaseException:  # KeyboardInterrupt from a callback is its bug, not a stop request
                self.logger.exception('%s: failure callback %r raised', self.name, callback)

    # -- one message --------------------------------------------------------------------------------

    def decode(self, method, properties, body) -> IncomingMessage:
        """The delivery as an IncomingMessage (never raises: a broken message carries its problem)."""
        return wire.decode_delivery(method, properties, body, self.config.max_message_size,
                                        get_task_type=self.get_task_type,
                                        get_arguments=self.serializer.serialize_arguments)

    def process(self, message: IncomingMessage, abandoned: threading.Event | None = None) -> Disposition:
        """Claim, run and record one message (in the task thread); never raises."""
        self._current_message = message
        try:
            return self.processor.process(message, abandoned)
        finally:
            self._current_message = None
            if self.after_task is not None:
                try:
                    self.after_task()
                except BaseException:  # noqa: B036 -- a clean-up problem is logged, never the worker's end
                    self.logger.exception('%s: cleaning up after the task failed', self.name)

    # -- the connection loop (runs in the calling thread) -------------------------------------------

    def run(self, max_messages: int | None = None, idle_timeout: float | None = None) -> None:
        """Consume until stop() (or SIGTERM in a supervised child), `max_messages` settled, or no message
        for `idle_timeout` seconds. Reconnects when the broker goes away. Raises TaskTimeLimitExceeded
        when a task overruns `task_time_limit`: its thread cannot be stopped, so the process should end."""
        # A task's own lines down to CARROT['task_log_level'] reach its MessageLog, whatever --loglevel says
        # (the supervisor's log handler keeps its own level).
        task_logger = logging.getLogger(TASK_LOGGER)
        wanted = logging.getLevelName(self.config.task_log_level)
        if task_logger.getEffectiveLevel() > wanted:
            task_logger.setLevel(wanted)
        registry.autodiscover()
        self._max_messages = max_messages
        self.processor  # made here, once: the task thread and the lease thread share it
        self._thread = TaskThread(self.name)
        try:
            self._reconnecting_loop(max_messages, idle_timeout)
        except TaskTimeLimitExceeded:
            self._thread.abandon()  # the overrunning task still holds the thread
            raise
        finally:
            self._thread.close()
            if self._lease_offload is not None:
                self._lease_offload.close(timeout=1.0)
                self._lease_offload = None
                self._lease_future = None

    def stop(self) -> None:
        """Stop taking messages; the task in hand is finished and acked first."""
        self.stopping.set()

    def _finished(self, max_messages) -> bool:
        return self.stopping.is_set() or (max_messages is not None and self.messages_settled >= max_messages)

    def _reconnecting_loop(self, max_messages, idle_timeout) -> None:
        broker = Outage(self.logger, self.name, f'the broker {self.broker}', cap=RECONNECT_CAP,
                        base=RECONNECT_BASE)
        clash = None  # monotonic time the queue clash was last logged, while there is one
        while not self._finished(max_messages):
            # A worker that stops after a few messages (max_tasks_per_child) holds no more than it will run.
            prefetch = self.queue.prefetch if max_messages is None else \
                max(1, min(self.queue.prefetch, max_messages - self.messages_settled))
            session = ConsumeSession(self.broker, self.queue, self.logger, self.name,
                                     delay_levels=self.config.delay_levels,
                                     confirm_timeout=self.config.confirm_timeout, prefetch=prefetch)
            try:
                session.open(self._on_delivery(session))
            except QueueMismatchError as exc:
                if idle_timeout is not None:  # a bounded run (a test, a script) is told at once
                    raise
                # Restarting this worker would clash again: it waits instead, and tries again now and then
                # (the operator may delete or rename the queue meanwhile).
                if clash is None or time.monotonic() - clash >= CLASH_REMINDER:
                    self.logger.error('%s: cannot consume %s: %s -- this worker waits and tries again every '
                                      '%.0fs', self.name, self.queue.name, exc, CLASH_RETRY)
                    clash = time.monotonic()
                self._sleep(CLASH_RETRY)
                continue
            except SESSION_ERRORS as exc:
                self._sleep(broker.failed(self._describe(exc, session), exc))
                continue
            broker.recovered()
            if clash is not None:
                self.logger.info('%s: the clash of queue %s is resolved', self.name, self.queue.name)
                clash = None
            self.logger.info('%s: consuming %s on %s', self.name, self.queue.name, session.where)
            lost = False
            try:
                self._consume(session, max_messages, idle_timeout)
                if idle_timeout is not None:
                    return
            except SESSION_ERRORS as exc:
                lost = True
                delivery = self.delivery
                if delivery is not None and not delivery.done:
                    self.logger.warning('%s: lost the connection to %s (%s) while running %s (%s); the task '
                                        'goes on, its message will be delivered again and acked as a '
                                        'duplicate once it is done', self.name, session.where,
                                        self._describe(exc, session), delivery.task, delivery.message_id)
                self._wait_for_delivery()  # its log is written; the lost ack means a redelivery
                self._write_deferred_result()  # ... and the task's before it
                self._give_back_claims_ahead()  # the held ones come again: to any worker, at once
                self._sleep(broker.failed(self._describe(exc, session), exc))
            finally:
                with self._handover:
                    self._runs_on = False
                # Held deliveries go back unrun: their claims ahead first (carrot.consume.ahead).
                self._give_back_claims_ahead()
                with self._handover:
                    self._held.clear()  # unacked: RabbitMQ delivers them again once the channel is gone
                    self._done_in_run.clear()  # ... and these, found COMPLETED (or acked as duplicates)
                self._unflushed.clear()  # ... these too: a redelivery finds their rows COMPLETED
                self._flush_future = None
                self._paused = False
                session.close(lost=lost)

    def _describe(self, exc: BaseException, session: ConsumeSession | None = None) -> str:
        node = session.node if session is not None else None
        return text.for_log(describe_connection_error(exc, self.broker, node), 400)

    def _consume(self, session: ConsumeSession, max_messages, idle_timeout) -> None:
        self._tick()  # say "idle" (and heartbeat) now, not after the first poll
        last_activity = time.monotonic()
        self._runs_on = True
        while True:
            session.poll(IDLE_POLL)
            # What the task thread finished: in one look, so the run's deliveries are settled in order.
            with self._handover:
                done_in_run, self._done_in_run = self._done_in_run, []
                self._being_settled = len(done_in_run)
                current = self.delivery
                finished = current is not None and current.done
            for delivery in done_in_run:
                self._settle_in_turn(session, delivery, max_messages)
                self._being_settled -= 1  # counted in messages_settled now, where it counts
            if finished:
                self._settle_in_turn(session, current, max_messages)
            if done_in_run or finished:
                # Once for all of them: the results one flush made durable are acked with one frame.
                self._settle_unflushed(session)
                last_activity = time.monotonic()
            if finished:
                self.delivery = None
                following = self._take_held() if not self._finished(max_messages) else None
                if following is not None:
                    self._start(following, session)
                elif self._paused and not self._finished(max_messages):
                    session.resume()
                    self._paused = False
            self._flush_when_stuck(session)
            self._give_back_held_during_long_task(session)
            self._enforce_time_limit(session)
            self._tick()
            if self.delivery is not None:
                last_activity = time.monotonic()
                continue
            idle_for = time.monotonic() - last_activity
            if self._finished(max_messages) or (idle_timeout is not None and idle_for >= idle_timeout):
                session.cancel()
                session.poll(0)  # a delivery may have arrived just before the cancel; finish it first
                if self.delivery is None:
                    self._flush_before_leaving(session)
                    return

    def _on_delivery(self, session: ConsumeSession):
        def on_delivery(method, properties, body):
            try:
                message = self.decode(method, properties, body)
            except Exception as exc:  # a broken decode() override: the processor still records it
                message = IncomingMessage(task='', shown_task='(undecodable)', message_id=None, body=b'',
                                          properties=properties,
                                          problem=f'the message could not be decoded: '
                                                  f'{type(exc).__name__}: {text.for_log(exc, 300)}')
            delivery = Delivery(method.delivery_tag, message.shown_task, message.message_id, message=message)
            if self.delivery is None:  # only this thread sets it to None: no run is going on
                self._start(delivery, session)
            else:
                with self._handover:
                    self._held.append(delivery)  # prefetch above 1: it waits its turn here, unacked
        return on_delivery

    def _take_held(self) -> Delivery | None:
        with self._handover:
            return self._held.popleft() if self._held else None

    def _start(self, delivery: Delivery, session: ConsumeSession) -> None:
        """Hand `delivery` to the idle task thread, which runs it and may go on to the held ones after it
        (_run_from)."""
        self.delivery = delivery
        self._lease_renewed = delivery.started = time.monotonic()
        delivery.future = Future()
        self._thread.submit(self._run_from, delivery, session, on_done=session.wake)

    # -- runs: the task thread goes on by itself (it runs this part)

    def _run_from(self, delivery: Delivery, session: ConsumeSession) -> None:
        """Run `delivery`, then each held delivery after it while _next_in_run() allows, in the task thread.

        In a backlog this thread used to wait for the connection thread after every task: to be told it
        was done, settle it and hand the next one over -- two wake-ups and two hand-offs of the GIL a task,
        a seventh of a worker's CPU. Now the connection thread is woken only when a delivery must be settled
        at once (anything but a result that waits for a flush anyway: carrot.consume.unflushed) and when
        the run ends; it settles the run's deliveries in order (_done_in_run) whenever it wakes."""
        while delivery is not None:
            try:
                disposition, raised = self.process(delivery.message, delivery.abandoned), None
            except BaseException as exc:  # process() never raises; an override might: _settle says so
                disposition, raised = None, exc
            # The number of the result waiting for a flush, read now: the next delivery of the run resets it.
            delivery.flush_number = self.processor.unflushed_number
            with self._handover:
                following = self._next_in_run(disposition)
                if following is not None:
                    self._done_in_run.append(delivery)
                    # Started before it is shown: the connection thread reads self.delivery without the lock.
                    self._lease_renewed = following.started = time.monotonic()
                    following.future = Future()
                    self.delivery = following
                # Done only now: the connection thread that sees it done also sees whether the run went on.
                if raised is None:
                    delivery.future.set_result(disposition)
                else:
                    delivery.future.set_exception(raised)
            if following is not None and disposition.on_disk:
                session.wake()  # an ack, a dead-letter, a retry to carry out now
            delivery = following

    def _next_in_run(self, disposition: Disposition | None) -> Delivery | None:
        """The held delivery the task thread goes on to (taken from the held ones), or None: the run ends
        there and the connection thread takes over. Called under the hand-over lock."""
        if disposition is None or not self._runs_on or not self._held or self._paused or self.stopping.is_set():
            return None
        if self._max_messages is not None and \
                self.messages_settled + self._being_settled + len(self._done_in_run) + 2 > self._max_messages:
            return None  # the last ones are started by the connection thread, which stops consuming first
        return self._held.popleft()

    # -- settling (the connection thread)

    def _settle_in_turn(self, session: ConsumeSession, delivery: Delivery, max_messages) -> None:
        last = max_messages is not None and self.messages_settled + 1 >= max_messages
        if last and session.consuming:
            session.cancel()  # before the ack that frees a place: no message taken only to go back
        self._settle(session, delivery)
        if last and not self._finished(max_messages) and not self._paused:
            session.resume()  # that one did not count (parked for later): consume on

    def _settle(self, session: ConsumeSession, delivery: Delivery) -> None:
        try:
            disposition = delivery.future.result()
        except BaseException:  # process() never raises; if an override does, the message is not run again
            self.logger.exception('%s: processing %s raised; dead-lettering it', self.name, delivery.task)
            disposition = DEAD_LETTER
        if disposition.on_disk:
            session.settle(delivery.delivery_tag, disposition, delivery.message)
        else:
            self._unflushed.append(delivery)  # acked once a flush has made its result durable
        if disposition.action in (Action.ACK, Action.DEAD_LETTER):
            self.messages_settled += 1

    # -- results written without waiting for the disk (carrot.consume.unflushed)

    def _settle_unflushed(self, session: ConsumeSession) -> None:
        """Ack the deliveries whose results a flush has made durable; give back (requeue) those a server
        restart may have lost (the redelivery finds the row COMPLETED, or runs the task again); keep the
        others until a flush settles them."""
        if not self._unflushed:
            return
        results = self.processor.results
        kept, durable, given_back = [], [], 0
        for waiting in self._unflushed:
            verdict = results.verdict(waiting.flush_number)
            if verdict is None:
                kept.append(waiting)
            elif verdict:
                durable.append(waiting)
            else:
                session.settle(waiting.delivery_tag, REQUEUE, waiting.message)
                given_back += 1
        self._unflushed = kept
        self._ack(session, durable)
        if given_back:
            self.logger.warning('%s: the database server restarted before %d results written without waiting '
                                'for the disk were flushed; their messages go back to the queue', self.name,
                                given_back)

    def _ack(self, session: ConsumeSession, durable: list[Delivery]) -> None:
        """Ack `durable` -- in one frame when no other delivery below the highest of them is unsettled on
        the channel (an ack with `multiple` takes every one up to its tag): a run of results flushed
        together is acked together, one frame for RabbitMQ to handle instead of eight."""
        if not durable:
            return
        highest = max(delivery.delivery_tag for delivery in durable)
        with self._handover:
            unsettled = [*self._unflushed, *self._held, *self._done_in_run]
            current = self.delivery
        if current is not None and all(current is not delivery for delivery in durable):
            unsettled.append(current)  # running, or settled just now: above these either way
        if len(durable) > 1 and all(delivery.delivery_tag > highest for delivery in unsettled):
            session.ack_up_to(highest)
            return
        for delivery in durable:
            session.settle(delivery.delivery_tag, ACK, delivery.message)

    def _flush_when_stuck(self, session: ConsumeSession) -> None:
        """Results wait for a flush while no task runs (a stop is coming, held deliveries were given back)
        or while the task after them runs longer than FLUSH_DURING_TASK_AFTER: flush them on the lease
        thread, so their deliveries are not held unacked. A flush that fails is tried again every second."""
        pending = self._flush_future
        if pending is not None:
            if not pending.done():
                return
            self._flush_future = None
            exc = pending.exception()
            if exc is None:
                self._lease_outage.recovered()
                self._settle_unflushed(session)
            else:
                self._lease_outage.failed(f'flushing {len(self._unflushed)} results: {text.for_log(exc, 200)}')
                self._next_flush = time.monotonic() + FLUSH_RETRY
            return
        delivery = self.delivery
        if not self._results_wait() or time.monotonic() < self._next_flush:
            return
        # A task done is settled on the next turn, with whatever its own commit flushed.
        if delivery is not None and (delivery.done or delivery.age < FLUSH_DURING_TASK_AFTER):
            return
        self._flush_future = self._lease_thread.submit(self._flush_in_lease_thread)

    def _give_back_held_during_long_task(self, session: ConsumeSession) -> None:
        """A delivery has waited GIVE_BACK_HELD_AFTER behind a running task: stop consuming and give back
        every held one to the queue (requeued where they were, marked redelivered), so an idle consumer
        runs them now. Not on a quorum queue: each return counts towards its delivery limit."""
        with self._handover:
            delivery = self.delivery
            if not self._held or delivery is None or delivery.done or self._held[0].age < GIVE_BACK_HELD_AFTER \
                    or self.queue.is_quorum or not session.consuming or time.monotonic() < self._next_give_back:
                return
            self._paused = True  # the run goes on to none of them
            held, self._held = list(self._held), collections.deque()
        if not self._give_back_claims_ahead(held):
            with self._handover:  # still claimed for them: kept, and run here after the long task
                self._held.extendleft(reversed(held))
                self._paused = False
            self._next_give_back = time.monotonic() + FLUSH_RETRY
            return
        session.cancel()  # pika gives back, itself, what arrives before the broker confirms the cancel
        for waiting in held:
            session.settle(waiting.delivery_tag, REQUEUE, waiting.message)
        self.logger.info('%s: %d messages waited %.1fs behind %s (running for %.1fs); they go back to the '
                         'queue for other consumers', self.name, len(held), held[0].age, delivery.task,
                         delivery.age)

    def _give_back_claims_ahead(self, held: list[Delivery] | None = None) -> bool:
        """Un-claim the rows claimed ahead for `held` (None: for every delivery), going back to the queue
        unrun, on the lease thread; False (logged) when the database refused (carrot.consume.ahead)."""
        processor = self.processor
        if not processor.ahead:
            return True
        messages = None if held is None else [delivery.message for delivery in held]
        try:
            self._on_lease_thread(processor.give_back_claims_ahead, messages)
        except Exception as exc:
            self.logger.warning('%s: could not give back the claims of the messages held behind the running one '
                                '(%s); %s', self.name, text.for_log(exc, 200),
                                'they are kept' if held is not None else
                                'they are taken over once their lease has run out')
            return False
        return True

    def _results_wait(self) -> bool:
        """Whether results wait for a flush: deliveries kept unacked for one, or a result deferred to the
        next claim (carrot.consume.unflushed), which a flush writes."""
        return bool(self._unflushed) or self.processor.results.deferred

    def _write_deferred_result(self) -> None:
        """The connection is lost, or the loop ends: a result deferred to the next claim is written now, an
        outage waited out -- it is all there is of a task that ran, and its delivery, coming again, must
        find it COMPLETED (the task thread waits out the write of any other result the same way)."""
        if not self.processor.results.deferred and self._flush_future is None:
            return
        # A flush in flight (which may hold the deferred results, and fail) finishes first: the lease thread
        # runs one step at a time.
        self._flush_future = None
        try:
            self._on_lease_thread(self.processor.write_deferred_results)
        except Exception as exc:  # refused for good: its delivery comes again, and the task runs again
            self.logger.error('%s: could not write the result of the last task: %s; it will run again',
                              self.name, text.for_log(exc, 200))

    def _flush_in_lease_thread(self) -> None:
        try:
            self.processor.results.flush()
        except DatabaseError:
            connections.close_all()  # the lease thread's; the next flush (or the task's own commit) tries again
            raise

    def _flush_before_leaving(self, session: ConsumeSession) -> None:
        """Before the loop ends (stop, max_messages, idle timeout): flush and ack what waits for a flush.
        If that fails, the deliveries go back unacked with the channel and are found COMPLETED."""
        if not self._results_wait():
            return
        self._flush_future = None  # one in flight finishes first: the lease thread runs one step at a time
        try:
            self._on_lease_thread(self._flush_in_lease_thread)
        except Exception as exc:
            if self.processor.results.deferred:
                self._write_deferred_result()
            else:
                self.logger.warning('%s: could not flush %d results before stopping (%s); their messages are '
                                    'delivered again and acked as duplicates', self.name, len(self._unflushed),
                                    text.for_log(exc, 200))
                return
        self._settle_unflushed(session)

    def _enforce_time_limit(self, session: ConsumeSession) -> None:
        """Fail and dead-letter a task that overran the time limit, then raise to end this process."""
        if not self.task_time_limit:
            return
        with self._handover:
            delivery = self.delivery
            if delivery is None or delivery.done or delivery.age < self.task_time_limit:
                return
            # This process ends: should the task end while its failure is recorded, the run takes no other.
            self._runs_on = False
        error = self._fail_overrun(delivery, f'the task was still running after {delivery.age:.1f}s')
        session.reject(delivery.delivery_tag, delivery.message)
        self.delivery = None
        raise error

    def _fail_overrun(self, delivery: Delivery, what: str) -> TaskTimeLimitExceeded:
        """Mark an overrunning task FAILED (failure callbacks run); returns the error to raise."""
        error = TaskTimeLimitExceeded(f'time limit of {self.task_time_limit:g}s exceeded: {what}, so its '
                                      f'worker process was stopped')
        if delivery.message_id:
            started = timezone.now() - timedelta(seconds=delivery.age)
            self._on_lease_thread(self._fail_overrun_row, delivery.message_id, error, started)
        return error

    def _fail_overrun_row(self, message_id: str, error: TaskTimeLimitExceeded, started=None) -> None:
        log = MessageLog.objects.filter(uuid=message_id, status=MessageLog.IN_PROGRESS,
                                        worker=self.processor.worker).first()
        if log is not None:
            if log.started_time is None:  # claimed in a window: its start was only in memory (ahead)
                log.started_time = started
            record_attempt(log, TaskAttempt.FAILED, self.config.max_stored_text,
                           exception_class=exception_class_path(error), exception=str(error),
                           finished=timezone.now())
            self.fail(log, error)

    def _tick(self) -> None:
        delivery = self.delivery
        if delivery is not None:
            self._renew_lease(delivery)
        if self.on_status is not None:
            try:
                self.on_status('idle' if delivery is None else f'running {delivery.task} {delivery.age:.1f}s')
            except Exception:  # a process title is not worth a consumer
                self.logger.debug('%s: on_status raised', self.name, exc_info=True)
        if self.on_tick is not None:
            self.on_tick()

    def _renew_lease(self, delivery: Delivery) -> None:
        """Every third of CARROT['claim_lease'], push the claim of the running message forward, so other
        workers keep counting this one as alive. The renewal runs on the lease thread: this thread, which
        heartbeats, never waits on the database (a lock on the log table, a CREATE INDEX, VACUUM FULL).
        A renewal still waiting when the next is due is not doubled: the next one goes once it is done."""
        pending = self._lease_future
        if pending is not None:
            if not pending.done():
                return
            self._lease_future = None
            self._note_renewal(pending, delivery)
        if delivery.message_id is None or delivery.done:
            return
        now = time.monotonic()
        if now - self._lease_renewed < self.config.claim_lease / 3:
            return
        self._lease_renewed = now
        self._lease_future = self._lease_thread.submit(self._renew_in_lease_thread, delivery.message_id)

    def _renew_in_lease_thread(self, message_id: str) -> bool:
        try:
            return self.processor.renew_lease(message_id)
        except DatabaseError:
            connections.close_all()  # the lease thread's; a fresh one is opened on the next renewal
            raise

    def _note_renewal(self, future, delivery: Delivery) -> None:
        exc = future.exception()
        if isinstance(exc, DatabaseError):
            self._lease_outage.failed(f'renewing the claim of {delivery.message_id}: {text.for_log(exc, 200)}')
        elif exc is not None:
            self.logger.error('%s: renewing the claim of %s raised %s', self.name, delivery.message_id,
                              text.for_log(f'{type(exc).__name__}: {exc}', 300))
        else:
            self._lease_outage.recovered()

    @property
    def _lease_thread(self) -> Offload:
        """The thread for the connection thread's database work (lease renewals, an overrun's row)."""
        if self._lease_offload is None:
            self._lease_offload = Offload(f'{self.name}-lease')
        return self._lease_offload

    def _on_lease_thread(self, step, *args):
        """`step(*args)` on the lease thread, heartbeating while it waits on the database."""
        return self._lease_thread.call(step, *args, on_tick=self.on_tick)

    def _wait_for_delivery(self) -> None:
        """After the connection is lost: let the task in hand finish (its log row gets written; the
        message, unacked, is delivered again and then acked as a duplicate), within the time limit. A
        delivery not yet claimed (the database is down) is dropped: RabbitMQ delivers it again."""
        with self._handover:
            self._runs_on = False  # the task in hand is the last: the held ones come again
            delivery = self.delivery
        if delivery is not None:
            delivery.abandoned.set()
        while delivery is not None and not self._thread.wait(delivery.future, IDLE_POLL):
            if self.task_time_limit and delivery.age > self.task_time_limit:
                # FAILED in the log: its redelivery is then dead-lettered without running again.
                self.delivery = None
                raise self._fail_overrun(delivery, 'the task was still running while the broker '
                                                   'connection was down')
            self._tick()
        self.delivery = None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self._tick()
            self.stopping.wait(min(IDLE_POLL, max(0.0, deadline - time.monotonic())))


class _ConsumerHooks(Hooks):
    """The processor's hooks, routed to the consumer's 1.x extension points."""

    def __init__(self, consumer: Consumer):
        self.consumer = consumer

    def get_message_log(self, message: IncomingMessage) -> MessageLog:
        return self.consumer.get_message_log(message.properties, message.body)

    def fail(self, log: MessageLog, err) -> None:
        self.consumer.fail(log, err)

    def finds_rows_as_carrot_does(self) -> bool:
        return type(self.consumer).get_message_log is Consumer.get_message_log

    def another_message_waits(self) -> bool:
        consumer = self.consumer
        return bool(consumer._held) and not consumer._finished(consumer._max_messages)

    def messages_in_hand(self) -> list[IncomingMessage]:
        consumer = self.consumer
        with consumer._handover:
            if not consumer._runs_on or consumer._paused or consumer._finished(consumer._max_messages):
                return []
            return [delivery.message for delivery in consumer._held]




def _broker_of(host) -> BrokerConfig | None:
    """The broker a 1.x caller named: a VirtualHost (its .config), a BrokerConfig or a URL."""
    if host is None or isinstance(host, BrokerConfig):
        return host
    if isinstance(getattr(host, 'config', None), BrokerConfig):  # a 1.x carrot.objects.VirtualHost
        return host.config
    if isinstance(host, str):
        return parse_broker(host)
    raise TypeError(f'host must be a VirtualHost, a BrokerConfig or a URL, got {host!r}')
