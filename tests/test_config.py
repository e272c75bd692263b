"""The CARROT setting: defaults, both broker spellings, and checks that name the bad key."""
import os

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

import carrot
from carrot.config import BrokerConfig, clear_config_cache, get_config, parse_config
from carrot.exceptions import CarrotConfigException
from carrot.objects import VirtualHost
from carrot.utilities import get_host_from_name


def problems_of(raw):
    return [str(p) for p in parse_config(raw)[1]]


def test_no_carrot_setting_means_one_default_queue_on_localhost():
    config, problems = parse_config(None)
    assert problems == []
    assert [q.name for q in config.queues] == ['default']
    broker = config.queues[0].broker
    assert (broker.host, broker.port, broker.virtual_host, broker.username, broker.password) == \
        ('localhost', 5672, '/', 'guest', 'guest')


def test_settings_without_carrot_key_use_the_default_queue():
    from django.conf import settings
    try:
        with override_settings():
            del settings.CARROT  # deleting sends no setting_changed signal: clear the cache by hand
            clear_config_cache()
            assert [q.name for q in get_config().queues] == ['default']
    finally:
        clear_config_cache()


def test_broker_url_without_vhost_means_slash():
    for url in ('amqp://u:p@rabbit:5673', 'amqp://u:p@rabbit:5673/'):
        broker = parse_config({'default_broker': url})[0].default_broker
        assert (broker.host, broker.port, broker.virtual_host) == ('rabbit', 5673, '/')


def test_broker_url_with_encoded_vhost_and_amqps():
    broker = parse_config({'default_broker': 'amqps://u:p%40ss@rabbit/my%2Fvhost'})[0].default_broker
    assert broker.virtual_host == 'my/vhost'
    assert broker.password == 'p@ss'
    assert broker.secure and broker.port == 5671


def test_broker_dict_form_as_documented_for_django_carrot():
    config, problems = parse_config({'default_broker': {
        'host': '192.168.0.1', 'port': 5672, 'name': 'my-virtual-host', 'username': 'me',
        'password': 'secret', 'secure': False}})
    assert problems == []
    assert config.default_broker == BrokerConfig('192.168.0.1', 5672, 'my-virtual-host', 'me', 'secret')


def test_queue_options_and_host_per_queue():
    config, problems = parse_config({'queues': [
        {'name': 'my-queue-1', 'host': 'amqp://a:b@h1:5672/v1', 'concurrency': 5},
        {'name': 'my-queue-2', 'host': {'host': 'h2', 'name': '%2f'}, 'consumable': False,
         'consumer_class': 'tests.testapp.consumers.CustomConsumer'},
    ]})
    assert problems == []
    names = [q.name for q in config.queues]
    assert names == ['default', 'my-queue-1', 'my-queue-2']
    q1, q2 = config.queue('my-queue-1'), config.queue('my-queue-2')
    assert (q1.concurrency, q1.consumable, q1.broker.host, q1.broker.virtual_host) == (5, True, 'h1', 'v1')
    assert (q2.concurrency, q2.consumable, q2.broker.virtual_host) == (1, False, '/')
    assert q2.consumer_class == 'tests.testapp.consumers.CustomConsumer'
    assert [q.name for q in config.consumable_queues] == ['default', 'my-queue-1']


def test_check_reports_bad_concurrency_with_id_and_path():
    assert problems_of({'queues': [{'name': 'a'}, {'name': 'b', 'concurrency': 'ten'}]}) == [
        "carrot.E003: CARROT['queues'][1]['concurrency'] must be a positive integer, got 'ten'"]


def test_check_reports_negative_concurrency():
    assert problems_of({'queues': [{'name': 'a', 'concurrency': -2}]}) == [
        "carrot.E003: CARROT['queues'][0]['concurrency'] must be a positive integer, got -2"]


def test_check_reports_unknown_keys():
    found = problems_of({'queue': [], 'queues': [{'name': 'a', 'concurency': 2}]})
    assert len(found) == 2
    assert found[0].startswith("carrot.E002: CARROT has an unknown key 'queue'")
    assert found[1].startswith("carrot.E002: CARROT['queues'][0] has an unknown key 'concurency'")


def test_check_reports_wrong_types():
    found = problems_of({'queues': {'name': 'a'}, 'task_modules': 'myapp.tasks', 'max_attempts': 0})
    assert "carrot.E003: CARROT['queues'] must be a list of dicts, got {'name': 'a'}" in found
    assert "carrot.E003: CARROT['task_modules'] must be a list of dotted import paths, got 'myapp.tasks'" \
        in found
    assert "carrot.E003: CARROT['max_attempts'] must be a positive integer, got 0" in found
    assert problems_of([1, 2]) == ['carrot.E001: CARROT must be a dict, got list']


