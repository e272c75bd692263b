"""Tasks the tests publish. Every function here is registered (an installed app's tasks module)."""
import logging
import os
import time

logger = logging.getLogger('carrot')


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return {'args': list(args), 'kwargs': kwargs}


def chatty(name):
    logger.info('hello %s', name)
    logger.warning('careful, %s', name)
    return 'done'


def returns_object():
    return object()


def collector_state():
    """What the garbage collector of the worker running it looks like: on, and the image's heap frozen."""
    import gc
    return {'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count()}


def explode(message='boom'):
    raise ValueError(message)


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def die():
    """Kill the worker process mid-task, as an OOM kill or a segfault would."""
    os._exit(17)


def append_line(path, text):
    with open(path, 'a') as f:
        f.write(text + '\n')
    return text


def die_once(marker):
    """Die the first time (leaving `marker` behind), succeed on the redelivery."""
    if not os.path.exists(marker):
        open(marker, 'w').close()
        os._exit(17)
    return 'survived'


# -- for the supervisor tests (tests/test_supervisor*.py) --

_HOARD = []


def slow_once(marker, seconds):
    """Sleep `seconds` the first time (leaving `marker` behind); return at once on a redelivery."""
    if not os.path.exists(marker):
        open(marker, 'w').close()
        time.sleep(seconds)
        return 'slow'
    return 'fast'


def hog(megabytes):
    """Allocate `megabytes` MiB, touch every page, and keep it for the life of the process."""
    _HOARD.append(b'\x01' * (megabytes * 1024 * 1024))
    return megabytes


def backend_pid(pause=0.0):
    """The PostgreSQL server process serving this worker's database connection."""
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute('select pg_backend_pid()')
        pid = cursor.fetchone()[0]
    time.sleep(pause)
    return pid


# -- monitor (tests/test_monitor_browser.py) --

_monitor_logger = logging.getLogger('carrot.monitor_test')
_monitor_logger.setLevel(logging.DEBUG)  # so the captured task log has a DEBUG line to reveal


def log_levels(name):
    """Log at four levels, return markup that the monitor must show as text."""
    _monitor_logger.debug('debug detail for %s', name)
    _monitor_logger.info('hello %s', name)
    _monitor_logger.warning('careful, %s', name)
    _monitor_logger.error('something odd about %s', name)
    return '<script>alert(1)</script>'


def fail_unless_exists(path):
    """Fail until `path` exists (a requeue after creating it succeeds)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} is not there yet')
    return 'found it'


# -- supervisor (warm image, hung children) ---------------------------------------------------------

def hold_the_gil(seconds=30):
    """Keep the interpreter's lock for about `seconds` without running a bytecode: no other thread of
    the worker (its broker connection, its heartbeats) gets to run -- a hang as the master sees it."""
    import re
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        re.match(r'(a+)+$', 'a' * 28 + 'b')  # catastrophic backtracking, all in C, GIL held
    return 'done'
# -- consume (tests/test_processing.py, tests/test_claim.py) --

def append_and_sleep(path, text, seconds):
    """Record one execution in `path`, then take `seconds` (so a second delivery arrives meanwhile)."""
    with open(path, 'a') as f:
        f.write(text + '\n')
    time.sleep(seconds)
    return text


def returns_text(text, times=1):
    """Return `text` repeated `times` times (oversize or unstorable output)."""
    return text * times


def logs_a_lot(lines, width=100):
    for n in range(lines):
        logger.info('%d %s', n, 'x' * width)
    return lines


def raises_weird(text):
    """Raise an exception whose message carries `text` (control characters, NUL ...)."""
    raise RuntimeError(text)


def takes_the_log_table_away(path):
    """Record one execution, then rename carrot's log table, as if the database went away just after
    the task ran (tests/test_processing.py renames it back)."""
    from django.db import connection
    with open(path, 'a') as f:
        f.write('ran\n')
    with connection.cursor() as cursor:
        cursor.execute('ALTER TABLE carrot_messagelog RENAME TO carrot_messagelog_away')
    return 'done'


def returns_deep(depth):
    """Return lists nested `depth` deep (built without recursion): too deep for json.dumps and repr."""
    value = []
    for _ in range(depth):
        value = [value]
    return value


# -- attack (tests/test_hostile*.py, scripts/chaos) --
# Below: things that are NOT tasks (issue 6 §2). Each leaves a marker file or directory behind if it is
# ever run, so a test can prove a message naming it ran nothing.

def _touch(marker):
    open(marker, 'a').close()


class NotATask:
    """A class: calling it runs __init__."""
    def __init__(self, marker, *args, **kwargs):
        _touch(marker)


class _CallableThing:
    def __call__(self, marker, *args, **kwargs):
        _touch(marker)


callable_instance = _CallableThing()


def _private_touch(marker, *args, **kwargs):
    _touch(marker)


def _wrap(func):
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


make_dir = _wrap(os.mkdir)  # a wrapper built here around an imported function


def record_execution(path, token, seconds=0.0):
    """A real task for the chaos runs: append one line per execution (so duplicates are counted, not
    assumed), optionally after working for `seconds`. O_APPEND writes of one short line do not interleave."""
    if seconds:
        time.sleep(seconds)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f'{token} {os.getpid()}\n'.encode())
    finally:
        os.close(fd)
    return token


def record_then_fail(path, token, seconds=0.0):
    """Record the execution, take `seconds`, then fail (no retry: dead-lettered, it counts as settled)."""
    record_execution(path, token, seconds)
    raise ValueError(f'{token} fails on purpose')


def record_and_die(path, token):
    """Record the execution, then kill the worker mid-task (before the ack)."""
    record_execution(path, token)
    os._exit(17)


def spawn_lingering_child(path, token, linger, then_sleep=0.0):
    """Start a multiprocessing child (forked: it inherits the worker's sockets) that outlives the task."""
    import multiprocessing
    child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(linger,), daemon=False)
    child.start()
    record_execution(path, token)
    if then_sleep:
        time.sleep(then_sleep)
    return child.pid


def log_at_every_level(marker):
    """Log through the documented task logger, setting no level of its own (what a user's task does)."""
    task_logger = logging.getLogger('carrot')
    task_logger.debug('debug %s', marker)
    task_logger.info('info %s', marker)


def log_to(name, marker):
    """Log a debug and an info line to logger `name` (a task's own logger, under 'carrot' or not)."""
    logging.getLogger(name).debug('debug %s', marker)
    logging.getLogger(name).info('info %s', marker)


# -- tasks that misbehave (issue 14, tests/test_hostile_tasks.py) --

class NotAnException(BaseException):
    """A BaseException of a task's own, outside Exception."""


def raises_base(kind, path=None):
    """Raise a BaseException that is not an Exception, after recording the execution in `path`."""
    if path:
        record_execution(path, kind)
    if kind == 'KeyboardInterrupt':
        raise KeyboardInterrupt('pressed in a task')
    if kind == 'GeneratorExit':
        raise GeneratorExit('closed in a task')
    if kind == 'SystemExit':
        raise SystemExit(3)
    if kind == 'custom':
        raise NotAnException('a BaseException of its own')
    raise ValueError(kind)


def leaves_transaction(kind, username):
    """Write a user row, then return with the task's database connection left in a transaction."""
    from django.contrib.auth.models import User
    from django.db import connection, transaction
    if kind == 'begin':
        connection.cursor().execute('BEGIN')
    elif kind == 'atomic':
        transaction.atomic().__enter__()
    elif kind == 'nested':
        transaction.atomic().__enter__()
        transaction.atomic().__enter__()
    elif kind == 'autocommit':
        transaction.set_autocommit(False)
    elif kind == 'broken':
        transaction.atomic().__enter__()
        try:
            with connection.cursor() as cursor:
                cursor.execute('SELECT * FROM no_such_table_at_all')
        except Exception:
            pass
    elif kind == 'interrupted':
        # The task's own timeout (a signal handler's exception) came inside atomic()'s entry, after Django
        # turned the driver's autocommit off and before its own flag: nothing written since, so no
        # transaction is open yet -- the next statement on the connection opens one.
        connection.ensure_connection()
        connection._set_autocommit(False)
        return kind
    else:
        raise ValueError(kind)
    if kind != 'broken':
        User.objects.create(username=username)
    return kind


def sets_session_read_only():
    """Set the database session this task shares with carrot read-only, and leave it so (PostgreSQL)."""
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute('SET default_transaction_read_only TO on')
    return 'read-only'


def fork_and_return(path, linger, how='fork'):
    """Start a process that outlives the task, and return at once. `how`: fork (a copy of the worker,
    holding its sockets), daemon (double fork + setsid, as a daemon does), exec (a new program in a
    session of its own), or both (the forked copy returns from the task too, as the worker does). The
    started process writes its pid to `path`."""
    import subprocess
    import sys
    if how == 'exec':
        process = subprocess.Popen([sys.executable, '-c', 'import os, sys, time; '
                                    'open(sys.argv[1], "a").write(f"{os.getpid()}\\n"); time.sleep(float(sys.argv[2]))',
                                    path, str(linger)], start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return process.pid
    pid = os.fork()
    if pid == 0 and how == 'both':  # the copy returns from the task as the worker does
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f'{os.getpid()}\n'.encode())
        os.close(fd)
        return 'the copy'
    if pid == 0:
        try:
            if how == 'daemon':
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f'{os.getpid()}\n'.encode())
            os.close(fd)
            time.sleep(linger)
        finally:
            os._exit(0)
    if how == 'daemon':
        os.waitpid(pid, 0)
    time.sleep(0.3)
    return pid


