"""The transactional outbox: a message's row is written first, and the message sent once it commits.

Everything that publishes comes through here: ``publish_message`` (the 1.x facade in carrot.utilities),
``MessageLog.requeue``, the scheduler, the relay of waiting messages and the monitor's actions.

1. ``prepare()`` (carrot.publish.outgoing) checks the call and builds an immutable ``Outgoing``.
2. ``enqueue()`` writes the MessageLog row first, with status WAITING ("waiting for the broker"), and
   sends at once, or after commit when called inside a transaction (so no consumer sees a message whose
   row may still roll back).
3. ``send()`` publishes through the confirmed Publisher of carrot.amqp.publisher -- a message whose
   ``run_after`` is still ahead through the delay levels (carrot.amqp.delays), for the seconds left.
   Once RabbitMQ confirms, the row becomes PUBLISHED (SCHEDULED when delayed), but only if it is still
   WAITING: a fast consumer may already have claimed it.

   - ``BrokerUnavailable`` (unreachable, connection lost, no confirm): with
     ``CARROT['store_and_forward']`` (the default) the row stays WAITING and the call returns normally;
     the relay (carrot.publish.relay) sends it later. Without it, the row is marked FAILED (it can be
     requeued from the admin or the monitor) and the error is raised.
   - ``MessageRejected`` (unroutable, nacked, no such exchange, too large, a queue clash): FAILED at
     once, and raised.

Outside a transaction the row's INSERT and its PUBLISHED commit without waiting for the disk
(carrot.commits); a row left WAITING for the relay is flushed before the call returns. Where the driver
allows (carrot.statements.Statement.send), the INSERT of a message to run now is sent just before the
message and its answer read while RabbitMQ confirms (a delayed message's row is committed first): a worker
quicker than the INSERT waits for it (the uuid is unique) or writes the row itself, and a database that
refuses the row once the message has left costs the publisher's row, not the task (its worker writes one).
A queue that tracks only failures (or nothing) gets no row at all unless one is needed (`_enqueue_untracked`).
``publish_many()`` does the same for many calls of one task, in batches whose confirms are awaited
together.
"""
from __future__ import annotations

import functools
import logging
import time
import uuid as uuid_module
from dataclasses import dataclass, field
from typing import Callable

from django.db import DatabaseError, IntegrityError, connections, models, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from carrot.amqp import wire
from carrot.amqp.publisher import publisher_for
from carrot.commits import without_waiting_for_disk
from carrot.config import get_config
from carrot.config.schema import TRACK_ALL
from carrot.dbfaults import MIGRATE_HINT, may_pass, tables_missing
from carrot.exceptions import (AlreadyRequeued, BrokerUnavailable, CarrotConfigException, InvalidCall, MessageRejected,
                               NotMigrated, PublishError, StillRunning)
from carrot.models import MessageLog
from carrot.publish import arguments
from carrot.publish.outgoing import Outgoing, prepare
from carrot.statements import InFlight, Statement, close_if_busy, close_if_out_of_step, statement

logger = logging.getLogger('carrot.publishing')

# What means "this message can never be sent as it stands": a call carrot refuses (an unregistered task,
# arguments that cannot be read back or encoded, an unknown queue), an invalid CARROT, or a refusal for
# good by the broker. Anything else (BrokerUnavailable above all) may pass.
UNSENDABLE = (InvalidCall, CarrotConfigException, MessageRejected)


def enqueue(message: Outgoing, *, on_commit: bool = True, store_and_forward: bool | None = None,
            on_enqueued: Callable[[MessageLog], None] | None = None) -> MessageLog:
    """Write the row (WAITING), then send: now, or when the surrounding transaction commits.

    Returns the row: PUBLISHED once RabbitMQ has it, WAITING while it waits for the broker or the commit.
    ``store_and_forward=None`` means CARROT['store_and_forward']. ``on_enqueued(row)`` is called once the
    task is sure to be delivered, never after a rollback: with store-and-forward when its row is
    committed, before the send (so before any worker can start it); without, once RabbitMQ has it.
    django.tasks' task_enqueued is sent there.
    """
    if store_and_forward is None:
        store_and_forward = get_config().store_and_forward
    connection = _connection_in_step()
    if _untracked(message):
        return _enqueue_untracked(message, connection, on_commit, store_and_forward, on_enqueued)
    if on_commit and connection.in_atomic_block:
        log = _write_row(message, wait_for_disk=False)
        transaction.on_commit(lambda: _send_after_commit(message, log, store_and_forward, on_enqueued),
                              using=MessageLog.objects.db)
        return log
    # A delayed message goes into the delay levels only once its row is committed: a copy that comes out
    # and finds no row is taken for one whose row was deleted, and is not run (carrot.consume.processor).
    if on_enqueued is None and message.run_after is None:
        log = _new_row(message)
        try:
            in_flight = _start_insert(log)
            if in_flight is not None:
                send(message, log, store_and_forward=store_and_forward, row_in_flight=in_flight)
                return log
        finally:
            # An interrupt anywhere from the INSERT's send to the reading of its answer (even before
            # _start_insert() returned it) leaves the answer unread: that connection is closed.
            close_if_busy(connection)
    log = _write_row(message, wait_for_disk=False)  # outside a transaction: see carrot.commits
    _deliver(message, log, store_and_forward, on_enqueued)
    return log


