"""The MessageLog rows a worker writes: rows for messages from other publishers, checking a row logs
the very message delivered, bounding a row to its columns, the FAILED fields, and the TaskAttempt rows
of the attempts that did not succeed.
"""
from __future__ import annotations

from django.db import connections
from django.db.models import signals
from django.utils import timezone

from carrot import text
from carrot.amqp.wire import IncomingMessage
from carrot.commits import SERVER_STARTED
from carrot.config import QueueConfig
from carrot.exceptions import CarrotError, InvalidArguments
from carrot.models import MessageLog, TaskAttempt
from carrot.publish import arguments
from carrot.statements import statement

# What a reduced row writes: the outcome, without the texts the database may have refused.
REDUCED_FIELDS = ('status', 'completion_time', 'failure_time', 'lease_expires', 'output', 'log',
                  'traceback', 'exception', 'run_after', 'retries', 'started_time')


def new_row(message: IncomingMessage, queue: QueueConfig, message_id: str, limit: int) -> MessageLog:
    """An unsaved PUBLISHED row for `message` under `message_id`, bounded to its columns."""
    task_args, content = message.stored_arguments
    return MessageLog(
        uuid=message_id, status=MessageLog.PUBLISHED, queue=queue.name, exchange=message.exchange,
        routing_key=message.routing_key or queue.name, priority=message.priority,
        task=text.for_column(message.shown_task, 200), task_args=text.for_column(task_args, limit),
        content=text.for_column(content, limit), publish_time=timezone.now())


def insert_row(message: IncomingMessage, queue: QueueConfig, message_id: str, limit: int) -> MessageLog:
    """A new PUBLISHED row for `message` under `message_id`."""
    row = new_row(message, queue, message_id, limit)
    row.save(force_insert=True)
    return row


def get_or_insert_row(message: IncomingMessage, queue: QueueConfig, limit: int) -> MessageLog:
    """The row of `message`'s id; inserted first for messages from other publishers. The insert
    tolerates a concurrent one of the same uuid (INSERT ... ON CONFLICT DO NOTHING, then read)."""
    try:
        return MessageLog.objects.get(uuid=message.message_id)  # the usual case: carrot published it
    except MessageLog.DoesNotExist:
        return insert_foreign_row(message, queue, limit)


def insert_foreign_row(message: IncomingMessage, queue: QueueConfig, limit: int) -> MessageLog:
    """The row of a message from another publisher, whose id was found to have none: inserted, or the one
    a concurrent delivery of the same id inserted first (INSERT ... ON CONFLICT DO NOTHING, then read)."""
    MessageLog.objects.bulk_create([new_row(message, queue, message.message_id, limit)], ignore_conflicts=True)
    return MessageLog.objects.get(uuid=message.message_id)


def same_call(row: MessageLog, message: IncomingMessage) -> bool:
    """Whether `row` logs this very message: the same task with the same arguments."""
    if row.task != text.for_column(message.shown_task, 200):
        return False
    task_args, content = message.stored_arguments
    if message.is_bad:
        return _same_text(row.task_args, task_args) and _same_text(row.content, content)
    return (_same_text(row.task_args, task_args) or _stored_value(row.task_args, 0) == list(message.args)) and \
        (_same_text(row.content, content) or _stored_value(row.content, 1) == message.kwargs)


def _same_text(stored: str | None, ours: str) -> bool:
    stored = stored or ''
    if stored == ours:
        return True
    marker = text.CUT_MARKER.split('{')[0]
    return marker in stored and ours.startswith(stored[:stored.index(marker)])  # a cut copy of ours


def _stored_value(stored: str | None, index: int):
    """The stored positional (index 0, as a list) or keyword (1) arguments, or None if unreadable."""
    try:
        value = arguments.load_logged(stored, None)[0] if index == 0 else arguments.load_logged(None, stored)[1]
    except InvalidArguments:
        return None
    return list(value) if index == 0 else value


def bound_result(row: MessageLog, limit: int) -> None:
    """Bound the text fields a success writes (write_completion: its output and log) to their columns. The
    row's other texts are as the claim read or matched them, so as their columns hold them already:
    bounding all eleven for each task was a fortieth of a worker's CPU in a drain."""
    row.output = text.for_column(row.output, limit)
    row.log = text.for_column(row.log, limit)


