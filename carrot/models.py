"""What carrot keeps in the project's database: a log row per message (and the attempts that did not
succeed), interval schedules, supervisor statuses, and the other carrot's Task and Worker rows."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from django.core.validators import MaxValueValidator
from django.db import models

from carrot.publish import arguments
from carrot.schedule import rules


class Operations:
    """The 1.x methods MessageLog.requeue() and ScheduledTask.publish() publish, and the publish side
    (which writes these very rows) sits above the models; so the models import nothing of it and
    CarrotAppConfig.ready() (carrot/apps.py) hands the two operations over here."""
    requeue: Callable | None = None           # carrot.publish.outbox.requeue(log)
    publish_schedule: Callable | None = None  # carrot.schedule.scheduler.publish_run(schedule, priority)
    send_waiting: Callable | None = None      # carrot.publish.relay.send_now(log): a created Task's message


operations = Operations()


class MessageLog(models.Model):
    """One message's life: PUBLISHED (or SCHEDULED, to run later), then IN_PROGRESS in a worker, then
    COMPLETED or FAILED."""
    WAITING = 'WAITING'  # logged, not yet taken by the broker (store-and-forward); relayed later
    SCHEDULED = 'SCHEDULED'  # taken by the broker, in the delay levels until run_after (or a retry's time)
    PUBLISHED = 'PUBLISHED'
    IN_PROGRESS = 'IN_PROGRESS'
    FAILED = 'FAILED'
    COMPLETED = 'COMPLETED'
    STATUS_CHOICES = (
        (WAITING, 'Waiting for the broker'),
        (SCHEDULED, 'Scheduled for later'),
        (PUBLISHED, 'Published'),
        (IN_PROGRESS, 'In progress'),
        (FAILED, 'Failed'),
        (COMPLETED, 'Completed'),
    )

    status = models.CharField(max_length=20, choices=STATUS_CHOICES, default=PUBLISHED)
    exchange = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    uuid = models.CharField(max_length=200)  # unique: Meta.constraints
    origin = models.CharField(
        max_length=200, blank=True, default='',
        help_text='The uuid this message was first published under, when it is a requeued copy: its id in '
                  "Django's tasks API stays the same")
    priority = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(255)])
    backend = models.CharField(max_length=100, blank=True, default='',
                               help_text="The django.tasks backend alias that enqueued it ('' for carrot's own API)")

    task = models.CharField(max_length=200, help_text='The dotted path of the task function')
    task_args = models.TextField(null=True, blank=True, verbose_name='Task positional arguments')
    content = models.TextField(null=True, blank=True, verbose_name='Task keyword arguments')

    exception = models.TextField(null=True, blank=True)
    traceback = models.TextField(null=True, blank=True)
    output = models.TextField(null=True, blank=True)
    log = models.TextField(blank=True, null=True)

    publish_time = models.DateTimeField(null=True, blank=True)
    run_after = models.DateTimeField(
        null=True, blank=True,
        help_text='The earliest the task may run (a delayed publish, or the next retry); empty: at once')
    started_time = models.DateTimeField(null=True, blank=True)
    failure_time = models.DateTimeField(null=True, blank=True)
    completion_time = models.DateTimeField(null=True, blank=True)

    attempts = models.PositiveIntegerField(default=0, help_text='How many times a worker started the task')
    retries = models.PositiveIntegerField(
        default=0, help_text='How many times a failed run was retried (the lost workers are not counted here)')
    worker = models.CharField(max_length=200, blank=True, default='',
                              help_text='host:pid of the worker that ran it last')
    lease_expires = models.DateTimeField(
        null=True, blank=True,
        help_text='While IN_PROGRESS: the running worker renews this; past it, the worker counts as dead')

    class Meta:
        ordering = ('-publish_time', '-id')
        # Every index is written again on each change of status (a publish, a claim, a result), so each
        # list has a partial index holding only its own rows: a row is in one of them at a time. A
        # constraint, not unique=True, keeps uuid unique: on PostgreSQL unique=True adds a second index
        # for LIKE that nothing here uses. Together a task's life writes a third of the index entries.
        indexes = [
            models.Index(fields=['-publish_time'], name='carrot_log_active',
                         condition=models.Q(status__in=['WAITING', 'PUBLISHED', 'IN_PROGRESS'])),
            models.Index(fields=['-completion_time'], name='carrot_log_completed',
                         condition=models.Q(status='COMPLETED')),
            models.Index(fields=['-failure_time'], name='carrot_log_failed', condition=models.Q(status='FAILED')),
            models.Index(fields=['run_after'], name='carrot_log_later', condition=models.Q(status='SCHEDULED')),
            models.Index(fields=['origin'], name='carrot_log_origin', condition=~models.Q(origin='')),
        ]
        constraints = [models.UniqueConstraint(fields=['uuid'], name='carrot_log_uuid_unique')]

    def __str__(self):
        return self.task

    @property
    def positionals(self) -> list:
        return list(arguments.load_logged_leniently(self.task_args, None)[0])

    @property
    def keywords(self) -> dict:
        return arguments.load_logged_leniently(None, self.content)[1]

    @property
    def duration(self) -> timedelta | None:
        end = self.completion_time or self.failure_time
        if self.started_time and end:
            return end - self.started_time
        return None

    @property
    def virtual_host(self) -> str:
        from carrot.config import get_config
        return str(get_config().queue(self.queue).broker)

    def requeue(self) -> MessageLog:
        """Publish a copy of this message (a new uuid and log row) and delete this row, as 1.x did."""
        return operations.requeue(self)

    def attempt_history(self) -> list[AttemptRecord]:
        """Every attempt, the first first: the ones that did not succeed are TaskAttempt rows; the row
        itself is the latest attempt while it runs or once it completed."""
        records = [AttemptRecord(a.number, a.worker, a.started_time, a.finished_time, a.outcome, a.exception_class,
                                 a.exception, a.traceback)
                   for a in self.past_attempts.order_by('number')]
        recorded = {record.number for record in records}
        if self.attempts and self.attempts not in recorded and self.started_time:
            finished = self.completion_time or self.failure_time
            outcome = {self.IN_PROGRESS: 'RUNNING', self.COMPLETED: 'COMPLETED'}.get(self.status, self.status)
            failed = self.status == self.FAILED
            records.append(AttemptRecord(self.attempts, self.worker, self.started_time, finished, outcome, '',
                                         self.exception or '' if failed else '',
                                         self.traceback or '' if failed else ''))
        return records


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of a task, as MessageLog.attempt_history() gives it."""
    number: int
    worker: str
    started: datetime | None
    finished: datetime | None
    outcome: str           # RUNNING, COMPLETED, FAILED, RETRIED, LOST
    exception_class: str   # the dotted path of what it raised ('' when unknown)
    exception: str
    traceback: str