def fork_and_work(path, linger, seconds):
    """Fork a lingering copy (its pid in `path`), then keep working for `seconds`."""
    fork_and_return(path, linger)
    time.sleep(seconds)
    return seconds


def stamp(path, label):
    """Append "<label> <unix time>" to `path`: when the task ran, for the delay tests."""
    with open(path, 'a') as f:
        f.write(f'{label} {time.time():.3f}\n')
    return label


# -- for the retry tests (tests/test_retries.py) --

import carrot  # noqa: E402


def _count_run(path):
    with open(path, 'a') as f:
        f.write(f'{time.time():.3f}\n')
    with open(path) as f:
        return len(f.read().splitlines())


@carrot.task(max_retries=3, retry_backoff=1, retry_backoff_max=30, retry_on=(OSError,))
def flaky(path, failures):
    """Raise OSError the first `failures` runs (each run appends its time to `path`), then succeed."""
    runs = _count_run(path)
    if runs <= failures:
        raise OSError(f'flaky run {runs}')
    return runs


@carrot.task(max_retries=2, retry_backoff=1, retry_on=(OSError,))
def wrong_kind(path):
    """Raises what its retry_on does not cover: failed at once."""
    _count_run(path)
    raise KeyError('not retried')


def asks_again(path, times, delay=1):
    """A plain task (no retry options) that raises carrot.Retry the first `times` runs."""
    runs = _count_run(path)
    if runs <= times:
        raise carrot.Retry('not yet', delay=delay)
    return runs


# -- a task's bad log calls and a result that is not JSON (tests/test_hostile_tasks.py) --

class _Unprintable:
    def __str__(self):
        raise RuntimeError('no str for you')

    __repr__ = __str__


def logs_badly():
    """Log calls that cannot be formatted: the task must still succeed, the line kept saying so."""
    logger = logging.getLogger('carrot')
    logger.info('first fine line')
    logger.info('two placeholders %s %s', 'only one')
    logger.warning('an argument that cannot be shown: %s', _Unprintable())
    logger.error(_Unprintable())
    logger.info('last fine line')
    return 'done'


def returns_not_json(kind):
    """NaN, an infinity, or one inside a list: Python's json writes them, a strict JSON reader refuses them."""
    from decimal import Decimal
    return {'nan': float('nan'), 'inf': float('inf'), 'list': [1.0, float('-inf')],
            'decimal': Decimal('1E+400')}[kind]
