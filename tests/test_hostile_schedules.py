"""Hostile ScheduledTask rows against a running scheduler child (issue 6 §7, §9).

Rows are written straight to the table (as a bad admin edit, a data migration or a hand-written SQL
UPDATE would, bypassing any form validation): arguments that do not parse or nest absurdly, intervals so
large the date overflows, units that do not exist, tasks that are not registered (os.system), queues that
are not configured, last run times at the ends of the calendar. A good schedule appends a line to a file
every second. Checks: the scheduler child stays the same process, the master runs, the good schedule
keeps running, nothing that is not a task ran, and a bad row is marked (its `problem` says why).
"""
from __future__ import annotations

import datetime
import json
import os
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from tests.harness import assertion_failure, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

POSTGRES = os.environ.get('CARROT_TEST_DB', 'sqlite') == 'postgres'
HYPOTHESIS = dict(deadline=None, database=None, max_examples=int(os.environ.get('CARROT_HOSTILE_SCHEDULES', 8)),
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def storable(text):
    """PostgreSQL cannot store NUL in text: a row with one cannot exist there, so none is generated."""
    if text is None or not POSTGRES:
        return text
    return text.replace('\x00', '')


def lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@pytest.fixture
def scheduled(start_supervisor, tmp_path):
    """A supervisor with its scheduler and a good schedule ticking every second into a file."""
    from carrot.models import ScheduledTask
    ticks = tmp_path / 'ticks.txt'
    good = ScheduledTask.objects.create(task_name='good heartbeat', task='tests.testapp.tasks.append_line',
                                        task_args=json.dumps([str(ticks), 'tick']), interval_type='seconds',
                                        interval_count=1, queue='default')
    sup = start_supervisor('--queues', 'default', scheduler=True)
    sup.wait_ready(['consumer default#1', 'scheduler', 'housekeeping'], timeout=60)
    wait_for(lambda: lines(ticks) >= 1, 30, 'the good schedule to run once')
    return sup, good, ticks


def scheduler_pid(sup):
    kid = sup.by_slot().get('scheduler')
    return kid.pid if kid else None


def still_ticking(sup, ticks, pid, runs=2, timeout=20):
    """The good schedule runs `runs` more times, and the scheduler child is still `pid`."""
    start = lines(ticks)

    def ticked():
        if not sup.running():
            raise AssertionError(f'the master exited ({sup.proc.returncode}){sup.tail()}')
        now = scheduler_pid(sup)
        if now is not None and now != pid:
            raise AssertionError(f'the scheduler child was replaced ({pid} -> {now}){sup.tail(40)}')
        return lines(ticks) >= start + runs

    wait_for(ticked, timeout, lambda: f'the good schedule to keep running (ran {lines(ticks) - start} time(s) '
                                      f'in {timeout}s){sup.tail(40)}', fail=assertion_failure)


hostile_text = st.lists(st.one_of(st.sampled_from(['\x00', '\n', '\x1b[31m', '"', '[', ']', '{', '}', ',',
                                                   '\\', '\ud7ff']), st.text(max_size=6)), max_size=10) \
    .map(''.join)
arguments = st.one_of(
    st.none(), st.just(''), hostile_text,
    st.integers(100, 20000).map(lambda d: '[' * d + ']' * d),
    st.integers(100, 20000).map(lambda d: '[' + '{"a":' * d + '1' + '}' * d + ']'),
    st.just('"a string"'), st.just('{"a": 1}'), st.just('[1, 2'), st.just('1, 2, 3'), st.just('null'),
    st.just('[NaN, Infinity]'), st.just('[' + '1,' * 100000 + '1]'),
)
keywords = st.one_of(st.none(), st.just(''), hostile_text, st.just('[1, 2]'), st.just('"x"'),
                     st.integers(100, 20000).map(lambda d: '{"a":' * d + '1' + '}' * d),
                     st.just('{"": 1, "\\u0000": 2}'), st.just('{"priority": "high", "queue": 7}'))
task = st.one_of(st.sampled_from(['os.system', 'subprocess.call', 'tests.testapp.tasks.NotATask',
                                  'tests.testapp.tasks._private_touch', 'tests.testapp.tasks.no_such_task',
                                  'no_such_module.run', 'tests.testapp.tasks.explode', 'tests.testapp.tasks.add',
                                  '', '.', 'tests.testapp.tasks.']), hostile_text.map(lambda t: t[:200]))
schedule = st.fixed_dictionaries({
    'task': task,
    'task_args': arguments,
    'content': keywords,
    'interval_type': st.one_of(st.sampled_from(['seconds', 'minutes', 'hours', 'days']),
                               st.sampled_from(['fortnights', '', 'SECONDS']), hostile_text.map(lambda t: t[:200])),
    'interval_count': st.one_of(st.integers(0, 3), st.integers(0, 2 ** 31 - 1),
                                st.sampled_from([2 ** 31 - 1, 10 ** 9, 86400 * 365 * 10 ** 4])),
    'queue': st.one_of(st.none(), st.just(''), st.just('default'), st.just('no-such-queue'),
                       hostile_text.map(lambda t: t[:200])),
    'routing_key': st.one_of(st.none(), hostile_text.map(lambda t: t[:200])),
    'exchange': st.one_of(st.none(), st.just(''), st.just('no-such-exchange'), st.just('amq.topic')),
    'last_run_time': st.one_of(st.none(), st.datetimes(min_value=datetime.datetime(1, 1, 2),
                                                       max_value=datetime.datetime(9999, 12, 30),
                                                       timezones=st.just(datetime.timezone.utc))),
    'active': st.just(True),
})


def insert(rows: list[dict]):
    from carrot.models import ScheduledTask
    made = []
    for row in rows:
        row = {k: storable(v) if isinstance(v, str) else v for k, v in row.items()}
        if POSTGRES:
            row['interval_count'] = min(row['interval_count'], 2 ** 31 - 1)
        made.append(ScheduledTask.objects.create(task_name=f'hostile {uuid.uuid4()}', **row))
    return made


def test_generated_hostile_schedules_never_stop_the_scheduler(scheduled, tmp_path):
    sup, good, ticks = scheduled

    @settings(**HYPOTHESIS)
    @given(rows=st.lists(schedule, min_size=1, max_size=6))
    def check(rows):
        from carrot.models import ScheduledTask
        pid = scheduler_pid(sup)
        assert pid, f'no scheduler child{sup.tail()}'
        made = insert(rows)
        try:
            still_ticking(sup, ticks, pid)
        finally:
            ScheduledTask.objects.filter(pk__in=[m.pk for m in made]).delete()

    check()


def test_pinned_hostile_schedules_are_skipped_marked_and_never_run(scheduled, tmp_path):
    from carrot.models import ScheduledTask
    sup, good, ticks = scheduled
    marker = tmp_path / 'ran'
    pid = scheduler_pid(sup)
    bad = insert([
        dict(task='os.system', task_args=json.dumps([f'touch {marker}']), interval_type='seconds',
             interval_count=1, queue='default'),
        dict(task='tests.testapp.tasks.NotATask', task_args=json.dumps([str(marker)]), interval_type='seconds',
             interval_count=1, queue='default'),
        dict(task='tests.testapp.tasks._private_touch', task_args=json.dumps([str(marker)]),
             interval_type='seconds', interval_count=1, queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[' * 50000 + ']' * 50000, interval_type='seconds',
             interval_count=1, queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2', interval_type='seconds', interval_count=1,
             queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', content='[1, 2]', interval_type='seconds',
             interval_count=1, queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', interval_type='days',
             interval_count=2 ** 31 - 1, queue='default',
             last_run_time=datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', interval_type='seconds', interval_count=1,
             queue='default', last_run_time=datetime.datetime(9999, 12, 31, 23, 59, tzinfo=datetime.timezone.utc)),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', interval_type='fortnights', interval_count=1,
             queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', interval_type='seconds', interval_count=0,
             queue='default'),
        dict(task='tests.testapp.tasks.add', task_args='[1, 2]', interval_type='seconds', interval_count=1,
             queue='no-such-queue'),
        dict(task='tests.testapp.tasks.add\x1b[2J\nFAKE LOG LINE', task_args='[1, 2]', interval_type='seconds',
             interval_count=1, queue='default'),
    ])
    still_ticking(sup, ticks, pid, runs=4, timeout=30)
    assert not marker.exists(), 'a schedule naming something that is not a task ran it'
    unmarked = [(row.task[:60], row.task_args[:30], row.content, row.interval_type, row.interval_count, row.queue,
                 str(row.last_run_time))
                for row in ScheduledTask.objects.filter(pk__in=[b.pk for b in bad]) if not row.problem]
    assert not unmarked, f'bad schedules not marked with a problem (the admin would not show them): {unmarked}'
    good.refresh_from_db()
    assert good.problem == '', f'the good schedule is marked: {good.problem!r}'
    assert '\x1b' not in sup.log(), 'a raw escape sequence from a schedule reached the log file'
