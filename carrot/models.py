"""What carrot keeps in the project's database: a log row per message, and interval schedules."""
from __future__ import annotations

import ast
import json
from datetime import timedelta

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


def _loads(text, default):
    """Stored JSON arguments; django-carrot 1.x wrote positional args as a Python tuple repr."""
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return default


class MessageLog(models.Model):
    """One message's life: PUBLISHED, then IN_PROGRESS in a worker, then COMPLETED or FAILED."""
    WAITING = 'WAITING'  # logged, not yet taken by the broker (store-and-forward); relayed later
    PUBLISHED = 'PUBLISHED'
    IN_PROGRESS = 'IN_PROGRESS'
    FAILED = 'FAILED'
    COMPLETED = 'COMPLETED'
    STATUS_CHOICES = (
        (WAITING, 'Waiting for the broker'),
        (PUBLISHED, 'Published'),
        (IN_PROGRESS, 'In progress'),
        (FAILED, 'Failed'),
        (COMPLETED, 'Completed'),
    )

    status = models.CharField(max_length=20, choices=STATUS_CHOICES, default=PUBLISHED)
    exchange = models.CharField(max_length=200, blank=True, null=True)
    queue = models.CharField(max_length=200, blank=True, null=True)
    routing_key = models.CharField(max_length=200, blank=True, null=True)
    uuid = models.CharField(max_length=200, unique=True)
    priority = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(255)])

    task = models.CharField(max_length=200, help_text='The dotted path of the task function')
    task_args = models.TextField(null=True, blank=True, verbose_name='Task positional arguments')
    content = models.TextField(null=True, blank=True, verbose_name='Task keyword arguments')

    exception = models.TextField(null=True, blank=True)
    traceback = models.TextField(null=True, blank=True)
    output = models.TextField(null=True, blank=True)
    log = models.TextField(blank=True, null=True)

    publish_time = models.DateTimeField(null=True, blank=True)
    started_time = models.DateTimeField(null=True, blank=True)
    failure_time = models.DateTimeField(null=True, blank=True)
    completion_time = models.DateTimeField(null=True, blank=True)

    attempts = models.PositiveIntegerField(default=0, help_text='How many times a worker started the task')
    worker = models.CharField(max_length=200, blank=True, default='',
                              help_text='host:pid of the worker that ran it last')
    lease_expires = models.DateTimeField(
        null=True, blank=True,
        help_text='While IN_PROGRESS: the running worker renews this; past it, the worker counts as dead')

    class Meta:
        ordering = ('-publish_time', '-id')
        indexes = [
            models.Index(fields=['status', '-publish_time'], name='carrot_log_status_published'),
            models.Index(fields=['status', '-completion_time'], name='carrot_log_status_completed'),
            models.Index(fields=['status', '-failure_time'], name='carrot_log_status_failed'),
        ]

    def __str__(self):
        return self.task

    @property
    def positionals(self) -> list:
        return list(_loads(self.task_args, []))

    @property
    def keywords(self) -> dict:
        kwargs = _loads(self.content, {})
        return kwargs if isinstance(kwargs, dict) else {}

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
        from carrot import publishing  # publishing imports this module
        return publishing.requeue(self)


class ScheduledTask(models.Model):
    """Publish `task` every `interval_count` `interval_type` while active."""
    INTERVAL_CHOICES = (
        ('seconds', 'seconds'),
        ('minutes', 'minutes'),
        ('hours', 'hours'),
        ('days', 'days'),
    )
    SECONDS_PER = {'seconds': 1, 'minutes': 60, 'hours': 3600, 'days': 86400}
    MAX_INTERVAL = timedelta(days=3650)  # a longer interval is a typo, not a schedule

    interval_type = models.CharField(max_length=200, choices=INTERVAL_CHOICES, default='seconds')
    interval_count = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])

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

    @property
    def positional_arguments(self) -> tuple:
        text = (self.task_args or '').strip()
        if not text:
            return ()
        if text.startswith('['):
            return tuple(_loads(text, []))
        # 1.x stored "a, b, c"
        return tuple(a.strip() for a in text.split(',') if a.strip())

    @property
    def keyword_arguments(self) -> dict:
        kwargs = _loads(self.content, {})
        return kwargs if isinstance(kwargs, dict) else {}

    def clean(self):
        """Refuse a schedule the scheduler could not run (used by the admin and the monitor's form)."""
        from django.core.exceptions import ValidationError

        from carrot.schedule_validation import schedule_errors
        errors = schedule_errors(self)
        if errors:
            raise ValidationError(errors)

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
        from carrot import publishing  # publishing imports this module
        return publishing.publish_schedule(self, priority=priority, store_and_forward=store_and_forward)


class SupervisorStatus(models.Model):
    """The last status snapshot of one carrot-supervisor master, published by its scheduler child so
    the monitor can show every worker host. `document` is the master's status JSON (see carrot/status.py)."""
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
