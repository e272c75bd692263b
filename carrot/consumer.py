"""A blocking consumer of one queue: one task at a time (prefetch 1), acked only once its log is written.

Threads: the thread that calls `run()` owns the pika connection and keeps its I/O (AMQP heartbeats,
SIGTERM handling, acks) flowing; the task runs in a single executor thread, which also writes the
MessageLog rows through its own DB connection. The loop settles (acks or dead-letters) a delivery when the
executor says how it went, so a task longer than the AMQP heartbeat does not lose its connection.

Delivery guarantees: at least once. A worker that dies mid-task leaves the message unacked, so RabbitMQ
delivers it again; the log's IN_PROGRESS status and attempt count tell the next worker, and past
CARROT['max_attempts'] the task is marked FAILED ("worker lost") and dead-lettered. A redelivery whose log
is already COMPLETED is acked without running again.
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from django.db import DatabaseError, IntegrityError, connections
from django.utils import timezone

from carrot import messages, registry
from carrot.broker import CONNECTION_ERRORS, connect, declare_queue
from carrot.config import BrokerConfig, QueueConfig, get_config
from carrot.exceptions import BadMessage, TaskNotRegistered, TaskTimeLimitExceeded
from carrot.models import MessageLog
from carrot.objects import DefaultMessageSerializer, VirtualHost
from carrot.runner import TASK_LOGGER, run_task

IDLE_POLL = 0.5          # seconds the loop waits for broker I/O between ticks (bounds stop latency)
RECONNECT_DELAYS = (1, 2, 5, 10, 30)
DB_RETRY_DELAYS = (0.5, 2, 5)


class Disposition(enum.Enum):
    ACK = 'ack'                  # done (completed, or a duplicate of a completed one)
    DEAD_LETTER = 'dead-letter'  # failed for good: reject without requeue, RabbitMQ moves it to <queue>.dead
    REQUEUE = 'requeue'          # could not even record it (database down): give it back for later


@dataclass
class Delivery:
    """The message being worked on, as the connection thread sees it."""
    delivery_tag: int
    task: str
    message_id: str | None
    started: float = field(default_factory=time.monotonic)
    future: Future | None = None


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
        # declares its queues durable with the arguments in carrot.broker.queue_arguments.
        self.config = get_config()
        self.queue = queue if isinstance(queue, QueueConfig) else self.config.queue(queue)
        self.broker = _broker_of(host) or self.queue.broker
        self.logger = logger or logging.getLogger('carrot.consumer')
        self.name = name or f'{self.queue.name}#1'
        self.failure_callbacks: list[Callable] = []
        self.stopping = threading.Event()
        self.on_tick: Callable[[], None] | None = None        # called every loop turn (supervisor heartbeat)
        self.on_status: Callable[[str], None] | None = None   # told 'idle' / 'running <task> 3.1s'
        self.task_time_limit: float | None = self.config.task_time_limit
        self.messages_settled = 0
        self.delivery: Delivery | None = None
        self._current_method = None
        self._executor: ThreadPoolExecutor | None = None

    # -- extension points -------------------------------------------------------------------------

    def add_failure_callback(self, callback: Callable) -> None:
        self.failure_callbacks.append(callback)

    def get_task_type(self, properties, body) -> str:
        return self.serializer.get_task_type(properties, body)

    def get_message_log(self, properties, body) -> MessageLog:
        """The log row of this message, created if it came from another publisher (or has no id)."""
        message_id = properties.message_id or _new_uuid()
        method = self._current_method
        defaults = dict(status=MessageLog.PUBLISHED, queue=self.queue.name, publish_time=timezone.now(),
                        priority=properties.priority or 0, task=_header_task(properties),
                        exchange=getattr(method, 'exchange', '') or '',
                        routing_key=getattr(method, 'routing_key', None))
        defaults.update(_arguments_for_log(body))
        try:
            log, _ = MessageLog.objects.get_or_create(uuid=message_id, defaults=defaults)
        except IntegrityError:  # a concurrent create of the same uuid won the race
            log = MessageLog.objects.get(uuid=message_id)
        return log

    def fail(self, log: MessageLog, err, traceback_text: str | None = None) -> None:
        """Mark `log` FAILED with `err`, then run the failure callbacks. The loop dead-letters the message."""
        self.logger.error('%s: task %s (%s) failed: %s', self.name, log.task, log.uuid, err)
        log.status = MessageLog.FAILED
        log.failure_time = timezone.now()
        # carrot's own errors already read as sentences; other exceptions are prefixed with their type.
        plain = not isinstance(err, BaseException) or isinstance(err, (BadMessage, TaskNotRegistered))
        log.exception = str(err) if plain else f'{type(err).__name__}: {err}'
        if traceback_text is not None:
            log.traceback = traceback_text
        self._save(log)
        for callback in self.failure_callbacks:
            try:
                callback(log, err)
            except Exception:
                self.logger.exception('%s: failure callback %r raised', self.name, callback)

    # -- one message (runs in the executor thread) --------------------------------------------------

    def process_message(self, method, properties, body) -> Disposition:
        """Record, run and record again; returns what the connection thread should do with the message."""
        self._current_method = method
        try:
            log = self.get_message_log(properties, body)
        except DatabaseError as exc:
            self.logger.error('%s: cannot record message %s, giving it back to the queue: %s',
                              self.name, properties.message_id, exc)
            connections.close_all()
            return Disposition.REQUEUE
        if log.status == MessageLog.COMPLETED:
            self.logger.warning('%s: %s (%s) is already COMPLETED; acking the duplicate delivery without '
                                'running it again', self.name, log.task, log.uuid)
            return Disposition.ACK
        if log.status == MessageLog.FAILED and method.redelivered:
            return Disposition.DEAD_LETTER  # failed before the reject reached the broker
        if log.status == MessageLog.IN_PROGRESS and log.attempts >= self.config.max_attempts:
            self.fail(log, f'worker lost after {log.attempts} attempts: the process running this task '
                           f'died or lost its connection each time (CARROT["max_attempts"] is '
                           f'{self.config.max_attempts})')
            return Disposition.DEAD_LETTER

        try:
            task_path = self.get_task_type(properties, body)
            if log.task != task_path:
                log.task = task_path
            func = registry.get_task(task_path)
            args, kwargs = self.serializer.serialize_arguments(body)
        except (BadMessage, TaskNotRegistered) as exc:
            self.fail(log, exc)
            return Disposition.DEAD_LETTER

        log.status = MessageLog.IN_PROGRESS
        log.attempts += 1
        log.started_time = timezone.now()
        log.worker = worker_id()
        log.exception = log.traceback = ''
        self._save(log)
        self.logger.info('%s: running %s (%s), attempt %d', self.name, task_path, log.uuid, log.attempts)

        outcome = run_task(func, args, kwargs)
        log.log = outcome.log
        if outcome.succeeded:
            log.status = MessageLog.COMPLETED
            log.completion_time = timezone.now()
            log.output = outcome.output
            self._save(log)
            self.logger.info('%s: %s (%s) completed', self.name, task_path, log.uuid)
            return Disposition.ACK
        self.fail(log, outcome.exception, outcome.traceback)
        return Disposition.DEAD_LETTER

    def _save(self, log: MessageLog) -> None:
        """Save, retrying a few times across a database blip (the ack waits for this)."""
        for delay in DB_RETRY_DELAYS + (None,):
            try:
                log.save()
                return
            except DatabaseError:
                if delay is None:
                    raise
                self.logger.warning('%s: saving the log of %s failed; retrying in %ss', self.name,
                                    log.uuid, delay, exc_info=True)
                connections.close_all()
                time.sleep(delay)

    def _process_safely(self, method, properties, body) -> Disposition:
        """process_message, with whatever escapes it (a broken subclass, a dead DB) turned into a requeue."""
        try:
            return self.process_message(method, properties, body)
        except Exception:
            self.logger.exception('%s: could not process message %s; giving it back to the queue',
                                  self.name, properties.message_id)
            time.sleep(DB_RETRY_DELAYS[-1])  # don't spin on a message that cannot be recorded
            return Disposition.REQUEUE

    # -- the connection loop (runs in the calling thread) -------------------------------------------

    def run(self, max_messages: int | None = None, idle_timeout: float | None = None) -> None:
        """Consume until stop() (or SIGTERM in a supervised child), `max_messages` settled, or no message
        for `idle_timeout` seconds. Reconnects when the broker goes away. Raises TaskTimeLimitExceeded
        when a task overruns `task_time_limit`: its thread cannot be stopped, so the process should end."""
        if logging.getLogger(TASK_LOGGER).level == logging.NOTSET:
            logging.getLogger(TASK_LOGGER).setLevel(logging.INFO)  # so tasks' info lines reach the log field
        registry.autodiscover()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f'carrot-{self.name}')
        try:
            self._reconnecting_loop(max_messages, idle_timeout)
        except TaskTimeLimitExceeded:
            self._executor.shutdown(wait=False)  # the overrunning task still holds the thread
            self._executor = None
            raise
        finally:
            self._shutdown_executor()

    def _reconnecting_loop(self, max_messages, idle_timeout) -> None:
        attempt = 0
        while not self._finished(max_messages):
            try:
                self._consume(max_messages, idle_timeout)
                attempt = 0
                if idle_timeout is not None:
                    return
            except CONNECTION_ERRORS as exc:
                self._wait_for_delivery()  # its log is written; the lost ack means a redelivery
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                attempt += 1
                self.logger.warning('%s: connection to %s lost (%s: %s); reconnecting in %ss',
                                    self.name, self.broker, type(exc).__name__, exc, delay)
                self._sleep(delay)

    def stop(self) -> None:
        """Stop taking messages; the task in hand is finished and acked first."""
        self.stopping.set()

    def _finished(self, max_messages) -> bool:
        return self.stopping.is_set() or (max_messages is not None and self.messages_settled >= max_messages)

    def _consume(self, max_messages, idle_timeout) -> None:
        connection = connect(self.broker)
        try:
            channel = connection.channel()
            declare_queue(channel, self.queue)
            channel.basic_qos(prefetch_count=1)
            consumer_tag = channel.basic_consume(self.queue.name, self._on_message(connection))
            self.logger.info('%s: consuming %s on %s', self.name, self.queue.name, self.broker)
            self._tick()  # say "idle" (and heartbeat) now, not after the first poll
            last_activity = time.monotonic()
            while True:
                connection.process_data_events(time_limit=IDLE_POLL)
                if self.delivery and self.delivery.future.done():
                    self._settle(channel, self.delivery)
                    last_activity = time.monotonic()
                self._enforce_time_limit(channel)
                self._tick()
                if self.delivery is not None:
                    last_activity = time.monotonic()
                    continue
                idle_for = time.monotonic() - last_activity
                if self._finished(max_messages) or (idle_timeout is not None and idle_for >= idle_timeout):
                    if consumer_tag is not None:
                        channel.basic_cancel(consumer_tag)
                        consumer_tag = None
                    # A delivery may have arrived just before the cancel; finish it first.
                    connection.process_data_events(time_limit=0)
                    if self.delivery is None:
                        break
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except CONNECTION_ERRORS:
                    pass

    def _on_message(self, connection):
        def on_message(channel, method, properties, body):
            delivery = Delivery(method.delivery_tag, _header_task(properties), properties.message_id)
            delivery.future = self._executor.submit(self._process_safely, method, properties, body)
            # Wake the connection loop as soon as the task is done, instead of at its next poll.
            delivery.future.add_done_callback(lambda _: connection.add_callback_threadsafe(lambda: None))
            self.delivery = delivery
        return on_message

    def _settle(self, channel, delivery: Delivery) -> None:
        disposition = delivery.future.result()
        if disposition is Disposition.ACK:
            channel.basic_ack(delivery.delivery_tag)
        elif disposition is Disposition.DEAD_LETTER:
            channel.basic_reject(delivery.delivery_tag, requeue=False)
        else:
            channel.basic_nack(delivery.delivery_tag, requeue=True)
        self.delivery = None
        self.messages_settled += 1

    def _enforce_time_limit(self, channel) -> None:
        """Fail and dead-letter a task that overran the time limit, then raise to end this process."""
        delivery = self.delivery
        if delivery is None or not self.task_time_limit or delivery.future.done():
            return
        elapsed = time.monotonic() - delivery.started
        if elapsed < self.task_time_limit:
            return
        error = self._fail_overrun(delivery, f'the task was still running after {elapsed:.1f}s')
        channel.basic_reject(delivery.delivery_tag, requeue=False)
        self.delivery = None
        raise error

    def _fail_overrun(self, delivery: Delivery, what: str) -> TaskTimeLimitExceeded:
        """Mark an overrunning task FAILED (failure callbacks run); returns the error to raise."""
        error = TaskTimeLimitExceeded(f'time limit of {self.task_time_limit:g}s exceeded: {what}, so its '
                                      f'worker process was stopped')
        log = MessageLog.objects.filter(uuid=delivery.message_id).first() if delivery.message_id else None
        if log is not None:
            self.fail(log, error)
        return error

    def _tick(self) -> None:
        if self.on_status is not None:
            delivery = self.delivery
            self.on_status('idle' if delivery is None else
                           f'running {delivery.task} {time.monotonic() - delivery.started:.1f}s')
        if self.on_tick is not None:
            self.on_tick()

    def _wait_for_delivery(self) -> None:
        """After the connection is lost: let the task in hand finish (its log row gets written; the
        message, unacked, is delivered again and then acked as a duplicate), within the time limit."""
        delivery, self.delivery = self.delivery, None
        while delivery is not None and not delivery.future.done():
            try:
                delivery.future.result(timeout=IDLE_POLL)
            except TimeoutError:
                pass
            if self.task_time_limit and time.monotonic() - delivery.started > self.task_time_limit:
                # FAILED in the log: its redelivery is then dead-lettered without running again.
                raise self._fail_overrun(delivery, 'the task was still running while the broker '
                                                   'connection was down')
            self._tick()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self._tick()
            self.stopping.wait(min(IDLE_POLL, max(0.0, deadline - time.monotonic())))

    def _shutdown_executor(self) -> None:
        if self._executor is None:
            return
        # The executor thread has its own DB connection; close it from that thread.
        self._executor.submit(connections.close_all).result()
        self._executor.shutdown(wait=True)
        self._executor = None


def worker_id() -> str:
    return f'{socket.gethostname()}:{os.getpid()}'


def _new_uuid() -> str:
    import uuid
    return str(uuid.uuid4())


def _broker_of(host) -> BrokerConfig | None:
    if host is None or isinstance(host, BrokerConfig):
        return host
    if isinstance(host, VirtualHost):
        return host.config
    if isinstance(host, str):
        return VirtualHost(url=host).config
    raise TypeError(f'host must be a VirtualHost, a BrokerConfig or a URL, got {host!r}')


def _header_task(properties) -> str:
    try:
        return messages.task_type(properties)[:200]
    except BadMessage:
        return '(no task type header)'


def _arguments_for_log(body) -> dict:
    """What to show as the arguments of a message, even one whose body is broken."""
    import json
    try:
        args, kwargs = messages.decode_arguments(body)
        return dict(task_args=json.dumps(args), content=json.dumps(kwargs))
    except BadMessage:
        return dict(task_args='', content=repr(body)[:10000])