def _connection_in_step():
    """The log table's connection, closed first if an interrupt left its driver committing otherwise than
    Django believes (carrot.statements.close_if_out_of_step): the row would wait in a transaction that
    never commits, and the task be lost while the caller holds its row."""
    connection = transaction.get_connection(MessageLog.objects.db)
    close_if_out_of_step(connection)
    return connection


def _untracked(message: Outgoing) -> bool:
    """Whether `message` goes to a queue that logs only failures (or nothing) and needs no row to be
    sent: not delayed (the row says when it may run) and not a django.tasks Task (its result is there)."""
    return get_config().queue(message.queue).track != TRACK_ALL and message.run_after is None \
        and not message.backend


def _enqueue_untracked(message: Outgoing, connection, on_commit: bool, store_and_forward: bool,
                       on_enqueued: Callable[[MessageLog], None] | None) -> MessageLog:
    """Send without a row: the unsaved row is returned, as the caller may read it. A row is written
    after all when the message must wait for the broker (the relay sends it from there) or is refused."""
    log = _unsaved_row(message)

    def deliver():
        queue = get_config().queue(message.queue)
        try:
            publisher_for(queue.broker).publish(queue, message.body, message.properties, exchange=message.exchange,
                                                routing_key=message.routing_key)
        except (BrokerUnavailable, MessageRejected) as exc:
            # A row after all: the one the relay sends from, or the failure logged (as on a 'all' queue).
            waits = store_and_forward and isinstance(exc, BrokerUnavailable)
            if waits:
                logger.warning('%s (%s) waits for the broker and will be relayed: %s', message.task, message.uuid,
                               exc)
            stored = _write_row(message)  # a commit that waits: the row is all there is of this task now
            if not waits:
                fail_unsent(stored, exc)
            log.pk, log.status, log._state.adding = stored.pk, stored.status, False
            if not waits:
                raise
        if on_enqueued is not None:
            on_enqueued(log)

    if on_commit and connection.in_atomic_block:
        def after_commit():
            try:
                deliver()
            except Exception:
                logger.exception('publishing %s (%s) after commit failed', message.task, message.uuid)
        transaction.on_commit(after_commit, using=MessageLog.objects.db)
    else:
        deliver()
    return log


def _deliver(message: Outgoing, log: MessageLog, store_and_forward: bool,
             on_enqueued: Callable[[MessageLog], None] | None) -> None:
    if on_enqueued is not None and store_and_forward:
        on_enqueued(log)  # the committed row is enough: the relay sends it if this send cannot
    send(message, log, store_and_forward=store_and_forward)
    if on_enqueued is not None and not store_and_forward:
        on_enqueued(log)


def _new_row(message: Outgoing) -> MessageLog:
    """The WAITING row of `message`, not yet written."""
    task_args, content = arguments.dump(message.args, message.kwargs)
    return MessageLog(
        status=MessageLog.WAITING, queue=message.queue, exchange=message.exchange,
        routing_key=message.routing_key, uuid=message.uuid, priority=message.priority, task=message.task,
        task_args=task_args, content=content, publish_time=timezone.now(), run_after=message.run_after,
        backend=message.backend, origin=message.origin)


def _write_row(message: Outgoing, wait_for_disk: bool = True) -> MessageLog:
    """The WAITING row of `message`; its commit (outside a transaction) waits for the disk unless told
    not to, in one round trip either way."""
    return _write_new_row(_new_row(message), wait_for_disk)


