"""PostgreSQL fixtures for the tests, on :class:`gradhpo.testing.postgres.PostgresServer` (a
throwaway server: initdb in a temporary folder, 127.0.0.1 only, a free port, run as the
``postgres`` user under root).

Import them into a test module: ``from postgres import postgres_server, postgres_url``.

* ``postgres_server``: one server for the whole test session (started on first use);
* ``postgres_url``: a fresh, empty database on it for one test, as a
  ``postgresql://gradhpo:<password>@127.0.0.1:<port>/<db>`` URL.

Both skip, naming what is missing, when the PostgreSQL server binaries (``initdb``,
``pg_ctl``; Debian: ``apt-get install postgresql``, which .ci/run does) or the ``psycopg``
driver are not installed; any other failure to start is an error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gradhpo.testing.postgres import PostgresServer, missing_reason

__all__ = ["PostgresServer", "postgres_server", "postgres_url", "skip_without_postgres"]


def skip_without_postgres() -> None:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (skipped without PostgreSQL)."""
    skip_without_postgres()
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server, as a ``postgresql://`` URL with the
    user's password in it."""
    if not postgres_server.running:  # a test stopped it and failed before starting it again
        postgres_server.start()
    return postgres_server.create_database()
