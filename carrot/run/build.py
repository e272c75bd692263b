"""The warm image of a settings generation: Django set up once, checks run, task modules imported.

carrot-supervisor's master never imports Django, pika or the project. For every settings generation
(start, HUP, --autoreload, a dead image) it forks an image process (supervisor/image.py) that calls
`ImageBuilder`: set Django up with the settings module, run the carrot system checks (an image whose
checks fail never serves), import the task modules, import what every child uses, close every database
and broker connection (nothing holding a socket crosses a fork), and return the plan whose child bodies
(carrot/run/bodies.py) the image forks on the master's request. A settings or code file broken on disk
later never reaches a child: children are forks of the image, not fresh imports.

`read_settings` is the same reading in the calling process, for `carrot-supervisor --check`.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import traceback
from dataclasses import dataclass, field

from supervisor import EXIT_BROKER, EXIT_CONFIG, Arbiter, Plan, SlotGroup
from supervisor.image import ImageFailed

from carrot.run.bodies import ChildOptions, consumer_main, housekeeping_main, scheduler_main


class SettingsUnreadable(ImageFailed):
    """The settings could not be read, CARROT is invalid, or the task modules do not import."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_CONFIG)


class BrokerUnreachable(ImageFailed):
    """A broker a consumer or the scheduler would use cannot be reached (checked at start only)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BROKER)


@dataclass(frozen=True)
class QueueSummary:
    name: str
    concurrency: int
    consumable: bool
    broker: str  # masked URL


@dataclass(frozen=True)
class SettingsSummary:
    """What the plan is made of: the queues and CARROT's supervisor options."""
    queues: tuple[QueueSummary, ...]
    options: dict
    broker_errors: tuple[str, ...] = field(default=())

    def queue(self, name: str) -> QueueSummary | None:
        return next((q for q in self.queues if q.name == name), None)


def set_up_django(settings_module: str, loglevel: str = 'INFO') -> None:
    os.environ['DJANGO_SETTINGS_MODULE'] = settings_module
    import django
    django.setup()
    # Django applies LOGGING with dictConfig, whose default disable_existing_loggers=True silences every
    # logger created before it -- carrot's and the supervisor's among them. Their lines are what tells an
    # operator what the workers did.
    for name, existing in logging.root.manager.loggerDict.items():
        if isinstance(existing, logging.Logger) and name.split('.')[0] in ('carrot', 'supervisor'):
            existing.disabled = False
    logging.getLogger('carrot').setLevel(loglevel)


def read_settings(settings_module: str, check_brokers: bool = False, loglevel: str = 'INFO') -> SettingsSummary:
    """Set Django up with `settings_module` here and summarise CARROT; SettingsUnreadable on any problem."""
    try:
        set_up_django(settings_module, loglevel)
    except BaseException as exc:  # whatever a broken settings module raises, report it
        frames = traceback.extract_tb(exc.__traceback__)
        where = f' (at {frames[-1].filename}:{frames[-1].lineno})' if frames else ''
        raise SettingsUnreadable(f'cannot load settings {settings_module}: {type(exc).__name__}: {exc}{where}') \
            from exc
    from django.apps import apps
    from django.conf import settings

    if not apps.is_installed('carrot'):
        raise SettingsUnreadable(f"'carrot' is not in INSTALLED_APPS of {settings_module}: add it "
                                 f"(INSTALLED_APPS = [..., 'carrot']), then run manage.py migrate")
    from carrot.checks import run_carrot_checks
    from carrot.config import config_from_settings
    from carrot.config.options import settings_values

    config, _ = config_from_settings(settings)
    # Every check tagged 'carrot' runs, database ones included (carrot.E007: tables missing).
    problems = [f'{e.id}: {e.msg}' for e in run_carrot_checks()]
    if problems:
        raise SettingsUnreadable('\n'.join(problems))
    options = settings_values(config)
    # The Worker rows (carrot.models.Worker) are queues too: read at every start and every reload (HUP).
    return SettingsSummary(
        queues=tuple(QueueSummary(q.name, q.concurrency, q.consumable, str(q.broker)) for q in config.all_queues),
        options=options, broker_errors=tuple(broker_errors(config)) if check_brokers else ())