def _write_new_row(row: MessageLog, wait_for_disk: bool, again: bool = False) -> MessageLog:
    """Write `row`. `again`: its first INSERT's answer was lost, so a row of its uuid is that INSERT's."""
    try:
        if wait_for_disk:
            row.save(force_insert=True)
        else:
            using = MessageLog.objects.db
            inserted = _insert_statement().run(_insert_params(row, using), using=using, fetch=True)
            if inserted is None and not again:  # ON CONFLICT DO NOTHING: the id has a row already, not ours
                raise IntegrityError(f'a MessageLog with uuid {row.uuid!r} exists already')
            _inserted(row, inserted[0] if inserted else MessageLog.objects.only('pk').get(uuid=row.uuid).pk)
        return row
    except DatabaseError as exc:
        if tables_missing(exc):
            raise NotMigrated(f"carrot's tables are missing from database {MessageLog.objects.db!r} "
                              f'({exc}): {MIGRATE_HINT}') from exc
        raise


def _start_insert(row: MessageLog) -> InFlight | None:
    """Send `row`'s INSERT without waiting for the answer (carrot.statements.Statement.send), or None
    where that cannot be done: then _write_row() writes it."""
    using = MessageLog.objects.db
    return _insert_statement().send(_insert_params(row, using), using=using, fetch=True)


def _land_row(row: MessageLog, in_flight: InFlight) -> None:
    """Read the answer of `row`'s INSERT sent by _start_insert(): `row` is then the row as written. A
    worker that had the message first (before this INSERT reached the table) wrote the row itself: then
    `row` is that one. Raises the DatabaseError that kept the row from being written."""
    inserted = in_flight.result()
    if inserted is not None:
        _inserted(row, inserted[0])
        return
    _inserted(row, MessageLog.objects.only('pk').get(uuid=row.uuid).pk)
    row.refresh_from_db()


def _inserted(row: MessageLog, pk: int) -> None:
    row.pk = pk
    row._state.adding, row._state.db = False, MessageLog.objects.db


def _insert_statement() -> Statement:
    return statement('insert_row', _insert_sql, MessageLog.objects.db)


def _insert_sql(connection) -> str:
    """The INSERT ... ON CONFLICT DO NOTHING RETURNING id of a row, as the ORM writes it (every column but
    the id, in field order). Nothing is returned when the uuid has a row already: a worker that received
    the message before its publisher's INSERT came wrote it (see enqueue)."""
    from django.db.models.constants import OnConflict
    from django.db.models.sql import InsertQuery
    query = InsertQuery(MessageLog, on_conflict=OnConflict.IGNORE)
    query.insert_values(_insert_fields(), [MessageLog()])
    compiler = query.get_compiler(connection=connection)
    compiler.returning_fields = [MessageLog._meta.pk]
    sql, _ = compiler.as_sql()[0]
    if 'RETURNING' not in sql.upper():  # a database that cannot return from an INSERT
        sql = f'{sql} RETURNING {connection.ops.quote_name(MessageLog._meta.pk.column)}'
    return sql


def _insert_params(row: MessageLog, using: str) -> list:
    """The values of `row` for _insert_sql, as the ORM would send them. A value that the ORM's conversion
    would return unchanged (see _as_they_are) is taken as it is: a publish fills 24 columns, most of them
    text or empty, and converting each was a tenth of publish_message's CPU."""
    connection = connections[using]
    params = []
    for column, verbatim in _insert_fields_verbatim():
        value = getattr(row, column.attname)
        params.append(value if type(value) in verbatim else column.get_db_prep_save(value, connection))
    return params


def _insert_fields() -> list:
    return [field for field in MessageLog._meta.concrete_fields if not field.primary_key]


@functools.cache
def _insert_fields_verbatim() -> list[tuple]:
    """(field, the types of value sent as they are) for each column of _insert_sql."""
    return [(field, _as_they_are(field)) for field in _insert_fields()]


def _as_they_are(field) -> tuple[type, ...]:
    """The types of value that `field.get_db_prep_save()` returns unchanged on every backend: a str or None
    in a plain CharField or TextField, None in a DateTimeField. Decided by the field's exact class (a
    subclass may convert); anything else is converted by the ORM (an int is wrapped for psycopg 3, a
    datetime checked for its timezone)."""
    if type(field) in (models.CharField, models.TextField):
        return str, type(None)
    if type(field) is models.DateTimeField:
        return (type(None),)
    return ()


def _send_after_commit(message: Outgoing, log: MessageLog, store_and_forward: bool,
                       on_enqueued: Callable[[MessageLog], None] | None) -> None:
    # The caller's transaction has committed: raising here would reach whoever committed, long after
    # publish_message returned. The row says what happened, and the log file too.
    try:
        _deliver(message, log, store_and_forward, on_enqueued)
    except Exception:
        logger.exception('publishing %s (%s) after commit failed', message.task, message.uuid)