class TaskAttempt(models.Model):
    """An attempt of a task that did not succeed: it failed (and was retried, or not), or its worker was
    lost. A successful attempt is its MessageLog row itself, so running a task writes nothing here."""
    FAILED = 'FAILED'    # the last one: the task is FAILED
    RETRIED = 'RETRIED'  # it failed and the task runs again later
    LOST = 'LOST'        # its worker died or lost its connection while it ran
    OUTCOMES = ((FAILED, 'Failed'), (RETRIED, 'Failed, retried'), (LOST, 'Worker lost'))

    message_log = models.ForeignKey(MessageLog, on_delete=models.CASCADE, related_name='past_attempts')
    number = models.PositiveIntegerField(help_text='1 for the first attempt')
    outcome = models.CharField(max_length=20, choices=OUTCOMES)
    worker = models.CharField(max_length=200, blank=True, default='')
    started_time = models.DateTimeField(null=True, blank=True)
    finished_time = models.DateTimeField(null=True, blank=True)
    exception_class = models.CharField(max_length=200, blank=True, default='',
                                       help_text='The dotted path of the exception class')
    exception = models.TextField(blank=True, default='')
    traceback = models.TextField(blank=True, default='')
    log = models.TextField(blank=True, default='', help_text="The task's own log lines of this attempt")

    class Meta:
        ordering = ('message_log', 'number')
        constraints = [models.UniqueConstraint(fields=['message_log', 'number'], name='carrot_attempt_once')]

    def __str__(self):
        return f'{self.message_log_id} #{self.number} {self.outcome}'


