"""carrot.statements against a real PostgreSQL: a statement prepared once per connection keeps working when
the server loses it (a pooler, DISCARD ALL), when a migration changes what it returns, and when two versions
of carrot (two texts under one name) share a session, and when something outside the database interrupts
it; elsewhere the statement runs as it is."""
import signal
import time
from contextlib import contextmanager
from datetime import datetime, timezone as dt_timezone

import pytest
from django.db import connection, connections, transaction
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from carrot.statements import Statement

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def table():
    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE carrot_statement_test (id integer PRIMARY KEY, name varchar(20))')
        cursor.execute("INSERT INTO carrot_statement_test VALUES (1, 'one'), (2, 'two')")
    yield 'carrot_statement_test'
    with connection.cursor() as cursor:
        cursor.execute('DROP TABLE IF EXISTS carrot_statement_test')


def prepared_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute('SELECT name FROM pg_prepared_statements')
        return {row[0] for row in cursor.fetchall()}


def postgres_only():
    if connection.vendor != 'postgresql':
        pytest.skip('PREPARE is PostgreSQL (CARROT_TEST_DB=postgres)')


def test_a_statement_is_prepared_once_and_then_executed(table):
    postgres_only()
    rename = Statement('rename', f'UPDATE {table} SET name = %s WHERE id = %s RETURNING name')
    assert rename.run(['uno', 1], fetch=True) == ('uno',)
    assert rename.prepared_name in prepared_names()
    assert rename.run(['eins', 1], fetch=True) == ('eins',)
    assert rename.run(['zwei', 2]) == 1


def test_a_session_that_lost_its_statements_runs_them_plain_from_then_on(table):
    postgres_only()
    rename = Statement('rename', f'UPDATE {table} SET name = %s WHERE id = %s')
    assert rename.run(['uno', 1]) == 1
    with connection.cursor() as cursor:
        cursor.execute('DEALLOCATE ALL')  # what a pooler in transaction mode or DISCARD ALL amounts to
    assert rename.run(['eins', 1]) == 1  # not an error: the plain statement
    assert rename.run(['one', 1]) == 1
    assert rename.prepared_name not in prepared_names()  # and no new PREPARE on that connection


def test_a_migration_that_changes_the_result_type_costs_one_plain_run(table):
    postgres_only()
    read = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    assert read.run([1], fetch=True) == ('one',)
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE {table} ALTER COLUMN name TYPE text')  # "cached plan must not change"
    assert read.run([1], fetch=True) == ('one',)
    assert read.run([2], fetch=True) == ('two',)
    assert read.prepared_name in prepared_names()  # prepared afresh


def test_two_texts_never_share_a_name_and_an_existing_one_is_used(table):
    postgres_only()
    old = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    new = Statement('read', f'SELECT id FROM {table} WHERE name = %s')
    assert old.prepared_name != new.prepared_name
    assert old.run([1], fetch=True) == ('one',)
    assert new.run(['two'], fetch=True) == (2,)
    again = Statement('read', f'SELECT name FROM {table} WHERE id = %s')  # another client, the same text
    assert again.run([2], fetch=True) == ('two',)  # PREPARE says it exists: used as it is


def test_inside_a_transaction_nothing_is_prepared(table):
    postgres_only()
    read = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    with transaction.atomic():
        assert read.run([1], fetch=True) == ('one',)
        assert read.prepared_name not in prepared_names()


def test_elsewhere_the_statement_runs_as_it_is(table):
    if connection.vendor == 'postgresql':
        pytest.skip('the other databases')
    read = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    assert read.run([2], fetch=True) == ('two',)


# --- send now, read later (Statement.send: the publisher's INSERT while RabbitMQ confirms) ---------------

def test_a_statement_is_sent_early_only_once_prepared_and_answers_as_run_does(table):
    postgres_only()
    rename = Statement('rename', f'UPDATE {table} SET name = %s WHERE id = %s RETURNING name')
    assert rename.send(['uno', 1], fetch=True) is None  # not prepared on this connection yet: run() it
    assert rename.run(['uno', 1], fetch=True) == ('uno',)
    in_flight = rename.send(['eins', 1], fetch=True)
    assert in_flight is not None
    assert in_flight.result() == ('eins',)
    assert rename.send(['nobody', 99], fetch=True).result() is None  # no row: as run() says
    count = Statement('count', f'UPDATE {table} SET name = name WHERE id > %s')
    count.run([0])
    assert count.send([0]).result() == 2  # the rows changed, without fetch
    with connection.cursor() as cursor:  # the connection is as usable as before
        cursor.execute(f'SELECT name FROM {table} WHERE id = 1')
        assert cursor.fetchone() == ('eins',)