def broker_errors(config) -> list[str]:
    """Try every broker a consumer or the scheduler would use; one line per unreachable broker."""
    from carrot.amqp.connection import connect, describe_connection_error

    errors = []
    brokers = {q.broker for q in config.consumable_queues} | {config.default_broker}
    for broker in sorted(brokers, key=str):
        try:
            connect(broker).close()
        except Exception as exc:
            errors.append(f'broker {broker} is unreachable: {describe_connection_error(exc, broker)}')
    return errors


# What every child uses, imported in the image so that children share it instead of importing it each.
PRELOADED = ('carrot.consume.loop', 'carrot.consume.offload', 'carrot.schedule.scheduler', 'carrot.run.housekeeping',
             'carrot.publish.relay', 'carrot.publish.sweep',
             'carrot.run.status', 'carrot.amqp.session', 'carrot.amqp.publisher', 'pika', 'psutil')


class ImageBuilder:
    """Builds the image (runs in the image process): settings + command-line flags -> the plan.

    `flags` holds the command line's values (None where a flag was not given: CARROT decides).
    """

    def __init__(self, settings_module: str, flags: dict, *, queues: list[str] | None = None,
                 no_scheduler: bool = False, loglevel: str = 'INFO', status_file: str | None = None,
                 autoreload: bool = False):
        self.settings_module = settings_module
        self.flags = flags
        self.queue_filter = queues
        self.no_scheduler = no_scheduler
        self.loglevel = loglevel
        self.status_file = status_file
        self.autoreload = autoreload

    def option(self, summary: SettingsSummary, name: str):
        flag = self.flags.get(name)
        return flag if flag is not None else summary.options[name]

    def __call__(self, generation: int) -> tuple[Plan, dict]:
        summary = read_settings(self.settings_module, check_brokers=generation == 1, loglevel=self.loglevel)
        if summary.broker_errors:
            raise BrokerUnreachable('; '.join(summary.broker_errors))
        plan = self.plan_for(summary)
        self.import_code()
        close_connections()
        if self.autoreload:
            from carrot.run.autoreload import start_watcher
            start_watcher(os.getppid(), generation)
        return plan, {name: self.option(summary, name) for name in Arbiter.OPTIONS}

    def import_code(self) -> None:
        """Import the task modules and what every child runs, once, here: children share it."""
        from carrot.registry import autodiscover

        try:
            autodiscover()
        except BaseException as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = f' (at {frames[-1].filename}:{frames[-1].lineno})' if frames else ''
            raise SettingsUnreadable(f'cannot import the task modules: {type(exc).__name__}: {exc}{where}') from exc
        for module in PRELOADED:
            importlib.import_module(module)

    def plan_for(self, summary: SettingsSummary) -> Plan:
        queues = [q for q in summary.queues if q.consumable]
        if self.queue_filter is not None:
            unknown = [name for name in self.queue_filter if summary.queue(name) is None]
            if unknown:
                raise SettingsUnreadable(f"--queues names queues that are not in CARROT['queues']: "
                                         f"{', '.join(unknown)}")
            queues = [summary.queue(name) for name in self.queue_filter]
        options = ChildOptions(
            task_time_limit=self.option(summary, 'task_time_limit'),
            max_tasks_per_child=self.option(summary, 'max_tasks_per_child'),
            max_memory_per_child=self.option(summary, 'max_memory_per_child'),
            status_file=self.status_file)
        groups = [SlotGroup(f'consumer {q.name}', q.concurrency, functools.partial(consumer_main, q.name, options),
                            scalable=True) for q in queues]
        if summary.options['scheduler'] and not self.no_scheduler:
            groups.append(SlotGroup('scheduler', 1, functools.partial(scheduler_main, options), numbered=False))
        # Every host, whatever it consumes: relay waiting messages, copy the status to the database.
        groups.append(SlotGroup('housekeeping', 1, functools.partial(housekeeping_main, options), numbered=False,
                                auxiliary=True))
        return Plan(tuple(groups))


def close_connections() -> None:
    """Nothing that holds a socket crosses a fork: each child opens its own connections."""
    from django.db import connections

    from carrot.amqp.publisher import close_publishers

    connections.close_all()
    close_publishers()
