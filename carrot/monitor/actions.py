"""Everything the monitor changes, shared by the HTML views and the JSON API. Each function returns a
`Done` (what happened, for a message to the user) or raises ActionError (why nothing happened)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import DatabaseError
from django.db.models import Q, QuerySet
from django.utils import timezone

from carrot.exceptions import AlreadyRequeued, CarrotConfigException, CarrotError, InvalidCall
from carrot.publish import outbox, relay
from carrot.publish.outbox import requeue_many
from carrot.models import MessageLog, ScheduledTask
from carrot.monitor import queries

logger = logging.getLogger('carrot.monitor')

DELETABLE = (MessageLog.FAILED, MessageLog.COMPLETED, MessageLog.WAITING)


class ActionError(Exception):
    """An action that could not be done; the text is for the person who asked."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Done:
    message: str
    count: int = 0
    errors: list[str] = field(default_factory=list)
    uuid: str | None = None  # the new message, for a requeue or a run now

    def as_dict(self) -> dict:
        return {'ok': not self.errors, 'message': self.message, 'count': self.count, 'errors': self.errors,
                'uuid': self.uuid}


def get_message(uuid: str) -> MessageLog:
    log = MessageLog.objects.filter(uuid=uuid).first()
    if log is None:
        raise ActionError(f'there is no task with id {uuid!r} (it may have been requeued or deleted)', 404)
    return log


def requeue_one(uuid: str) -> Done:
    log = get_message(uuid)
    if log.status != MessageLog.FAILED:
        raise ActionError(f'only failed tasks can be requeued; this one is {log.get_status_display()}', 409)
    try:
        copy = log.requeue()
    except AlreadyRequeued:
        raise ActionError(f'{log.task} was requeued or deleted meanwhile (by someone else, or a click before '
                          f'this one); it was not published again', 409) from None
    except (InvalidCall, CarrotConfigException) as exc:
        raise ActionError(f'{log.task} was not requeued: {exc}', 400) from None
    except CarrotError as exc:
        raise ActionError(f'{log.task} was not requeued: {exc}', 502) from None
    return Done(f'{log.task} requeued.', 1, uuid=copy.uuid)


def _requeue_all(rows: QuerySet) -> Done:
    """Set-based and batched (carrot.publish.outbox.requeue_many): of two requeues at once each row is
    published once, and 10,000 rows answer in seconds."""
    result = requeue_many(rows)
    message = f'{result.requeued} failed task(s) requeued.'
    if result.sent < result.requeued:
        message += (f' {result.sent} sent now; the other {result.requeued - result.sent} wait in the outbox '
                    f'(Waiting tab) and are sent by the supervisor\'s relay within seconds.')
    if result.gone:
        message += f' {result.gone} were requeued or deleted meanwhile by someone else.'
    if result.errors:
        message += f' {len(result.errors)} could not be.'
    return Done(message, result.requeued, result.errors)


def failed_rows(search: str = '', queue: str = '', uuids: list[str] | None = None) -> QuerySet:
    """The failed tasks a bulk action applies to: the selected ones, else all matching the filter."""
    rows = queries.messages(queries.TABS['failed'], search, queue)
    if uuids:
        rows = rows.filter(uuid__in=uuids)
    return rows


def requeue_failed(search: str = '', queue: str = '', uuids: list[str] | None = None) -> Done:
    return _requeue_all(failed_rows(search, queue, uuids))


def delete_one(uuid: str) -> Done:
    log = get_message(uuid)
    if log.status not in DELETABLE:
        raise ActionError(f'a task that is {log.get_status_display().lower()} cannot be deleted: its '
                          f'message is on the queue (purge the queue instead)', 409)
    log.delete()
    return Done(f'{log.task} deleted.', 1)


def delete_failed(search: str = '', queue: str = '', uuids: list[str] | None = None) -> Done:
    count = _deleted_rows(failed_rows(search, queue, uuids))
    return Done(f'{count} failed task(s) deleted.', count)


def _deleted_rows(rows: QuerySet) -> int:
    """Delete `rows`; how many MessageLog rows went (their attempts go with them, not counted)."""
    _, per_model = rows.delete()
    return per_model.get(MessageLog._meta.label, 0)


