"""The allowlist: what counts as a task, for publishing, consuming, requeue, the scheduler and the list.

tests/testapp/shapes.py holds a callable of every shape; it is a task module only when CARROT lists it.
"""
import json
import subprocess
import sys

import pika
import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from carrot import registry
from carrot.publish import outgoing
from carrot.exceptions import TaskNotRegistered
from carrot.models import MessageLog, ScheduledTask
from carrot.schedule.scheduler import Scheduler
from carrot.utilities import publish_message
from tests.conftest import run_consumer

SHAPES = 'tests.testapp.shapes'


@pytest.fixture
def shapes_listed():
    with override_settings(CARROT={**settings.CARROT, 'task_modules': [SHAPES]}):
        yield


def test_a_public_module_level_function_of_a_listed_module_is_a_task(shapes_listed):
    from tests.testapp import shapes
    assert registry.get_task(f'{SHAPES}.public') is shapes.public


def test_functions_of_an_installed_apps_tasks_module_are_tasks():
    from tests.testapp import tasks
    assert registry.get_task('tests.testapp.tasks.add') is tasks.add


@pytest.mark.parametrize('attribute, reason', [
    ('_private', "starts with '_': private helpers are not tasks"),
    ('Klass', 'is a type, not a function'),
    ('instance', 'is a _Callable, not a function'),
    ('builtin', 'is a builtin_function_or_method, not a function'),
    ('system', 'is a builtin_function_or_method, not a function'),
    ('quote', 'is shlex.quote, imported into tests.testapp.shapes: only functions defined in a tasks module'),
    ('run', "is the function '_wrap.<locals>.wrapper' stored under another name"),
    ('call', 'is subprocess.call, imported into tests.testapp.shapes'),
    ('alias', "is the function 'public' stored under another name"),
    ('lam', "is the function '<lambda>' stored under another name"),
    ('nested', "is the function 'outer.<locals>.nested' stored under another name"),
    ('nope', "module tests.testapp.shapes has no attribute 'nope'"),
])
def test_what_is_not_a_task_in_a_task_module_says_why(shapes_listed, attribute, reason):
    with pytest.raises(TaskNotRegistered) as caught:
        registry.get_task(f'{SHAPES}.{attribute}')
    assert f'task {SHAPES}.{attribute} is not registered: ' in str(caught.value)
    assert reason in str(caught.value)


def test_decorated_functions_are_tasks_whatever_their_name(shapes_listed):
    from tests.testapp import shapes
    assert registry.get_task(f'{SHAPES}.decorated') is shapes.decorated
    assert registry.get_task('shapes.renamed') is shapes._decorated_private


@pytest.mark.parametrize('attribute', ['public', 'run', '_private', 'Klass'])
def test_in_a_module_of_an_installed_app_only_decorated_functions_are_tasks(attribute):
    # Not listed in task_modules: only what @carrot.task registered.
    with pytest.raises(TaskNotRegistered, match=f'{SHAPES} \\(of installed app tests.testapp\\) is not a '
                                                f"tasks module, and it has no function '{attribute}' "
                                                f'decorated with @carrot.task'):
        registry.get_task(f'{SHAPES}.{attribute}')


def test_a_decorated_task_in_an_installed_app_is_found_on_demand(subprocess_env):
    # In a fresh interpreter, so nothing has imported the module before the lookup.
    code = ('import sys, django; django.setup()\n'
            'from carrot import registry\n'
            'assert "tests.testapp.lazy_jobs" not in sys.modules\n'
            'assert registry.get_task("tests.testapp.lazy_jobs.lazy")(1) == 2\n'
            'try:\n'
            '    registry.get_task("tests.testapp.lazy_jobs.plain")\n'
            'except registry.TaskNotRegistered as exc:\n'
            '    print(exc)\n')
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "has no function 'plain' decorated with @carrot.task" in result.stdout


def test_modules_outside_installed_apps_are_never_imported(subprocess_env):
    code = ('import sys, django; django.setup()\n'
            'from carrot import registry\n'
            'for path in ("tests.outside_jobs.outside", "os.system", "subprocess.call", "json.dumps"):\n'
            '    try:\n'
            '        registry.get_task(path)\n'
            '    except registry.TaskNotRegistered as exc:\n'
            '        print(exc)\n'
            '    else:\n'
            '        print("ACCEPTED", path)\n'
            'print("IMPORTED" if "tests.outside_jobs" in sys.modules else "NOT IMPORTED")\n')
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == 'NOT IMPORTED' and 'ACCEPTED' not in result.stdout
    assert lines[0].startswith('task tests.outside_jobs.outside is not registered: tests.outside_jobs is not '
                               'a tasks module of an installed app, not in CARROT')