def test_check_reports_duplicate_queue_names():
    assert problems_of({'queues': [{'name': 'a'}, {'name': 'a'}]}) == [
        "carrot.E004: CARROT['queues'][1] repeats the queue name 'a'; queue names must be unique"]


def test_check_reports_a_queue_name_rabbitmq_or_the_log_table_cannot_hold():
    # 'é' is two bytes in UTF-8: 127 of them fit AMQP's 255, but not with the '.dead' of the queue's
    # dead-letter queue; 125 (250 bytes) do.
    found = problems_of({'queues': [{'name': 'q' * 201}, {'name': 'é' * 130}, {'name': 'é' * 127},
                                    {'name': 'é' * 125}, {'name': 'q' * 200}, {'name': 'ok'}]})
    assert len(found) == 3
    assert "CARROT['queues'][0]['name']" in found[0] and 'at most 200 characters' in found[0]
    assert "CARROT['queues'][1]['name']" in found[1] and '250 bytes' in found[1]
    assert "CARROT['queues'][2]['name']" in found[2] and 'room for .dead' in found[2]


def test_check_reports_unparseable_broker_urls_without_showing_the_password():
    found = problems_of({'default_broker': 'http://u:hunter2@h/', 'queues': [
        {'name': 'a', 'host': 'amqp://u:p@h:notaport/'}, {'name': 'b', 'host': 42}]})
    assert len(found) == 3
    assert all(f.startswith('carrot.E005: ') for f in found)
    assert 'hunter2' not in ' '.join(found)
    assert "CARROT['queues'][0]['host']" in found[1]


@pytest.mark.django_db  # Django 6 runs database checks (carrot.E007) for tags=['carrot']
def test_manage_py_check_shows_the_problem():
    with override_settings(CARROT={'queues': [{'name': 'a'}, {'name': 'b', 'concurrency': 'ten'}]}):
        errors = run_checks(tags=['carrot'])
        assert [(e.id, e.msg) for e in errors] == [
            ('carrot.E003', "CARROT['queues'][1]['concurrency'] must be a positive integer, got 'ten'")]
        with pytest.raises(SystemCheckError, match=r"carrot\.E003"):
            call_command('check')
        with pytest.raises(CarrotConfigException, match='concurrency'):
            get_config()


@pytest.mark.django_db  # Django 6 runs database checks (carrot.E007) for tags=['carrot']
def test_check_reports_consumer_class_that_cannot_be_imported():
    with override_settings(CARROT={'queues': [{'name': 'a', 'consumer_class': 'nowhere.Consumer'}],
                                   'task_modules': ['tests.testapp.tasks', 'no.such.module']}):
        errors = run_checks(tags=['carrot'])
    assert [e.id for e in errors] == ['carrot.E006', 'carrot.E006']
    assert "'nowhere.Consumer' cannot be imported" in errors[0].msg
    assert "'no.such.module' cannot be imported" in errors[1].msg


def test_config_is_immutable():
    config = get_config()
    with pytest.raises(AttributeError):
        config.max_attempts = 5
    with pytest.raises(AttributeError):
        config.queues[0].concurrency = 9


def test_broker_str_and_repr_never_show_the_password():
    broker = parse_config({'default_broker': 'amqp://carrot:s3cr3t@rabbit:5672/prod'})[0].default_broker
    assert 's3cr3t' not in str(broker) and 's3cr3t' not in repr(broker)
    assert str(broker) == 'amqp://carrot:***@rabbit:5672/prod'
    vhost = VirtualHost(url='amqp://carrot:s3cr3t@rabbit:5672/prod')
    assert 's3cr3t' not in str(vhost) and 's3cr3t' not in repr(vhost)
    assert vhost.password == 's3cr3t'  # still usable to connect
    assert 's3cr3t' not in str(get_host_from_name('default'))


def test_get_host_from_name_unknown_queue_names_the_configured_ones():
    with pytest.raises(CarrotConfigException, match="no queue called 'nope'.*'default', 'other'"):
        get_host_from_name('nope')


# --- ops: the AppConfig's name, and carrot.E007 (carrot's tables missing) --------------------------

def test_the_app_config_is_carrot_app_config_and_the_only_one():
    import inspect

    from django.apps import AppConfig, apps

    from carrot import apps as carrot_apps
    assert type(apps.get_app_config('carrot')) is carrot_apps.CarrotAppConfig
    declared = [c for _, c in inspect.getmembers(carrot_apps, inspect.isclass)
                if issubclass(c, AppConfig) and c is not AppConfig]
    assert declared == [carrot_apps.CarrotAppConfig]  # so INSTALLED_APPS = ['carrot'] picks it