def test_a_statement_lost_before_it_was_sent_early_is_run_plain(table):
    postgres_only()
    rename = Statement('rename', f'UPDATE {table} SET name = %s WHERE id = %s RETURNING name')
    rename.run(['uno', 1], fetch=True)
    with connection.cursor() as cursor:
        cursor.execute('DEALLOCATE ALL')
    assert rename.send(['eins', 1], fetch=True).result() == ('eins',)  # EXECUTE failed; the plain one ran
    assert rename.send(['one', 1], fetch=True) is None  # and this connection prepares nothing any more


def test_an_error_sent_early_is_raised_as_django_raises_it_and_the_connection_goes_on(table):
    postgres_only()
    from django.db import IntegrityError
    insert = Statement('insert', f'INSERT INTO {table} VALUES (%s, %s) RETURNING id')
    assert insert.run([3, 'three'], fetch=True) == (3,)
    with pytest.raises(IntegrityError):
        insert.send([1, 'one again'], fetch=True).result()  # the primary key: the statement's own refusal
    # is raised at once (no plain run to meet it again), and the statement stays prepared.
    assert insert.send([4, 'four'], fetch=True).result() == (4,)
    with pytest.raises(IntegrityError):
        insert.run([1, 'one again'], fetch=True)  # run() alike
    assert insert.send([5, 'five'], fetch=True).result() == (5,)
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*) FROM {table}')
        assert cursor.fetchone() == (5,)


def test_nothing_is_sent_early_in_a_transaction_or_while_queries_are_watched(table):
    postgres_only()
    from django.test.utils import CaptureQueriesContext
    read = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    read.run([1], fetch=True)
    with transaction.atomic():
        assert read.send([1], fetch=True) is None
    with CaptureQueriesContext(connection):  # DEBUG's query log: Django's cursor must see it
        assert read.send([1], fetch=True) is None
    with connection.execute_wrapper(lambda execute, *args: execute(*args)):
        assert read.send([1], fetch=True) is None
    assert read.send([1], fetch=True).result() == ('one',)


class Interrupted(Exception):
    """What a time limit's signal handler raises in the middle of a query (a SIGALRM timeout, a soft limit)."""


