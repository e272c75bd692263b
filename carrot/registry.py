"""Which tasks carrot may run.

A message names its task by dotted path, and a queue can be written to by anyone who can reach the
broker, so carrot never imports whatever a message names. A task is registered when it is

- a function defined in an installed app's ``tasks`` module,
- a function defined in a module listed in ``CARROT['task_modules']``, or
- decorated with ``@carrot.task`` (its module must have been imported, which is the case for the two
  kinds of module above: carrot imports them all when a consumer starts).

A module is only imported if it is one of those task modules. Functions merely imported into a task
module (``from os import system``) are not registered under the task module's name.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable

from carrot.exceptions import TaskNotRegistered

_decorated: dict[str, Callable] = {}
_lock = threading.Lock()

HOW_TO_REGISTER = ("put it in an installed app's tasks.py, list its module in CARROT['task_modules'], "
                   "or decorate it with @carrot.task")


def task_path(func: Callable) -> str:
    """The dotted path a message uses for `func`."""
    return f'{func.__module__}.{func.__qualname__}'


def task(func: Callable | None = None, *, name: str | None = None):
    """Register a function as a carrot task: ``@task`` or ``@task(name='billing.send_invoice')``.

    The function is returned unchanged, so it can still be called directly.
    """
    def register(f):
        with _lock:
            _decorated[name or task_path(f)] = f
        return f

    return register(func) if func is not None else register


def task_module_names() -> list[str]:
    """The modules whose functions are tasks: each installed app's `tasks` plus CARROT['task_modules']."""
    from django.apps import apps

    from carrot.config import get_config

    names = [f'{app.name}.tasks' for app in apps.get_app_configs()]
    names += [m for m in get_config().task_modules if m not in names]
    return names


def autodiscover() -> list[str]:
    """Import every task module (so decorated tasks in them register). Returns the ones imported.

    An installed app without a tasks module is normal; a module listed in task_modules that cannot be
    imported is reported by the system checks, and its error surfaces again when a task in it is run.
    """
    imported = []
    for module_name in task_module_names():
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        imported.append(module_name)
    return imported


def get_task(path: str) -> Callable:
    """The registered function for a dotted path, or TaskNotRegistered with a reason a person reads."""
    if not isinstance(path, str) or not path:
        raise TaskNotRegistered(f'task {path!r} is not registered: a task is named by a dotted path')
    with _lock:
        func = _decorated.get(path)
    if func is not None:
        return func

    module_name, _, attribute = path.rpartition('.')
    if not module_name or module_name not in task_module_names():
        raise TaskNotRegistered(f'task {path} is not registered: {HOW_TO_REGISTER}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskNotRegistered(f'task {path} is not registered: its module {module_name} cannot be '
                                f'imported ({exc})') from exc
    with _lock:  # importing the module may just have registered it by decorator
        func = _decorated.get(path)
    if func is not None:
        return func
    func = getattr(module, attribute, None)
    if func is None:
        raise TaskNotRegistered(f'task {path} is not registered: module {module_name} has no '
                                f'attribute {attribute!r}')
    if not callable(func) or getattr(func, '__module__', None) != module_name:
        raise TaskNotRegistered(f'task {path} is not registered: {module_name}.{attribute} is not a '
                                f'function defined in {module_name}; {HOW_TO_REGISTER}')
    return func


def registered_task_names() -> list[str]:
    """Every registered task that carrot can see now, for the monitor's task drop-down."""
    import inspect

    names = set()
    for module_name in autodiscover():
        module = importlib.import_module(module_name)
        for attribute, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module_name \
                    and not attribute.startswith('_'):
                names.add(f'{module_name}.{attribute}')
    with _lock:
        names.update(_decorated)
    return sorted(names)
