"""carrot's built-in tasks. The module keeps its 1.x name because the task's dotted path,
``carrot.helper_tasks.cleanup``, is stored in schedules and messages; its schedule is kept in step with
the settings by carrot.schedule.builtin."""
from datetime import timedelta

from django.utils import timezone

from carrot.registry import task

CLEANUP_TASK_NAME = 'carrot: delete old completed logs'  # the 1.x name; it deletes old FAILED rows too
CLEANUP_INTERVAL = {'hours': 1}


@task
def cleanup(days: float | None = None, failed_days: float | None = None) -> int:
    """Delete COMPLETED MessageLogs older than CARROT['cleanup_after_days'] and FAILED ones older than
    CARROT['cleanup_failed_after_days'] (either None: kept); returns how many rows were deleted.

    A FAILED row's age is counted from its failure (or, for rows without a failure time, its publication),
    so a flood of bad messages cannot fill the database for good. A row whose delayed copy is still in the
    delay levels may go: that copy, finding no row, is dead-lettered unrun (carrot.consume.processor).
    """
    from django.db.models import Q

    from carrot.config import get_config
    from carrot.models import MessageLog, Task

    config = get_config()
    days = config.cleanup_after_days if days is None else days
    failed_days = config.cleanup_failed_after_days if failed_days is None else failed_days
    now = timezone.now()
    deleted = 0
    if days:
        cutoff = now - timedelta(days=days)
        deleted += MessageLog.objects.filter(status=MessageLog.COMPLETED, completion_time__lt=cutoff).delete()[0]
    if failed_days:
        cutoff = now - timedelta(days=failed_days)
        deleted += MessageLog.objects.filter(
            Q(failure_time__lt=cutoff) | Q(failure_time__isnull=True, publish_time__lt=cutoff),
            status=MessageLog.FAILED).delete()[0]
    if days and failed_days:
        # The other carrot's Task rows (carrot.models.Task) whose log is gone: the request of a task that
        # ran long ago. Only rows older than both ages are looked at.
        cutoff = now - timedelta(days=max(days, failed_days))
        gone = Task.objects.filter(created_on__lt=cutoff).exclude(
            message_id__in=MessageLog.objects.values('uuid')).exclude(
            message_id__in=MessageLog.objects.exclude(origin='').values('origin'))
        deleted += gone.delete()[0]
    return deleted