@pytest.mark.parametrize('path', ['', 'nodots', '.leading', 'a..b', 'os.system\x00', '../../etc.passwd'])
def test_malformed_names_are_refused(path):
    with pytest.raises(TaskNotRegistered, match='is not registered'):
        registry.get_task(path)
    with pytest.raises(TaskNotRegistered):
        registry.get_task(None)


def test_the_decorator_takes_functions_only():
    with pytest.raises(TypeError, match='decorates functions'):
        registry.task(type('Job', (), {}))


def test_registered_task_names_follow_the_same_rule(shapes_listed):
    names = registry.registered_task_names()
    assert f'{SHAPES}.public' in names and f'{SHAPES}.decorated' in names and 'shapes.renamed' in names
    assert 'tests.testapp.tasks.add' in names and 'carrot.helper_tasks.cleanup' in names
    for attribute in ('_private', 'Klass', 'instance', 'builtin', 'system', 'run', 'call', 'alias', 'lam',
                      'nested', 'quote', '_wrap', 'CALLS', 'subprocess', 'functools', 'task'):
        assert f'{SHAPES}.{attribute}' not in names, attribute


# --- the same rule on every path a task name takes -----------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_publish_requeue_and_scheduler_refuse_a_wrapper(shapes_listed):
    with pytest.raises(TaskNotRegistered, match='stored under another name'):
        publish_message(f'{SHAPES}.run', ['true'])
    log = MessageLog.objects.create(status='FAILED', queue='default', task=f'{SHAPES}.run', uuid='x',
                                    task_args='[["true"]]', content='{}', publish_time=timezone.now())
    with pytest.raises(TaskNotRegistered, match='stored under another name'):
        log.requeue()
    with pytest.raises(TaskNotRegistered, match='stored under another name'):
        outgoing.prepare(f'{SHAPES}.run', (['true'],))
    schedule = ScheduledTask.objects.create(task=f'{SHAPES}.run', task_name='wrapper', queue='default',
                                            interval_type='seconds', interval_count=60, task_args='[["true"]]')
    Scheduler().publish_due()
    schedule.refresh_from_db()
    assert 'stored under another name' in schedule.problem
    assert list(MessageLog.objects.filter(task=f'{SHAPES}.run').values_list('uuid', flat=True)) == ['x']


@pytest.mark.django_db(transaction=True)
def test_the_consumer_refuses_a_wrapper_a_message_names(shapes_listed, raw_channel):
    from tests.testapp import shapes
    from carrot.amqp.declare import declare_queue
    from carrot.config import get_config
    declare_queue(raw_channel, get_config().queue('default'))  # as carrot declares it (dead-letter TTL too)
    for name in ('run', 'instance', '_private', 'public'):
        raw_channel.basic_publish('', 'default', json.dumps({'args': [['true']], 'kwargs': {}}),
                                  pika.BasicProperties(headers={'type': f'{SHAPES}.{name}'}, message_id=name,
                                                       content_type='application/json'))
    shapes.CALLS.clear()
    run_consumer(max_messages=4, idle_timeout=10)
    rows = {log.uuid: log for log in MessageLog.objects.all()}
    for name in ('run', 'instance', '_private'):
        assert rows[name].status == 'FAILED' and 'is not registered' in rows[name].exception, name
    assert rows['public'].status == 'COMPLETED' and shapes.CALLS == [['true']]


def test_a_module_that_fails_to_import_is_refused_not_raised():
    with pytest.raises(TaskNotRegistered, match=r'its module tests\.testapp\.broken_jobs cannot be imported '
                                                r'\(RuntimeError: broken_jobs cannot be imported'):
        registry.get_task('tests.testapp.broken_jobs.anything')


def test_private_modules_of_an_installed_app_are_not_imported_for_a_message():
    with pytest.raises(TaskNotRegistered, match="is private .* does not import it"):
        registry.get_task('tests.testapp._hidden.hidden')
    assert 'tests.testapp._hidden' not in sys.modules