@pytest.mark.django_db
def test_tables_check_passes_on_a_migrated_database_and_needs_databases():
    from carrot.checks import carrot_databases, check_carrot_tables, run_carrot_checks
    assert carrot_databases() == ['default']
    assert check_carrot_tables(databases=['default']) == []
    assert run_carrot_checks() == []
    # Like Django's own database checks: nothing without databases (plain `manage.py check`).
    assert check_carrot_tables(databases=None) == []


def run_project(database, *argv, module=None):
    """Run `tests/manage.py argv` (or `python -m module argv`) against database NAME `database`."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CARROT_TEST_DB_NAME=database, DJANGO_SETTINGS_MODULE='tests.testproject.settings',
               PYTHONPATH=root)
    command = [sys.executable, '-m', module] if module else [sys.executable, os.path.join(root, 'tests', 'manage.py')]
    result = subprocess.run(command + list(argv), env=env, cwd=root, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    result.output = result.stdout + result.stderr
    return result


MISSING = ("has no table carrot_messagelog, carrot_scheduledtask, carrot_supervisorstatus, carrot_task, "
           "carrot_taskattempt, carrot_worker: run manage.py migrate")


@pytest.mark.timeout(240)
def test_missing_tables_are_an_error_that_says_run_migrate_and_migrate_still_runs(empty_database):
    result = run_project(empty_database, 'check', '--database', 'default')
    assert result.returncode == 1, result.output
    assert f"(carrot.E007) database 'default' {MISSING}" in result.output

    # carrot-supervisor, its --check and manage.py carrot --check: exit 3 (bad configuration), and say why.
    for argv, module in ((['--check'], 'carrot.cli'), ([], 'carrot.cli'), (['carrot', '--check'], None)):
        result = run_project(empty_database, *argv, module=module)
        assert result.returncode == 3, (argv, result.output)
        assert f"carrot.E007: database 'default' {MISSING}" in result.output, (argv, result.output)

    # The check must not stop the command it asks for (migrate runs every check on its database).
    result = run_project(empty_database, 'migrate', '-v', '0')
    assert result.returncode == 0, result.output
    result = run_project(empty_database, 'check', '--database', 'default')
    assert result.returncode == 0, result.output
    result = run_project(empty_database, '--check', '--no-scheduler', module='carrot.cli')
    assert result.returncode == 0 and result.stdout.rstrip().endswith('ok'), result.output


@pytest.mark.timeout(240)
def test_an_unapplied_carrot_migration_is_reported_too(empty_database):
    assert run_project(empty_database, 'migrate', '-v', '0').returncode == 0
    # As after upgrading carrot without migrating: the newest migration is not recorded as applied.
    newest = sorted(name[:-3] for name in os.listdir(os.path.join(os.path.dirname(carrot.__file__), 'migrations'))
                    if name[:4].isdigit() and name.endswith('.py'))[-1]
    forget = ("from django.db.migrations.recorder import MigrationRecorder\n"
              f"MigrationRecorder.Migration.objects.filter(app='carrot', name='{newest}').delete()\n")
    result = run_project(empty_database, 'shell', '-c', forget)
    assert result.returncode == 0, result.output
    result = run_project(empty_database, '--check', module='carrot.cli')
    assert result.returncode == 3, result.output
    assert (f"carrot.E007: database 'default' lacks migration carrot.{newest}: "
            "run manage.py migrate") in result.output
# --- the broker password never shows ------------------------------------------------------------------

SECRET = 's3cr3t'


@pytest.mark.parametrize('raw', [
    {'default_broker': f'amqp://carrot:{SECRET}/x@rabbit:5672/prod'},        # '/' in the password
    {'default_broker': f'amqp://carrot:{SECRET}#x@rabbit:5672/prod'},        # '#'
    {'default_broker': f'amqp://carrot:{SECRET}?x@rabbit:5672/prod'},        # '?'
    {'default_broker': f'amqp://carrot:1234/{SECRET}@rabbit/'},              # would parse as a port + vhost
    {'default_broker': f'amqp://carrot:{SECRET}'},                           # no host at all
    {'default_broker': f'http://carrot:{SECRET}@rabbit/'},                   # wrong scheme
    {'default_broker': f'amqp://carrot:{SECRET}@rabbit:5672/prod?x=1'},      # unsupported query
    {'default_broker': f'amqp://carrot:{SECRET}@rabbit:99999/'},             # port out of range
    {'default_broker': f'amqp://carrot:{SECRET}@rabbit/'.encode()},          # bytes, not str
    {'default_broker': [f'amqp://carrot:{SECRET}@rabbit/', 'amqp://carrot:x@r2/']},  # nodes, other passwords
    {'default_broker': [f'amqp://carrot:{SECRET}@rabbit/', f'amqp://carrot:{SECRET}#x@r2/']},
    {'default_broker': [f'amqp://carrot:{SECRET}@rabbit/', f'amqp://carrot:{SECRET}@rabbit/']},  # a node twice
    {'default_broker': {'hosts': [f'carrot:{SECRET}@rabbit'], 'password': SECRET}},  # a URL where a host belongs
    {'default_broker': {'hosts': f'carrot:{SECRET}@rabbit'}},
    {'default_broker': {'url': [f'amqp://carrot:{SECRET}@rabbit/', 42]}},
    {'default_broker': {'url': f'amqp://carrot:{SECRET}/x@rabbit/'}},
    {'default_broker': {'url': 42, 'password': SECRET}},
    {'default_broker': {'host': 'rabbit', 'password': [SECRET]}},            # password of the wrong type
    {'default_broker': {'host': 'rabbit', 'password': SECRET, 'port': 'x'}},
    {'queues': [f'amqp://carrot:{SECRET}@rabbit/']},                         # a URL where a dict belongs
    {'queues': [{'name': 'q', 'host': f'amqp://carrot:{SECRET}?x@rabbit/'}]},
    {'queues': [{'name': 'q', 'host': {'password': SECRET, 'bogus': 1}}]},
    {f'amqp://carrot:{SECRET}@rabbit/': 1},                                  # as a key
    {'task_modules': {'password': SECRET}},
])
@pytest.mark.django_db  # Django 6 runs database checks (carrot.E007) for tags=['carrot']
def test_the_password_is_masked_in_every_problem(raw):
    config, problems = parse_config(raw)
    text = '\n'.join(str(p) for p in problems)
    assert SECRET not in text
    assert SECRET not in str(config) and SECRET not in repr(config)
    assert problems, 'each of these settings is wrong in some way'
    with override_settings(CARROT=raw):
        with pytest.raises(CarrotConfigException) as caught:
            get_config()
        assert SECRET not in str(caught.value)
        assert SECRET not in ' '.join(e.msg for e in run_checks(tags=['carrot']))


def test_a_special_character_in_the_password_gets_a_hint_to_encode_it():
    text = problems_of({'default_broker': f'amqp://carrot:{SECRET}/x@rabbit/'})[0]
    assert "must be percent-encoded (%2F, %3F, %23, %40), or give the broker as a dict" in text
    assert "'amqp://carrot:***@rabbit/'" in text
    broker = parse_config({'default_broker': f'amqp://carrot:{SECRET}%2Fx@rabbit/'})[0].default_broker
    assert broker.password == f'{SECRET}/x' and SECRET not in str(broker)


def test_an_at_sign_in_the_password_parses_and_is_masked():
    broker = parse_config({'default_broker': f'amqp://carrot:{SECRET}@x@rabbit:5672/prod'})[0].default_broker
    assert (broker.password, broker.host) == (f'{SECRET}@x', 'rabbit')
    assert SECRET not in str(broker) and SECRET not in repr(broker)


def test_virtualhost_with_a_bad_url_does_not_show_the_password():
    with pytest.raises(CarrotConfigException) as caught:
        VirtualHost(url=f'amqp://carrot:{SECRET}#x@rabbit/')
    assert SECRET not in str(caught.value)


def test_error_pages_hide_the_password_of_a_dict_and_with_carrots_filter_of_a_url():
    from django.views.debug import SafeExceptionReporterFilter

    from carrot.debug import SafeExceptionReporterFilter as CarrotFilter
    as_dict = {'default_broker': {'host': 'rabbit', 'username': 'carrot', 'password': SECRET}}
    as_url = {'default_broker': f'amqp://carrot:{SECRET}@rabbit/', 'queues': [
        {'name': 'q', 'host': f'amqp://carrot:{SECRET}/x@rabbit/'}]}
    with override_settings(CARROT=as_dict):
        assert SECRET not in str(SafeExceptionReporterFilter().get_safe_settings()['CARROT'])
    with override_settings(CARROT=as_url):
        assert SECRET in str(SafeExceptionReporterFilter().get_safe_settings()['CARROT'])  # Django alone
        safe = CarrotFilter().get_safe_settings()['CARROT']
        assert SECRET not in str(safe)
        assert safe['default_broker'] == 'amqp://carrot:***@rabbit/'
    as_nodes = {'default_broker': [f'amqp://carrot:{SECRET}@rabbit{n}/' for n in (1, 2, 3)],
                'queues': [{'name': 'q', 'host': {'hosts': ['r1', 'r2'], 'password': SECRET}}]}
    with override_settings(CARROT=as_nodes):  # the nodes of a cluster, in both spellings
        safe = CarrotFilter().get_safe_settings()['CARROT']
        assert SECRET not in str(safe)
        assert safe['default_broker'] == [f'amqp://carrot:***@rabbit{n}/' for n in (1, 2, 3)]
