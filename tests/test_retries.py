"""Retries with backoff (carrot.consume.retry): the policy, per task and from CARROT; a task that fails
twice then succeeds; the final failure FAILED and dead-lettered; carrot.Retry; every attempt kept and
shown; requeue starts a fresh count; lost workers counted apart."""
import json
import random

import pytest
from django.conf import settings
from django.test import override_settings

import carrot
from carrot.config import get_config, parse_config
from carrot.consume import retry
from carrot.exceptions import Retry
from carrot.models import MessageLog, TaskAttempt
from carrot.registry import retry_options
from carrot.utilities import publish_message
from tests.conftest import dead_letters, delay_depth, queue_depth, run_consumer
from tests.testapp import tasks


def policy(**options):
    defaults = dict(max_retries=3, backoff=2.0, backoff_max=60.0)
    defaults.update(options)
    return retry.RetryPolicy(**defaults)


# -- the policy (no broker) ---------------------------------------------------------------------------------------

@pytest.mark.no_broker
def test_the_nth_retry_waits_backoff_times_two_to_the_n_minus_one_plus_up_to_a_fifth():
    rng = random.Random(1)
    for retries, base in ((0, 2.0), (1, 4.0), (2, 8.0)):
        waits = [retry.next_delay(policy(), OSError(), retries, rng) for _ in range(200)]
        assert base <= min(waits) and max(waits) <= base * 1.2
        assert max(waits) - min(waits) > base * 0.1  # jittered, not all alike
    assert retry.next_delay(policy(max_retries=50, backoff_max=60.0), OSError(), 40, rng) == 60.0
    assert retry.next_delay(policy(max_retries=5000, backoff_max=60.0), OSError(), 4000, rng) == 60.0


@pytest.mark.no_broker
def test_no_retry_past_max_retries_for_other_exceptions_or_for_carrots_own_refusals():
    assert retry.next_delay(policy(), OSError(), 3) is None
    assert retry.next_delay(policy(max_retries=0), OSError(), 0) is None  # CARROT's default: as 1.x
    assert retry.next_delay(policy(retry_on=(OSError,)), KeyError(), 0) is None
    assert retry.next_delay(policy(), SystemExit(), 0) is None  # not an Exception
    assert retry.next_delay(policy(), None, 0) is None  # arguments that do not fit, a time limit ...


@pytest.mark.no_broker
def test_a_task_may_ask_for_a_retry_with_a_delay_of_its_own():
    assert retry.next_delay(policy(), Retry(delay=30), 0) == 30.0
    assert 2.0 <= retry.next_delay(policy(), Retry(), 0) <= 2.4
    assert retry.next_delay(policy(max_retries=0, explicit_max=3), Retry(delay=1), 2) == 1.0
    assert retry.next_delay(policy(max_retries=0, explicit_max=3), Retry(delay=1), 3) is None
    with pytest.raises(TypeError):
        Retry(delay=-1)
    with pytest.raises(TypeError):
        Retry(delay=float('inf'))
    assert retry.next_delay(policy(), Retry(delay=1e300), 0) == retry.LONGEST  # a datetime can hold it


@pytest.mark.no_broker
def test_a_backoff_callable_decides_and_none_stops():
    seen = []

    def backoff(exception, n):
        seen.append((type(exception), n))
        return None if n > 2 else 7 * n

    assert retry.next_delay(policy(backoff=backoff), OSError(), 1) == 14.0
    assert retry.next_delay(policy(backoff=backoff), OSError(), 2) is None
    assert retry.next_delay(policy(backoff=lambda e, n: 'soon'), OSError(), 0) is None  # not seconds
    assert retry.next_delay(policy(backoff=lambda e, n: 1 / 0), OSError(), 0) is None
    assert seen == [(OSError, 2), (OSError, 3)]


