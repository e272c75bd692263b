"""carrot as a backend of Django's tasks API (``django.tasks``, or the django-tasks backport on 5.2):

    TASKS = {'default': {'BACKEND': 'carrot.backends.CarrotBackend', 'QUEUES': ['default', 'reports']}}

The backend (carrot.backends.backend) is imported when it is first named, not with this package:
carrot's worker imports carrot.backends.compat alone, and a project without Django's tasks API imports
neither.
"""


def __getattr__(name):
    if name in ('CarrotBackend', 'CarrotTask'):
        from carrot.backends import backend
        return getattr(backend, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['CarrotBackend', 'CarrotTask']
