"""Every test run gets its own database and leaves nothing behind.

With ``LEDGER_DATABASE_URL`` set, the run creates ``ledger_test_<random>`` on that server and
drops it at the end; without it, an embedded Postgres starts in a temporary directory that is
removed at the end. Under pytest-xdist each worker has its own database (and server).
The database is migrated by its owner; tests log in as ``ledger_app``, as the server does.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ledger.embedded import EmbeddedPostgres
from ledger.migrate import migrate
from ledger.postgres import APP_ROLE, login_as


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A Postgres server on which the run may create databases."""
    given = os.environ.get("LEDGER_DATABASE_URL")
    if given:
        yield given
        return
    directory = Path(tempfile.mkdtemp(prefix="ledger-test-", dir="/tmp"))
    embedded = EmbeddedPostgres(directory / "pgdata")
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def owner_database_url(server_url: str) -> Iterator[str]:
    """A fresh database for this run (this worker), migrated and dropped afterwards, logged in
    as its owner (the server's superuser): only for tests that act as an administrator would."""
    name = f"ledger_test_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(**{**conninfo_to_dict(server_url), "dbname": name})
    try:
        # Roles belong to the server, not the database: xdist workers sharing one server must
        # not create or alter ledger_app at the same moment (a unique violation otherwise).
        lock = Path(tempfile.gettempdir()) / f"ledger-test-migrate-{os.getuid()}.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(owner_database_url: str) -> str:
    """The same database, logged in as ``ledger_app``: what the server uses."""
    return login_as(owner_database_url, APP_ROLE)


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A new database with no schema at all on the same server, as its owner (the server's
    superuser here); dropped afterwards."""
    db = f"ledger_test_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    try:
        yield make_conninfo(**{**conninfo_to_dict(server_url), "dbname": db})
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture
def second_database(empty_database: str) -> str:
    """Another, empty, migrated database on the same server (the cluster a ledger moves to),
    logged in as ``ledger_app``; dropped afterwards."""
    migrate(empty_database)
    return login_as(empty_database, APP_ROLE)  # import runs as the server's login, not the owner


@pytest.fixture
def ledger_name() -> str:
    """A ledger name no other test uses."""
    return f"t{secrets.token_hex(6)}"