@contextmanager
def interrupted_after(seconds: float):
    def interrupt(signum, frame):
        raise Interrupted()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rows_with_id(table: str, row_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*) FROM {table} WHERE id = %s', [row_id])
        return cursor.fetchone()[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('prepared', [True, False], ids=['executed', 'being-prepared'])
def test_a_statement_interrupted_from_outside_the_database_is_raised_as_it_is_and_never_run_again(table, prepared):
    """The server may commit an interrupted INSERT or not; nobody can tell, so it is not run plain after the
    EXECUTE as a refused one is (that would be a second INSERT on a connection still busy with the first:
    'another command is already in progress' in place of the caller's own exception). The connection still
    busy is closed, and the next query opens another."""
    postgres_only()
    slow_insert = Statement('slow_insert', f'INSERT INTO {table} SELECT %s, %s FROM pg_sleep(%s) RETURNING id')
    if prepared:
        assert slow_insert.run([3, 'three', 0], fetch=True) == (3,)
    else:  # interrupted while it is being prepared: PREPARE waits for the table's lock
        holder = connections.create_connection('default')  # a second session, not the test's
        holder.connect()
        holder.set_autocommit(False)
        with holder.cursor() as cursor:
            cursor.execute(f'LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE')
    try:
        started = time.monotonic()
        with pytest.raises(Interrupted), interrupted_after(0.2):
            slow_insert.run([4, 'four', 1], fetch=True)
        assert time.monotonic() - started < 0.9, 'the interrupt waited for the statement'
    finally:
        if not prepared:
            holder.rollback()
            holder.close()
    assert rows_with_id(table, 1) == 1  # the connection answers as before
    if prepared:  # the server finishes the INSERT it had: once, whatever the client did
        deadline = time.monotonic() + 10
        while rows_with_id(table, 4) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rows_with_id(table, 4) == 1
    else:
        assert rows_with_id(table, 4) == 0  # never prepared, never run
    assert slow_insert.run([5, 'five', 0], fetch=True) == (5,)  # prepared afresh on the new connection
    assert slow_insert.prepared_name in prepared_names()


@pytest.mark.parametrize('watched', [False, True], ids=['past-the-cursor', 'through-the-cursor'])
def test_a_statement_commits_as_asked_whatever_the_session_was_set_to(table, watched):
    """run() passes Django's cursor by where nobody watches (the same round trip, a third less time) and
    goes through it where someone does (DEBUG's query log): either way a write that must wait for the disk
    waits as the server is configured to, even on a session a task set to `synchronous_commit off`, and one
    that need not, does not."""
    postgres_only()
    from contextlib import nullcontext
    from django.test.utils import CaptureQueriesContext
    setting = Statement('setting', "SELECT current_setting('synchronous_commit') || %s")
    setting.run(['', ], fetch=True)  # prepared
    with connection.cursor() as cursor:
        cursor.execute('SET synchronous_commit TO off')  # what a task may do to the connection it shares
    with CaptureQueriesContext(connection) if watched else nullcontext() as seen:
        assert setting.run(['!'], fetch=True, wait_for_disk=True) == ('on!',)
        assert setting.run(['?'], fetch=True) == ('off?',)
    if watched:
        assert [q['sql'] for q in seen.captured_queries][0].startswith('SET LOCAL synchronous_commit TO DEFAULT')
    with connection.cursor() as cursor:
        cursor.execute('RESET synchronous_commit')


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # interrupts landing in __del__
def test_a_keyboard_interrupt_on_a_refused_statement_never_leaves_a_closed_connection_behind(table):
    """Ctrl-C while the database refuses a statement (here a duplicate key): psycopg cancels the query,
    meets the refusal instead of the cancellation, and closes its connection itself. Django's wrapper must
    not keep holding it, or the caller's next query fails with 'the connection is closed'."""
    postgres_only()
    import random
    from django.test.utils import CaptureQueriesContext
    duplicate = Statement('duplicate', f'INSERT INTO {table} VALUES (%s, %s) RETURNING id')

    armed = [False]

    def interrupt(signum, frame):
        if armed[0]:  # a signal handled after the call is over interrupts nothing of it
            armed[0] = False
            raise KeyboardInterrupt()

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted, broken = 0, []
    try:
        for attempt in range(600):
            with CaptureQueriesContext(connection):  # watched: through Django's cursor
                try:
                    try:
                        armed[0] = True
                        signal.setitimer(signal.ITIMER_REAL, random.randint(1, 800) / 1e6)
                        duplicate.run([1, 'one again'], fetch=True)
                    finally:
                        armed[0] = False
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except KeyboardInterrupt:
                    interrupted += 1
                except Exception:  # noqa: BLE001 -- the refusal itself, when the interrupt came late
                    pass
            try:
                assert rows_with_id(table, 1) == 1
            except Exception as exc:  # noqa: BLE001
                broken.append(f'{type(exc).__name__}: {exc}')
                connection.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 50, f'only {interrupted} interrupts landed'
    assert broken == [], f'{len(broken)} of 600 next queries failed, e.g. {broken[0]}'


@pytest.mark.parametrize('watched', [False, True], ids=['past-the-cursor', 'through-the-cursor'])
def test_a_lock_timeout_is_waited_once_not_twice(table, watched):
    """A refusal that is the statement's own (a lock timeout) is raised at once: running the plain statement
    after it would only wait the whole timeout again."""
    postgres_only()
    from contextlib import nullcontext
    from django.db import OperationalError
    from django.test.utils import CaptureQueriesContext
    rename = Statement('rename', f'UPDATE {table} SET name = %s WHERE id = %s')
    rename.run(['uno', 1])
    holder = connections.create_connection('default')
    holder.connect()
    holder.set_autocommit(False)
    with holder.cursor() as cursor:
        cursor.execute(f'SELECT * FROM {table} WHERE id = 1 FOR UPDATE')
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '500ms'")
        started = time.monotonic()
        with CaptureQueriesContext(connection) if watched else nullcontext():
            with pytest.raises(OperationalError, match='lock timeout'):
                rename.run(['eins', 1])
        assert time.monotonic() - started < 0.9, 'the timeout was waited twice'
    finally:
        holder.rollback()
        holder.close()
        with connection.cursor() as cursor:
            cursor.execute('RESET lock_timeout')
    assert rename.prepared_name in prepared_names()  # kept: the statement was fine
    assert rename.run(['eins', 1]) == 1


def test_a_prepare_refused_for_the_sessions_sake_is_tried_again_later(table):
    """A caller's transaction begun by hand that has failed refuses the PREPARE as it refuses everything:
    that says nothing of the statement, so once the caller has rolled back it is prepared after all."""
    postgres_only()
    from django.db import InternalError
    read = Statement('read', f'SELECT name FROM {table} WHERE id = %s')
    with connection.cursor() as cursor:
        cursor.execute('BEGIN')
        with pytest.raises(Exception):
            cursor.execute('SELECT 1/0')
    try:
        with pytest.raises(InternalError):
            read.run([1], fetch=True)
    finally:
        with connection.cursor() as cursor:
            cursor.execute('ROLLBACK')
    assert read.run([1], fetch=True) == ('one',)
    assert read.prepared_name in prepared_names()


# -- the query text built without psycopg's mogrify (literal_query) -------------------------------------

_PLAIN_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
    st.text().filter(lambda text: '\x00' not in text),
    st.text(alphabet="'\\\"%$_\n\t;()E ", max_size=12),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.one_of(st.none(), st.just(dt_timezone.utc), st.timezones())))


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_PLAIN_VALUES, min_size=1, max_size=6))
def test_a_query_built_from_literals_reads_back_as_psycopg_would_send_it(values):
    """literal_query() fills parameters in without psycopg's cursor: for any value of the kinds it takes
    (quotes, backslashes, E'', dollar signs, any unicode, extreme integers, naive and aware datetimes),
    PostgreSQL must read the same values as from mogrify()'s text of the same query."""
    _read_back_as_from_mogrify(values)


