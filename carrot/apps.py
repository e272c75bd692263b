"""The carrot Django app: its system checks, its post-migrate schedule, and the 1.x methods of its models."""
from importlib import import_module

from django.apps import AppConfig


class CarrotAppConfig(AppConfig):
    """The carrot Django app (the only AppConfig in carrot/apps.py, so Django picks it for 'carrot').

    Not to be confused with `carrot.config.CarrotConfig`, the parsed CARROT setting.
    """
    name = 'carrot'
    verbose_name = 'Carrot task queue'
    default_auto_field = 'django.db.models.BigAutoField'

    def ready(self):
        from django.core.signals import setting_changed
        from django.db.models.signals import post_migrate

        from carrot import models
        from carrot.config import clear_config_cache
        from carrot.config.schema import set_queue_source
        from carrot.publish.outbox import requeue
        from carrot.publish.relay import send_now
        from carrot.schedule.builtin import schedule_cleanup_after_migrate
        from carrot.schedule.scheduler import publish_run

        import_module('carrot.checks')  # registers the system checks
        setting_changed.connect(_setting_changed, dispatch_uid='carrot-setting-changed')
        post_migrate.connect(schedule_cleanup_after_migrate, sender=self, dispatch_uid='carrot-schedule-cleanup')
        models.operations.requeue = requeue
        models.operations.publish_schedule = publish_run
        models.operations.send_waiting = send_now
        set_queue_source(models.worker_queues)  # Worker rows are queues too
        clear_config_cache()


def _setting_changed(setting, **kwargs):
    if setting == 'CARROT':
        from carrot.config import clear_config_cache
        clear_config_cache()
