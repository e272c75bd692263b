"""Tasks of Django's tasks API (tests/test_backend.py): @task of django.tasks (Django 6) or of the
django-tasks backport (5.2), on carrot.backends.CarrotBackend. Not a tasks module: carrot finds them as
it finds @carrot.task functions in a module of an installed app.

When CARROT_TEST_SIGNALS names a file, every task signal is appended to it as a JSON line with the pid
of the process that sent it.
"""
import asyncio
import json
import os
import time

try:
    from django.tasks import signals, task
except ImportError:
    from django_tasks import signals, task


@task
def add(a, b):
    return a + b


@task(priority=50, queue_name='other')
def urgent(label, path):
    with open(path, 'a') as f:
        f.write(f'{label}\n')
    return label


@task
def record(path, label):
    with open(path, 'a') as f:
        f.write(f'{label} {time.time():.3f}\n')
    return label


@task(takes_context=True)
def with_context(context, note):
    result = context.task_result
    return {'attempt': context.attempt, 'id': result.id, 'status': str(result.status), 'note': note,
            'worker_ids': result.worker_ids, 'started_at': result.started_at.isoformat()}


@task
async def async_add(a, b):
    await asyncio.sleep(0.05)
    return a + b


@task
def fails(message):
    raise ValueError(message)


@task
def not_json():
    return object()


@task
def not_strict_json():
    return {'ratio': float('nan')}


@task
def slow(seconds):
    time.sleep(seconds)
    return seconds


@task(takes_context=True, max_retries=3, retry_backoff=1, retry_on=(OSError,))
def flaky(context, failures):
    """Raise OSError while this is attempt `failures` or earlier, then report the attempt."""
    if context.attempt <= failures:
        raise OSError(f'attempt {context.attempt} fails')
    return context.attempt


def _private_helper():
    return 'not a task'


def _record_signal(name):
    def receiver(sender, task_result, **kwargs):
        path = os.environ.get('CARROT_TEST_SIGNALS')
        if path:
            with open(path, 'a') as f:
                f.write(json.dumps({'signal': name, 'pid': os.getpid(), 'id': task_result.id,
                                    'status': str(task_result.status), 'attempts': task_result.attempts,
                                    'sender': getattr(sender, '__name__', None)}) + '\n')
    return receiver


for _name in ('task_enqueued', 'task_started', 'task_finished'):
    getattr(signals, _name).connect(_record_signal(_name), dispatch_uid=f'carrot-tests-{_name}', weak=False)
