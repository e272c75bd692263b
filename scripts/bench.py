"""carrot's speed and memory beside a raw pika ceiling, all from one run on this machine: run scripts/bench.

The database is PostgreSQL (a database of the bench's own, created and dropped here), the broker a
private RabbitMQ virtual host; the project is scripts/demo_project, its settings switched by the
CARROT_DEMO_* variables. The rows (names for --only):

  raw       the ceiling: 2 processes consuming a plain durable queue (no priority, no dead-lettering),
            carrot's prefetch, ack each, drain a backlog published beforehand; confirmed publishes from one
            process; and, for context, one-row PostgreSQL commits from one process (what each log
            write waits for on this disk); the floor under a logged drain (logged_floor: carrot's
            backlog drained by raw processes doing carrot's log writes per task and the ack as carrot's
            worker does them, no more) and the floor under publish_message (raw_publish_then_commit);
            with --batched-floor also that drain with every delivery in hand claimed in one statement
            (batched_logged_floor: what claiming ahead would reach, for the design of the next step)
  drain     track='all': a backlog of no-op tasks published with publish_message, then carrot-supervisor
            with 2 consumer children, timed from its start to the last row COMPLETED; and the CPU time
            per task each part of the machine spent meanwhile (CpuSpent)
  failures  the same with the queue's track='failures' (successful tasks write no row): timed by the
            broker's queue count instead; its CPU per task too
  publish   publish_message (the drain row's backlog: the same calls, timed; and the CPU per call of the
            publisher, PostgreSQL and RabbitMQ) and publish_messages (bulk)
  latency   an idle supervisor: publish_message to the task body's first line, against raw pika's
            publish to the consumer's receipt
  respawn   SIGKILL a consumer child: until its slot holds a new child that consumes
  memory    USS of every process, idle after start and after draining 6,000 tasks; DEBUG off and on
  scaling   (--scaling) the drain with 1, 2 and 4 consumer children
  million   (--million) 1,000,000 old COMPLETED rows in the log table: the drain again (its rate against
            the empty table's as measured, and at equal machine speed), and the monitor's list pages and API

The raw drain and the track='all' drain are each sampled --rounds times (3 by default), in turn, and
reported as the median of their samples, each sample kept in the JSON: one sample of either moves by a
sixth from run to run on a shared machine. publish_message too, as it publishes each drain's backlog.
carrot's modules are run from bytecode, as an installed carrot is (compile_bytecode).

Every figure comes from this machine and this run: compare the ratios to the ceiling across machines,
not the absolute numbers. Every wait is bounded; every process started here is stopped, and the virtual
host and the database are dropped, on the way out.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, 'scripts', 'demo_project')
NOOP = 'shop.tasks.noop'
NOTE_START = 'shop.tasks.note_start'
PREFETCH = 8  # what a carrot consumer child holds at a time (--prefetch): the ceiling is held to the same
CHILDREN = 2
EXIT_CONFIG = 3  # carrot-supervisor's "the settings are broken" (supervisor/exitcodes.py)
NOT_SUPPORTED = 'n/a (not supported by this carrot)'

# CpuSpent's parts, in the order printed: a drain's, and publish_single_and_cpu's.
CPU_PARTS = ('consumers', 'master', 'image', 'housekeeping', 'PostgreSQL', 'RabbitMQ', 'bench', 'other')
PUBLISH_PARTS = ('publisher', 'PostgreSQL', 'RabbitMQ', 'other')
FLOOR_PARTS = ('consumers', 'PostgreSQL', 'RabbitMQ', 'bench', 'other')  # the logged floor's
DEFAULT_ROWS = ('raw', 'drain', 'failures', 'publish', 'latency', 'respawn', 'memory')
ALL_ROWS = DEFAULT_ROWS + ('scaling', 'million')


class BenchError(Exception):
    """Something the bench waited for did not happen in time, or a figure cannot be trusted."""


def wait_until(predicate, what: str, timeout: float, interval: float = 0.01):
    """The first true value of predicate(), polled every `interval`; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f'{what} did not happen within {timeout:.0f}s')
        time.sleep(interval)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never one interpolated between two."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def drain_timeout(tasks: int) -> float:
    # Generous (a slow disk drains at tens of tasks a second), but a hung run still ends.
    return 120 + tasks / 10


# -- the bench's own RabbitMQ virtual host and PostgreSQL database -----------------------------------------

def rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['rabbitmqctl', *args], capture_output=True, text=True, timeout=60)


def create_vhost(name: str) -> None:
    rabbitmqctl('delete_vhost', name)  # one left behind by a run that was killed
    for args in (('add_vhost', name), ('set_permissions', '-p', name, 'guest', '.*', '.*', '.*')):
        result = rabbitmqctl(*args)
        if result.returncode != 0:
            raise BenchError(f'rabbitmqctl {" ".join(args)} failed (it needs root or the rabbitmq user): '
                             f'{result.stderr.strip()}')


def set_queue_version(vhost: str, version: int) -> None:
    """Every classic queue of `vhost` in storage `version` (a RabbitMQ policy, as its docs advise rather
    than an x-queue-version argument, which would clash with queues declared without it): RabbitMQ 3.10 to
    3.13 make version 1 unless told; 4.x has only version 2. The raw ceiling's queue gets it too."""
    result = rabbitmqctl('set_policy', '-p', vhost, '--apply-to', 'queues', 'bench-queue-version', '.*',
                         json.dumps({'queue-version': version}))
    if result.returncode != 0:
        raise BenchError(f'rabbitmqctl set_policy (queue-version {version}) failed: {result.stderr.strip()}')


def drop_vhost(name: str) -> None:
    rabbitmqctl('delete_vhost', name)


def postgres_admin():
    """An autocommit connection to the server's `postgres` database, as PGUSER (scripts/services)."""
    import psycopg
    return psycopg.connect(host=os.environ.get('PGHOST', '127.0.0.1'), port=os.environ.get('PGPORT', '5432'),
                           user=os.environ.get('PGUSER', 'postgres'), password=os.environ.get('PGPASSWORD') or None,
                           dbname='postgres', autocommit=True, connect_timeout=10)


def create_database(name: str) -> str:
    """Create database `name` anew; the server's version, for the report."""
    with postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
        return admin.execute('SHOW server_version').fetchone()[0]


def drop_database(name: str) -> None:
    from django.conf import settings
    if settings.configured:
        from django.db import connections
        connections.close_all()
    with postgres_admin() as admin:
        # FORCE: a child killed mid-task may leave its session behind for a moment.
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(run_dir: str, vhost: str, database: str) -> None:
    """Point the demo project at this run's broker, database and directory, then migrate."""
    os.environ.update(
        CARROT_DEMO_DIR=run_dir, CARROT_DEMO_BROKER=broker_url(vhost), CARROT_DEMO_DB='postgres',
        CARROT_DEMO_DB_NAME=database, CARROT_DEMO_CONCURRENCY=str(CHILDREN),
        # As in production: with DEBUG on, Django keeps every query of a connection in memory. The
        # memory row turns it on for its second supervisor, on purpose.
        CARROT_DEMO_DEBUG='0', DJANGO_SETTINGS_MODULE='demosite.settings')
    os.environ.pop('CARROT_DEMO_TRACK', None)
    sys.path.insert(0, PROJECT)
    import django
    django.setup()
    from django.core.management import call_command
    call_command('migrate', verbosity=0)


def broker_url(vhost: str) -> str:
    return f'amqp://guest:guest@127.0.0.1:5672/{vhost}'


def bench_broker() -> str:
    return os.environ['CARROT_DEMO_BROKER']


def bench_vhost() -> str:
    return bench_broker().rsplit('/', 1)[1]


def reset_log_and_queue() -> None:
    """An empty log table and an empty 'default' queue: each drain starts from the same place."""
    from django.db import connection

    from carrot.amqp.declare import purge
    from carrot.config import get_config
    from carrot.models import MessageLog, TaskAttempt
    with connection.cursor() as cursor:
        cursor.execute(f'TRUNCATE {MessageLog._meta.db_table}, {TaskAttempt._meta.db_table}')
    queue = get_config().queue('default')
    purge(queue.broker, queue.name)
    purge(queue.broker, queue.dead_letter_queue)


# -- row 1: the raw ceiling ---------------------------------------------------------------------------------

def raw_channel(url: str):
    import pika
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


def raw_publish(url: str, queue: str, n: int, confirmed: bool = True) -> float:
    """Confirmed publishes per second from one process, onto a plain durable queue (left holding them).
    Not `confirmed`: only to fill the queue (another drain sample), so published without confirms and
    waited for until the queue holds them all."""
    import pika
    connection, channel = raw_channel(url)
    try:
        channel.queue_declare(queue, durable=True)
        channel.queue_purge(queue)
        if confirmed:
            channel.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=2, content_type='application/json')
        started = time.perf_counter()
        for _ in range(n):
            channel.basic_publish('', queue, b'{"args": [], "kwargs": {}}', persistent)
        elapsed = time.perf_counter() - started
        if not confirmed:
            wait_until(lambda: channel.queue_declare(queue, durable=True, passive=True).method.message_count >= n,
                       f'{n} messages on {queue}', timeout=60, interval=0.05)
    finally:
        connection.close()
    return n / elapsed


def raw_drain_consumer(url: str, queue: str, prefetch: int, ready, go, results, done) -> None:
    """One ceiling consumer (run by drain_together), ack each, until the queue stays empty for a second.
    Reports (messages, time of the last ack)."""
    connection, channel = raw_channel(url)
    channel.basic_qos(prefetch_count=prefetch)
    count, last_ack = 0, None
    for method, _, _ in deliveries(channel, queue, ready, go):
        channel.basic_ack(method.delivery_tag)
        count, last_ack = count + 1, time.time()
    report_and_leave((count, last_ack), results, done, connection)