def send(message: Outgoing, log: MessageLog, *, store_and_forward: bool, relaying: bool = False,
         from_status: str = MessageLog.WAITING, row_in_flight: InFlight | None = None) -> bool:
    """Publish a logged message and record the outcome on its row (see the module docstring), if the row
    is still `from_status`. True once RabbitMQ has it; False when it waits for the broker
    (store-and-forward).

    `row_in_flight`: the row's INSERT is on its way (enqueue sent it just before) and is read here while
    RabbitMQ confirms. If it fails, nothing was written: raised when nothing was sent either; when the
    message was sent, logged, and the worker that takes it writes the row (as for a message from another
    publisher)."""
    config = get_config()
    queue = config.queue(message.queue)
    delay = message.delay(timezone.now())
    properties = message.properties
    if queue.track != TRACK_ALL:  # sent from its row: the consumer must claim it there, not run it untracked
        properties = wire.with_logged_header(properties)
    try:
        try:
            publisher_for(queue.broker).publish(queue, message.body, properties,
                                                exchange=message.exchange, routing_key=message.routing_key,
                                                delay=delay, delay_levels=config.delay_levels)
        except BaseException as exc:
            if row_in_flight is not None:
                _land_row_after_failure(log, row_in_flight, exc)
            raise
    except BrokerUnavailable as exc:
        if store_and_forward:
            # The relay logs an outage once per broker, not once per message and try.
            logger.log(logging.DEBUG if relaying else logging.WARNING,
                       '%s (%s) waits for the broker and will be relayed: %s', message.task, message.uuid, exc)
            if not relaying:
                _make_durable(log)
            return False
        fail_unsent(log, exc, from_status)
        raise
    except MessageRejected as exc:
        fail_unsent(log, exc, from_status)
        raise
    if row_in_flight is not None and not _landed_after_sending(message, log, row_in_flight):
        return True
    try:
        mark_published(log, scheduled=delay > 0, from_status=from_status)
    except DatabaseError as exc:
        # The message is on its way: raising would tell the caller it is not, and a caller that publishes
        # again runs the task twice. The row reads as before until a worker claims it; if none does within
        # the relay's wait, the relay sends it again, and the copy is recognised by its id.
        logger.error('%s (%s) was sent, but its log row could not be updated (%s); it is run all the same',
                     message.task, message.uuid, exc)
        connections[MessageLog.objects.db].close_if_unusable_or_obsolete()  # the caller's next query opens one
    return True


def _land_row_after_failure(log: MessageLog, in_flight: InFlight, exc: BaseException) -> None:
    """Read the answer of the INSERT of a row whose message was not sent, so the failure can be recorded
    on it. If the INSERT failed: a message RabbitMQ refused for good (MessageRejected) was not sent, so
    the DatabaseError is raised, as when the row is written first; one that may have arrived all the same
    (BrokerUnavailable: a confirm lost with the connection) gets its row written once more, on a new
    connection if need be, to wait for the relay (a copy is recognised by its id) -- raised only if that
    fails too. A send that failed for a reason of its own (an interrupt, a bug) is the one raised."""
    try:
        _land_row(log, in_flight)
    except DatabaseError as refused:
        if not isinstance(exc, PublishError):
            logger.exception('the log row of %s (%s) could not be written either', log.task, log.uuid)
            return
        if not isinstance(exc, BrokerUnavailable):
            raise
        logger.warning('the log row of %s (%s) could not be written (%s); it is written again, to wait for '
                       'the relay', log.task, log.uuid, refused)
        connections[MessageLog.objects.db].close_if_unusable_or_obsolete()
        _write_new_row(log, wait_for_disk=False, again=True)


def _landed_after_sending(message: Outgoing, log: MessageLog, in_flight: InFlight) -> bool:
    """Whether the row of a message RabbitMQ has confirmed was written. If the database was away (a lost
    connection, a full disk: a fault that passes), the call has done what it promised all the same -- the
    task will run, and its worker writes the row once the database is back: logged, not raised, so that
    no caller publishes again a task that is on its way. So too when the caller's own session refused it
    (a transaction of the caller's that had failed, a session the caller set read-only): the worker's
    session writes it. A refusal that will not pass (a constraint, a trigger, a read-only server) is
    raised: the worker would be refused the row too, and would not run it."""
    try:
        _land_row(log, in_flight)
        return True
    except DatabaseError as exc:
        if not may_pass(exc):
            raise
        logger.error('%s (%s) was sent, but its log row could not be written (%s): the worker that takes it '
                     'writes it', message.task, message.uuid, exc)
        # As at the end of a request: a session that is gone is closed, and the caller's next query opens one.
        connections[MessageLog.objects.db].close_if_unusable_or_obsolete()
        log.status = MessageLog.PUBLISHED
        return False


