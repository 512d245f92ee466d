"""The PostgreSQL backend (medcor_backend2/postgresql): a health check without a round trip while quiet.

Against the test run's PostgreSQL server: a connection the server terminated is replaced before a
request uses it, and a quiet one is kept without `SELECT 1`.
"""

from unittest import mock

import psycopg
import pytest
from django.conf import settings
from django.db import connections

from medcor_backend2.postgresql.base import DatabaseWrapper, is_quiet

from .conftest import require_postgresql, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def postgres():
    require_postgresql()
    connection = connections["default"]
    assert isinstance(connection, DatabaseWrapper)
    connection.ensure_connection()
    # As a request starts: a persistent connection, its health not yet checked.
    connection.health_check_enabled = True
    connection.health_check_done = False
    yield connection
    connection.close()


def _server(statement, *params):
    db = settings.DATABASES["default"]
    dsn = f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} user={db['USER']} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as other:
        return other.execute(statement, params).fetchall()


def test_a_quiet_connection_is_kept_without_a_query(postgres):
    raw = postgres.connection
    assert is_quiet(raw)
    with mock.patch.object(DatabaseWrapper, "is_usable", side_effect=AssertionError("SELECT 1 sent")):
        postgres.close_if_health_check_failed()
    assert postgres.connection is raw
    assert postgres.health_check_done


def test_a_connection_the_server_terminated_is_replaced_before_the_next_query(postgres):
    raw = postgres.connection
    pid = raw.info.backend_pid
    assert _server("SELECT pg_terminate_backend(%s)", pid) == [(True,)]
    wait_for(
        lambda: not _server("SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid), message="backend gone"
    )
    # The server's goodbye is waiting on the socket: Django's own check runs, fails, and closes it.
    wait_for(lambda: not is_quiet(raw), timeout=5, message="the socket to be readable")
    postgres.close_if_health_check_failed()
    assert postgres.connection is None
    with postgres.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


def test_a_connection_in_a_transaction_gets_djangos_own_check(postgres):
    with postgres.cursor() as cursor:
        postgres.connection.autocommit = False
        cursor.execute("SELECT 1")  # a transaction is open: not idle
    postgres.health_check_done = False  # the cursor's own check ran, before the transaction began
    assert not is_quiet(postgres.connection)
    with mock.patch.object(DatabaseWrapper, "is_usable", return_value=True) as usable:
        postgres.close_if_health_check_failed()
    usable.assert_called_once()
    postgres.connection.rollback()
    postgres.connection.autocommit = True


def test_a_closed_connection_is_not_quiet(postgres):
    raw = postgres.connection
    raw.close()
    assert not is_quiet(raw)