def report_and_leave(report, results, done, *connections) -> None:
    """A drain consumer's end: its report, then its connections kept until `done` (while the bench reads
    the CPU their sessions spent), then closed."""
    results.put(report)
    done.wait(30)
    for connection in connections:
        connection.close()


def deliveries(channel, queue: str, ready, go):
    """A drain consumer's deliveries: once it says it is connected (`ready`) and is let go (`go`), each
    (method, properties, body) of `queue` until the queue stays empty for a second."""
    ready.release()
    go.wait(30)
    for method, properties, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            return
        yield method, properties, body


def drain_together(target, args: tuple, consumers: int, n: int, what: str, parts: tuple[str, ...] | None = None):
    """`consumers` processes running target(*args, ready, go, results, done), spawned (nothing of this
    process -- Django, sockets -- is inherited): let go together once all are connected, each reports
    (messages, time of its last ack) -- or what went wrong, as a text -- and stays until `done`. Returns
    the messages per second from the moment they were let go to the last ack, and with `parts` the CPU per
    task by those parts (CpuSpent), read before they leave. BenchError unless they drained exactly n."""
    context = multiprocessing.get_context('spawn')
    ready, go, results, done = context.Semaphore(0), context.Event(), context.Queue(), context.Event()
    processes = [context.Process(target=target, args=args + (ready, go, results, done), daemon=True)
                 for _ in range(consumers)]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            if not ready.acquire(timeout=30):
                raise BenchError(f'{what} did not connect within 30s')
        spent = CpuSpent(None, parts, consumers=tuple(process.pid for process in processes)) if parts else None
        started = time.time()
        go.set()
        reports = [take(results, drain_timeout(n), f"{what}'s report") for _ in processes]
        cpu = spent.per_task(n) if spent else None
    finally:
        done.set()
        stop_processes(processes)
    problems = [report for report in reports if isinstance(report, str)]
    if problems:
        raise BenchError(f'{what}: {problems[0]}')
    drained = sum(count for count, _ in reports)
    if drained != n:
        raise BenchError(f'{what}s drained {drained} messages of {n}')
    return n / (max(last for _, last in reports if last) - started), cpu


def raw_drain(url: str, queue: str, n: int, consumers: int = CHILDREN, prefetch: int | None = None) -> float:
    """Messages per second that `consumers` processes drain from `queue` (holding n), from the moment all
    are connected to the last ack; each holding `prefetch` (carrot's by default)."""
    prefetch = PREFETCH if prefetch is None else prefetch
    return drain_together(raw_drain_consumer, (url, queue, prefetch), consumers, n, 'the raw consumer')[0]


def raw_latency_consumer(url: str, queue: str, prefetch: int, ready, results) -> None:
    """A ceiling consumer that reports when each message arrived, until a b'stop' (or 30s of nothing)."""
    connection, channel = raw_channel(url)
    channel.basic_qos(prefetch_count=prefetch)
    ready.release()
    for method, _, body in channel.consume(queue, inactivity_timeout=30):
        received = time.time()
        if method is None:
            break
        channel.basic_ack(method.delivery_tag)
        if body == b'stop':
            break
        results.put((body.decode(), received))
    channel.cancel()
    connection.close()


def raw_latency(url: str, queue: str, calls: int, spacing: float, consumers: int = CHILDREN) -> list[float]:
    """Milliseconds from basic_publish (confirmed) to the consumer's receipt, one message at a time."""
    import pika
    context = multiprocessing.get_context('spawn')
    ready, results = context.Semaphore(0), context.Queue()
    connection, channel = raw_channel(url)
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    processes = [context.Process(target=raw_latency_consumer, args=(url, queue, PREFETCH, ready, results),
                                 daemon=True) for _ in range(consumers)]
    latencies = []
    try:
        channel.queue_purge(queue)
        for process in processes:
            process.start()
        for _ in processes:
            if not ready.acquire(timeout=30):
                raise BenchError('a raw consumer did not connect within 30s')
        time.sleep(0.2)  # both consumers' basic_consume registered, so each message has a taker at once
        for i in range(calls):
            token = str(i)
            sent = time.time()
            channel.basic_publish('', queue, token.encode(), persistent)
            got, received = take(results, 10, f'raw message {token}')
            if got != token:
                raise BenchError(f'raw latency: expected message {token}, got {got}')
            latencies.append((received - sent) * 1000)
            time.sleep(spacing)
        for _ in processes:
            channel.basic_publish('', queue, b'stop', persistent)
    finally:
        stop_processes(processes)
        channel.queue_delete(queue)
        connection.close()
    return latencies


def take(results, timeout: float, what: str):
    """The next report on a multiprocessing queue; BenchError when none comes within `timeout` seconds."""
    import queue
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        raise BenchError(f'{what} did not come within {timeout:.0f}s') from None


def stop_processes(processes) -> None:
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def postgres_commits(n: int) -> float:
    """One-row INSERTs, each its own transaction, per second: the disk's commit rate, which every log row
    written outside a bigger transaction waits for (a regular table: a temporary one writes no WAL)."""
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE bench_commits (n integer)')
        try:
            started = time.perf_counter()
            for i in range(n):
                cursor.execute('INSERT INTO bench_commits VALUES (%s)', [i])
            return n / (time.perf_counter() - started)
        finally:
            cursor.execute('DROP TABLE bench_commits')


def raw_publish_then_commit(url: str, queue: str, n: int) -> float:
    """The floor under publish_message, per second from one process: a confirmed publish (as raw_publish)
    and then a one-row UPDATE committed without waiting for the disk, in series -- what carrot must do at
    the least once the row's INSERT overlaps the confirm (its PUBLISHED mark may only follow the confirm)."""
    import pika
    from django.db import connection
    connection_, channel = raw_channel(url)
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2, content_type='application/json')
    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE bench_marks (id integer PRIMARY KEY, status text)')
        cursor.execute("INSERT INTO bench_marks VALUES (1, 'WAITING')")
        try:
            started = time.perf_counter()
            for _ in range(n):
                channel.basic_publish('', queue, b'{"args": [], "kwargs": {}}', persistent)
                cursor.execute("SET LOCAL synchronous_commit TO off; UPDATE bench_marks SET status = %s "
                               "WHERE id = 1", ['PUBLISHED'])
            elapsed = time.perf_counter() - started
        finally:
            cursor.execute('DROP TABLE bench_marks')
    channel.queue_purge(queue)
    connection_.close()
    return n / elapsed


def logged_statements() -> dict | None:
    """carrot's own SQL for a task's log writes on PostgreSQL: the claim (take_on_arrival), the result
    (write_completion, with the server start time it returns) and the two in one statement
    (complete_then_take: the result of the task before, written by the claim of the next one); None for
    a carrot without them (then without the last: the floor takes two statements a task)."""
    from django.db import connection
    try:
        from carrot.consume.claim import _take_on_arrival_sql
        from carrot.consume.logrows import _write_completion_returning_sql
    except ImportError:
        return None
    sql = {'claim': _take_on_arrival_sql(connection), 'result': _write_completion_returning_sql(connection)}
    try:
        from carrot.consume.claim import _complete_then_take_sql
        sql['result_then_claim'] = _complete_then_take_sql(connection)
    except ImportError:
        pass
    return sql


def database_address() -> dict:
    """psycopg.connect() keywords for the bench's database, as Django reaches it."""
    from django.db import connection
    settings = connection.settings_dict
    return {'host': settings['HOST'] or None, 'port': settings['PORT'] or None, 'user': settings['USER'] or None,
            'password': settings['PASSWORD'] or None, 'dbname': settings['NAME']}


def floor_connections(url: str, queue: str, prefetch: int, address: dict) -> tuple:
    """A floor consumer's connections: (database, a cursor that sends 'SET LOCAL ...; UPDATE ...' in one round
    trip as carrot does, broker connection, channel consuming `queue` with `prefetch`, the deque its
    deliveries land in). The database session commits without waiting for the disk, as carrot's claims do."""
    import collections

    import psycopg
    database = psycopg.connect(autocommit=True, **address)
    database.execute('SET synchronous_commit TO off')
    connection, channel = raw_channel(url)
    channel.basic_qos(prefetch_count=prefetch)
    in_hand = collections.deque()
    channel.basic_consume(queue, lambda _channel, method, properties, body:
                          in_hand.append((method, properties, body)))
    return database, psycopg.ClientCursor(database), connection, channel, in_hand


def delivery_in_hand(connection, in_hand) -> bool:
    """Whether a floor consumer has a delivery in hand, waiting up to a second for one: False once the queue
    stayed empty that long (drained)."""
    if not in_hand:
        connection.process_data_events(time_limit=1)
    return bool(in_hand)


def drain_floor(consumer, sql, url: str, n: int, consumers: int, what: str) -> tuple[float, dict | None]:
    """carrot's own backlog of n (fill_backlog) drained by `consumers` processes running `consumer` with
    `sql` (drain_together): (tasks per second, CPU per task by part). BenchError unless every row ends
    COMPLETED: a floor that skipped a write would not be one."""
    from carrot.config import get_config
    from carrot.models import MessageLog
    reset_log_and_queue()
    fill_backlog(n)
    per_s, cpu = drain_together(consumer, (url, get_config().queue('default').name, PREFETCH, database_address(),
                                           sql), consumers, n, what, FLOOR_PARTS)
    completed = MessageLog.objects.filter(status=MessageLog.COMPLETED).count()
    if completed != n:
        raise BenchError(f'{what} left {n - completed} of its {n} rows not COMPLETED')
    reset_log_and_queue()
    return per_s, cpu


