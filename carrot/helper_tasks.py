"""carrot's built-in tasks (the 1.x module name, kept)."""
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
    so a flood of bad messages cannot fill the database for good.
    """
    from django.db.models import Q

    from carrot.config import get_config
    from carrot.models import MessageLog

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
    return deleted


def sync_cleanup_schedule(ScheduledTask=None) -> None:
    """Make the cleanup's ScheduledTask match the settings: active hourly, or inactive when both
    cleanup_after_days and cleanup_failed_after_days are turned off. `ScheduledTask` may be a historical
    model (post_migrate), so this only uses the fields of the first migration."""
    from carrot.config import get_config
    from carrot.registry import task_path

    if ScheduledTask is None:
        from carrot.models import ScheduledTask

    (unit, count), = CLEANUP_INTERVAL.items()
    config = get_config()
    enabled = bool(config.cleanup_after_days or config.cleanup_failed_after_days)
    schedule, created = ScheduledTask.objects.get_or_create(
        task_name=CLEANUP_TASK_NAME,
        defaults=dict(task=task_path(cleanup), interval_type=unit, interval_count=count, queue='default',
                      routing_key='default', task_args='[]', content='{}', active=enabled))
    if not created and schedule.active != enabled:
        ScheduledTask.objects.filter(pk=schedule.pk).update(active=enabled)


def schedule_cleanup_after_migrate(using='default', apps=None, **kwargs):
    """post_migrate: a freshly migrated database gets the cleanup schedule.

    Uses the model as the migrations left it (`apps`), not the current one: after `migrate carrot 0001`
    the table lacks the newer columns, and after `migrate carrot zero` it is gone."""
    from django.db import router

    try:
        ScheduledTask = apps.get_model('carrot', 'ScheduledTask') if apps is not None else None
    except LookupError:
        return  # carrot unmigrated on this database
    if ScheduledTask is None:
        from carrot.models import ScheduledTask
    if router.db_for_write(ScheduledTask) == using:
        sync_cleanup_schedule(ScheduledTask)
