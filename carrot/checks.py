"""System checks for carrot (`manage.py check`, `carrot-supervisor --check`, the supervisor at start).

- carrot.E001-E006: the CARROT setting (carrot/config.py parses it and names each problem).
- carrot.E007: carrot's tables are missing from its database, or its migrations are not all applied.
- carrot.E009: a Worker row (carrot.models.Worker) is named like a queue of CARROT['queues'].
  (carrot.E008, a django.tasks backend's QUEUES that CARROT lacks, is the backend's own check.)
  Like Django's own database checks it runs only for the databases it is given
  (`manage.py check --database default`; Django 6 also gives every database to `check --tag carrot`);
  `run_carrot_checks()` gives it carrot's databases.
- carrot.E008 / E009: a queue on the broker has another type (classic / quorum) than CARROT names, or
  other arguments than carrot declares. They ask the broker, so they are deployment checks
  (`manage.py check --deploy`); `run_carrot_checks()` (carrot-supervisor, --check) runs them. A broker
  that cannot be reached is not reported by them (carrot-supervisor says so itself at start).
"""
import importlib
import logging
import sys

from django.conf import settings
from django.core.checks import Error, Tags, register

from carrot.config import E_NOT_IMPORTABLE, config_from_settings

E_TABLES_MISSING = 'carrot.E007'
E_QUEUE_TYPE = 'carrot.E008'
E_QUEUE_ARGUMENTS = 'carrot.E009'
E_WORKER_CLASH = 'carrot.E010'
MIGRATE_HINT = 'run manage.py migrate'
BROKER_CHECK_TIMEOUT = 3.0  # seconds per node: the queue checks must not hold up a start or a reload

logger = logging.getLogger('carrot.checks')


@register(Tags.compatibility, 'carrot')
def check_carrot_setting(app_configs=None, **kwargs):
    config, problems = config_from_settings(settings)
    errors = [Error(p.message, id=p.id) for p in problems]
    for index, queue in enumerate(config.queues):
        if queue.consumer_class != 'carrot.consumer.Consumer':
            errors += _importable(queue.consumer_class, f"CARROT['queues'][{index}]['consumer_class']")
    for index, module in enumerate(config.task_modules):
        errors += _importable(module, f"CARROT['task_modules'][{index}]", attribute=False)
    for index, decorator in enumerate(config.monitor_authentication):
        errors += _importable(decorator, f"CARROT['monitor_authentication'][{index}]")
    return errors


def _importable(path, where, attribute=True):
    try:
        if attribute:
            module_name, _, name = path.rpartition('.')
            getattr(importlib.import_module(module_name), name)
        else:
            importlib.import_module(path)
    except (ImportError, AttributeError, ValueError) as exc:
        return [Error(f'{where} {path!r} cannot be imported: {exc}', id=E_NOT_IMPORTABLE)]
    return []


@register(Tags.compatibility, 'carrot', deploy=True)
def check_carrot_queues(app_configs=None, **kwargs):
    """Each configured queue (and its .dead and .wait queues) that exists on its broker, against what carrot
    declares: a queue's type and arguments cannot change once it exists."""
    from carrot.amqp.declare import clashes
    from carrot.exceptions import QueueTypeMismatch

    config, problems = config_from_settings(settings)
    if problems:
        return []  # check_carrot_setting reports them; the queues are not what they will be
    by_broker: dict = {}
    for queue in config.queues:
        by_broker.setdefault(queue.broker, []).append(queue)
    errors = []
    for broker, queues in by_broker.items():
        try:
            found = clashes(broker, queues, config.dead_letter_ttl_days, socket_timeout=BROKER_CHECK_TIMEOUT,
                            stack_timeout=BROKER_CHECK_TIMEOUT)
        except Exception as exc:  # unreachable, refused: not this check's to report
            logger.debug('carrot.E008/E009 skipped for %s: %s: %s', broker, type(exc).__name__, exc)
            continue
        errors += [Error(str(clash), id=E_QUEUE_TYPE if isinstance(clash, QueueTypeMismatch) else E_QUEUE_ARGUMENTS)
                   for clash in found]
    return errors


@register(Tags.database, 'carrot')
def check_carrot_tables(app_configs=None, databases=None, **kwargs):
    if not databases or _migrate_is_running():
        return []
    errors = []
    for alias in sorted(databases):
        problem = describe_missing_schema(alias)
        if problem:
            errors.append(Error(f'database {alias!r} {problem}: {MIGRATE_HINT}', id=E_TABLES_MISSING,
                                hint='python manage.py migrate (all apps, so the admin works too)'))
    return errors


@register(Tags.database, 'carrot')
def check_worker_rows(app_configs=None, databases=None, **kwargs):
    """A Worker row named like a queue of CARROT['queues'] is one queue with two settings: refused."""
    if not databases or _migrate_is_running():
        return []
    from django.db import DatabaseError

    from carrot.models import Worker
    config, _ = config_from_settings(settings)
    names = {queue.name for queue in config.queues}
    try:
        clashes = sorted(Worker.objects.filter(name__in=names).values_list('name', flat=True))
    except DatabaseError:  # not migrated (carrot.E007 says so) or unreachable
        return []
    return [Error(f"the Worker row {name!r} is named like a queue of CARROT['queues']: rename or delete one "
                  f"of them", id=E_WORKER_CLASH) for name in clashes]


def describe_missing_schema(alias: str) -> str | None:
    """What of carrot's schema database `alias` lacks ("has no table carrot_x", "lacks migration
    carrot.0002_y"), or None when it is complete -- or cannot be reached: an unreachable database is
    not a missing table, and the workers wait for it to come back."""
    from django.apps import apps
    from django.db import DatabaseError, connections, router
    from django.db.migrations.executor import MigrationExecutor

    models = [m for m in apps.get_app_config('carrot').get_models()
              if router.allow_migrate_model(alias, m)]
    if not models:
        return None
    connection = connections[alias]
    try:
        existing = set(connection.introspection.table_names())
        executor = MigrationExecutor(connection)
        targets = [node for node in executor.loader.graph.leaf_nodes() if node[0] == 'carrot']
        unapplied = [m for m, _ in executor.migration_plan(targets) if m.app_label == 'carrot']
    except DatabaseError as exc:
        logger.debug('carrot.E007 skipped: database %r cannot be reached: %s', alias, exc)
        return None
    missing = sorted(m._meta.db_table for m in models if m._meta.db_table not in existing)
    if missing:
        return f"has no table {', '.join(missing)}"
    if unapplied:
        return f"lacks migration {', '.join(f'{m.app_label}.{m.name}' for m in unapplied)}"
    return None


def _migrate_is_running() -> bool:
    """Whether this check runs inside `migrate`, which runs every check against the database it is
    about to migrate: "run manage.py migrate" must not stop manage.py migrate itself."""
    from django.core.management.commands.migrate import Command as Migrate

    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get('self'), Migrate):
            return True
        frame = frame.f_back
    return False


def carrot_databases() -> list[str]:
    """The database aliases carrot's models are read from and written to."""
    from django.apps import apps
    from django.db import router

    aliases = set()
    for model in apps.get_app_config('carrot').get_models():
        aliases.add(router.db_for_read(model) or 'default')
        aliases.add(router.db_for_write(model) or 'default')
    return sorted(aliases)


def run_carrot_checks() -> list:
    """The serious problems of every carrot check, database checks included: what carrot-supervisor
    runs before it starts anything (it exits 3 with them)."""
    from django.core.checks import run_checks

    return [e for e in run_checks(tags=['carrot'], databases=carrot_databases(), include_deployment_checks=True)
            if e.is_serious()]