class ScheduledTask(models.Model):
    """Publish `task` every `interval_count` `interval_type` while active."""
    INTERVAL_CHOICES = (
        ('seconds', 'seconds'),
        ('minutes', 'minutes'),
        ('hours', 'hours'),
        ('days', 'days'),
    )
    SECONDS_PER = rules.SECONDS_PER
    MAX_INTERVAL = rules.MAX_INTERVAL  # a longer interval is a typo, not a schedule

    interval_type = models.CharField(max_length=200, choices=INTERVAL_CHOICES, default='seconds')
    interval_count = models.PositiveIntegerField(default=1)  # at least 1: see carrot.schedule.rules

    exchange = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    task = models.CharField(max_length=200)
    task_args = models.TextField(null=True, blank=True, verbose_name='Positional arguments',
                                 help_text='A JSON list, e.g. [1, "two"]')
    content = models.TextField(null=True, blank=True, verbose_name='Keyword arguments',
                               help_text='A JSON object, e.g. {"order_id": 42}')
    task_name = models.CharField(max_length=200, unique=True)
    active = models.BooleanField(default=True)
    last_run_time = models.DateTimeField(null=True, blank=True)
    problem = models.TextField(blank=True, default='',
                               help_text='Why the scheduler skips this schedule (empty when it runs)')

    class Meta:
        ordering = ('task_name',)

    def __str__(self):
        return self.task_name

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=self.interval_count * self.multiplier)

    @property
    def multiplier(self) -> int:
        return self.SECONDS_PER.get(self.interval_type, 1)

    @property
    def interval_display(self) -> str:
        unit = self.interval_type if self.interval_count != 1 else self.interval_type[:-1]
        return f'Every {self.interval_count} {unit}'

    def clean(self):
        """Refuse a schedule the scheduler could not run (used by the admin and the monitor's form)."""
        from django.core.exceptions import NON_FIELD_ERRORS, ValidationError

        problems = rules.schedule_problems(self)
        # A value the field's own validation refuses (a unit not among the choices, a negative count) is
        # reported by Django already: once is enough.
        for name in ('interval_type', 'interval_count'):
            try:
                self._meta.get_field(name).clean(getattr(self, name), self)
            except ValidationError:
                problems.pop(name, None)
        if problems:
            # The last run time is in no form: its problem is the schedule's as a whole.
            raise ValidationError({NON_FIELD_ERRORS if field == 'last_run_time' else field: f'{text[:1].upper()}{text[1:]}.'
                                   for field, text in problems.items()})

    def next_run_time(self):
        """When this schedule is due next; None means it has never run, so it is due now."""
        if self.last_run_time is None:
            return None
        return self.last_run_time + self.interval

    def is_due(self, now) -> bool:
        next_run = self.next_run_time()
        return next_run is None or next_run <= now

    def publish(self, priority: int = 0, store_and_forward: bool | None = None) -> MessageLog:
        """Publish one run of this schedule now (the scheduler calls this when it is due)."""
        return operations.publish_schedule(self, priority=priority, store_and_forward=store_and_forward)


class SupervisorStatus(models.Model):
    """The last status snapshot of one carrot-supervisor master, published by its scheduler child so
    the monitor can show every worker host. `document` is the master's status JSON (see supervisor/status.py)."""
    name = models.CharField(max_length=255, unique=True, help_text='host:pid of the master')
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started = models.DateTimeField()
    last_seen = models.DateTimeField()
    generation = models.PositiveIntegerField(default=0)
    document = models.JSONField(default=dict)

    class Meta:
        ordering = ('host', 'pid')
        verbose_name_plural = 'supervisor statuses'

    def __str__(self):
        return self.name


# -- the other "carrot" (djangocarrot): Task rows and Worker rows ---------------------------------------------
#
# People who come from that project create a Task row to run a function and Worker rows for queues with a
# concurrency of their own. Here a Task row is the request as it was written (kallable, args, kwargs,
# worker); creating one writes its MessageLog row (WAITING) in the same transaction, and that row is the
# one source of truth for everything after: carrot sends it once the transaction commits (or the relay
# does: store-and-forward), the allowlist applies, and status, dates and output are read from it.

