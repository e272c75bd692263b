"""The database under maintenance (issue 14): a lock on carrot's log table held longer than the
supervisor's heartbeat timeout -- what a plain CREATE INDEX, many migrations and VACUUM FULL take -- must
not make the master kill its children as hung. The consumer's lease renewal, the scheduler's queries and
housekeeping's run on threads of their own; the loop that heartbeats never waits on the database.

The lock is held for LOCK_SECONDS (CARROT_LOCK_SECONDS; 12 s here, against a 3 s heartbeat timeout:
the same proof as a 2-minute lock against the default 60 s, in a CI-sized time). On PostgreSQL it is
``LOCK TABLE carrot_messagelog IN ACCESS EXCLUSIVE MODE`` from another session, which blocks even reads;
on SQLite, ``BEGIN EXCLUSIVE`` on the database file: readers in WAL mode go on, writers wait (up to the
connection's timeout, 30 s in the test settings, then "database is locked", which carrot waits out).
"""
import json
import os
import sqlite3
import threading
import time

import pytest

from tests.harness import publish_raw, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LOCK_SECONDS = float(os.environ.get('CARROT_LOCK_SECONDS', '12'))
HEARTBEAT_TIMEOUT = float(os.environ.get('CARROT_LOCK_HEARTBEAT_TIMEOUT', '3'))


def lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


class TableLock(threading.Thread):
    """Holds the strongest lock the database has on the log table for `seconds`, from a session of its
    own; `taken` is set once it is held."""

    def __init__(self, seconds):
        super().__init__(daemon=True)
        from django.db import connection
        self.settings = dict(connection.settings_dict)
        self.vendor = connection.vendor
        self.seconds = seconds
        self.taken = threading.Event()
        self.released_at = None
        self.error = None

    def run(self):
        try:
            if self.vendor == 'postgresql':
                import psycopg
                s = self.settings
                with psycopg.connect(host=s['HOST'], port=s['PORT'], user=s['USER'], password=s['PASSWORD'] or None,
                                     dbname=s['NAME']) as pg:
                    pg.execute('LOCK TABLE carrot_messagelog IN ACCESS EXCLUSIVE MODE')
                    self.hold()
                    pg.rollback()
            else:
                db = sqlite3.connect(self.settings['NAME'], isolation_level=None, timeout=30)
                db.execute('BEGIN EXCLUSIVE')
                self.hold()
                db.execute('ROLLBACK')
                db.close()
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.released_at = time.monotonic()

    def hold(self):
        self.taken.set()
        time.sleep(self.seconds)


def test_a_long_lock_on_the_log_table_kills_no_child_and_runs_each_task_once(start_supervisor, tmp_path):
    from carrot.models import MessageLog, ScheduledTask
    ticks = tmp_path / 'ticks.txt'
    ScheduledTask.objects.create(task_name='every second', task='tests.testapp.tasks.append_line',
                                 task_args=json.dumps([str(ticks), 'tick']), interval_type='seconds',
                                 interval_count=1, queue='other')
    # Renewals every second (a third of the lease): several fall inside the lock.
    sup = start_supervisor('--queues', 'default', '--heartbeat-timeout', str(HEARTBEAT_TIMEOUT), scheduler=True,
                           extra="CARROT['claim_lease'] = 3\n")
    kids = sup.wait_ready(['consumer default#1', 'scheduler', 'housekeeping'], timeout=60)
    pids = {slot: kid.pid for slot, kid in kids.items()}
    wait_for(lambda: ScheduledTask.objects.filter(last_run_time__isnull=False).exists(), 30,
             'the schedule to run once', sup.tail)
    record = tmp_path / 'executions.txt'
    running = publish_raw('default', 'tests.testapp.tasks.record_execution', str(record), 'long',
                          LOCK_SECONDS / 2)
    wait_for(lambda: MessageLog.objects.filter(uuid=running, status='IN_PROGRESS').exists(), 30,
             'the task to start', sup.tail)
    lock = TableLock(LOCK_SECONDS)
    lock.start()
    assert lock.taken.wait(30), 'the lock could not be taken'
    started = time.monotonic()
    # Published during the lock: its claim waits, then it runs.
    queued = publish_raw('default', 'tests.testapp.tasks.record_execution', str(record), 'queued')
    lock.join(LOCK_SECONDS + 60)
    assert lock.error is None, lock.error
    held = lock.released_at - started
    for uuid in (running, queued):
        wait_for(lambda: MessageLog.objects.filter(uuid=uuid, status='COMPLETED').exists(), 60,
                 f'{uuid} to complete after the lock', sup.tail)
    log = sup.log()
    assert 'missed heartbeats' not in log, sup.tail()
    assert 'killing' not in log, sup.tail()
    assert {slot: kid.pid for slot, kid in sup.by_slot(housekeeping=True).items() if slot in pids} == pids, \
        sup.tail()
    assert sorted(line.split()[0] for line in lines(record)) == ['long', 'queued'], lines(record)
    assert MessageLog.objects.get(uuid=running).attempts == 1
    print(f'FIGURE lock_held={held:.1f}s heartbeat_timeout={HEARTBEAT_TIMEOUT}s')


@pytest.mark.no_broker
def test_a_task_that_sets_the_shared_session_read_only_does_not_poison_its_worker(caplog):
    """A task may SET default_transaction_read_only on the connection it shares with carrot: the result's
    write, and the next message's claim, are then refused for the session's sake. A fresh session has none
    of what the task set: its own result is recorded and the next tasks run, not dead-lettered one by one."""
    from django.db import connection
    if connection.vendor != 'postgresql':
        pytest.skip('a session setting of PostgreSQL (CARROT_TEST_DB=postgres)')
    from carrot.amqp.disposition import Action
    from tests.test_hostile_tasks import _committed_elsewhere, _incoming, _processor
    processor = _processor()
    poison = _incoming('tests.testapp.tasks.sets_session_read_only')
    try:
        assert processor.process(poison).action is Action.ACK
        assert _committed_elsewhere(poison.message_id)['status'] == 'COMPLETED'
        for n in range(3):
            following = _incoming('tests.testapp.tasks.add', n, 1)
            assert processor.process(following).action is Action.ACK
            assert _committed_elsewhere(following.message_id)['status'] == 'COMPLETED'
    finally:
        connection.close()  # whatever happened, the test database is flushed on a session of its own
    # Replaced once the task is done (PostgreSQL 14+ reports the setting: carrot.consume.dbretry.left_read_only),
    # or once carrot's next write is refused for the session's sake.
    assert 'trying again on a fresh database session' in caplog.text or \
        ('left the database connection' in caplog.text and 'read-only' in caplog.text)
