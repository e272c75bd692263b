"""carrot.statements against a real PostgreSQL: a statement prepared once per connection keeps working when
the server loses it (a pooler, DISCARD ALL), when a migration changes what it returns, and when two versions
of carrot (two texts under one name) share a session; elsewhere the statement runs as it is."""
import pytest
from django.db import connection, transaction

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
