"""Django's tasks API, wherever it comes from: ``django.tasks`` (Django 6) or the django-tasks backport
(``django_tasks``, for Django 5.2). The one place that knows the difference; the names are Django 6's
(the backport calls InvalidTask InvalidTaskError).

Importing this module without either raises ImproperlyConfigured saying what to install.
"""
from django.core.exceptions import ImproperlyConfigured

try:
    from django.tasks import signals, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (DEFAULT_TASK_QUEUE_NAME, TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task,
                                   TaskContext, TaskError, TaskResult, TaskResultStatus)
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.utils.json import normalize_json
    SOURCE = 'django.tasks'
except ImportError:
    try:
        from django_tasks import signals, task_backends
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import (DEFAULT_TASK_QUEUE_NAME, TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task,
                                       TaskContext, TaskError, TaskResult, TaskResultStatus)
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import TaskResultDoesNotExist
        from django_tasks.utils import normalize_json
        SOURCE = 'django_tasks'
    except ImportError:
        raise ImproperlyConfigured(
            "carrot.backends.CarrotBackend needs Django's tasks API: Django 6, or on Django 5.2 the "
            "django-tasks backport (pip install 'django-carrot[tasks]', and add 'django_tasks' to "
            "INSTALLED_APPS)") from None

task_enqueued, task_started, task_finished = signals.task_enqueued, signals.task_started, signals.task_finished

__all__ = ['BaseTaskBackend', 'DEFAULT_TASK_QUEUE_NAME', 'InvalidTask', 'SOURCE', 'TASK_MAX_PRIORITY',
           'TASK_MIN_PRIORITY', 'Task', 'TaskContext', 'TaskError', 'TaskResult', 'TaskResultDoesNotExist',
           'TaskResultStatus', 'normalize_json', 'task_backends', 'task_enqueued', 'task_finished',
           'task_started']
