"""What a new user meets first, tried the way they try it: a settings module without carrot, a broker
that is not there or refuses them, a publish before `migrate`, a task's DEBUG lines, a schedule whose
arguments do not fit its task. Each says what is wrong and what to do, once, without a traceback."""
import os
import subprocess
import sys

import pytest

from tests.test_config import run_project

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(tmp_path, settings_text, *argv):
    """`python -m carrot.cli --check` with a settings module of its own that extends the test settings."""
    (tmp_path / 'newuser_settings.py').write_text('from tests.testproject.settings import *  # noqa\n' + settings_text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    env.pop('DJANGO_SETTINGS_MODULE', None)
    return subprocess.run([sys.executable, '-m', 'carrot.cli', '--settings', 'newuser_settings', '--check', *argv],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(120)
def test_carrot_missing_from_installed_apps_says_what_to_add(tmp_path, subprocess_env):
    result = run_check(tmp_path, "INSTALLED_APPS = [app for app in INSTALLED_APPS if app != 'carrot']\n")
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "'carrot' is not in INSTALLED_APPS of newuser_settings: add it" in output
    assert 'Traceback' not in output


@pytest.mark.timeout(120)
@pytest.mark.parametrize('broker, said', [
    ('amqp://guest:guest@127.0.0.1:1/', 'connection refused at 127.0.0.1:1: is RabbitMQ running there?'),
    ('amqp://guest:wrong@127.0.0.1:5672/', "access refused for user 'guest' on vhost '/' at 127.0.0.1:5672: the "
                                           "user name or password is wrong"),
    ('amqp://guest:guest@127.0.0.1:5672/no-such-vhost',
     "access refused for user 'guest' on vhost 'no-such-vhost' at 127.0.0.1:5672 (RabbitMQ says: vhost "
     "no-such-vhost not found); create it (rabbitmqctl add_vhost no-such-vhost)"),
])
def test_a_broker_that_is_not_there_or_refuses_is_said_once_in_words(tmp_path, subprocess_env, broker, said):
    result = run_check(tmp_path, f"CARROT = {{**CARROT, 'default_broker': {broker!r}}}\n", '--no-scheduler')
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert said in output and output.count(said) == 1, output
    assert 'Traceback' not in output and 'ERROR' not in output, output  # pika's own lines are dropped
    assert 'wrong@' not in output  # the password stays masked


@pytest.mark.timeout(240)
def test_publishing_before_migrate_says_run_migrate(empty_database):
    code = ("from carrot.utilities import publish_message\n"
            "from carrot.exceptions import NotMigrated\n"
            "try:\n"
            "    publish_message('tests.testapp.tasks.add', 1, 2)\n"
            "except NotMigrated as exc:\n"
            "    print('refused:', exc)\n")
    result = run_project(empty_database, 'shell', '-c', code)
    assert "refused: carrot's tables are missing from database 'default'" in result.output, result.output
    assert result.output.rstrip().endswith('run manage.py migrate'), result.output


@pytest.mark.timeout(60)
def test_a_tasks_debug_lines_are_kept_while_the_supervisors_log_says_info(start_supervisor):
    from carrot.utilities import publish_message
    from tests.harness import wait_status
    supervisor = start_supervisor('--loglevel', 'INFO')
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'])
    row = wait_status(publish_message('tests.testapp.tasks.log_at_every_level', 'marker-7'), 'COMPLETED', 20,
                      supervisor.tail)
    assert 'DEBUG debug marker-7' in row.log and 'INFO info marker-7' in row.log, row.log
    assert 'debug marker-7' not in supervisor.log() and 'info marker-7' in supervisor.log()


@pytest.mark.django_db(transaction=True)
def test_the_schedule_form_refuses_arguments_that_do_not_fit_the_task(admin_client):
    from carrot.models import ScheduledTask
    response = admin_client.post('/carrot/scheduled/new/', {
        'task_name': 'misfit', 'task': 'tests.testapp.tasks.add', 'queue': 'default', 'interval_type': 'minutes',
        'interval_count': '0', 'task_args': '[1, 2, 3]', 'content': '{}', 'active': 'on'})
    html = response.content.decode()
    assert response.status_code == 200 and not ScheduledTask.objects.filter(task_name='misfit').exists()
    assert 'The arguments do not fit add(a, b): too many positional arguments.' in html, html
    assert html.count('at least 1 (got 0)') == 1  # one problem, one message