@pytest.mark.no_broker
def test_a_tasks_own_options_win_over_carrots_defaults():
    config, problems = parse_config({'max_retries': 4, 'retry_backoff': 10, 'retry_backoff_max': 100})
    assert not problems
    plain = retry.policy_for('tests.testapp.tasks.add', tasks.add, config)
    assert (plain.max_retries, plain.backoff, plain.backoff_max, plain.retry_on) == (4, 10, 100, (Exception,))
    own = retry.policy_for('tests.testapp.tasks.flaky', tasks.flaky, config)
    assert (own.max_retries, own.backoff, own.backoff_max, own.retry_on) == (3, 1, 30, (OSError,))
    default = retry.policy_for('tests.testapp.tasks.add', tasks.add, parse_config({})[0])
    assert (default.max_retries, default.explicit_max) == (0, retry.EXPLICIT_RETRIES)


@pytest.mark.no_broker
@pytest.mark.parametrize('options, word', [
    ({'max_retries': -1}, 'max_retries'), ({'max_retries': True}, 'max_retries'),
    ({'retry_backoff': 'fast'}, 'retry_backoff'), ({'retry_backoff_max': 0}, 'retry_backoff_max'),
    ({'retry_on': 'OSError'}, 'retry_on'), ({'retry_on': (OSError, int)}, 'retry_on'), ({'retry_on': ()}, 'retry_on'),
])
def test_bad_retry_options_are_refused_where_the_task_is_decorated(options, word):
    with pytest.raises(TypeError, match=word):
        retry_options(**options)
    with pytest.raises(TypeError, match=word):
        carrot.task(**options)


@pytest.mark.no_broker
@pytest.mark.parametrize('raw, key', [({'max_retries': -1}, 'max_retries'), ({'retry_backoff': 0}, 'retry_backoff'),
                                      ({'retry_backoff_max': 'x'}, 'retry_backoff_max')])
def test_bad_retry_defaults_are_config_errors(raw, key):
    _, problems = parse_config(raw)
    assert [p.id for p in problems] == ['carrot.E003'] and key in problems[0].message


# -- end to end --------------------------------------------------------------------------------------------------

def run_times(path):
    return [float(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_a_task_that_fails_twice_then_succeeds_is_retried_with_backoff(tmp_path, admin_client):
    marker = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(marker), 2)
    run_consumer(idle_timeout=0.5)  # the first run fails: retry 1 scheduled (a retry settles nothing yet)
    log.refresh_from_db()
    assert (log.status, log.retries, log.attempts) == ('SCHEDULED', 1, 1)
    assert log.exception == 'OSError: flaky run 1'
    detail = admin_client.get(f'/carrot/api/messages/{log.uuid}/').json()
    assert detail['next_retry'] == log.run_after.isoformat()
    assert [a['outcome'] for a in detail['attempt_history']] == ['RETRIED']
    assert 'Next retry' in admin_client.get(f'/carrot/task/{log.uuid}/').content.decode()
    run_consumer(max_messages=1, idle_timeout=6)
    log.refresh_from_db()
    assert (log.status, log.retries, log.attempts, log.output) == ('COMPLETED', 2, 3, '3')
    first, second, third = run_times(marker)
    assert 1.0 <= second - first <= 1.2 + 1.5 and 2.0 <= third - second <= 2.4 + 1.5
    history = log.attempt_history()
    assert [(a.number, a.outcome) for a in history] == [(1, 'RETRIED'), (2, 'RETRIED'), (3, 'COMPLETED')]
    assert history[0].exception_class == 'builtins.OSError' and 'flaky run 1' in history[0].exception
    assert 'Traceback' in history[1].traceback and history[1].worker and history[1].finished
    page = admin_client.get(f'/carrot/task/{log.uuid}/').content.decode()
    assert 'builtins.OSError' in page and 'flaky run 2' in page
    assert (queue_depth('default'), delay_depth(), queue_depth('default.dead')) == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_the_final_failure_is_failed_and_dead_lettered_and_requeue_starts_afresh(tmp_path, raw_channel):
    marker = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(marker), 10)
    run_consumer(max_messages=1, idle_timeout=12)
    log.refresh_from_db()
    assert (log.status, log.retries, log.attempts) == ('FAILED', 3, 4)
    assert [a.outcome for a in log.past_attempts.all()] == ['RETRIED', 'RETRIED', 'RETRIED', 'FAILED']
    (_, body), = dead_letters(raw_channel)
    assert json.loads(body)['args'] == [str(marker), 10]
    copy = log.requeue()
    assert (copy.retries, copy.attempts, copy.past_attempts.count()) == (0, 0, 0)
    assert not TaskAttempt.objects.filter(message_log_id=log.pk).exists()  # gone with the failed row


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_an_exception_outside_retry_on_fails_at_once(tmp_path):
    log = publish_message(tasks.wrong_kind, str(tmp_path / 'runs'))
    run_consumer(max_messages=1)
    log.refresh_from_db()
    assert (log.status, log.retries, log.exception) == ('FAILED', 0, "KeyError: 'not retried'")
    assert [(a.outcome, a.exception_class) for a in log.past_attempts.all()] == [('FAILED', 'builtins.KeyError')]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_a_plain_task_that_raises_retry_runs_again_up_to_three_times(tmp_path):
    marker = tmp_path / 'runs'
    log = publish_message(tasks.asks_again, str(marker), 5)
    run_consumer(max_messages=1, idle_timeout=6)
    log.refresh_from_db()
    assert (log.status, log.retries, len(run_times(marker))) == ('FAILED', 3, 4)
    assert log.past_attempts.first().exception_class == 'carrot.exceptions.Retry'
    done = publish_message(tasks.asks_again, str(tmp_path / 'other'), 1)
    run_consumer(max_messages=1, idle_timeout=5)
    done.refresh_from_db()
    assert (done.status, done.retries, done.output) == ('COMPLETED', 1, '2')