def _read_back_as_from_mogrify(values: list) -> None:
    postgres_only()
    from carrot.statements import literal_query
    connection.ensure_connection()
    raw = connection.connection
    # As carrot runs its statements: EXECUTE of a prepared one, whose parameters have types of their own.
    types = ', '.join(_pg_type(value) for value in values)
    raw.execute(f"PREPARE literals({types}) AS SELECT {', '.join(f'${n + 1}' for n in range(len(values)))}")
    try:
        text = f"EXECUTE literals({', '.join('%s' for _ in values)})"
        built = literal_query(text, values, raw)
        assert built is not None
        with raw.cursor() as cursor:
            cursor.execute(text, values)  # mogrify's text, as before
            expected = cursor.fetchone()
        got = raw.execute(built.decode(raw.info.encoding)).fetchone()  # no parameters: sent as it is
    finally:
        raw.execute('DEALLOCATE literals')
    assert got == expected


_TEXTS = st.one_of(st.text().filter(lambda text: '\x00' not in text), st.text(alphabet="'\\\"{},%$ \nNUL", max_size=8))
_ARRAYS = st.one_of(
    st.lists(st.one_of(st.none(), _TEXTS), max_size=6),
    st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), max_size=6),
    st.lists(st.one_of(st.none(), st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                                               timezones=st.just(dt_timezone.utc))), max_size=6))


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(_ARRAYS, _PLAIN_VALUES), min_size=1, max_size=4))
def test_arrays_built_from_literals_read_back_as_psycopg_would_send_them(values):
    """The arrays of a window's claims (carrot.consume.ahead) -- any text (quotes, backslashes, braces, commas,
    'NULL'), extreme integers, times, NULL elements, empty arrays -- read by PostgreSQL as from mogrify()."""
    _read_back_as_from_mogrify(values)


def _pg_type(value) -> str:
    if isinstance(value, list):
        kinds = {_pg_type(element) for element in value if element is not None}
        return f'{kinds.pop() if kinds else "text"}[]'
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, int):
        return 'bigint'
    if isinstance(value, datetime):
        return 'timestamptz' if value.tzinfo else 'timestamp'
    return 'text'


def test_a_query_with_what_literals_cannot_say_is_left_to_mogrify():
    postgres_only()
    from decimal import Decimal
    from carrot.statements import literal_query
    connection.ensure_connection()
    raw = connection.connection
    assert literal_query('SELECT %s', [Decimal('1.5')], raw) is None
    assert literal_query('SELECT %s', ['a\x00b'], raw) is None  # mogrify raises PostgreSQL's reason
    assert literal_query("SELECT %s, '100%%'", ['a'], raw) is None
    assert literal_query('SELECT %s, %s', ['a'], raw) is None
    assert literal_query('SELECT %s', ["it's"], raw) == b"SELECT 'it''s'"