def logged_floor_consumer(url: str, queue: str, prefetch: int, address: dict, sql: dict,
                          ready, go, results, done) -> None:
    """One consumer of the logged floor (run by drain_together): carrot's log writes for each delivery and
    the ack, no other work -- as carrot's worker does them. Each statement is prepared and commits without
    waiting for the disk. Where carrot writes a result with the claim of the next delivery
    (sql['result_then_claim']), so does this: while the next delivery is already in hand, a result waits
    for the next claim's statement; when none is, it is written in a commit that waits for the disk, and
    every delivery up to it is acked with one frame. Otherwise the claim and the result are a statement
    each, then the ack. Reports (messages, time of the last ack), or which message's claim found no row;
    its connections stay open until `done` (their sessions' CPU is read while they are there)."""
    import datetime

    database, durable, connection, channel, in_hand = floor_connections(url, queue, prefetch, address)
    one_statement = 'result_then_claim' in sql
    worker, lease = f'floor-{os.getpid()}', datetime.timedelta(minutes=5)
    utc = datetime.timezone.utc
    report = count, last_ack = 0, None
    deferred = None  # the result parameters of the task before, when it waits for this claim
    ready.release()
    go.wait(30)
    while delivery_in_hand(connection, in_hand):
        method, properties, body = in_hand.popleft()
        message = json.loads(body)
        now = datetime.datetime.now(utc)
        claim = [now, worker, now + lease, properties.message_id, properties.headers['type'],
                 json.dumps(message['args']), json.dumps(message['kwargs']), now]
        if deferred is not None:
            row = database.execute(sql['result_then_claim'], deferred + claim, prepare=True).fetchone()[1:]
        else:
            row = database.execute(sql['claim'], claim, prepare=True).fetchone()
        if row is None or row[0] is None:
            report = f'found no row to claim for message {properties.message_id}'
            break
        result = [datetime.datetime.now(utc), '', '', now, row[0]]  # completion_params: ..., its start, pk
        if one_statement:
            connection.process_data_events(time_limit=0)  # is the next delivery in hand?
            if in_hand:
                deferred = result
                continue
            deferred = None
            durable.execute(f"SET LOCAL synchronous_commit TO DEFAULT; {sql['result']}", result)
            channel.basic_ack(method.delivery_tag, multiple=True)
        else:
            database.execute(sql['result'], result, prepare=True).fetchone()
            channel.basic_ack(method.delivery_tag)
        # Every delivery of this channel up to this one is acked now (its tags count from 1).
        report = count, last_ack = method.delivery_tag, time.time()
    report_and_leave(report, results, done, connection, database)


def logged_floor(url: str, n: int, consumers: int = CHILDREN) -> dict | None:
    """The floor under a logged drain: n of carrot's own messages and rows (fill_backlog) drained by
    `consumers` raw processes that do nothing but carrot's log writes per task and the ack
    (logged_floor_consumer), tasks per second from the moment all are connected to the last ack, and the
    CPU per task each part spent (CpuSpent). What no consumer that logs each task as carrot does can beat
    on this machine; None for a carrot without those statements."""
    sql = logged_statements()
    if sql is None:
        return None
    per_s, cpu = drain_floor(logged_floor_consumer, sql, url, n, consumers, 'the logged floor consumer')
    return {'per_s': per_s, 'cpu_us_per_task': cpu, 'statements_a_task': 1 if 'result_then_claim' in sql else 2}


def batched_statements() -> dict | None:
    """The batched floor's SQL, in the shape of carrot's own statements but for many deliveries at a time:
    'claim' writes the results of the window before (ids and completion times, as arrays) and claims every
    delivery in hand (uuids, tasks and stored arguments, as arrays) under carrot's claim conditions,
    returning the count it completed and then the columns carrot's claim returns; 'complete' writes a
    window's results in a commit that waits for the disk; 'id_at' is where the id is in a claim's row.
    None for a carrot without them."""
    from django.db import connection, models
    try:
        from carrot.commits import epoch_microseconds
        from carrot.consume.claim import SET_OR_MATCHED, TAKEABLE, returned_fields
        from carrot.models import MessageLog
    except ImportError:
        return None
    assert {'uuid', 'task', 'task_args', 'content'} <= SET_OR_MATCHED  # matched below, as carrot's claim does
    quote = connection.ops.quote_name
    table, pk = quote(MessageLog._meta.db_table), quote(MessageLog._meta.pk.column)
    fields = returned_fields()
    columns = ', '.join(epoch_microseconds(f'm.{quote(f.column)}') if isinstance(f, models.DateTimeField)
                        else f'm.{quote(f.column)}' for f in fields)  # times as carrot's claim returns them
    takeable = ', '.join(f"'{status}'" for status in TAKEABLE)
    write_results = (f"UPDATE {table} AS m SET status = '{MessageLog.COMPLETED}', completion_time = d.at, "
                     f"output = '', log = '', lease_expires = NULL "
                     f"FROM unnest(%s::bigint[], %s::timestamptz[]) AS d(id, at) WHERE m.{pk} = d.id")
    claim = (f'WITH done AS ({write_results} RETURNING 1), '
             f"taken AS (UPDATE {table} AS m SET status = '{MessageLog.IN_PROGRESS}', started_time = %s, "
             f"worker = %s, lease_expires = %s, attempts = m.attempts + 1, exception = '', traceback = '', "
             f'failure_time = NULL '
             f'FROM unnest(%s::varchar[], %s::varchar[], %s::text[], %s::text[]) AS w(uuid, task, task_args, content) '
             f'WHERE m.uuid = w.uuid AND m.task = w.task AND m.task_args = w.task_args AND m.content = w.content '
             f'AND m.status IN ({takeable}) AND (m.run_after IS NULL OR m.run_after <= %s) RETURNING {columns}) '
             f'SELECT (SELECT count(*) FROM done), taken.* FROM taken')
    return {'claim': claim, 'complete': f'SET LOCAL synchronous_commit TO DEFAULT; {write_results}',
            'id_at': 1 + [f.primary_key for f in fields].index(True)}


def batched_floor_consumer(url: str, queue: str, prefetch: int, address: dict, sql: dict,
                           ready, go, results, done) -> None:
    """One consumer of the batched floor (run by drain_together): as logged_floor_consumer, but every
    delivery in hand is claimed by one statement, which also writes the results of the window before;
    when no delivery is in hand after a window, its results are written in a commit that waits for the
    disk, and every delivery up to it is acked with one frame."""
    import datetime

    database, durable, connection, channel, in_hand = floor_connections(url, queue, prefetch, address)
    worker, lease = f'floor-{os.getpid()}', datetime.timedelta(minutes=5)
    utc = datetime.timezone.utc
    report = count, last_ack = 0, None
    results_before = ([], [])  # ids and completion times of the window before, when they wait for this claim
    ready.release()
    go.wait(30)
    while delivery_in_hand(connection, in_hand):
        window = list(in_hand)
        in_hand.clear()
        calls = [[], [], [], []]  # uuids, tasks, task_args, contents
        for _method, properties, body in window:
            message = json.loads(body)
            for values, value in zip(calls, (properties.message_id, properties.headers['type'],
                                             json.dumps(message['args']), json.dumps(message['kwargs']))):
                values.append(value)
        now = datetime.datetime.now(utc)
        taken = database.execute(sql['claim'], [*results_before, now, worker, now + lease, *calls, now],
                                 prepare=True).fetchall()
        if len(taken) != len(window):
            report = f'claimed {len(taken)} rows for a window of {len(window)} messages'
            break
        # The tasks would run here, one after the other.
        results_before = ([row[sql['id_at']] for row in taken], [datetime.datetime.now(utc)] * len(taken))
        connection.process_data_events(time_limit=0)  # is the next delivery in hand?
        if in_hand:
            continue
        durable.execute(sql['complete'], list(results_before))
        results_before = ([], [])
        channel.basic_ack(window[-1][0].delivery_tag, multiple=True)
        report = count, last_ack = window[-1][0].delivery_tag, time.time()
    report_and_leave(report, results, done, connection, database)


def batched_logged_floor(url: str, n: int, consumers: int = CHILDREN) -> dict | None:
    """The logged floor (logged_floor) with claims batched by window: what a worker that claimed every
    delivery in hand at once -- rows IN_PROGRESS before their turn, carrot's claim does not do that --
    could reach on this machine. Context for the next step of the drain, not a figure carrot is held to."""
    sql = batched_statements()
    if sql is None:
        return None
    per_s, cpu = drain_floor(batched_floor_consumer, sql, url, n, consumers, 'the batched floor consumer')
    return {'per_s': per_s, 'cpu_us_per_task': cpu}


RAW_QUEUE = 'bench-raw'


