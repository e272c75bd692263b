"""``carrot.backends.CarrotBackend``: Django's tasks API on RabbitMQ, through carrot.

- ``enqueue``/``aenqueue`` publish through carrot's outbox, as ``publish_message`` does: the row is
  written in the caller's transaction and the message sent when it commits (nothing on a rollback);
  task_enqueued is sent in the enqueuing process once the task is sure to run (carrot.publish.outbox,
  ``on_enqueued``). ``run_after`` goes through the delay levels.
- ``get_result``/``aget_result`` build the TaskResult from the MessageLog row and its attempts
  (carrot.consume.djangotask.task_result); TaskResultDoesNotExist for an unknown id. A requeued task
  keeps its id (the copy's ``origin``).
- ``task_class`` is CarrotTask: Django's Task plus carrot's retry options, so
  ``@task(max_retries=3, retry_backoff=10)`` works where Django passes the decorator's keywords to the
  backend's task class (Django 6.1, the backport).
- The worker runs a Task object the way Django's API promises (carrot.consume.djangotask).

``__init__`` touches no database and no broker: Django builds the backend when a tasks module is
imported, possibly before the apps are ready. ``check()`` reports QUEUES that CARROT does not have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from django.core import checks
from django.db.models import Q

from carrot import registry
from carrot.backends import compat
from carrot.consume import djangotask
from carrot.exceptions import CarrotConfigException, InvalidCall, TaskNotRegistered

E_UNKNOWN_QUEUE = 'carrot.E011'


@dataclass(frozen=True, slots=True, kw_only=True)
class CarrotTask(compat.Task):
    """A django.tasks Task with carrot's retry options (README.rst, "Retries"); None: CARROT's default."""
    max_retries: int | None = None
    retry_backoff: float | Callable | None = None
    retry_backoff_max: float | None = None
    retry_on: tuple | None = None

    def __post_init__(self):
        registry.retry_options(max_retries=self.max_retries, retry_backoff=self.retry_backoff,
                               retry_backoff_max=self.retry_backoff_max, retry_on=self.retry_on)  # TypeError
        compat.Task.__post_init__(self)  # (no zero-argument super() in a slots dataclass)


class CarrotBackend(compat.BaseTaskBackend):
    task_class = CarrotTask
    supports_defer = True          # run_after: the delay levels
    supports_async_task = True     # an async def task runs to completion in the consumer
    supports_get_result = True     # from the MessageLog row, in any process
    supports_priority = True       # -100..100 onto the queue's 0..max_priority (every carrot queue has one)

    def enqueue(self, task, args, kwargs):
        from carrot.config import get_config
        from carrot.publish import outbox

        self.validate_task(task)
        try:
            queue = get_config().queue(task.queue_name)
            priority = djangotask.carrot_priority(task.priority, queue.max_priority)
            log = outbox.publish(task, tuple(args), dict(kwargs), queue=queue.name, priority=priority,
                                 run_after=task.run_after, backend=self.alias,
                                 on_enqueued=lambda row: self._enqueued(row, task))
        except (InvalidCall, CarrotConfigException) as exc:
            raise compat.InvalidTask(str(exc)) from exc
        return djangotask.task_result(log, task, self.alias)

    def _enqueued(self, row, task) -> None:
        compat.task_enqueued.send(type(self), task_result=djangotask.task_result(row, task, self.alias))

    def get_result(self, result_id):
        from carrot.config import get_config
        from carrot.models import MessageLog

        row = MessageLog.objects.filter(Q(uuid=result_id) | Q(origin=result_id)).order_by('-id').first() \
            if isinstance(result_id, str) and result_id else None
        if row is None:
            raise compat.TaskResultDoesNotExist(result_id)
        try:
            task = self._task_of(row)
        except TaskNotRegistered as exc:
            raise compat.TaskResultDoesNotExist(f'{result_id}: its task cannot be found any more: {exc}') from exc
        task = djangotask.task_for_row(task, row, self.alias, get_config())
        return djangotask.task_result(row, task, self.alias)

    def _task_of(self, row):
        """The Task a row runs: the django.tasks Task its path names, or one made for a carrot task."""
        func = registry.get_task(row.task)
        if registry.django_task(func) is not None:
            return func
        try:
            return self.task_class(func=func, backend=self.alias, queue_name=row.queue or compat.DEFAULT_TASK_QUEUE_NAME)
        except (compat.InvalidTask, TypeError, ValueError) as exc:
            raise TaskNotRegistered(f'{row.task} is not a task of this backend: {exc}') from exc

    def check(self, **kwargs):
        from carrot.config import config_from_settings
        from django.conf import settings

        config, problems = config_from_settings(settings)
        if problems:
            return []  # carrot's own checks report them
        known = {queue.name for queue in config.queues}
        return [checks.Error(f"TASKS[{self.alias!r}]['QUEUES'] names {name!r}, which is not a queue of "
                             f"CARROT['queues'] (configured: {', '.join(sorted(known))})", id=E_UNKNOWN_QUEUE)
                for name in sorted(self.queues - known)]