def mark_published(log: MessageLog, scheduled: bool = False, from_status: str = MessageLog.WAITING) -> None:
    """WAITING (or `from_status`) → PUBLISHED, or SCHEDULED when it is in the delay levels; a row a
    consumer has claimed meanwhile is left as it is."""
    status = MessageLog.SCHEDULED if scheduled else MessageLog.PUBLISHED
    # Lost in a server crash, the row reads WAITING: relayed, a harmless copy (carrot.commits).
    using = MessageLog.objects.db
    changed = statement('mark_published', _mark_published_sql, using).run([status, log.pk, from_status],
                                                                          using=using)
    if changed:
        log.status = status
    else:  # a worker took it first: the row as it left it (claimed, or even finished)
        try:
            log.refresh_from_db()
        except MessageLog.DoesNotExist:
            pass  # deleted meanwhile (from the monitor, say): the message has left all the same


def _mark_published_sql(connection) -> str:
    quote = connection.ops.quote_name
    return f'UPDATE {quote(MessageLog._meta.db_table)} SET status = %s WHERE id = %s AND status = %s'


def _make_durable(log: MessageLog) -> None:
    """Wait until the row of a message that waits for the broker is on disk: it is all there is of the
    task now. A commit that waits flushes every earlier one, the row's own (which did not wait) too."""
    try:
        MessageLog.objects.filter(pk=log.pk).update(status=F('status'))
    except DatabaseError:
        logger.exception('could not make sure the row of %s (%s) is on disk', log.task, log.uuid)


def fail_unsent(log: MessageLog, exc: Exception, from_status: str = MessageLog.WAITING) -> None:
    reason = f'{type(exc).__name__}: the message could not be published: {exc}'
    MessageLog.objects.filter(pk=log.pk, status=from_status).update(
        status=MessageLog.FAILED, failure_time=timezone.now(), exception=reason)
    log.refresh_from_db(fields=['status', 'failure_time', 'exception'])


def publish(task: str | Callable, args: tuple = (), kwargs: dict | None = None, *, queue: str | None = None,
            exchange: str = '', routing_key: str | None = None, priority: int = 0, on_commit: bool = True,
            store_and_forward: bool | None = None, run_after=None, countdown: float | None = None,
            backend: str = '', on_enqueued: Callable[[MessageLog], None] | None = None) -> MessageLog:
    """prepare() then enqueue(): the whole publish. See carrot.utilities.publish_message."""
    message = prepare(task, args, kwargs, queue=queue, exchange=exchange, routing_key=routing_key,
                      priority=priority, run_after=run_after, countdown=countdown, backend=backend)
    return enqueue(message, on_commit=on_commit, store_and_forward=store_and_forward, on_enqueued=on_enqueued)


BATCH_SIZE = 1000  # messages per batch of publish_many: rows written and confirms awaited together