def raw_row(url: str, n: int, latency_calls: int, spacing: float, postgres_n: int,
            batched_floor: bool = False) -> dict:
    queue = RAW_QUEUE
    publish = raw_publish(url, queue, n)
    drain = raw_drain(url, queue, n)
    # The ceiling one delivery at a time too (as django-carrot 1.x and carrot 'prefetch': 1 consume).
    drain_one = drain
    if PREFETCH != 1:
        raw_publish(url, queue, n)
        drain_one = raw_drain(url, queue, n, prefetch=1)
    latencies = raw_latency(url, queue, latency_calls, spacing)
    return {'consumers': CHILDREN, 'prefetch': PREFETCH, 'messages': n, 'drain_per_s': drain,
            'drain_prefetch_1_per_s': drain_one,
            'publish_confirmed_per_s': publish, 'latency_calls': latency_calls,
            'latency_p50_ms': percentile(latencies, 50), 'latency_p99_ms': percentile(latencies, 99),
            'postgres_commits_per_s': postgres_commits(postgres_n),
            'publish_then_commit_per_s': raw_publish_then_commit(url, queue, min(n, 2000)),
            'logged_floor': logged_floor(url, n),
            'logged_floor_batched': batched_logged_floor(url, n) if batched_floor else None}


# -- publishing -------------------------------------------------------------------------------------------

def bulk_publisher():
    """carrot.utilities.publish_messages, or None where this carrot has none yet."""
    try:
        from carrot.utilities import publish_messages
    except ImportError:
        return None
    return publish_messages


def publish_single(n: int) -> float:
    """publish_message calls per second from one process (row + confirmed publish each)."""
    from carrot.utilities import publish_message
    started = time.perf_counter()
    for _ in range(n):
        publish_message(NOOP)
    return n / (time.perf_counter() - started)


def publish_single_and_cpu(n: int) -> tuple[float, dict | None]:
    """publish_single(), and the CPU each part spent per call meanwhile (CpuSpent): this process (the
    publisher, the driver and pika included), PostgreSQL, RabbitMQ and the rest of the machine."""
    spent = CpuSpent(None, PUBLISH_PARTS, own='publisher')
    calls_per_s = publish_single(n)
    return calls_per_s, spent.per_task(n)


def publish_bulk(n: int) -> float:
    started = time.perf_counter()
    bulk_publisher()(NOOP, [((), {})] * n, queue='default')
    return n / (time.perf_counter() - started)


def fill_backlog(n: int) -> None:
    """n no-op tasks on 'default' with their rows, as publish_message leaves them (PUBLISHED), when the
    publishing is not what is measured: carrot's bulk publish where there is one; else the rows in one
    transaction and the messages (carrot's own, from prepare()) on one unconfirmed stream. Rows go first:
    a consumer that found no row would write one of its own."""
    bulk = bulk_publisher()
    if bulk is not None:
        bulk(NOOP, [((), {})] * n, queue='default')
        return
    import pika
    from django.utils import timezone

    from carrot.amqp.declare import declare_queue
    from carrot.config import get_config
    from carrot.models import MessageLog
    from carrot.publish import arguments
    from carrot.publish.outgoing import prepare

    messages = [prepare(NOOP, queue='default') for _ in range(n)]
    task_args, content = arguments.dump((), {})
    MessageLog.objects.bulk_create([
        MessageLog(status=MessageLog.PUBLISHED, queue=m.queue, exchange=m.exchange, routing_key=m.routing_key,
                   uuid=m.uuid, priority=m.priority, task=m.task, task_args=task_args, content=content,
                   publish_time=timezone.now()) for m in messages], batch_size=2000)
    queue = get_config().queue('default')
    connection, channel = raw_channel(bench_broker())
    try:
        declare_queue(channel, queue)
        before = channel.queue_declare(queue.name, passive=True).method.message_count
        for m in messages:
            channel.basic_publish(m.exchange, m.routing_key, m.body, pika.BasicProperties(**m.properties))
        # With nobody consuming, a drain is timed next: it must not start before the whole backlog is in.
        # (With consumers, their completions are what is waited for.)
        if channel.queue_declare(queue.name, passive=True).method.consumer_count == 0:
            wait_until(lambda: channel.queue_declare(queue.name, passive=True).method.message_count >= before + n,
                       f'the backlog of {n} messages reaching the queue', timeout=60, interval=0.05)
    finally:
        connection.close()


# -- carrot-supervisor, run as a user runs it ----------------------------------------------------------------

class SupervisorExited(BenchError):
    def __init__(self, code: int, log_tail: str):
        super().__init__(f'carrot-supervisor exited with {code} before it was ready:\n{log_tail}')
        self.code = code
        self.log_tail = log_tail


