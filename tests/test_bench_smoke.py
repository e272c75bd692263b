"""scripts/bench runs end to end with tiny numbers (--quick): every row it runs by default is in its JSON
with positive figures, and its virtual host and database are gone afterwards. Speed is never asserted
here: the figures are scripts/bench's to report, on the machine it runs on.

The bench measures on PostgreSQL, which scripts/test starts for every leg (scripts/services --postgres);
this file runs in the SQLite leg, the one that runs every test file, with a database of its own.
"""
import json
import os
import subprocess
import sys
import time

import pytest
from django.conf import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'scripts', 'bench.py')
CONSUMERS = {'consumer default#1', 'consumer default#2'}


def postgres_databases():
    import psycopg
    try:
        with psycopg.connect(host=os.environ.get('PGHOST', '127.0.0.1'), port=os.environ.get('PGPORT', '5432'),
                             user=os.environ.get('PGUSER', 'postgres'), password=os.environ.get('PGPASSWORD') or None,
                             dbname='postgres', connect_timeout=5) as pg:
            return {row[0] for row in pg.execute('SELECT datname FROM pg_database')}
    except psycopg.OperationalError as exc:
        pytest.fail(f'scripts/bench needs PostgreSQL on 127.0.0.1:5432 ({exc}); scripts/test starts it '
                    f'(scripts/services --postgres prints PGUSER/PGPASSWORD)', pytrace=False)