def bound_row(row: MessageLog, limit: int) -> None:
    """Bound every text field of `row` to its column (cut with a marker; NUL escaped)."""
    for name in ('exception', 'traceback', 'output', 'log', 'task_args', 'content'):
        setattr(row, name, text.for_column(getattr(row, name), limit))
    for name in ('task', 'worker', 'queue', 'exchange', 'routing_key'):
        setattr(row, name, text.for_column(getattr(row, name), 200))


def completion_skips_the_orm() -> bool:
    """Whether a result may be written by one prepared UPDATE: no receiver of MessageLog's pre_save or
    post_save signals expects to see it (Model.save sends them; a plain UPDATE does not)."""
    return not (signals.pre_save.has_listeners(MessageLog) or signals.post_save.has_listeners(MessageLog))


def write_completion(row: MessageLog, wait_for_disk: bool = True) -> tuple[bool, object]:
    """Write a success (COMPLETED, its completion time, output, log and start -- a row claimed ahead was
    started in memory only: carrot.consume.ahead; no lease) of `row`, bounded already,
    in one statement planned once per connection. `wait_for_disk=False`: the commit does not wait for the
    WAL flush, and the delivery may be acked only once a later commit has flushed it
    (carrot.consume.unflushed). Returns whether the row was written (False: it was deleted meanwhile) and,
    on PostgreSQL, the start time of the server that took it."""
    using = MessageLog.objects.db
    params = completion_params(row)
    if connections[using].vendor != 'postgresql':
        return bool(statement('write_completion', write_completion_sql, using).run(params, using=using)), None
    found = statement('write_completion_returning', _write_completion_returning_sql, using).run(
        params, using=using, fetch=True, wait_for_disk=wait_for_disk)
    return (True, found[0]) if found is not None else (False, None)


def completion_params(row: MessageLog) -> list:
    """write_completion_sql's parameters for `row`."""
    adapt = connections[MessageLog.objects.db].ops.adapt_datetimefield_value
    return [adapt(row.completion_time), row.output, row.log, adapt(row.started_time), row.pk]


def write_completion_sql(connection) -> str:
    quote = connection.ops.quote_name
    return (f"UPDATE {quote(MessageLog._meta.db_table)} SET status = '{MessageLog.COMPLETED}', "
            f'completion_time = %s, output = %s, log = %s, started_time = %s, lease_expires = NULL '
            f'WHERE {quote(MessageLog._meta.pk.column)} = %s')


def _write_completion_returning_sql(connection) -> str:
    # The server's start time comes back with the write: a result is vouched for only by a flush on the
    # same server run (carrot.consume.unflushed).
    return f'{write_completion_sql(connection)} RETURNING {SERVER_STARTED}'


def record_attempt(row: MessageLog, outcome: str, limit: int, exception_class: str = '', exception: str = '',
                   traceback: str = '', log: str = '', finished=None) -> None:
    """Keep the attempt `row` holds now (its number, worker and start) as a TaskAttempt with `outcome`. A
    second record of the same attempt (a redelivery after a crash in between) is ignored."""
    attempt = TaskAttempt(
        message_log=row, number=row.attempts, outcome=outcome, worker=text.for_column(row.worker or '', 200),
        started_time=row.started_time, finished_time=finished, exception_class=text.for_column(exception_class, 200),
        exception=text.for_column(exception, limit), traceback=text.for_column(traceback, limit),
        log=text.for_column(log, limit))
    TaskAttempt.objects.bulk_create([attempt], ignore_conflicts=True)


def set_failed_fields(log: MessageLog, err, traceback_text: str | None = None) -> None:
    """Set the FAILED fields of `log` from `err` (not saved)."""
    log.status = MessageLog.FAILED
    log.failure_time = timezone.now()
    log.lease_expires = None
    # carrot's own errors already read as sentences; other exceptions are prefixed with their type.
    plain = not isinstance(err, BaseException) or isinstance(err, CarrotError)
    log.exception = text.for_column(str(err) if plain else f'{type(err).__name__}: {err}', None)
    if traceback_text is not None:
        log.traceback = traceback_text