class Worker(models.Model):
    """A queue of its own, consumed with `concurrency` worker processes: carrot-supervisor adds the Worker
    rows to CARROT['queues'] when it starts and on every HUP (a name in both is a check error, carrot.E010).
    Its queue is on the default broker; `enabled=False` keeps it unconsumed (tasks for it wait)."""
    name = models.CharField(max_length=200, unique=True, help_text='The queue name')
    concurrency = models.PositiveIntegerField(default=4, help_text='Worker processes for this queue')
    description = models.TextField(blank=True, default='')
    enabled = models.BooleanField(default=True, help_text='Whether carrot-supervisor consumes this queue')

    class Meta:
        ordering = ('name',)

    def __str__(self):
        return self.name

    def clean(self):
        from django.core.exceptions import ValidationError

        from carrot.config import get_config
        if any(queue.name == self.name for queue in get_config().queues):
            raise ValidationError({'name': f"{self.name!r} is a queue of CARROT['queues'] already"})
        if not self.concurrency:
            raise ValidationError({'concurrency': 'at least 1'})


def worker_queues(config) -> tuple:
    """The queues of the Worker rows, for carrot.config (CarrotConfig.queue and all_queues). A database
    that cannot be read now -- not migrated, unreachable, or not to be used here (before the apps are
    ready, a test without one) -- adds none."""
    from carrot.config import QueueConfig
    try:
        rows = list(Worker.objects.values_list('name', 'concurrency', 'enabled'))
    except Exception:
        return ()
    return tuple(QueueConfig(name=name, broker=config.default_broker, concurrency=max(1, concurrency),
                             consumable=enabled) for name, concurrency, enabled in rows)


class Task(models.Model):
    """``Task.objects.create(kallable='myapp.tasks.process', args=[...], kwargs={...}, worker='files')``
    runs ``kallable(*args, **kwargs)`` on the queue `worker` names (a Worker, or a CARROT queue; default
    ``default``). The row keeps the request; `log` is its MessageLog, where the rest is kept."""
    kallable = models.CharField(max_length=200, help_text='The dotted path of a registered task')
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    worker = models.CharField(max_length=200, default='default', help_text='The queue (a Worker) to run it on')
    created_on = models.DateTimeField(auto_now_add=True)
    message_id = models.CharField(max_length=200, blank=True, default='', editable=False,
                                  help_text='The uuid of its MessageLog')

    class Meta:
        ordering = ('-created_on', '-id')

    def __str__(self):
        return self.kallable

    def save(self, *args, **kwargs):
        """Creating a Task writes its MessageLog (WAITING) in the same transaction; the message is sent
        once that commits. Saving it again changes nothing that was sent."""
        from django.db import transaction
        from django.utils import timezone

        if isinstance(self.worker, Worker):
            self.worker = self.worker.name
        self.worker = self.worker or 'default'
        if not self._state.adding or self.message_id:
            return super().save(*args, **kwargs)
        with transaction.atomic(using=MessageLog.objects.db):
            log = MessageLog.objects.create(
                status=MessageLog.WAITING, queue=self.worker, routing_key=self.worker, exchange='',
                uuid=str(uuid.uuid4()), task=str(self.kallable)[:200],
                task_args=json.dumps(list(self.args or [])), content=json.dumps(dict(self.kwargs or {})),
                publish_time=timezone.now())
            self.message_id = log.uuid
            super().save(*args, **kwargs)
            if operations.send_waiting is not None:
                transaction.on_commit(lambda: operations.send_waiting(log), using=MessageLog.objects.db)

    @property
    def log(self) -> MessageLog | None:
        """Its MessageLog (the requeued copy, after a requeue)."""
        if not self.message_id:
            return None
        return MessageLog.objects.filter(models.Q(uuid=self.message_id) | models.Q(origin=self.message_id)) \
            .order_by('-id').first()

    @property
    def status(self) -> str:
        log = self.log
        return log.status if log is not None else ''

    def get_status_display(self) -> str:
        log = self.log
        return log.get_status_display() if log is not None else 'Unknown (its log was deleted)'

    @property
    def started_on(self):
        log = self.log
        return log.started_time if log is not None else None

    @property
    def completed_on(self):
        log = self.log
        return (log.completion_time or log.failure_time) if log is not None else None

    @property
    def message(self) -> str:
        """Why it failed, when it did."""
        log = self.log
        return (log.exception or '') if log is not None else ''