def positive(value):
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_bench_reports_every_default_row(tmp_path):
    vhost, database = f'carrot-bench-smoke-{settings.RUN_ID}', f'carrot_bench_smoke_{settings.RUN_ID}'
    postgres_databases()  # reachable, or a clear failure
    out = tmp_path / 'bench.json'
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the run directory (logs) goes with the test's
    result = subprocess.run([sys.executable, BENCH, '--quick', '--rounds', '2', '--batched-floor', '--json',
                             str(out), '--vhost', vhost, '--database', database], capture_output=True, text=True,
                            timeout=200, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'raw pika drain' in result.stdout and str(out) in result.stdout

    document = json.loads(out.read_text())
    assert document['options']['quick'] is True and positive(document['wall_time_s'])
    assert 0 <= document['steal_share'] <= 1 and 'of the CPU time stolen by the host' in result.stdout
    assert {'cpus', 'postgresql', 'rabbitmq'} <= set(document['machine'])
    rows = document['rows']
    assert set(rows) == {'raw', 'drain', 'failures', 'publish', 'latency', 'respawn', 'memory'}

    raw = rows['raw']
    assert raw['prefetch'] == 8 and raw['consumers'] == 2  # carrot's default prefetch, held to the same
    for key in ('drain_per_s', 'publish_confirmed_per_s', 'latency_p50_ms', 'latency_p99_ms',
                'postgres_commits_per_s'):
        assert positive(raw[key]), key
    # The logged floor: carrot's own backlog, every row claimed and completed by the raw consumers.
    floor = raw['logged_floor']
    assert positive(floor['per_s']) and 'logged floor: raw drain + one statement a task' in result.stdout
    assert floor['statements_a_task'] == 1 and 'at best: the floor, after this start' in result.stdout
    assert {'consumers', 'PostgreSQL', 'RabbitMQ', 'all'} <= set(floor['cpu_us_per_task']), floor
    # --batched-floor: the same backlog claimed a window at a time, every row COMPLETED (else the bench fails).
    batched = raw['logged_floor_batched']
    assert positive(batched['per_s']) and 'logged floor, claims batched: one statement a window' in result.stdout
    assert {'consumers', 'PostgreSQL', 'RabbitMQ', 'all'} <= set(batched['cpu_us_per_task']), batched
    assert 'at best: the batched floor, after this start' in result.stdout
    assert positive(rows['drain']['per_s']) and positive(rows['drain']['from_first_started_per_s'])
    # --rounds 2: the raw drain and the carrot drain sampled twice each, in turn; each figure is the median.
    assert document['options']['rounds'] == 2
    samples = raw['drain_rounds_per_s']
    assert len(samples) == 2 and all(positive(value) for value in samples)
    assert raw['drain_per_s'] == pytest.approx(sum(samples) / 2)  # the median of two
    drains = rows['drain']['rounds']
    assert len(drains) == 2 and all(positive(sample['per_s']) for sample in drains), drains
    assert rows['drain']['per_s'] == pytest.approx(sum(sample['per_s'] for sample in drains) / 2)
    publishes = rows['publish']['single_rounds_per_s']  # each drain's backlog published with publish_message
    assert len(publishes) == 2 and rows['publish']['single_per_s'] == pytest.approx(sum(publishes) / 2)
    assert result.stdout.count('median of 2 rounds: ') == 3 and 'vs raw in each round' in result.stdout
    # Where the drain's CPU went, per task. A quick drain is short and the kernel counts in clock ticks, so
    # a part may read 0; the image imports Django, which always takes some.
    cpu = rows['drain']['cpu_us_per_task']
    assert {'consumers', 'master', 'image', 'housekeeping', 'PostgreSQL', 'RabbitMQ', 'bench', 'other',
            'all'} <= set(cpu), cpu
    assert all(isinstance(us, int) and us >= 0 for us in cpu.values()) and positive(cpu['image']), cpu
    assert f"{cpu['all']:,} in all, so at most" in result.stdout
    failures = rows['failures']
    assert positive(failures['per_s']) if failures['supported'] else failures['note'].startswith('n/a')
    if failures['supported']:
        assert positive(failures['cpu_us_per_task']['all']), failures
    assert positive(rows['publish']['single_per_s'])
    publishing = rows['publish']['single_cpu_us_per_call']  # few calls in 10 ms ticks: a part may read 0
    assert {'publisher', 'PostgreSQL', 'RabbitMQ', 'other', 'all'} <= set(publishing), publishing
    assert all(isinstance(us, int) and us >= 0 for us in publishing.values()), publishing
    assert f"{publishing['all']:,} in all, so at most" in result.stdout or publishing['all'] == 0
    assert rows['publish']['bulk_per_s'] is None or positive(rows['publish']['bulk_per_s'])
    latency = rows['latency']
    assert positive(latency['p50_ms']) and latency['p99_ms'] >= latency['p50_ms']
    assert positive(rows['respawn']['median_ms']) and rows['respawn']['max_ms'] >= rows['respawn']['median_ms']
    for debug in ('debug_off', 'debug_on'):
        memory = rows['memory'][debug]
        for moment in ('idle_uss_mib', 'after_uss_mib'):
            assert {'master'} | CONSUMERS <= set(memory[moment]), (debug, moment, memory[moment])
            assert all(positive(mib) for mib in memory[moment].values()), (debug, moment)

    # Nothing left behind: the virtual host and the database are dropped on the way out.
    vhosts = subprocess.run(['rabbitmqctl', 'list_vhosts', '-q'], capture_output=True, text=True, timeout=60)
    assert vhost not in vhosts.stdout.split()
    assert database not in postgres_databases()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_bench_sets_the_classic_queue_version_it_is_asked_for(tmp_path):
    """--queue-version 2 is a policy on the bench's own virtual host, in force while the rows run (checked
    from inside the run's RabbitMQ, not taken from the bench's word) and said in the report."""
    vhost, database = f'carrot-bench-qv-{settings.RUN_ID}', f'carrot_bench_qv_{settings.RUN_ID}'
    postgres_databases()
    out = tmp_path / 'bench.json'
    env = dict(os.environ, TMPDIR=str(tmp_path))
    bench = subprocess.Popen([sys.executable, BENCH, '--quick', '--only', 'raw', '--queue-version', '2', '--json',
                              str(out), '--vhost', vhost, '--database', database], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        policies = ''
        deadline = time.monotonic() + 60
        while bench.poll() is None and 'queue-version' not in policies and time.monotonic() < deadline:
            policies = subprocess.run(['rabbitmqctl', 'list_policies', '-p', vhost, '-q'], capture_output=True,
                                      text=True, timeout=60).stdout
            time.sleep(0.5)
        output, _ = bench.communicate(timeout=100)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
    assert bench.returncode == 0, output[-3000:]
    assert '"queue-version":2' in policies.replace(' ', ''), policies
    assert 'classic queues version 2 (policy)' in output
    assert json.loads(out.read_text())['options']['queue_version'] == 2


def test_the_million_row_ratio_at_equal_speed_takes_the_consumers_cpu_as_the_clock():
    """Measured minutes apart, two drains of this shared machine differ by more than a table's size makes
    them: the consumers' CPU per task (the same Python, whatever the table holds) says by how much."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('carrot_bench_script', BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    empty = {'per_s': 855, 'cpu_us_per_task': {'consumers': 1086, 'PostgreSQL': 446}}  # a slow minute
    million = {'per_s': 1527, 'cpu_us_per_task': {'consumers': 602, 'PostgreSQL': 270}}  # a fast one
    assert round(bench.ratio_at_equal_speed(million, empty), 2) == 0.99  # 1.79 as measured
    assert bench.ratio_at_equal_speed({'per_s': 900, 'cpu_us_per_task': {'consumers': 500}},
                                      {'per_s': 1000, 'cpu_us_per_task': {'consumers': 500}}) == 0.9
    assert bench.ratio_at_equal_speed({'per_s': 900, 'cpu_us_per_task': None}, empty) is None
    assert bench.ratio_at_equal_speed({'per_s': 900, 'cpu_us_per_task': {'consumers': 0}}, empty) is None
