"""carrot on a RabbitMQ cluster of three nodes of its own (scripts/cluster.py: node names carrot-test-cluster-N,
AMQP ports 5691-5693, data and Erlang cookie under the test's temp dir; the shared broker is not touched),
started once for this module (about 15 s) and stopped at its end, also when a test fails.

- tasks through a quorum queue; failures dead-lettered at least once;
- a nack (a queue full under reject-publish) and a queue without its quorum (no confirm at all) are
  transient: the row waits and the relay sends it once the queue takes messages again; it runs once;
- the process test: three supervisors (two consumers of one quorum queue and a scheduler each), the node
  that leads the queue killed mid-run and brought back: every task COMPLETED once, each supervisor ran
  its share, the schedule ran once per interval, work went on within seconds. The full-size run (3,000
  tasks) is `scripts/chaos -k quorum`.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pika
import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from carrot.amqp.connection import connect
from carrot.amqp.publisher import close_publishers
from carrot.config import get_config
from carrot.models import MessageLog, ScheduledTask
from carrot.publish.relay import Relay
from carrot.utilities import publish_message
from tests.cluster_tally import read_executions, tally
from tests.conftest import run_consumer
from tests.harness import figure, wait_for
from tests.testapp import tasks

ROOT = Path(__file__).resolve().parents[1]
FIRST_PORT = 5691
RECORD = 'tests.testapp.tasks.record_execution'
QUEUES = ('default', 'default.dead')  # parked and retried messages go round the delay levels (classic)

# Once per scripts/test run, in its PostgreSQL pass (which runs beside the longer SQLite pass): the database
# decides nothing here, the three-node cluster is what is under test.
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(os.environ.get('CARROT_TEST_DB', 'sqlite') != 'postgres',
                                 reason='runs once, in the PostgreSQL pass of scripts/test')]


def _cluster_script():
    spec = importlib.util.spec_from_file_location('carrot_cluster_script', ROOT / 'scripts' / 'cluster.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    script = _cluster_script()
    nodes = script.Cluster(tmp_path_factory.mktemp('rabbit'), name='carrot-test-cluster', first_port=FIRST_PORT)
    try:
        started = nodes.start()
        figure('cluster_start_seconds', started)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def on_cluster(cluster):
    """CARROT on the cluster (every node named; 'default' a quorum queue), every node up, no queue of an
    earlier test left."""
    for node in cluster.nodes:
        if node.pid() is None:
            node.launch()
            node.await_startup()
    urls = cluster.urls
    connection = pika.BlockingConnection(pika.URLParameters(urls[0]))
    for name in QUEUES:
        connection.channel().queue_delete(name)
    connection.close()
    carrot = {**settings.CARROT, 'default_broker': urls, 'confirm_timeout': 3,
              'queues': [{'name': 'default', 'queue_type': 'quorum', 'concurrency': 2}]}
    close_publishers()
    with override_settings(CARROT=carrot):
        yield carrot
    close_publishers()


def queue_depth(name) -> int:
    connection = connect(get_config().default_broker)
    try:
        return connection.channel().queue_declare(name, passive=True).method.message_count
    finally:
        connection.close()


def age(log):
    """Old enough for the relay (it leaves a fresh row to the process that wrote it)."""
    MessageLog.objects.filter(pk=log.pk).update(publish_time=timezone.now() - timedelta(minutes=1))


def relay_until_sent(timeout=30):
    relay = Relay()

    def sent():
        for backoff in relay.unavailable.values():
            backoff.retry_at = 0.0
        return relay.relay_waiting() or None
    return wait_for(sent, timeout, 'the relay to send the waiting row', interval=0.5)


def test_tasks_run_through_a_quorum_queue_and_failures_are_dead_lettered(cluster, on_cluster):
    good, bad = publish_message(tasks.add, 2, 3), publish_message(tasks.explode, 'no')
    run_consumer(max_messages=2)  # per-consumer prefetch: global QoS would close the connection
    good.refresh_from_db()
    bad.refresh_from_db()
    assert (good.status, good.output, bad.status) == ('COMPLETED', '5', 'FAILED')
    wait_for(lambda: queue_depth('default.dead') == 1, 10, 'the failed message in default.dead')
    assert {row['name']: row['type'] for row in cluster.quorum_queues()} == dict.fromkeys(QUEUES, 'quorum')
    assert cluster.leader_of('default') in (1, 2, 3)


def test_a_quorum_queue_named_as_classic_is_a_type_error(cluster, on_cluster):
    from carrot.checks import check_carrot_queues
    from carrot.exceptions import QueueTypeMismatch
    publish_message(tasks.add, 1, 1)  # declares the quorum queues
    with override_settings(CARROT={**on_cluster, 'queues': [{'name': 'default', 'queue_type': 'classic'}]}):
        with pytest.raises(QueueTypeMismatch) as caught:
            publish_message(tasks.add, 2, 2)
        assert (caught.value.existing, caught.value.wanted) == ('quorum', 'classic')
        assert 'is a quorum queue, and CARROT declares it as a classic queue' in str(caught.value)
        assert [error.id for error in check_carrot_queues()] == ['carrot.E008']


def test_scripts_cluster_says_which_nodes_run_and_which_leads_each_quorum_queue(cluster, on_cluster):
    publish_message(tasks.add, 1, 1)  # declares the quorum queues
    command = [sys.executable, str(ROOT / 'scripts' / 'cluster.py'), '--dir', str(cluster.base)]
    status = subprocess.run([*command, 'status'], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert sum(1 for line in lines if ' running ' in line) == 3, status.stdout
    leader = cluster.leader_of('default')
    assert f"quorum queue 'default': leader carrot-test-cluster-{leader}@localhost" in status.stdout
    urls = subprocess.run([*command, 'urls'], capture_output=True, text=True, timeout=60).stdout.split()
    assert urls == cluster.urls == [f'amqp://guest:guest@127.0.0.1:{FIRST_PORT + n}/' for n in range(3)]
    cookie = cluster.base / 'home' / '.erlang.cookie'  # its own, readable by its owner only
    assert cookie.stat().st_mode & 0o777 == 0o400


def test_a_nack_from_a_full_queue_leaves_the_row_waiting_and_the_relay_sends_it(cluster, on_cluster, caplog):
    first = publish_message(tasks.add, 1, 1)  # declares the queue
    node = cluster.running_node()
    node.ctl('set_policy', '-p', '/', '--apply-to', 'queues', 'carrot-full', '^default$', '{"max-length": 1}')
    try:
        # The policy reaches the queue a moment later; until then a publish may still go through.
        def nacked():
            log = publish_message(tasks.add, 2, 2)
            return log if log.status == 'WAITING' else None
        waiting = wait_for(nacked, 20, 'a publish nacked by the full queue', interval=0.5)
    finally:
        node.ctl('clear_policy', '-p', '/', 'carrot-full')
    assert first.status == 'PUBLISHED'
    assert f'({waiting.uuid}) waits for the broker and will be relayed: RabbitMQ did not take (nacked)' in caplog.text
    run_consumer(idle_timeout=2)  # empties the queue
    age(waiting)
    relay_until_sent()
    run_consumer(max_messages=1)
    waiting.refresh_from_db()
    assert waiting.status == 'COMPLETED'


def test_a_queue_without_its_quorum_keeps_the_row_waiting_until_it_is_back_and_runs_it_once(
        cluster, on_cluster, tmp_path):
    record = tmp_path / 'executions.txt'
    publish_message(tasks.record_execution, str(record), 'before')  # declares the queue on all three nodes
    survivor = cluster.running_node().number
    killed = [node.number for node in cluster.nodes if node.number != survivor]
    for number in killed:
        cluster.kill_node(number)
    started = time.monotonic()
    log = publish_message(tasks.record_execution, str(record), 'during')
    took = time.monotonic() - started
    figure('publish_without_quorum_seconds', took)
    assert log.status == 'WAITING', 'a queue without its quorum confirms nothing: the row waits'
    assert took < 3 + 4, took  # the confirm deadline (3 s), not for ever
    for number in killed:
        cluster.start_node(number)
    age(log)
    relay_until_sent()
    run_consumer(idle_timeout=3)  # the first copy may have landed too: acked as a duplicate, not run again
    log.refresh_from_db()
    assert log.status == 'COMPLETED'
    assert {token: len(pids) for token, pids in read_executions(record).items()} == {'before': 1, 'during': 1}


# -- the process test -------------------------------------------------------------------------------

TASKS = 300
TASK_SECONDS = 0.02
SUPERVISOR_SLOTS = ['consumer default#1', 'consumer default#2', 'scheduler']


def test_three_supervisors_lose_nothing_when_the_node_leading_the_queue_dies(
        cluster, on_cluster, start_supervisor, tmp_path):
    record = tmp_path / 'executions.txt'
    schedule = ScheduledTask.objects.create(
        task=RECORD, task_name='every second', queue='default', interval_type='seconds', interval_count=1,
        task_args=json.dumps([str(record), 'schedule']))
    started = time.monotonic()
    tokens = {}
    for _ in range(TASKS):  # before the supervisors start: the kill comes a third of the way through
        token = uuid.uuid4().hex
        tokens[token] = publish_message(tasks.record_execution, str(record), token, TASK_SECONDS).uuid
    extra = f'CARROT = {on_cluster!r}\n'
    supervisors = [start_supervisor('--queues', 'default', scheduler=True, extra=extra, name=f'host{n}')
                   for n in (1, 2, 3)]
    for supervisor in supervisors:
        supervisor.wait_ready(SUPERVISOR_SLOTS, timeout=90)

    def completed():
        for supervisor in supervisors:
            supervisor.children()  # remember every consumer pid: the rows name the worker by pid
        return MessageLog.objects.filter(uuid__in=tokens.values(), status='COMPLETED').count()

    wait_for(lambda: completed() >= TASKS // 3, 120, 'a third of the tasks to complete', interval=0.2)
    leader = cluster.leader_of('default')
    assert leader is not None
    killed_at = timezone.now()
    cluster.kill_node(leader)
    time.sleep(5)
    cluster.start_node(leader)
    wait_for(lambda: completed() == TASKS, 240, f'{TASKS} tasks to complete',
             tail=lambda: ''.join(s.tail(20) for s in supervisors), interval=0.5)
    ScheduledTask.objects.filter(pk=schedule.pk).update(active=False)
    time.sleep(1.5)  # a run published just before may still be running
    for supervisor in supervisors:
        supervisor.children()
        supervisor.stop()

    rows = {row['uuid']: {'status': row['status'], 'worker': row['worker'], 'started': row['started_time'],
                          'completed': row['completion_time']}
            for row in MessageLog.objects.values('uuid', 'status', 'worker', 'started_time', 'completion_time')}
    schedule_times = list(MessageLog.objects.filter(task=RECORD, task_args__contains='"schedule"',
                                                    status='COMPLETED').values_list('publish_time', flat=True))
    result = tally(tokens, rows, read_executions(record),
                   {s.name: set(s.seen) - {s.pid} for s in supervisors}, schedule_token='schedule',
                   schedule_times=schedule_times, killed_at=killed_at, killed_node=leader)
    result.wall = time.monotonic() - started
    print(f'FIGURE quorum_leader_killed: {result.figures()} in {result.wall:.0f}s')
    # The consumers that were on the killed node went on on another one.
    port = FIRST_PORT + leader - 1
    moved = stayed = 0
    for supervisor in supervisors:
        nodes_by_pid = {}
        for pid, node in re.findall(r'\[(\d+)\] INFO carrot\.consumer: consumer default#\d: consuming default on '
                                    r'node 127\.0\.0\.1:(\d+)', supervisor.log()):
            nodes_by_pid.setdefault(pid, []).append(int(node))
        for nodes in nodes_by_pid.values():
            if nodes[0] == port:
                moved += len(nodes) > 1 and nodes[1] != port
            else:
                stayed += 1
    figure('consumers_moved_off_the_killed_node', moved)
    assert moved + stayed == 6, (moved, stayed)
    runs = sorted(schedule_times)
    assert not result.problems(), (f'{result.problems()}\n{result.figures()}\nschedule runs at '
                                   f'{[t.strftime("%S.%f")[:6] for t in runs]}')