def purge_queue(queue_name: str) -> Done:
    """Empty a queue on RabbitMQ and mark the log rows of its messages FAILED, saying they were purged (to
    requeue or delete from the Failed tab).

    RabbitMQ and the database cannot be changed in one step, so the rows are marked once RabbitMQ has been
    emptied: every row of the queue still WAITING or PUBLISHED, and every SCHEDULED one already due (its
    copy has come out of the delay levels, or is about to). A message sent while the purge runs is purged
    with it: whether RabbitMQ dropped it or not, its row is marked, and a copy that is still delivered finds
    it FAILED and is dead-lettered unrun. So a row never says PUBLISHED for a message that is gone, and a
    task marked purged never runs. The rows are marked, not deleted, for the same reason: not every copy was
    in the queue -- a consumer may hold some, prefetched, and a delayed copy may still come out of the
    levels. Tasks already running (IN_PROGRESS) are not touched, nor is a row a worker claims first, nor
    one a worker has claimed ahead (carrot.consume.ahead: it counts as taken, and runs).
    """
    from carrot.amqp.declare import purge
    from carrot.config import get_config
    from carrot.exceptions import CarrotConfigException
    from carrot.monitor import broker_stats

    try:
        queue = get_config().queue(queue_name)
    except CarrotConfigException as exc:
        raise ActionError(str(exc), 404) from None
    try:
        purged = purge(queue.broker, queue.name)
    except Exception as exc:  # unreachable broker, or it refused: nothing was purged
        raise ActionError(f'queue {queue.name!r} was not purged: {type(exc).__name__}: {exc}', 502) from None
    broker_stats.forget()
    now = timezone.now()
    waiting = Q(status__in=(MessageLog.WAITING, MessageLog.PUBLISHED)) | \
        Q(status=MessageLog.SCHEDULED, run_after__lte=now)
    try:
        rows = MessageLog.objects.filter(waiting, queue=queue.name).update(
            status=MessageLog.FAILED, failure_time=now,
            exception=f'Purged: removed from queue {queue.name!r} in the monitor at {now.isoformat()}')
    except DatabaseError as exc:  # the rows still say they wait: a second purge marks them
        raise ActionError(f'queue {queue.name!r} was purged on RabbitMQ ({purged} message(s) removed), but '
                          f'its log rows could not be marked: {type(exc).__name__}: {exc}. Purge it again once '
                          f'the database answers.', 503) from None
    return Done(f'Queue {queue.name!r} purged: {purged} message(s) removed from RabbitMQ; {rows} task(s) marked '
                f'failed as purged (in the Failed tab, to requeue or delete).', purged)


def send_waiting(uuid: str) -> Done:
    """Send a message that waits for the broker now, instead of when the supervisor relays it."""
    log = get_message(uuid)
    if log.status != MessageLog.WAITING:
        raise ActionError(f'this task is not waiting for the broker (it is {log.get_status_display()})', 409)
    try:
        relay.send_waiting(log)
    except CarrotError as exc:
        raise ActionError(f'{log.task} was not sent: {exc}', 502) from None
    log.refresh_from_db()
    return Done(f'{log.task} sent ({log.get_status_display().lower()}).', 1, uuid=log.uuid)


def get_schedule(pk) -> ScheduledTask:
    schedule = ScheduledTask.objects.filter(pk=pk).first()
    if schedule is None:
        raise ActionError(f'there is no scheduled task with id {pk}', 404)
    return schedule


def run_schedule_now(pk) -> Done:
    schedule = get_schedule(pk)
    try:
        log = schedule.publish()
    except CarrotError as exc:
        raise ActionError(f'{schedule.task_name} was not run: {exc}', 502) from None
    return Done(f'{schedule.task_name} published now.', 1, uuid=log.uuid)


def set_schedule_active(pk, active: bool) -> Done:
    schedule = get_schedule(pk)
    ScheduledTask.objects.filter(pk=schedule.pk).update(active=active)
    return Done(f'{schedule.task_name} {"activated" if active else "paused"}.', 1)


def delete_schedule(pk) -> Done:
    schedule = get_schedule(pk)
    schedule.delete()
    return Done(f'{schedule.task_name} deleted.', 1)


def forget_gone_supervisors() -> Done:
    """Drop the Workers tab's rows of supervisors shown as gone."""
    from carrot.config import get_config
    from carrot.run.status import forget_silent_supervisors
    count = forget_silent_supervisors(get_config().supervisor_gone_after)
    return Done(f'{count} gone supervisor(s) forgotten.', count)


def run_now(uuid: str) -> Done:
    """Run a scheduled task now: its run_after becomes now and its message is sent again, straight to its
    queue, under the same uuid (the copy still in the delay levels finds it done and is acked)."""
    log = get_message(uuid)
    if log.status != MessageLog.SCHEDULED:
        raise ActionError(f'only tasks scheduled for later can be run now; this one is '
                          f'{log.get_status_display()}', 409)
    try:
        outbox.run_scheduled_now(log)
    except CarrotError as exc:
        raise ActionError(f'{log.task} was not sent: {exc}', 502) from None
    return Done(f'{log.task} sent to run now ({log.get_status_display().lower()}).', 1, uuid=log.uuid)


def cancel(uuid: str) -> Done:
    """Cancel a scheduled task: FAILED, saying so; its message, when it comes out of the delay levels,
    finds the row FAILED and is dead-lettered without running."""
    log = get_message(uuid)
    if not outbox.cancel_scheduled(log, 'cancelled in the monitor before it ran'):
        log.refresh_from_db()
        raise ActionError(f'only tasks scheduled for later can be cancelled; this one is '
                          f'{log.get_status_display()}', 409)
    return Done(f'{log.task} cancelled.', 1, uuid=log.uuid)


# What a POST to a message's action URL may do (the pages and the JSON API share it).
MESSAGE_ACTIONS = {'requeue': requeue_one, 'delete': delete_one, 'send': send_waiting, 'run': run_now,
                   'cancel': cancel}