class Supervisor:
    """carrot-supervisor on the demo project's 'default' queue (no scheduler), in a subprocess."""

    def __init__(self, run_dir: str, name: str, children: int = CHILDREN, debug: bool = False,
                 track: str | None = None):
        self.log = os.path.join(run_dir, f'carrot-{name}.log')
        self.env = dict(os.environ, CARROT_DEMO_CONCURRENCY=str(children), CARROT_DEMO_DEBUG='1' if debug else '0')
        if track:
            self.env['CARROT_DEMO_TRACK'] = track
        self.children = children
        self.process = None
        self.started = None  # time.time() just before the command was started

    def start(self) -> None:
        command = os.path.join(os.path.dirname(sys.executable), 'carrot-supervisor')
        self.started = time.time()
        with open(self.log + '.stderr', 'w') as stderr:  # what comes before the log file is open
            self.process = subprocess.Popen(
                [command, '--settings', 'demosite.settings', '--pythonpath', PROJECT, '--queues', 'default',
                 '--no-scheduler', '--logfile', self.log],
                cwd=PROJECT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def check_running(self) -> bool:
        """True while the master runs; SupervisorExited (with the end of its log) once it has exited."""
        if self.process.poll() is None:
            return True
        with open(self.log + '.stderr') as f:
            tail = (self.log_text() + f.read())[-2000:]
        raise SupervisorExited(self.process.returncode, tail)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the master says every child is up; SupervisorExited if it gives up first."""
        wait_until(lambda: self.check_running() and re.search(r'ready: \d+ children up', self.log_text()),
                   f'carrot-supervisor ready (log: {self.log})', timeout, 0.02)

    def consuming(self) -> dict[str, int]:
        """slot name -> pid of the consumer children whose process title says they wait for a message."""
        import psutil
        found = {}
        for role, process in self.processes():
            try:
                if role.startswith('consumer ') and process_title(process).endswith(' idle'):
                    found[role] = process.pid
            except psutil.Error:
                continue
        return found

    def wait_consuming(self, timeout: float = 30) -> dict[str, int]:
        def every_child_consuming():
            self.check_running()
            found = self.consuming()
            return found if len(found) == self.children else None
        return wait_until(every_child_consuming, 'every consumer child consuming', timeout, 0.01)

    def processes(self) -> list[tuple[str, object]]:
        """(role, psutil.Process) of the master and each of its children, the role read from the title."""
        import psutil
        master = psutil.Process(self.process.pid)
        found = [('master', master)]
        for child in master.children():
            try:
                found.append((role_of(process_title(child)), child))
            except psutil.Error:
                continue
        return found

    def memory(self) -> dict[str, float]:
        """role -> USS in MiB: the memory the process alone holds (not what it shares with the image)."""
        import psutil
        figures = {}
        for role, process in self.processes():
            try:
                figures[role] = process.memory_full_info().uss / 2 ** 20
            except psutil.Error:
                continue
        return figures

    def stop(self, timeout: float = 30) -> None:
        """TERM (children finish the task in hand), then KILL of the master and every process below it."""
        if self.process is None or self.process.poll() is not None:
            return
        import psutil
        try:
            family = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            family = []
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for process in family:
            try:
                process.kill()
            except psutil.Error:
                pass  # gone already, as it should be

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def process_title(process) -> str:
    return ' '.join(process.cmdline()).strip().replace('carrot-supervisor: ', '')


def role_of(title: str) -> str:
    """'consumer default#2' from 'consumer default#2 running shop.tasks.noop 0.0s' (or '... idle')."""
    words = title.split()
    if words[:1] == ['consumer'] and len(words) > 1:
        return ' '.join(words[:2])
    return words[0] if words else '?'


# -- rows 2 to 8: carrot ----------------------------------------------------------------------------------

def completed_since(since) -> int:
    """Tasks of this drain COMPLETED so far. Polled every 50 ms during a drain, so it reads only the recent
    end of the completed index (completion_time): a count over publish_time read all of a million old
    rows each time, and the bench's own polling ate the database's CPU."""
    from carrot.models import MessageLog
    return MessageLog.objects.filter(status=MessageLog.COMPLETED, completion_time__gte=since,
                                     publish_time__gte=since).count()


def failed_count() -> int:
    from carrot.models import MessageLog
    return MessageLog.objects.filter(status=MessageLog.FAILED).count()


def timed_drain(run_dir: str, name: str, n: int, since, children: int = CHILDREN) -> dict:
    """carrot-supervisor started on a backlog of n logged no-op tasks: tasks per second from its start to
    the last completion, and from the first task started (both read from the rows' own times); and the CPU
    time each part of the machine spent per task meanwhile (CpuSpent)."""
    from django.db.models import Max, Min

    from carrot.models import MessageLog
    with Supervisor(run_dir, name, children=children) as supervisor:
        spent = CpuSpent(supervisor)
        # The rate comes from the rows' own times, not from when this poll sees the end: polled every 50 ms,
        # its count took a twentieth of the machine's CPU from the drain it measured.
        wait_until(lambda: supervisor.check_running() and completed_since(since) >= n, f'{n} tasks COMPLETED',
                   drain_timeout(n), 0.25)
        cpu = spent.per_task(n)
    if failed_count():
        raise BenchError(f'{failed_count()} tasks FAILED in the {name} drain (see {supervisor.log})')
    times = MessageLog.objects.filter(status=MessageLog.COMPLETED, publish_time__gte=since).aggregate(
        first=Min('started_time'), last=Max('completion_time'))
    last = times['last'].timestamp()
    return {'tasks': n, 'children': children, 'per_s': n / (last - supervisor.started),
            'from_first_started_per_s': n / (last - times['first'].timestamp()), 'cpu_us_per_task': cpu}


class CpuSpent:
    """Where the CPU time of a drain (or of publish_single) goes, in µs per task: carrot's consumer
    children, the supervisor's master, image and housekeeping, PostgreSQL's processes, RabbitMQ's and the
    bench's own polling (for the publishes: the publisher, this process); 'other' is what the machine
    spent besides (the kernel's threads: disk writes, softirqs), from /proc/stat. On a machine whose CPUs
    are all busy, 'all' bounds the rate: CPUs / all.

    Read at the start (once the supervisor has started) and again at the end (before it stops): a process
    started meanwhile counts from zero. Two readings, so the measuring costs next to nothing."""

    def __init__(self, supervisor: Supervisor | None, parts: tuple[str, ...] | None = None, own: str = 'bench',
                 consumers: tuple[int, ...] = ()):
        """`supervisor`: the drain's (None: no carrot-supervisor runs). `own`: the part this process is.
        `consumers`: pids counted as consumers besides the supervisor's (the logged floor's)."""
        self.polling_session, self.consumers = None, consumers
        if supervisor is not None:
            from django.db import connection
            with connection.cursor() as cursor:  # the session that polls for the drain's end
                cursor.execute('SELECT pg_backend_pid()')
                self.polling_session = cursor.fetchone()[0]
        self.supervisor, self.parts, self.own = supervisor, parts or CPU_PARTS, own
        self.start, self.start_ticks = self._reading(), cpu_busy_ticks()

    def per_task(self, tasks: int) -> dict[str, int] | None:
        end, end_ticks = self._reading(), cpu_busy_ticks()
        spent = dict.fromkeys(self.parts, 0.0)
        for pid, (part, seconds) in end.items():
            before = self.start.get(pid)
            spent[part] = spent.get(part, 0.0) + seconds - (before[1] if before and before[0] == part else 0.0)
        if self.start_ticks is None or end_ticks is None:
            return None
        machine = (end_ticks - self.start_ticks) / os.sysconf('SC_CLK_TCK')
        spent['other'] = max(0.0, machine - sum(spent.values()))  # each count is in whole clock ticks
        spent['all'] = sum(spent.values())
        return {part: round(seconds * 1e6 / tasks) for part, seconds in spent.items()}

    def _reading(self) -> dict[int, tuple[str, float]]:
        """pid -> (part, CPU seconds so far) of every process that takes part."""
        import psutil
        found = {}
        try:
            carrot = self.supervisor.processes() if self.supervisor is not None else []
        except psutil.Error:  # the master gone: the wait says why
            carrot = []
        for role, process in carrot:
            found[process.pid] = ('consumers' if role.startswith('consumer ') else role, process)
        for pid in self.consumers:
            try:
                found[pid] = ('consumers', psutil.Process(pid))
            except psutil.Error:
                pass  # gone already: what it spent is left to 'other'
        found[os.getpid()] = (self.own, psutil.Process())
        if self.polling_session is not None:
            try:
                found[self.polling_session] = (self.own, psutil.Process(self.polling_session))
            except psutil.Error:
                pass  # a PostgreSQL on another machine, or of another user
        for process in psutil.process_iter(['name']):
            name = process.info['name'] or ''
            if name == 'postgres' or name.startswith('postgres:'):
                found.setdefault(process.pid, ('PostgreSQL', process))
            elif name.startswith('beam') or name in ('epmd', 'erl_child_setup'):
                found.setdefault(process.pid, ('RabbitMQ', process))
        reading = {}
        for pid, (part, process) in found.items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue  # gone meanwhile: what it spent is left to 'other'
            reading[pid] = (part, times.user + times.system)
        return reading


def drain_row(run_dir: str, n: int, name: str = 'drain') -> tuple[dict, tuple[float, dict | None]]:
    """Row 2, and row 4's publish_message figure: the backlog is published with it, timed."""
    from django.utils import timezone
    reset_log_and_queue()
    since = timezone.now()
    publish = publish_single_and_cpu(n)
    return timed_drain(run_dir, name, n, since), publish


def more_rounds(rows: dict, run_dir: str, url: str, n: int, rounds: int) -> list[tuple[float, dict | None]]:
    """The raw drain and the track='all' drain again, in turn, until each has `rounds` samples; each row's
    figure becomes the median of its samples (all kept in the JSON). One sample of either moves by a sixth
    from one run to the next on a shared machine -- more than the ratio between them is asked to show -- and
    the turns put both under the same weather. The drain's CPU per task is the median of its samples, part
    by part. Each drain's backlog is published with publish_message, timed as in drain_row: returns those
    samples of row 4 (rate, CPU per call)."""
    raw, drain = rows.get('raw'), rows.get('drain')
    raw_samples = [raw['drain_per_s']] if raw else []
    drain_samples = [drain] if drain else []
    publishes = []
    for _ in range(rounds - 1):
        if raw:
            raw_publish(url, RAW_QUEUE, n, confirmed=False)
            raw_samples.append(raw_drain(url, RAW_QUEUE, n))
        if drain:
            sample, publish = drain_row(run_dir, n, name=f'drain-{len(drain_samples) + 1}')
            drain_samples.append(sample)
            publishes.append(publish)
    if raw:
        raw['drain_rounds_per_s'] = raw_samples
        raw['drain_per_s'] = statistics.median(raw_samples)
    if drain:
        drain['rounds'] = [{key: sample[key] for key in ('per_s', 'from_first_started_per_s', 'cpu_us_per_task')}
                           for sample in drain_samples]
        for key in ('per_s', 'from_first_started_per_s'):
            drain[key] = statistics.median(sample[key] for sample in drain_samples)
        drain['cpu_us_per_task'] = median_cpu([sample.get('cpu_us_per_task') for sample in drain_samples])
    return publishes


def median_cpu(readings: list[dict | None]) -> dict | None:
    """Part by part, the median of CpuSpent readings (those there are)."""
    readings = [reading for reading in readings if reading]
    if not readings:
        return None
    return {part: round(statistics.median(reading.get(part, 0) for reading in readings)) for part in readings[0]}


def median_publish(samples: list[tuple[float, dict | None]]) -> tuple[float, dict | None]:
    """publish_single_and_cpu() samples as one: the median rate, and the median CPU per call."""
    return statistics.median(rate for rate, _ in samples), median_cpu([cpu for _, cpu in samples])


def track_supported() -> bool:
    """Whether this carrot accepts a queue's 'track' key (it reports an unknown key as a problem)."""
    from django.conf import settings

    from carrot.config import parse_config
    raw = dict(settings.CARROT, queues=[dict(settings.DEFAULT_QUEUE, track='failures')])
    _, problems = parse_config(raw)
    return not any('track' in str(problem) for problem in problems)


def failures_row(run_dir: str, n: int) -> dict:
    """Row 3: the drain with track='failures'. Successful tasks leave no row, so the end is read from
    the broker: the moment the queue has no message left to hand out. Those a child holds (its prefetch) may
    still be running then; rabbitmqctl confirms afterwards that all were acked."""
    if not track_supported():
        return {'supported': False, 'note': NOT_SUPPORTED}
    from django.conf import settings
    from django.test import override_settings
    reset_log_and_queue()
    failures_settings = dict(settings.CARROT, queues=[dict(settings.DEFAULT_QUEUE, track='failures')])
    publish = None
    with override_settings(CARROT=failures_settings):  # publish as the supervisor's settings say
        bulk = bulk_publisher()
        if bulk is not None:
            bulk(NOOP, [((), {})] * n, queue='default')
        else:
            publish = publish_single(n)  # no row written: a figure of its own for row 4
    connection, channel = raw_channel(bench_broker())
    try:
        supervisor = Supervisor(run_dir, 'failures', track='failures')
        with supervisor:
            spent = CpuSpent(supervisor)
            try:
                supervisor.wait_ready()
            except SupervisorExited as exc:
                if exc.code == EXIT_CONFIG and 'track' in exc.log_tail:
                    return {'supported': False, 'note': NOT_SUPPORTED}
                raise
            wait_until(lambda: supervisor.check_running() and
                       channel.queue_declare('default', passive=True).method.message_count == 0,
                       'the queue handed out every message', drain_timeout(n), 0.02)
            emptied = time.time()
            cpu = spent.per_task(n)  # before rabbitmqctl is run below: each run is an Erlang VM of its own
            wait_until(lambda: unacknowledged('default') == 0, 'every message acked', 60, 0.5)
    finally:
        connection.close()
    if failed_count():
        raise BenchError(f'{failed_count()} tasks FAILED in the failures drain (see {supervisor.log})')
    return {'supported': True, 'tasks': n, 'children': CHILDREN, 'per_s': n / (emptied - supervisor.started),
            'publish_single_per_s': publish, 'cpu_us_per_task': cpu}


def unacknowledged(queue: str) -> int | None:
    """Messages ready plus unacknowledged in `queue`, from rabbitmqctl (AMQP reports only the ready)."""
    result = rabbitmqctl('list_queues', '-q', '-p', bench_vhost(), 'name', 'messages')
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue and fields[1].isdigit():
            return int(fields[1])
    return None


def publish_bulk_row(n: int) -> float | None:
    if bulk_publisher() is None:
        return None
    reset_log_and_queue()
    rate = publish_bulk(n)
    reset_log_and_queue()
    return rate


def latency_and_respawn(run_dir: str, calls: int, spacing: float, kills: int, rows: set) -> dict:
    """Rows 5 and 6 on one idle supervisor: first the latency, then the kills."""
    reset_log_and_queue()
    figures = {}
    with Supervisor(run_dir, 'latency') as supervisor:
        supervisor.wait_ready()
        supervisor.wait_consuming()
        if 'latency' in rows:
            latencies = task_start_latency(run_dir, calls, spacing)
            figures['latency'] = {'calls': calls, 'spacing_ms': spacing * 1000,
                                  'p50_ms': percentile(latencies, 50), 'p99_ms': percentile(latencies, 99)}
        if 'respawn' in rows:
            figures['respawn'] = respawn_times(supervisor, kills)
    return figures


def task_start_latency(run_dir: str, calls: int, spacing: float) -> list[float]:
    """Milliseconds from calling publish_message to the first line of the task's body, one call at a
    time: the task appends its own time.time() to task-starts.txt (shop.tasks.note_start)."""
    from carrot.utilities import publish_message
    starts = os.path.join(run_dir, 'task-starts.txt')
    open(starts, 'w').close()
    seen: dict[str, float] = {}
    offset = 0

    def body_started(token):
        nonlocal offset
        with open(starts) as f:
            f.seek(offset)
            text = f.read()
        complete = text[:text.rfind('\n') + 1]  # a line still being written is read next time
        offset += len(complete)
        for line in complete.splitlines():
            name, stamp = line.split()
            seen[name] = float(stamp)
        return token in seen

    latencies = []
    for i in range(calls):
        token = f'call-{i}'
        called = time.time()
        publish_message(NOTE_START, token)
        # The figure is the body's own time stamp minus the call's: looking every 5 ms rather than every
        # 0.5 ms changes when the next call goes, not the figure -- except that the faster polling took
        # CPU from the worker it measured (0.4 ms of the p50 on 2 cores).
        wait_until(lambda: body_started(token), f'the body of {token}', 30, 0.005)
        latencies.append((seen[token] - called) * 1000)
        time.sleep(spacing)
    return latencies


def respawn_times(supervisor: Supervisor, kills: int) -> dict:
    """SIGKILL a consuming child; milliseconds until its slot holds a new child that consumes."""
    times = []
    for _ in range(kills):
        slot, pid = sorted(supervisor.wait_consuming().items())[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: supervisor.consuming().get(slot) not in (None, pid), f'{slot} respawned', 30, 0.001)
        times.append((time.monotonic() - killed) * 1000)
        time.sleep(0.3)
    return {'kills': kills, 'median_ms': statistics.median(times), 'max_ms': max(times)}


def memory_row(run_dir: str, tasks: int) -> dict:
    """Row 7: USS per process of a supervisor idle after start, and after it drained `tasks` no-op tasks;
    with DEBUG off (production) and on (Django then keeps each connection's queries)."""
    from django.utils import timezone
    figures = {}
    for debug in (False, True):
        reset_log_and_queue()
        with Supervisor(run_dir, f'memory-debug-{"on" if debug else "off"}', debug=debug) as supervisor:
            supervisor.wait_ready()
            supervisor.wait_consuming()
            time.sleep(1)  # the image's and children's start-up garbage settled
            idle = supervisor.memory()
            since = timezone.now()
            fill_backlog(tasks)
            wait_until(lambda: supervisor.check_running() and completed_since(since) >= tasks,
                       f'{tasks} tasks COMPLETED', drain_timeout(tasks), 0.2)
            supervisor.wait_consuming()
            after = supervisor.memory()
        figures['debug_on' if debug else 'debug_off'] = {'tasks': tasks, 'tasks_per_child': tasks // CHILDREN,
                                                         'idle_uss_mib': idle, 'after_uss_mib': after}
    return figures


def scaling_row(run_dir: str, n: int, known: dict) -> dict:
    """Row 8: the drain with 1, 2 and 4 children (2 is the drain row's, when it ran)."""
    from django.utils import timezone
    rates = {}
    for children in (1, 2, 4):
        if children == CHILDREN and 'drain' in known:
            rates[str(children)] = known['drain']['per_s']
            continue
        reset_log_and_queue()
        since = timezone.now()
        fill_backlog(n)
        rates[str(children)] = timed_drain(run_dir, f'scaling-{children}', n, since, children=children)['per_s']
    return rates


# -- row 9: a million old rows ---------------------------------------------------------------------------

MONITOR_PAGES = (
    ('queued', 'carrot:queued', ''), ('completed', 'carrot:completed', ''), ('failed', 'carrot:failed', ''),
    ('waiting', 'carrot:waiting', ''), ('later', 'carrot:later', ''), ('scheduled', 'carrot:scheduled', ''),
    ('workers', 'carrot:workers', ''), ('completed, search', 'carrot:completed', '?q=note_start'),
    ('api messages queued', 'carrot:api-messages', '?tab=queued'),
    ('api messages completed', 'carrot:api-messages', '?tab=completed'),
    ('api overview', 'carrot:api-overview', ''), ('api workers', 'carrot:api-workers', ''),
    ('api scheduled', 'carrot:api-schedules', ''),
)


def insert_old_rows(count: int) -> float:
    """`count` COMPLETED rows published from an hour to ~12 days ago (one a second), each with the id carrot
    made for it then, in one statement, then VACUUM ANALYZE as autovacuum would, and a CHECKPOINT; the
    seconds it took."""
    from django.db import connection

    from carrot.models import MessageLog
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"""
            INSERT INTO {MessageLog._meta.db_table}
                (status, exchange, queue, routing_key, uuid, origin, priority, backend, task, task_args,
                 content, output, publish_time, started_time, completion_time, attempts, retries, worker)
            SELECT 'COMPLETED', '', 'default', 'default', id, '', 0, '', %s, '[]', '{{}}', 'null',
                   stamp, stamp + interval '5 ms', stamp + interval '8 ms', 1, 0, 'bench-host:1'
            FROM generate_series(1, %s) AS g,
                 LATERAL (SELECT now() - interval '1 hour' - g * interval '1 second' AS stamp) AS t,
                 LATERAL (SELECT lpad(to_hex((extract(epoch FROM stamp) * 1000)::bigint), 12, '0') AS millis,
                                 md5(g::text) AS noise) AS parts,
                 -- the id carrot gave it then (carrot.text.new_message_id: version 7, its time first)
                 LATERAL (SELECT substr(millis, 1, 8) || '-' || substr(millis, 9, 4) || '-7' || substr(noise, 1, 3)
                                 || '-8' || substr(noise, 4, 3) || '-' || substr(noise, 7, 12) AS id) AS made
        """, [NOOP, count])
        cursor.execute(f'VACUUM ANALYZE {MessageLog._meta.db_table}')
        # A settled database, as after months of use: the load's own aftermath (a checkpoint writing it
        # all out while the drain runs) is not the table's size.
        cursor.execute('CHECKPOINT')
    return time.perf_counter() - started


def monitor_timings(repeat: int = 5) -> dict[str, float]:
    """Median milliseconds of a GET of each monitor list page and API endpoint, as a logged-in staff user
    (Django's test client in this process: no web server's time in the figure)."""
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse
    user, _ = get_user_model().objects.get_or_create(username='bench-staff', defaults={'is_staff': True})
    client = Client(HTTP_HOST='localhost')
    client.force_login(user)
    timings = {}
    for label, name, query in MONITOR_PAGES:
        url = reverse(name) + query
        client.get(url)  # the first request pays for imports and templates
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise BenchError(f'GET {url} answered {response.status_code}')
        timings[label] = statistics.median(times)
    return timings


def million_row(run_dir: str, n: int, rows: int) -> dict:
    """Row 9: the drain and the monitor on an empty log table, then again with `rows` old rows in it.
    The empty-table drain is run here again, just before, with the same backlog: on a shared machine two
    drains minutes apart differ by more than the table's size could make them."""
    from django.utils import timezone
    reset_log_and_queue()
    since = timezone.now()
    fill_backlog(n)
    empty = timed_drain(run_dir, 'million-empty', n, since)
    reset_log_and_queue()
    monitor_empty = monitor_timings()
    took = insert_old_rows(rows)
    since = timezone.now()
    fill_backlog(n)
    drain = timed_drain(run_dir, 'million', n, since)
    return {'old_rows': rows, 'insert_and_vacuum_s': took, 'drain_empty': empty, 'drain': drain,
            'ratio': drain['per_s'] / empty['per_s'], 'ratio_at_equal_speed': ratio_at_equal_speed(drain, empty),
            'monitor_ms_empty': monitor_empty, 'monitor_ms': monitor_timings()}


def ratio_at_equal_speed(drain: dict, empty: dict) -> float | None:
    """drain's rate / empty's, as if the machine had run both at one speed: the consumer children's CPU per
    task is the clock. Their Python does the same work whatever the table holds (the database's work is what
    its size changes), so when they spend more CPU per task the machine was slower, by that much. Here the
    same drain, minutes apart, cost the consumers 572 to 1,086 µs a task: more than any table size moved it.
    None without the CPU figures."""
    clock, clock_empty = (figures.get('cpu_us_per_task') or {} for figures in (drain, empty))
    if not clock.get('consumers') or not clock_empty.get('consumers'):
        return None
    return drain['per_s'] / empty['per_s'] * clock['consumers'] / clock_empty['consumers']


# -- the report -----------------------------------------------------------------------------------------------

def ratio(value, ceiling) -> str:
    if value is None or not ceiling:
        return '-'
    return f'{value / ceiling:.2f}'


def rounds_line(samples: list[float] | None, lines: list[str], ceilings: list[float] | None = None) -> None:
    """The samples a median was taken of (--rounds), in the order taken; with `ceilings`, each against the
    raw drain of its own round."""
    if not samples or len(samples) < 2:
        return
    text = f'    median of {len(samples)} rounds: ' + ' / '.join(f'{value:,.0f}' for value in samples) + '/s'
    if ceilings and len(ceilings) == len(samples):
        text += ', vs raw in each round ' + ' / '.join(ratio(value, ceiling)
                                                       for value, ceiling in zip(samples, ceilings))
    lines.append(text)


def rate(value) -> str:
    return '-' if value is None else f'{value:,.0f}/s'


def cpu_line(cpu: dict | None, cpus: int, lines: list[str], order: tuple[str, ...] | None = None,
             unit: str = 'task', lead: str = '    CPU') -> None:
    """The CPU per task (or call) by part (CpuSpent), and the rate that CPU allows on this machine's CPUs."""
    if not cpu or not cpu.get('all'):
        return
    parts = ', '.join(f'{part} {cpu[part]:,}' for part in order or CPU_PARTS if part in cpu)
    lines.append(f'{lead} per {unit}, µs: {parts}; {cpu["all"]:,} in all, so at most '
                 f'{cpus * 1e6 / cpu["all"]:,.0f}/s on {cpus} CPUs')


def steal_note(share) -> str:
    return '' if share is None else f', {share:.0%} of the CPU time stolen by the host'


def queue_version_note(version) -> str:
    return '' if version is None else f', classic queues version {version} (policy)'


def print_table(results: dict) -> None:
    rows = results['rows']
    raw = rows.get('raw', {})
    lines = []

    def line(label, figure, vs=''):
        if len(figure) > 18:  # a note (n/a ...), not a number: no column to keep
            lines.append(f'{label:<62}{figure}')
        else:
            lines.append(f'{label:<62}{figure:>18}  {vs}'.rstrip())

    machine = results['machine']
    print(f'\ncarrot bench: {results["options"]["messages"]:,} messages, {machine["cpus"]} CPUs, '
          f'PostgreSQL {machine["postgresql"]}, RabbitMQ {machine["rabbitmq"]}, carrot prefetch '
          f'{os.environ.get("CARROT_DEMO_PREFETCH", "1")}'
          f'{", claims one task at a time" if os.environ.get("CARROT_DEMO_CLAIM_AHEAD") == "0" else ""}'
          f'{queue_version_note(results["options"].get("queue_version"))}; one run, {results["wall_time_s"]:.0f}s, '
          f'load average {results["load_average"]["start"]:.1f} at the start, {results["load_average"]["end"]:.1f} '
          f'at the end{steal_note(results.get("steal_share"))}')
    line('', 'figure', 'vs raw pika')
    if raw:
        line(f'1 raw pika drain, {raw["consumers"]} processes, prefetch {raw["prefetch"]}, ack each',
             rate(raw['drain_per_s']), '1.00')
        rounds_line(raw.get('drain_rounds_per_s'), lines)
        if raw['prefetch'] != 1 and 'drain_prefetch_1_per_s' in raw:
            line(f'  raw pika drain, {raw["consumers"]} processes, prefetch 1, ack each',
                 rate(raw['drain_prefetch_1_per_s']), '1.00')
        line('  raw pika confirmed publish, 1 process', rate(raw['publish_confirmed_per_s']), '1.00')
        line('  PostgreSQL one-row commits, 1 process (context)', rate(raw['postgres_commits_per_s']))
        floor = raw.get('logged_floor')
        if floor:
            how = 'one statement' if floor.get('statements_a_task') == 1 else "carrot's claim and result"
            line(f'  logged floor: raw drain + {how} a task', rate(floor['per_s']),
                 ratio(floor['per_s'], raw['drain_per_s']))
            cpu_line(floor.get('cpu_us_per_task'), machine['cpus'], lines, FLOOR_PARTS)
        batched = raw.get('logged_floor_batched')
        if batched:
            line('  logged floor, claims batched: one statement a window', rate(batched['per_s']),
                 ratio(batched['per_s'], raw['drain_per_s']))
            cpu_line(batched.get('cpu_us_per_task'), machine['cpus'], lines, FLOOR_PARTS)
    ceiling = raw.get('drain_per_s')
    if 'drain' in rows:
        drain = rows['drain']
        line(f"2 drain track='all', {drain['children']} children, from supervisor start", rate(drain['per_s']),
             ratio(drain['per_s'], ceiling))
        samples = drain.get('rounds')
        if samples:
            rounds_line([sample['per_s'] for sample in samples], lines, raw.get('drain_rounds_per_s'))
        line('    from the first task started', rate(drain['from_first_started_per_s']),
             ratio(drain['from_first_started_per_s'], ceiling))
        if raw.get('drain_prefetch_1_per_s') and raw['prefetch'] != 1:
            line('    from supervisor start, vs the raw drain with prefetch 1', '',
                 ratio(drain['per_s'], raw['drain_prefetch_1_per_s']))
        if raw.get('logged_floor'):
            floor = raw['logged_floor']['per_s']
            line('    from supervisor start, vs the logged floor (row 1)', '',
                 f"{ratio(drain['per_s'], floor)} of it")
            # What the drain from start would be if the workers cost nothing beyond the floor: the floor's
            # time for these tasks plus this drain's own start (supervisor start to the first task started).
            start = drain['tasks'] / drain['per_s'] - drain['tasks'] / drain['from_first_started_per_s']
            at_best = drain['tasks'] / (drain['tasks'] / floor + start)
            line(f'    at best: the floor, after this start ({start:.2f}s)', rate(at_best),
                 ratio(at_best, ceiling))
            if raw.get('logged_floor_batched'):
                batched = drain['tasks'] / (drain['tasks'] / raw['logged_floor_batched']['per_s'] + start)
                line('    at best: the batched floor, after this start', rate(batched), ratio(batched, ceiling))
        cpu_line(drain.get('cpu_us_per_task'), machine['cpus'], lines)
    if 'failures' in rows:
        failures = rows['failures']
        if failures['supported']:
            line(f"3 drain track='failures', {failures['children']} children, from start", rate(failures['per_s']),
                 ratio(failures['per_s'], ceiling))
            cpu_line(failures.get('cpu_us_per_task'), machine['cpus'], lines)
        else:
            line("3 drain track='failures'", failures['note'])
    if 'publish' in rows:
        publish = rows['publish']
        line('4 publish_message, 1 process', rate(publish['single_per_s']),
             ratio(publish['single_per_s'], raw.get('publish_confirmed_per_s')))
        rounds_line(publish.get('single_rounds_per_s'), lines)
        if raw.get('publish_then_commit_per_s'):
            line('    floor: raw confirmed publish, then a one-row commit (no disk wait)',
                 rate(raw['publish_then_commit_per_s']),
                 f"{ratio(publish['single_per_s'], raw['publish_then_commit_per_s'])} of it")
        cpu_line(publish.get('single_cpu_us_per_call'), machine['cpus'], lines, PUBLISH_PARTS, 'call')
        untracked = rows.get('failures', {}).get('publish_single_per_s')
        if untracked:
            line("  publish_message to a track='failures' queue (no row)", rate(untracked),
                 ratio(untracked, raw.get('publish_confirmed_per_s')))
        if publish['bulk_per_s'] is None:
            line('  publish_messages (bulk)', NOT_SUPPORTED)
        else:
            line('  publish_messages (bulk)', rate(publish['bulk_per_s']),
                 ratio(publish['bulk_per_s'], raw.get('publish_confirmed_per_s')))
    if 'latency' in rows:
        latency = rows['latency']
        line(f'5 idle latency, publish_message to task body, p50 / p99 ({latency["calls"]} calls)',
             f'{latency["p50_ms"]:.1f} / {latency["p99_ms"]:.1f} ms',
             f'{ratio(latency["p50_ms"], raw.get("latency_p50_ms"))} / '
             f'{ratio(latency["p99_ms"], raw.get("latency_p99_ms"))}')
        if raw:
            line('  raw pika publish to consumer receipt, p50 / p99',
                 f'{raw["latency_p50_ms"]:.1f} / {raw["latency_p99_ms"]:.1f} ms', '1.00 / 1.00')
    if 'respawn' in rows:
        respawn = rows['respawn']
        line(f'6 respawn after SIGKILL to consuming, median (max) of {respawn["kills"]}',
             f'{respawn["median_ms"]:.0f} ({respawn["max_ms"]:.0f}) ms')
    if 'memory' in rows:
        for key, title in (('debug_off', 'DEBUG off'), ('debug_on', 'DEBUG on')):
            memory = rows['memory'][key]
            line(f'7 memory USS MiB, {title}: idle -> after {memory["tasks"]:,} tasks '
                 f'({memory["tasks_per_child"]:,}/child)', '')
            for role in sorted(memory['after_uss_mib']):
                idle = memory['idle_uss_mib'].get(role)
                line(f'    {role}', f'{idle:.1f} -> {memory["after_uss_mib"][role]:.1f}' if idle is not None
                     else f'- -> {memory["after_uss_mib"][role]:.1f}')
    if 'scaling' in rows:
        for children, per_s in rows['scaling'].items():
            line(f"8 drain track='all', {children} children", rate(per_s), ratio(per_s, ceiling))
    if 'million' in rows:
        million = rows['million']
        drain, empty = million['drain']['per_s'], million['drain_empty']['per_s']
        line('9 drain, empty log table, just before', rate(empty), ratio(empty, ceiling))
        line(f'  drain with {million["old_rows"]:,} old rows in the log', rate(drain), ratio(drain, ceiling))
        line('    of the empty-table drain', f'{million["ratio"]:.0%}')
        if million.get('ratio_at_equal_speed') is not None:
            line('    the same at equal machine speed (see README)',
                 f'{million["ratio_at_equal_speed"]:.0%}')
        line(f'  (inserting them and VACUUM ANALYZE took {million["insert_and_vacuum_s"]:.0f}s)', '')
        line(f'  monitor GET as staff, median ms: empty log -> {million["old_rows"]:,} old rows', '')
        for label, ms in million['monitor_ms'].items():
            line(f'    {label}', f'{million["monitor_ms_empty"][label]:.0f} -> {ms:.0f} ms')
    print('\n'.join(lines))
    print('(vs raw pika: carrot / ceiling -- for rates higher is better, for latencies lower)')


def machine_facts(postgres_version: str) -> dict:
    import django
    rabbitmq = rabbitmqctl('version').stdout.strip() or '?'
    return {'cpus': os.cpu_count(), 'python': sys.version.split()[0], 'django': django.get_version(),
            'postgresql': postgres_version, 'rabbitmq': rabbitmq}


# -- the run ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='scripts/bench', description='carrot beside a raw pika ceiling, one run on this machine.')
    parser.add_argument('--messages', type=int, default=None, help='tasks per drain and publish (default 5000)')
    parser.add_argument('--only', help=f'comma-separated rows: {",".join(ALL_ROWS)}')
    parser.add_argument('--json', help='where the results go (default: bench-results.json in the run directory)')
    parser.add_argument('--million', action='store_true', help='also row 9: 1,000,000 old rows in the log')
    parser.add_argument('--scaling', action='store_true', help='also row 8: 1, 2 and 4 consumer children')
    parser.add_argument('--quick', action='store_true', help='tiny numbers, for the smoke test')
    parser.add_argument('--batched-floor', action='store_true',
                        help='with the raw row: also the logged floor with every delivery in hand claimed in one '
                             "statement (the floor of carrot's claiming ahead)")
    parser.add_argument('--no-claim-ahead', action='store_true',
                        help="carrot with CARROT['claim_ahead'] False in every row: one claim a task")
    parser.add_argument('--rounds', type=int, default=None,
                        help="samples of the raw drain and of the track='all' drain, taken in turn; each figure "
                             "is the median of its samples (default 3, 1 with --quick)")
    parser.add_argument('--prefetch', type=int, default=None,
                        help="the 'prefetch' of carrot's queue in every row, and of the raw ceiling's consumers "
                             "(default: CARROT's default)")
    parser.add_argument('--queue-version', type=int, choices=(1, 2), default=None,
                        help="classic queues' storage version in the bench's virtual host, by policy, raw "
                             "ceiling included (default: the broker's own; RabbitMQ 3.x makes version 1)")
    parser.add_argument('--vhost', default='carrot-bench', help='the RabbitMQ virtual host made (and dropped) here')
    parser.add_argument('--database', default='carrot_bench',
                        help='the PostgreSQL database made (and dropped) here')
    args = parser.parse_args(argv)
    if args.only:
        args.rows = {name.strip() for name in args.only.split(',') if name.strip()}
        unknown = args.rows - set(ALL_ROWS)
        if unknown:
            parser.error(f'unknown rows {", ".join(sorted(unknown))}; the rows are {", ".join(ALL_ROWS)}')
    else:
        args.rows = set(DEFAULT_ROWS) | ({'million'} if args.million else set()) | \
            ({'scaling'} if args.scaling else set())
    quick = args.quick
    args.messages = args.messages or (60 if quick else 5000)
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    args.latency_calls, args.spacing = (20, 0.02) if quick else (200, 0.02)
    args.kills = 2 if quick else 5
    args.memory_tasks = 200 if quick else 6000
    args.old_rows = 10_000 if quick else 1_000_000
    args.postgres_commits = 50 if quick else 500
    global PREFETCH
    if args.prefetch is None:
        try:
            from carrot.config.schema import DEFAULT_PREFETCH as carrot_default
        except ImportError:  # a carrot from before the key: it holds one delivery
            carrot_default = 1
        args.prefetch = carrot_default
    PREFETCH = args.prefetch
    os.environ['CARROT_DEMO_PREFETCH'] = str(args.prefetch)  # read by the demo settings, in every supervisor
    if args.no_claim_ahead:
        os.environ['CARROT_DEMO_CLAIM_AHEAD'] = '0'
    return args


def run_rows(args, run_dir: str) -> dict:
    url = bench_broker()
    rows = {}
    if 'raw' in args.rows:
        rows['raw'] = raw_row(url, args.messages, args.latency_calls, args.spacing, args.postgres_commits,
                              args.batched_floor)
    single, single_rounds = None, None
    if 'drain' in args.rows:
        rows['drain'], single = drain_row(run_dir, args.messages)
    if args.rounds > 1 and args.rows & {'raw', 'drain'}:
        publishes = more_rounds(rows, run_dir, url, args.messages, args.rounds)
        if single is not None and publishes:
            samples = [single, *publishes]
            single, single_rounds = median_publish(samples), [rate for rate, _ in samples]
    if 'failures' in args.rows:
        rows['failures'] = failures_row(run_dir, args.messages)
    if 'publish' in args.rows:
        if single is None:
            reset_log_and_queue()
            single = publish_single_and_cpu(args.messages)
        single_rate, single_cpu = single
        rows['publish'] = {'messages': args.messages, 'single_per_s': single_rate,
                           'single_cpu_us_per_call': single_cpu, 'single_rounds_per_s': single_rounds,
                           'bulk_per_s': publish_bulk_row(args.messages)}
    if args.rows & {'latency', 'respawn'}:
        rows.update(latency_and_respawn(run_dir, args.latency_calls, args.spacing, args.kills, args.rows))
    if 'memory' in args.rows:
        rows['memory'] = memory_row(run_dir, args.memory_tasks)
    if 'scaling' in args.rows:
        rows['scaling'] = scaling_row(run_dir, args.messages, rows)
    if 'million' in args.rows:
        rows['million'] = million_row(run_dir, args.messages, args.old_rows)
    return rows


def cpu_ticks() -> list[int] | None:
    """The clock ticks of every CPU since boot, from /proc/stat's first line (user nice system idle iowait
    irq softirq steal guest guest_nice: guest time is counted in user too); None where there is none."""
    try:
        with open('/proc/stat') as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields + [0] * (8 - len(fields))


def cpu_times() -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU since boot."""
    fields = cpu_ticks()
    return None if fields is None else (fields[7], sum(fields[:8]))


def cpu_busy_ticks() -> int | None:
    """Clock ticks every CPU has spent busy since boot (all but idle, iowait and steal)."""
    fields = cpu_ticks()
    return None if fields is None else sum(fields[:3]) + fields[5] + fields[6]


def steal_share(start, end) -> float | None:
    """The share of CPU time the hypervisor gave to other machines during the run: on a shared host it
    moves every figure more than the load average shows."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def leave_on_term(signum, frame):
    # TERM (a CI timeout, `kill`) unwinds like Ctrl-C: the finally blocks stop the supervisor and drop
    # the virtual host and the database.
    print(f'bench: stopped by signal {signum}; cleaning up', file=sys.stderr)
    raise SystemExit(128 + signum)


def compile_bytecode() -> None:
    """Bytecode for carrot, its supervisor and the demo project, as an installed carrot has it (pip compiles
    what it installs). A checkout run with PYTHONDONTWRITEBYTECODE set, as this repository's machines have
    it, compiles each of those modules again in every process that imports them: measured here, 35 of the
    master's 85 ms of imports and 50 ms of the image's build, at every supervisor start. A tree that cannot
    be written is left as it is (and measured so)."""
    import compileall
    for directory in (os.path.join(ROOT, 'carrot'), os.path.join(ROOT, 'supervisor'), PROJECT):
        compileall.compile_dir(directory, quiet=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, leave_on_term)
    started = time.monotonic()
    compile_bytecode()
    # Other work on the machine moves every figure: the report says how busy it was.
    load_at_start = os.getloadavg()[0]
    cpu_at_start = cpu_times()
    run_dir = tempfile.mkdtemp(prefix='carrot-bench-')
    json_path = os.path.abspath(args.json or os.path.join(run_dir, 'bench-results.json'))
    create_vhost(args.vhost)
    try:
        if args.queue_version is not None:
            set_queue_version(args.vhost, args.queue_version)
        postgres_version = create_database(args.database)
        try:
            setup_django(run_dir, args.vhost, args.database)
            machine = machine_facts(postgres_version)
            rows = run_rows(args, run_dir)
        finally:
            drop_database(args.database)
    finally:
        drop_vhost(args.vhost)
    results = {'machine': machine, 'options': {'messages': args.messages, 'rows': sorted(args.rows),
                                               'queue_version': args.queue_version,
                                               'quick': args.quick, 'prefetch': PREFETCH, 'children': CHILDREN,
                                               'rounds': args.rounds, 'claim_ahead': not args.no_claim_ahead},
               'wall_time_s': time.monotonic() - started, 'run_dir': run_dir,
               'load_average': {'start': load_at_start, 'end': os.getloadavg()[0]},
               'steal_share': steal_share(cpu_at_start, cpu_times()), 'rows': rows}
    with open(json_path, 'w') as f:
        json.dump(results, f, indent=2, default=str)
    print_table(results)
    print(f'\nresults: {json_path}\nsupervisor logs: {run_dir}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f'bench: {exc}')
