"""carrot's built-in tasks (the 1.x module name, kept)."""
from datetime import timedelta

from django.utils import timezone

from carrot.registry import task

CLEANUP_TASK_NAME = 'carrot: delete old completed logs'
CLEANUP_INTERVAL = {'hours': 1}


@task
def cleanup(days: float | None = None) -> int:
    """Delete COMPLETED MessageLogs older than CARROT['cleanup_after_days']; returns how many."""
    from carrot.config import get_config
    from carrot.models import MessageLog

    days = get_config().cleanup_after_days if days is None else days
    if not days:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = MessageLog.objects.filter(status=MessageLog.COMPLETED, completion_time__lt=cutoff).delete()
    return deleted


def sync_cleanup_schedule() -> None:
    """Make the cleanup's ScheduledTask match the setting: active hourly, or inactive when turned off."""
    from carrot.config import get_config
    from carrot.models import ScheduledTask
    from carrot.registry import task_path

    (unit, count), = CLEANUP_INTERVAL.items()
    enabled = bool(get_config().cleanup_after_days)
    schedule, created = ScheduledTask.objects.get_or_create(
        task_name=CLEANUP_TASK_NAME,
        defaults=dict(task=task_path(cleanup), interval_type=unit, interval_count=count, queue='default',
                      routing_key='default', task_args='[]', content='{}', active=enabled))
    if not created and schedule.active != enabled:
        ScheduledTask.objects.filter(pk=schedule.pk).update(active=enabled)


def schedule_cleanup_after_migrate(using='default', **kwargs):
    """post_migrate: a freshly migrated database gets the cleanup schedule."""
    from django.db import router

    from carrot.models import ScheduledTask
    if router.db_for_write(ScheduledTask) == using:
        sync_cleanup_schedule()
