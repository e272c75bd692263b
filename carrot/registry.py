"""Which tasks carrot may run, and finding them.

A message names its task by dotted path, and a queue can be written to by anyone who can reach the
broker, so carrot never imports or runs whatever a message names. A task is

- a public function defined at module level in an installed app's ``tasks`` module or in a module
  listed in ``CARROT['task_modules']``: ``inspect.isfunction``, defined in that module under that very
  name (``__module__`` and ``__qualname__`` match), and not starting with ``_``. So a class, a callable
  object, a builtin, a ``_private`` helper, a function imported from elsewhere (``from os import
  system``) and a wrapper built there (``run = _wrap(subprocess.call)``) are not tasks; or
- a function decorated with ``@carrot.task``, in any module. A decorated task in a module of an installed
  app is found on demand: when a message names it, that module is imported, and the task accepted only if
  importing it registered that name by decorator; or
- a ``django.tasks`` Task (``@task`` of Django 6, or of the django-tasks backport) whose function is a
  public function defined at module level, under that very name, in a tasks module or a module of an
  installed app: the module attribute is then the Task object, and carrot runs it the way Django's tasks
  API does (carrot.consume.djangotask).

Nothing outside installed apps and ``CARROT['task_modules']`` is ever imported because a message names
it. The same rule holds for publishing, consuming, requeue, the scheduler and ``registered_task_names()``,
and a refusal says which part of it failed.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
from typing import Callable

from carrot.exceptions import TaskNotRegistered

_decorated: dict[str, Callable] = {}
_options: dict[str, dict] = {}  # the retry options given to @carrot.task, by task path
_lock = threading.Lock()
RETRY_OPTIONS = ('max_retries', 'retry_backoff', 'retry_backoff_max', 'retry_on')

HOW_TO_REGISTER = ("put it in an installed app's tasks.py, list its module in CARROT['task_modules'], "
                   "or decorate it with @carrot.task")


def task_path(func: Callable) -> str:
    """The dotted path a message uses for `func` (a function, or a django.tasks Task: its function's)."""
    django_task_object = django_task(func)
    if django_task_object is not None:
        func = django_task_object.func
    return f'{func.__module__}.{func.__qualname__}'


_DJANGO_TASK_MODULES = ('django.tasks.base', 'django_tasks.base')


def django_task(value):
    """`value` if it is a django.tasks Task object (Django 6, or the django-tasks backport), else None.
    Nothing is imported: a Task object exists only once its module was."""
    for name in _DJANGO_TASK_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(value, module.Task):
            return value
    return None


def task(func: Callable | None = None, *, name: str | None = None, max_retries: int | None = None,
         retry_backoff: float | Callable | None = None, retry_backoff_max: float | None = None,
         retry_on: tuple | None = None):
    """Register a function as a carrot task: ``@task`` or ``@task(name='billing.send_invoice')``.

    Retries (README.rst, "Retries"): ``max_retries`` (how often a failing run is retried), ``retry_backoff``
    (seconds before the first retry, doubled for each next one, with up to 20% jitter; or a callable
    ``(exception, retry) -> seconds or None``), ``retry_backoff_max`` (the longest wait) and ``retry_on``
    (the exception classes that are retried; all of Exception by default). What is not given comes from
    CARROT (``max_retries`` 0: no retries, as in 1.x). The function is returned unchanged, so it can
    still be called directly.
    """
    options = retry_options(max_retries=max_retries, retry_backoff=retry_backoff,
                            retry_backoff_max=retry_backoff_max, retry_on=retry_on)

    def register(f):
        if not inspect.isfunction(f):
            raise TypeError(f'@carrot.task decorates functions, not {type(f).__name__} {f!r}')
        path = name or task_path(f)
        with _lock:
            _decorated[path] = f
            _options[path] = options
        return f

    return register(func) if func is not None else register


def retry_options(max_retries=None, retry_backoff=None, retry_backoff_max=None, retry_on=None) -> dict:
    """The retry options that are given, checked (TypeError saying which is wrong); None means not given."""
    options = {}
    if max_retries is not None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise TypeError(f'max_retries must be a whole number >= 0, got {max_retries!r}')
        options['max_retries'] = max_retries
    if retry_backoff is not None:
        if not callable(retry_backoff) and (isinstance(retry_backoff, bool) or
                                            not isinstance(retry_backoff, (int, float)) or retry_backoff < 0):
            raise TypeError(f'retry_backoff must be seconds >= 0 or a callable (exception, retry) -> seconds, '
                            f'got {retry_backoff!r}')
        options['retry_backoff'] = retry_backoff
    if retry_backoff_max is not None:
        if isinstance(retry_backoff_max, bool) or not isinstance(retry_backoff_max, (int, float)) \
                or retry_backoff_max <= 0:
            raise TypeError(f'retry_backoff_max must be seconds > 0, got {retry_backoff_max!r}')
        options['retry_backoff_max'] = retry_backoff_max
    if retry_on is not None:
        classes = (retry_on,) if isinstance(retry_on, type) else tuple(retry_on) \
            if isinstance(retry_on, (tuple, list)) else None
        if not classes or not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
            raise TypeError(f'retry_on must be an exception class or a tuple of them, got {retry_on!r}')
        options['retry_on'] = classes
    return options


def task_options(path: str) -> dict:
    """The retry options @carrot.task was given for the task at `path` (empty: none, or not decorated)."""
    with _lock:
        return dict(_options.get(path, {}))


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


def _decorated_task(path: str) -> Callable | None:
    with _lock:
        return _decorated.get(path)


def why_not_a_task(module_name: str, attribute: str, value) -> str | None:
    """Why `value`, found as `attribute` of task module `module_name`, is not a task (None: it is one)."""
    where = f'{module_name}.{attribute}'
    if attribute.startswith('_'):
        return f"{where} starts with '_': private helpers are not tasks"
    if django_task(value) is not None:
        value = value.func  # a django.tasks Task: its function must be one of the module's own
    if not inspect.isfunction(value):
        return (f'{where} is a {type(value).__name__}, not a function: classes, callable objects and '
                f'builtins are not tasks')
    if value.__module__ != module_name:
        return f'{where} is {value.__module__}.{value.__qualname__}, imported into {module_name}: only ' \
               f'functions defined in a tasks module are its tasks'
    if value.__qualname__ != attribute:
        return (f'{where} is the function {value.__qualname__!r} stored under another name (a wrapper or '
                f'nested function): only functions defined at module level under their own name are tasks')
    return None


def installed_app_of(module_name: str) -> str | None:
    """The installed app whose package holds `module_name`, if any."""
    from django.apps import apps

    for app in apps.get_app_configs():
        if module_name == app.name or module_name.startswith(app.name + '.'):
            return app.name
    return None


def _importable_name(module_name: str) -> bool:
    return bool(module_name) and all(part.isidentifier() for part in module_name.split('.'))


def get_task(path: str) -> Callable:
    """The task a dotted path names, or TaskNotRegistered saying which rule it fails (see the module doc).
    What is found is remembered for as long as the CARROT setting stays the same object (a worker asks
    for the same few paths thousands of times); what is refused is looked up again each time."""
    global _found
    from carrot.config import get_config
    config = get_config()
    if _found[0] is not config:
        _found = (config, {})
    found = _found[1]
    if path not in found:
        found[path] = _find_task(path)
    return found[path]


_found: tuple = (None, {})  # (the parsed CARROT setting, {path: task found under it})


def _find_task(path: str) -> Callable:
    if not isinstance(path, str) or not path:
        raise TaskNotRegistered(f'task {path!r} is not registered: a task is named by a dotted path')
    func = _decorated_task(path)
    if func is not None:
        return func

    module_name, _, attribute = path.rpartition('.')
    if not _importable_name(module_name) or not attribute:
        raise TaskNotRegistered(f'task {path!r} is not registered: it is not a dotted path of a module and a '
                                f'function; {HOW_TO_REGISTER}')
    if module_name in task_module_names():
        return _task_from_task_module(path, module_name, attribute)
    app = installed_app_of(module_name)
    if app is None:
        raise TaskNotRegistered(
            f'task {path} is not registered: {module_name} is not a tasks module of an installed app, not '
            f"in CARROT['task_modules'], and not part of an installed app (where @carrot.task functions are "
            f'found); {HOW_TO_REGISTER}')
    if any(part.startswith('_') for part in module_name.split('.')):
        # __main__ and private modules may do work when imported: never for a message.
        raise TaskNotRegistered(f'task {path} is not registered: {module_name} is private (a part of its '
                                f"name starts with '_'), so carrot does not import it to look for "
                                f'@carrot.task functions')
    # A module of an installed app may hold @carrot.task functions (or django.tasks Tasks) nobody imported yet.
    module = _import_task_module(path, module_name)
    func = _decorated_task(path)
    if func is None:
        value = getattr(module, attribute, None)
        if django_task(value) is not None and why_not_a_task(module_name, attribute, value) is None:
            return value
        raise TaskNotRegistered(
            f'task {path} is not registered: {module_name} (of installed app {app}) is not a tasks module, '
            f'and it has no function {attribute!r} decorated with @carrot.task (or a django.tasks @task)')
    return func


def _import_task_module(path: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a broken module is the task's problem, not the worker's
        raise TaskNotRegistered(f'task {path} is not registered: its module {module_name} cannot be '
                                f'imported ({type(exc).__name__}: {exc})') from exc


def _task_from_task_module(path: str, module_name: str, attribute: str) -> Callable:
    module = _import_task_module(path, module_name)
    func = _decorated_task(path)  # importing the module may just have registered it by decorator
    if func is not None:
        return func
    if not hasattr(module, attribute):
        raise TaskNotRegistered(f'task {path} is not registered: module {module_name} has no '
                                f'attribute {attribute!r}')
    reason = why_not_a_task(module_name, attribute, getattr(module, attribute))
    if reason is not None:
        raise TaskNotRegistered(f'task {path} is not registered: {reason}; {HOW_TO_REGISTER}')
    return getattr(module, attribute)


def call_problem(func: Callable, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` cannot be called as written (a wrong count or name of arguments), or
    None. Checked when a call is published or scheduled, so a mistake is reported to whoever made it. A
    django.tasks Task that takes context gets its context from the worker, before the arguments."""
    django_task_object = django_task(func)
    if django_task_object is not None:
        func = django_task_object.func
        if django_task_object.takes_context:
            args = (None, *args)
    try:
        signature = _signature(func)
    except (TypeError, ValueError):  # no signature to check against: the run will tell
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f'the arguments do not fit {func.__name__}{signature}: {exc}'
    return None


@functools.lru_cache(maxsize=1024)
def _signature(func: Callable) -> inspect.Signature:
    """inspect.signature(func), read once per task function (tasks are functions: see why_not_a_task):
    reading it was a third of checking a call."""
    return inspect.signature(func)


def registered_task_names() -> list[str]:
    """Every registered task that carrot can see now, for the monitor's task drop-down."""
    names = set()
    for module_name in autodiscover():
        module = importlib.import_module(module_name)
        for attribute, value in vars(module).items():
            if why_not_a_task(module_name, attribute, value) is None:
                names.add(f'{module_name}.{attribute}')
    with _lock:
        names.update(_decorated)
    return sorted(names)