def publish_many(task: str | Callable, calls, *, queue: str | None = None, priority: int = 0,
                 on_commit: bool = True, store_and_forward: bool | None = None) -> list[MessageLog]:
    """Publish `task` once per (args, kwargs) of `calls`: see carrot.utilities.publish_messages.

    Every call is checked before anything is written. Per batch of BATCH_SIZE: the rows in one INSERT
    (WAITING; none on a queue that tracks only failures), the messages sent back to back and their
    confirms awaited together, then the rows PUBLISHED in one UPDATE. What cannot be sent now waits in
    its rows for the relay (store-and-forward), as a single publish does."""
    if store_and_forward is None:
        store_and_forward = get_config().store_and_forward
    messages = [prepare(task, *_one_call(call, index), queue=queue, priority=priority)
                for index, call in enumerate(calls)]
    if not messages:
        return []
    tracked = not _untracked(messages[0])
    batches = [messages[start:start + BATCH_SIZE] for start in range(0, len(messages), BATCH_SIZE)]

    def rows_for(batch):
        return _write_rows(batch) if tracked else [_unsaved_row(message) for message in batch]

    connection = _connection_in_step()
    if on_commit and connection.in_atomic_block:
        written = [rows_for(batch) for batch in batches]

        def after_commit():
            for batch, batch_rows in zip(batches, written):
                try:
                    _send_batch(batch, batch_rows, tracked, store_and_forward)
                except Exception:
                    logger.exception('publishing %d messages of %s after commit failed', len(batch), batch[0].task)
        transaction.on_commit(after_commit, using=MessageLog.objects.db)
        return [row for batch_rows in written for row in batch_rows]
    # Outside a transaction the next batch's rows are written while RabbitMQ confirms this one's messages.
    written = [rows_for(batches[0])]
    for index, batch in enumerate(batches):
        def write_next(index=index):
            if index + 1 < len(batches):
                written.append(rows_for(batches[index + 1]))
        try:
            _send_batch(batch, written[index], tracked, store_and_forward, while_confirming=write_next)
        except (BrokerUnavailable, MessageRejected) as exc:
            # The caller is told this call failed: the next batch's rows, written while this one was being
            # confirmed, must not be left WAITING for the relay to send behind its back.
            if tracked and len(written) > index + 1:
                _fail_rows(written[index + 1], type(exc)(f'not sent: an earlier batch of the same '
                                                         f'publish_messages call failed: {exc}'))
            raise
        if len(written) == index + 1:  # not written while confirming (the send failed first)
            write_next()
    return [row for batch_rows in written for row in batch_rows]


def _one_call(call, index: int) -> tuple[tuple, dict]:
    """(args, kwargs) of one entry of publish_many's `calls`, or InvalidCall saying which is wrong."""
    if not isinstance(call, (tuple, list)) or len(call) != 2 or not isinstance(call[0], (tuple, list)) \
            or not isinstance(call[1], dict):
        raise InvalidCall(f'calls[{index}] must be an (args, kwargs) pair such as ((1, 2), {{}}), got {call!r}')
    return tuple(call[0]), call[1]


def _write_rows(messages: list[Outgoing]) -> list[MessageLog]:
    now = timezone.now()
    rows = []
    for message in messages:
        task_args, content = arguments.dump(message.args, message.kwargs)
        rows.append(MessageLog(status=MessageLog.WAITING, queue=message.queue, exchange=message.exchange,
                               routing_key=message.routing_key, uuid=message.uuid, priority=message.priority,
                               task=message.task, task_args=task_args, content=content, publish_time=now))
    try:
        with without_waiting_for_disk():
            return MessageLog.objects.bulk_create(rows)
    except DatabaseError as exc:
        if tables_missing(exc):
            raise NotMigrated(f"carrot's tables are missing from database {MessageLog.objects.db!r} "
                              f'({exc}): {MIGRATE_HINT}') from exc
        raise


def _unsaved_row(message: Outgoing) -> MessageLog:
    log = MessageLog(status=MessageLog.PUBLISHED, queue=message.queue, exchange=message.exchange,
                     routing_key=message.routing_key, uuid=message.uuid, priority=message.priority,
                     task=message.task, publish_time=timezone.now(), origin=message.origin)
    log.task_args, log.content = arguments.dump(message.args, message.kwargs)
    return log


def _send_batch(messages: list[Outgoing], rows: list[MessageLog], tracked: bool, store_and_forward: bool,
                while_confirming: Callable[[], None] | None = None) -> None:
    queue = get_config().queue(messages[0].queue)
    try:
        publisher_for(queue.broker).publish_batch(queue, [(m.body, m.properties) for m in messages],
                                                  while_confirming=while_confirming)
    except (BrokerUnavailable, MessageRejected) as exc:
        # The messages RabbitMQ confirmed before the batch failed are on the queue: PUBLISHED (tracked), or
        # no row (untracked). Only the others wait for the relay, or are FAILED.
        delivered = set(getattr(exc, 'delivered', ()))
        undelivered = [index for index in range(len(messages)) if index not in delivered]
        if tracked:
            _mark_rows_published([rows[index] for index in sorted(delivered)])
        elif undelivered:  # rows after all: what the relay sends from, or the failure to log
            for index, row in zip(undelivered, _write_rows([messages[index] for index in undelivered])):
                rows[index] = row
        pending = [rows[index] for index in undelivered]
        if isinstance(exc, BrokerUnavailable) and store_and_forward:
            logger.warning('%d messages of %s wait for the broker and will be relayed: %s', len(pending),
                           messages[0].task, exc)
            if pending:
                _make_durable(pending[0])
            return
        _fail_rows(pending, exc)
        raise
    if tracked:
        _mark_rows_published(rows)


