"""System checks for the CARROT setting (`manage.py check`, `carrot-supervisor --check`)."""
import importlib

from django.conf import settings
from django.core.checks import Error, Tags, register

from carrot.config import E_NOT_IMPORTABLE, config_from_settings


@register(Tags.compatibility, 'carrot')
def check_carrot_setting(app_configs=None, **kwargs):
    config, problems = config_from_settings(settings)
    errors = [Error(p.message, id=p.id) for p in problems]
    for index, queue in enumerate(config.queues):
        if queue.consumer_class != 'carrot.consumer.Consumer':
            errors += _importable(queue.consumer_class, f"CARROT['queues'][{index}]['consumer_class']")
    for index, module in enumerate(config.task_modules):
        errors += _importable(module, f"CARROT['task_modules'][{index}]", attribute=False)
    for index, decorator in enumerate(config.monitor_authentication):
        errors += _importable(decorator, f"CARROT['monitor_authentication'][{index}]")
    return errors


def _importable(path, where, attribute=True):
    try:
        if attribute:
            module_name, _, name = path.rpartition('.')
            getattr(importlib.import_module(module_name), name)
        else:
            importlib.import_module(path)
    except (ImportError, AttributeError, ValueError) as exc:
        return [Error(f'{where} {path!r} cannot be imported: {exc}', id=E_NOT_IMPORTABLE)]
    return []
