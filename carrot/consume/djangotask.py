"""A django.tasks Task in a carrot worker: run the way Django's tasks API promises, and described by a
TaskResult read from its row.

- `task_result(row, task, backend)`: the TaskResult of a MessageLog row and its attempts -- what
  CarrotBackend.get_result() answers, what a ``takes_context`` task gets, what the signals carry;
- `DjangoRun`: one attempt as the runner calls it -- task_started (in the worker, with the running
  TaskResult), the TaskContext of a ``takes_context`` task, an ``async def`` task run to completion
  (Task.call), and the return value held to strict JSON (anything else fails the task, as Django's own
  backends do);
- `DjangoRun.finished(row)`: task_finished, once the outcome is recorded.

Django's tasks API is imported only here and in carrot.backends, and only when a Task is at hand
(carrot.backends.compat: Django 6, or the django-tasks backport on 5.2).
"""
from __future__ import annotations

import json
import logging

from carrot import text
from carrot.config import CarrotConfig
from carrot.models import MessageLog, TaskAttempt

logger = logging.getLogger('carrot.consumer')

# Django's priorities, -100 .. 100 (django.tasks.base.TASK_MIN_PRIORITY/TASK_MAX_PRIORITY), on a queue's
# 0 .. max_priority: the order is kept; a queue with fewer levels than 201 puts neighbours together.
MIN_PRIORITY, MAX_PRIORITY = -100, 100
FAILED_OUTCOMES = (TaskAttempt.FAILED, TaskAttempt.RETRIED, TaskAttempt.LOST)
UNKNOWN_ERROR = 'carrot.exceptions.CarrotError'  # the class of a failure carrot knows no class of


def carrot_priority(priority: int, max_priority: int) -> int:
    return round((priority - MIN_PRIORITY) * max_priority / (MAX_PRIORITY - MIN_PRIORITY))


def django_priority(priority: int, max_priority: int) -> int:
    value = round(priority * (MAX_PRIORITY - MIN_PRIORITY) / max_priority + MIN_PRIORITY)
    return max(MIN_PRIORITY, min(MAX_PRIORITY, value))


def status_of(row: MessageLog):
    from carrot.backends.compat import TaskResultStatus
    return {MessageLog.IN_PROGRESS: TaskResultStatus.RUNNING, MessageLog.COMPLETED: TaskResultStatus.SUCCESSFUL,
            MessageLog.FAILED: TaskResultStatus.FAILED}.get(row.status, TaskResultStatus.READY)


def task_for_row(task, row: MessageLog, backend: str, config: CarrotConfig):
    """`task` as the row says it was enqueued: its priority, queue, run_after and backend."""
    changes = {'queue_name': row.queue, 'backend': backend}
    try:
        changes['priority'] = django_priority(row.priority, config.queue(row.queue).max_priority)
    except Exception:  # a queue no longer configured: the task's own priority stands
        pass
    if row.run_after is not None:
        changes['run_after'] = row.run_after
    try:
        return task.using(**changes)
    except Exception:  # the backend refuses the row's queue or priority now: the task as it is defined
        return task


def task_result(row: MessageLog, task, backend: str):
    """The TaskResult of `row`: status, dates, one worker id and start per attempt, one TaskError per
    failed attempt (exception class path and traceback), the return value once SUCCESSFUL."""
    from carrot.backends.compat import TaskError, TaskResult, TaskResultStatus
    from carrot.publish import arguments

    history = row.attempt_history()
    errors = [TaskError(exception_class_path=a.exception_class or UNKNOWN_ERROR, traceback=a.traceback or a.exception)
              for a in history if a.outcome in FAILED_OUTCOMES]
    status = status_of(row)
    if status == TaskResultStatus.FAILED and not errors:  # refused before it ran, or cancelled
        errors.append(TaskError(exception_class_path=UNKNOWN_ERROR, traceback=row.traceback or row.exception or ''))
    args, kwargs = arguments.load_logged_leniently(row.task_args, row.content)
    finished = {TaskResultStatus.SUCCESSFUL: row.completion_time, TaskResultStatus.FAILED: row.failure_time}
    result = TaskResult(
        task=task, id=row.origin or row.uuid, status=status, enqueued_at=row.publish_time,
        started_at=history[0].started if history else None,
        last_attempted_at=history[-1].started if history else None,
        finished_at=finished.get(status), args=list(args), kwargs=dict(kwargs), backend=backend,
        errors=errors, worker_ids=[a.worker for a in history])
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, '_return_value', _stored_value(row.output))
    return result


def _stored_value(output: str | None):
    if output in (None, ''):
        return None
    try:
        return json.loads(output)
    except ValueError:  # a row written by 1.x or by carrot's own API: its str()
        return output


def _sender(backend: str):
    from carrot.backends.compat import task_backends
    try:
        return type(task_backends[backend])
    except Exception:
        return None


class DjangoRun:
    """One attempt of a django.tasks Task, called by the runner with the message's arguments."""

    def __init__(self, task, row: MessageLog, config: CarrotConfig):
        self.backend = row.backend or task.backend
        self.task = task_for_row(task, row, self.backend, config)
        self.row = row
        self.limit = config.max_stored_text

    def __call__(self, *args, **kwargs):
        from carrot.backends.compat import TaskContext, normalize_json, task_started

        result = task_result(self.row, self.task, self.backend)
        task_started.send(sender=_sender(self.backend), task_result=result)
        if self.task.takes_context:
            value = self.task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = self.task.call(*args, **kwargs)
        value = normalize_json(value)  # TypeError or ValueError: not JSON, so the task fails
        size = len(json.dumps(value, allow_nan=False))  # NaN and the infinities are not JSON either
        if size > self.limit:
            raise ValueError(f'the return value is {size} characters of JSON, more than '
                             f"CARROT['max_stored_text'] ({self.limit}): it could not be stored whole")
        return value

    def finished(self, row: MessageLog) -> None:
        """task_finished, with the recorded outcome (a receiver that raises is logged, not propagated)."""
        from carrot.backends.compat import task_finished
        try:
            task_finished.send(sender=_sender(self.backend), task_result=task_result(row, self.task, self.backend))
        except Exception as exc:
            logger.error('task_finished of %s (%s): a receiver raised %s', row.task, row.uuid,
                         text.for_log(f'{type(exc).__name__}: {exc}', 300))