def _mark_rows_published(rows: list[MessageLog]) -> None:
    """WAITING -> PUBLISHED for rows whose messages RabbitMQ confirmed (a row a consumer claimed meanwhile
    is left as it is)."""
    if not rows:
        return
    with without_waiting_for_disk():
        MessageLog.objects.filter(pk__in=[row.pk for row in rows], status=MessageLog.WAITING).update(
            status=MessageLog.PUBLISHED)
    for row in rows:
        row.status = MessageLog.PUBLISHED


def _fail_rows(rows: list[MessageLog], exc: Exception) -> None:
    reason = f'{type(exc).__name__}: the message could not be published: {exc}'
    now = timezone.now()
    MessageLog.objects.filter(pk__in=[row.pk for row in rows], status=MessageLog.WAITING).update(
        status=MessageLog.FAILED, failure_time=now, exception=reason)
    for row in rows:
        row.status, row.failure_time, row.exception = MessageLog.FAILED, now, reason


def requeue(log: MessageLog) -> MessageLog:
    """Publish a copy of a logged message (a new uuid and row) and delete the original, in one transaction:
    there is never a moment with both rows or with neither, and the copy is sent once that commits. A task
    that is running (IN_PROGRESS) is not requeued (StillRunning): it would run twice at once, and its
    outcome, written to a deleted row, would be lost.

    Idempotent under concurrency: the original is claimed first (a conditional UPDATE, the transaction's
    first write, so SQLite takes its write lock before any read), and only if it is still there as it was
    read (same status); a requeue that finds it gone -- another requeue, a double click, a delete got
    there first -- raises AlreadyRequeued and publishes nothing. Of two requeues at once, one copy."""
    if log.status == MessageLog.IN_PROGRESS:
        raise StillRunning(f'{log.task} ({log.uuid}) is running on {log.worker or "a worker"}: it can be '
                           f'requeued once it has finished')
    args, kwargs = arguments.load_logged(log.task_args, log.content)
    message = prepare(log.task, args, kwargs, queue=log.queue, exchange=log.exchange or '',
                      routing_key=log.routing_key or None, priority=log.priority, backend=log.backend,
                      origin=log.origin or log.uuid)
    token = f'requeue:{uuid_module.uuid4()}'
    with transaction.atomic(using=MessageLog.objects.db):
        if log.pk and not MessageLog.objects.filter(pk=log.pk, status=log.status).update(worker=token):
            raise AlreadyRequeued(f'{log.task} ({log.uuid}) was requeued or deleted meanwhile; it was not '
                                  f'published again')
        copy = enqueue(message)
        if log.pk:
            MessageLog.objects.filter(pk=log.pk, worker=token).delete()
    copy.refresh_from_db(fields=['status'])
    return copy


REQUEUE_BATCH = 500   # rows per transaction in requeue_many
REQUEUE_SEND_FOR = 2.0  # seconds requeue_many spends sending; what is left waits for the relay


@dataclass
class Requeued:
    """What requeue_many did: rows requeued (copies written), copies sent now, rows that were not."""
    requeued: int = 0
    sent: int = 0
    gone: int = 0  # requeued or deleted by someone else meanwhile
    errors: list[str] = field(default_factory=list)


def requeue_many(rows: QuerySet, send_for: float = REQUEUE_SEND_FOR, batch: int = REQUEUE_BATCH) -> Requeued:
    """Requeue every row of `rows` as `requeue()` does, set-based: per batch of rows, one transaction
    claims them (a conditional UPDATE first, so of two requeues at once each row goes to one), writes
    their copies WAITING and deletes the originals. Copies are then sent for up to `send_for` seconds;
    the rest wait in the outbox and the relay (carrot-supervisor's housekeeping) sends them, so a request
    requeuing 10,000 rows answers in seconds."""
    result = Requeued()
    pks = list(rows.order_by().values_list('pk', flat=True))
    written: list[tuple[Outgoing, MessageLog]] = []
    for start in range(0, len(pks), batch):
        originals = list(MessageLog.objects.filter(pk__in=pks[start:start + batch]))
        result.gone += len(pks[start:start + batch]) - len(originals)
        prepared = {}
        for log in originals:
            if log.status == MessageLog.IN_PROGRESS:
                result.errors.append(f'{log.task} ({log.uuid}) was not requeued: it is running')
                continue
            try:
                args, kwargs = arguments.load_logged(log.task_args, log.content)
                prepared[log.pk] = (log, prepare(log.task, args, kwargs, queue=log.queue,
                                                 exchange=log.exchange or '',
                                                 routing_key=log.routing_key or None, priority=log.priority,
                                                 backend=log.backend, origin=log.origin or log.uuid))
            except UNSENDABLE as exc:
                result.errors.append(f'{log.task} ({log.uuid}) was not requeued: {exc}')
        if prepared:
            copies = _requeue_batch(prepared)
            result.gone += len(prepared) - len(copies)
            result.requeued += len(copies)
            written.extend(copies)
    deadline = time.monotonic() + send_for
    store_and_forward = True  # a copy the broker cannot take now waits for the relay, never fails
    for message, copy in written:
        if time.monotonic() >= deadline:
            break
        try:
            if send(message, copy, store_and_forward=store_and_forward, relaying=True):
                result.sent += 1
            else:
                break  # the broker is away: the relay sends them all once it is back
        except MessageRejected as exc:
            result.errors.append(f'{message.task} ({message.uuid}) was refused by the broker: {exc}')
    return result