@pytest.mark.django_db(transaction=True)
def test_the_defaults_come_from_carrot(tmp_path):
    with override_settings(CARROT={**settings.CARROT, 'max_retries': 1, 'retry_backoff': 1}):
        log = publish_message(tasks.explode)
        run_consumer(idle_timeout=0.5)
        log.refresh_from_db()
        assert (log.status, log.retries) == ('SCHEDULED', 1)
        assert get_config().max_retries == 1


@pytest.mark.django_db(transaction=True)
def test_retries_are_not_counted_as_lost_workers(subprocess_env):
    """max_attempts counts the runs whose worker was lost, not the retries before them."""
    from tests.test_consumer import consume_in_subprocess
    log = publish_message(tasks.die)
    MessageLog.objects.filter(pk=log.pk).update(retries=5, attempts=5)  # five runs failed and were retried
    result = consume_in_subprocess(subprocess_env)
    assert result.returncode == 17, result.stderr
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('IN_PROGRESS', 6)
    result = consume_in_subprocess(subprocess_env)  # the worker of attempt 6 is dead: attempt 7 dies too
    assert result.returncode == 17, result.stderr
    log.refresh_from_db()
    assert (log.status, log.attempts) == ('IN_PROGRESS', 7)
    assert [(a.number, a.outcome) for a in log.past_attempts.all()] == [(6, 'LOST')]
    assert log.past_attempts.get().exception_class == 'carrot.exceptions.WorkerLost'


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_a_worker_killed_between_scheduling_a_retry_and_parking_it_runs_the_retry_once(start_supervisor,
                                                                                      subprocess_env, tmp_path):
    marker, died = tmp_path / 'runs', tmp_path / 'died'
    supervisor = start_supervisor(
        extra="CARROT['queues'][0]['consumer_class'] = 'tests.testapp.consumers.DiesBeforeParking'\n",
        env=dict(subprocess_env, CARROT_TEST_DIE_MARKER=str(died)))
    supervisor.wait_ready(['consumer default#1', 'consumer other#1'], timeout=60)
    log = publish_message(tasks.flaky, str(marker), 1)
    supervisor.wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', 60, 'the retry to run')
    assert died.exists()  # the first worker did die in between
    log.refresh_from_db()
    assert (log.retries, log.attempts, log.output) == (1, 2, '2')
    first, second = run_times(marker)
    assert second >= log.past_attempts.get().finished_time.timestamp() + 1.0  # the retry waited its backoff
    assert (queue_depth('default'), queue_depth('default.dead')) == (0, 0)
