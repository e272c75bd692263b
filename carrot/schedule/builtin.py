"""The built-in schedule: the hourly cleanup of old log rows (carrot.helper_tasks.cleanup), kept in step
with the settings when the scheduler starts and after every migrate."""
from django.db import router

from carrot import models
from carrot.config import get_config
from carrot.helper_tasks import CLEANUP_INTERVAL, CLEANUP_TASK_NAME, cleanup
from carrot.registry import task_path


def sync_cleanup_schedule(ScheduledTask=None) -> None:
    """Make the cleanup's ScheduledTask match the settings: active hourly, or inactive when both
    cleanup_after_days and cleanup_failed_after_days are turned off. `ScheduledTask` may be a historical
    model (post_migrate), so this only uses the fields of the first migration."""
    ScheduledTask = ScheduledTask or models.ScheduledTask

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
    try:
        ScheduledTask = apps.get_model('carrot', 'ScheduledTask') if apps is not None else None
    except LookupError:
        return  # carrot unmigrated on this database
    ScheduledTask = ScheduledTask or models.ScheduledTask
    if router.db_for_write(ScheduledTask) == using:
        sync_cleanup_schedule(ScheduledTask)