def _requeue_batch(prepared: dict) -> list[tuple[Outgoing, MessageLog]]:
    token = f'requeue:{uuid_module.uuid4()}'
    with transaction.atomic(using=MessageLog.objects.db):
        by_status: dict[str, list[int]] = {}
        for pk, (log, _) in prepared.items():
            by_status.setdefault(log.status, []).append(pk)
        # The claim, the transaction's first write: a row another requeue (or a delete) holds or has
        # taken matches nothing here once that one commits.
        for status, pks in by_status.items():
            MessageLog.objects.filter(pk__in=pks, status=status).update(worker=token)
        claimed = set(MessageLog.objects.filter(pk__in=list(prepared), worker=token).values_list('pk', flat=True))
        if not claimed:
            return []
        now = timezone.now()
        copies = []
        for pk in claimed:
            _, message = prepared[pk]
            task_args, content = arguments.dump(message.args, message.kwargs)
            copies.append((message, MessageLog(
                status=MessageLog.WAITING, queue=message.queue, exchange=message.exchange,
                routing_key=message.routing_key, uuid=message.uuid, priority=message.priority, task=message.task,
                task_args=task_args, content=content, publish_time=now, backend=message.backend,
                origin=message.origin)))
        MessageLog.objects.bulk_create([copy for _, copy in copies], batch_size=REQUEUE_BATCH)
        if any(copy.pk is None for _, copy in copies):  # a database that does not return the new keys
            keys = dict(MessageLog.objects.filter(uuid__in=[m.uuid for m, _ in copies]).values_list('uuid', 'pk'))
            for message, copy in copies:
                copy.pk = keys[message.uuid]
        MessageLog.objects.filter(pk__in=claimed, worker=token).delete()
    return copies


def run_scheduled_now(log: MessageLog) -> None:
    """A SCHEDULED row's task runs now: run_after becomes now and the message is sent straight to its
    queue (same uuid; the delayed copy still in the levels finds it claimed or done when it comes).
    The row stays SCHEDULED if the broker cannot take it now: housekeeping's sweep sends it later."""
    now = timezone.now()
    if not MessageLog.objects.filter(pk=log.pk, status=MessageLog.SCHEDULED).update(run_after=now):
        log.refresh_from_db()
        return
    log.run_after = now
    send(outgoing_from_row(log), log, store_and_forward=True, from_status=MessageLog.SCHEDULED)


def cancel_scheduled(log: MessageLog, reason: str) -> bool:
    """SCHEDULED -> FAILED with `reason` (False: the row was not SCHEDULED any more). The message in the
    delay levels is dead-lettered, unrun, when it comes out."""
    done = MessageLog.objects.filter(pk=log.pk, status=MessageLog.SCHEDULED).update(
        status=MessageLog.FAILED, failure_time=timezone.now(), exception=f'Cancelled: {reason}')
    if done:
        log.refresh_from_db()
    return bool(done)


def outgoing_from_row(log: MessageLog) -> Outgoing:
    """The message a WAITING row stands for, with the row's uuid; raises one of UNSENDABLE (as prepare()
    does, or InvalidArguments when the stored arguments cannot be read back)."""
    args, kwargs = arguments.load_logged(log.task_args, log.content)
    return prepare(log.task, args, kwargs, queue=log.queue, exchange=log.exchange or '',
                   routing_key=log.routing_key or None, priority=log.priority, message_id=log.uuid,
                   run_after=log.run_after, backend=log.backend, origin=log.origin)
