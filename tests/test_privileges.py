"""Least privilege in Postgres (issue 9, ADR 0011): the server's own login cannot rewrite history.

Every way we know to change the log, with ``ledger_app``'s login (what ``ledger serve`` uses),
fails with the SQLSTATE of a refused privilege, before any trigger is reached; the read-only
login cannot write; the app login can still do its job; ``serve`` refuses a login that could.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ledger import audit, domain, postgres
from ledger.migrate import check_before_serving, migrate, newest_version, privileges
from ledger.money import Asset
from ledger.service import LedgerService
from ledger.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent
USD = Asset("USD", 2)
# Each history table, with a column to "update" (to itself: the grant is checked regardless).
HISTORY = {"events": "hash", "entries": "amount", "transfers": "position", "checkpoints": "root"}
DENIED = "42501"  # insufficient_privilege
READ_ONLY = "25006"  # read_only_sql_transaction
SIGNER = Ed25519PrivateKey.generate()

# (case, statements run in order as ledger_app: all but the last succeed, the last is refused)
APP_ATTEMPTS: list[tuple[str, list[str], str]] = [
    *[(f"update_{t}", [f"UPDATE {t} SET {c} = {c}"], DENIED) for t, c in HISTORY.items()],
    *[(f"delete_{t}", [f"DELETE FROM {t}"], DENIED) for t in HISTORY],
    *[(f"truncate_{t}", [f"TRUNCATE {t}"], DENIED) for t in HISTORY],
    ("disable_trigger", ["ALTER TABLE events DISABLE TRIGGER events_append_only"], DENIED),
    ("disable_all_triggers", ["ALTER TABLE entries DISABLE TRIGGER ALL"], DENIED),
    ("drop_trigger", ["DROP TRIGGER events_append_only ON events"], DENIED),
    ("drop_table", ["DROP TABLE events"], DENIED),
    ("alter_table_owner", ["ALTER TABLE events OWNER TO ledger_app"], DENIED),
    (
        "replace_the_trigger_function",
        [
            "CREATE OR REPLACE FUNCTION refuse_change_to_history() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
        ],
        DENIED,
    ),
    (
        "create_trigger",
        [
            "CREATE TRIGGER t BEFORE INSERT ON events FOR EACH ROW"
            " EXECUTE FUNCTION refuse_change_to_history()"
        ],
        DENIED,
    ),
    ("create_rule", ["CREATE RULE r AS ON INSERT TO events DO INSTEAD NOTHING"], DENIED),
    ("session_replication_role", ["SET session_replication_role = replica"], DENIED),
    (
        "session_replication_role_by_function",
        ["SELECT set_config('session_replication_role', 'replica', false)"],
        DENIED,
    ),
    ("alter_system", ["ALTER SYSTEM SET session_replication_role = replica"], DENIED),
    ("reset_role_then_update", ["RESET ROLE", "UPDATE events SET topic = topic"], DENIED),
    ("set_role_to_the_owner", ["SET ROLE {owner}"], DENIED),
    ("set_session_authorization", ["SET SESSION AUTHORIZATION {owner}"], DENIED),
    ("grant_itself_the_owner", ["GRANT {owner} TO ledger_app"], DENIED),
    (
        # Without the grant option Postgres only warns and grants nothing: the UPDATE still fails.
        "grant_itself_update",
        ["GRANT UPDATE ON events TO ledger_app", "UPDATE events SET topic = topic"],
        DENIED,
    ),
    ("alter_role_superuser", ["ALTER ROLE ledger_app SUPERUSER"], DENIED),
    ("alter_role_bypassrls", ["ALTER ROLE ledger_app BYPASSRLS"], DENIED),
    ("create_role", ["CREATE ROLE ledger_intruder SUPERUSER LOGIN"], DENIED),
    ("create_table", ["CREATE TABLE shadow (i int)"], DENIED),
    ("create_temp_table_shadowing_events", ["CREATE TEMP TABLE events (i int)"], DENIED),
    ("create_function", ["CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"], DENIED),
    (
        "create_temp_function",
        ["CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'"],
        DENIED,
    ),
    ("create_schema", ["CREATE SCHEMA shadow"], DENIED),
    ("copy_from_program", ["COPY events FROM PROGRAM 'true'"], DENIED),
    ("copy_to_server_file", ["COPY events TO '/tmp/ledger-events.copy'"], DENIED),
    ("pg_read_server_files", ["SELECT pg_read_file('/etc/hostname')"], DENIED),
    ("lo_import_server_file", ["SELECT lo_import('/etc/hostname')"], DENIED),
]

READER_ATTEMPTS: list[tuple[str, list[str], str]] = [
    ("insert_events", ["INSERT INTO events SELECT * FROM events LIMIT 1"], READ_ONLY),
    (
        "insert_events_read_write",
        ["SET default_transaction_read_only = off", "INSERT INTO events SELECT * FROM events"],
        DENIED,
    ),
    (
        "insert_transfers_read_write",
        [
            "SET default_transaction_read_only = off",
            "INSERT INTO transfers SELECT * FROM transfers",
        ],
        DENIED,
    ),
    (
        "update_balances_read_write",
        ["SET default_transaction_read_only = off", "UPDATE balances SET version = version"],
        DENIED,
    ),
    (
        "delete_tracking_read_write",
        ["SET default_transaction_read_only = off", "DELETE FROM tracking"],
        DENIED,
    ),
    ("create_table", ["SET default_transaction_read_only = off", "CREATE TABLE x (i int)"], DENIED),
]


def _post_one(url: str, ledger: str) -> int:
    """Creates a ledger, two accounts and one transfer with ``url``'s login; returns the head."""

    async def body() -> int:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        svc = LedgerService(pool)
        try:
            await svc.create_ledger(ledger, None, {})
            for name in ("alice", "bob"):
                await svc.open_account(ledger, domain.OpenAccount(name, "liability"), {})
            posting = domain.Posting("alice", "bob", USD, 250)
            await svc.post_transfer(ledger, domain.PostTransfer("t1", (posting,)), {})
            account = await svc.account(ledger, "bob")
            assert account is not None
        finally:
            await svc.close()
            await pool.close()
        with postgres.connect(url) as conn:
            row = conn.execute("SELECT head_position FROM ledgers WHERE name = %s", (ledger,))
            return int(row.fetchone()[0])  # type: ignore[index]

    return asyncio.run(body())


@pytest.fixture(scope="module")
def history(database_url: str) -> str:
    """A ledger with a transfer (and so rows in events, entries and transfers) and a checkpoint."""
    ledger = f"p{secrets.token_hex(5)}"
    _post_one(database_url, ledger)
    with postgres.connect(database_url) as conn:
        audit.seal(conn, ledger, SIGNER)
    return ledger


def _owner(owner_database_url: str) -> str:
    with psycopg.connect(owner_database_url) as conn:
        return str(conn.info.user)


def _refused(url: str, statements: list[str], owner: str) -> psycopg.Error:
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements[:-1]:
            conn.execute(sql.format(owner=owner).encode())
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(statements[-1].format(owner=owner).encode())
        # Whatever was tried, the login is still ledger_app's and the log is intact.
        row = conn.execute("SELECT current_user, count(*) FROM events").fetchone()
        login = conn.info.user
    assert row is not None and row[0] == login and row[1] > 0
    return caught.value


def _reader_url(database_url: str) -> str:
    return postgres.login_as(database_url, postgres.READER_ROLE)


@pytest.mark.parametrize(
    ("statements", "sqlstate"),
    [pytest.param(s, code, id=case) for case, s, code in APP_ATTEMPTS],
)
def test_the_app_login_cannot_rewrite_history(
    database_url: str, owner_database_url: str, history: str, statements: list[str], sqlstate: str
) -> None:
    error = _refused(database_url, statements, _owner(owner_database_url))
    assert error.sqlstate == sqlstate, f"{error.sqlstate}: {error}"
    # Refused by the grants, not by the append-only triggers (which come second).
    assert "append-only" not in str(error)


@pytest.mark.parametrize(
    ("statements", "sqlstate"),
    [pytest.param(s, code, id=case) for case, s, code in READER_ATTEMPTS],
)
def test_the_reader_login_cannot_write(
    database_url: str, owner_database_url: str, history: str, statements: list[str], sqlstate: str
) -> None:
    error = _refused(_reader_url(database_url), statements, _owner(owner_database_url))
    assert error.sqlstate == sqlstate, f"{error.sqlstate}: {error}"


def test_the_reader_login_cannot_read_api_key_hashes(database_url: str) -> None:
    with psycopg.connect(_reader_url(database_url)) as conn:
        if conn.execute("SELECT to_regclass('api_keys')").fetchone() == (None,):
            pytest.skip("no api_keys table in this schema")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM api_keys")


def test_the_app_login_posts_a_transfer_and_holds_no_dangerous_right(
    database_url: str, ledger_name: str
) -> None:
    assert _post_one(database_url, ledger_name) == 4  # ledger, two accounts, one transfer
    with psycopg.connect(database_url) as conn:
        assert conn.info.user == "ledger_app"
        assert privileges(conn) == []
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == (False, False, False, False, False)
    check_before_serving(database_url)  # no refusal


def test_the_reader_login_verifies_and_exports_a_ledger(database_url: str, history: str) -> None:
    import io

    with postgres.connect(_reader_url(database_url)) as conn:
        assert audit.verify(conn, history, SIGNER.public_key()).ok
        out = io.StringIO()
        assert audit.export(conn, history, out) == 4
        assert privileges(conn) == []


def test_finance_and_auditors_use_the_command_line_with_the_reader_login(
    database_url: str, history: str, tmp_path: Path
) -> None:
    env = {"LEDGER_DATABASE_URL": _reader_url(database_url)}
    report = _ledger(env, "report", "trial-balance", "-l", history, "--csv")
    assert report.returncode == 0 and "USD" in report.stdout, report.stderr
    verified = _ledger(env, "verify", "-l", history)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    exported = _ledger(env, "export", "-l", history, "--out", str(tmp_path / "x.jsonl"))
    assert exported.returncode == 0 and len((tmp_path / "x.jsonl").read_text().splitlines()) > 4
    opened = _ledger(env, "account", "open", "-l", history, "-n", "carol", "--type", "asset")
    assert opened.returncode == 2 and "ReadOnlySqlTransaction" in opened.stderr, opened.stderr


def test_the_owner_login_is_refused_for_serving_unless_the_development_switch_is_set(
    owner_database_url: str,
) -> None:
    with psycopg.connect(owner_database_url) as conn:
        assert "a superuser" in privileges(conn)
    with pytest.raises(SettingsError, match="could rewrite history") as caught:
        check_before_serving(owner_database_url)
    assert "\n" not in str(caught.value)
    check_before_serving(owner_database_url, allow_privileged=True)


def _ledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        capture_output=True,
        text=True,
        env={**base, "LEDGER_LOG_LEVEL": "warning", **env},
        cwd=ROOT,
        timeout=60,
    )


def test_serve_refuses_a_superuser_login_in_one_line(owner_database_url: str) -> None:
    # Port 9: the refusal comes before anything listens (it would fail to bind otherwise).
    done = _ledger({"LEDGER_DATABASE_URL": owner_database_url, "LEDGER_PORT": "9"}, "serve")
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "could rewrite history (a superuser" in line, line
    assert "LEDGER_INSECURE_PRIVILEGED_DB_LOGIN=true" in line


def test_the_multi_worker_factory_refuses_a_superuser_login_too(
    owner_database_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import app_from_environment

    for name in [k for k in os.environ if k.startswith("LEDGER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LEDGER_DATABASE_URL", owner_database_url)
    with pytest.raises(SettingsError, match="could rewrite history"):
        app_from_environment()
    monkeypatch.setenv("LEDGER_DATABASE_URL", database_url)
    assert app_from_environment() is not None


def test_serve_needs_a_current_schema_which_only_the_owner_migrates(
    empty_database: str, database_url: str
) -> None:
    app = postgres.login_as(empty_database, postgres.APP_ROLE)
    refused = _ledger({"LEDGER_DATABASE_URL": app, "LEDGER_PORT": "9"}, "serve")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"ledger: LEDGER_DATABASE_URL: the schema is at version 0, this program needs"
        f" {newest_version()}: run `ledger migrate` (as the owner, LEDGER_OWNER_DATABASE_URL)"
    )
    # The app login cannot migrate (no DDL) ...
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        migrate(app)
    # ... the owner does, through LEDGER_OWNER_DATABASE_URL, and then the app login may serve.
    done = _ledger(
        {"LEDGER_DATABASE_URL": app, "LEDGER_OWNER_DATABASE_URL": empty_database}, "migrate"
    )
    assert done.returncode == 0 and done.stdout == f"schema version {newest_version()}\n"
    check_before_serving(app)


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    """A directory for an embedded server of the test's own, removed afterwards. Under /tmp, as
    in conftest: as root the wheel runs Postgres as another OS user, which cannot enter pytest's
    private tmp_path (initdb failed there under xdist)."""
    directory = Path(tempfile.mkdtemp(prefix="ledger-test-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_embedded_default_migrates_as_its_superuser_and_runs_as_ledger_app(
    embedded_dir: Path,
) -> None:
    from ledger.embedded import database_url
    from ledger.settings import Settings

    with database_url(Settings(database_url=None, data_dir=embedded_dir / "data")) as url:
        with psycopg.connect(url) as conn:
            assert conn.info.user == "ledger_app"
            assert privileges(conn) == []
        check_before_serving(url)


def test_a_signing_key_open_to_group_or_others_is_refused_and_keygen_writes_0600(
    tmp_path: Path,
) -> None:
    key = tmp_path / "signing.pem"
    old = os.umask(0)  # even with a permissive umask
    try:
        done = _ledger({}, "keygen", "--out", str(key))
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    audit.load_private_key(key)
    for mode in (0o640, 0o604, 0o620):
        key.chmod(mode)
        with pytest.raises(SettingsError, match=f"open to group or others \\(mode 0{mode:o}\\)"):
            audit.load_private_key(key)
    key.chmod(0o644)
    sealed = _ledger({"LEDGER_SIGNING_KEY_FILE": str(key)}, "seal", "-l", "any")
    assert sealed.returncode == 2
    assert sealed.stderr.strip() == (
        f"ledger: LEDGER_SIGNING_KEY_FILE: {key} is open to group or others (mode 0644):"
        " chmod 600 it"
    )


# docs/operations.md, "Database roles": the two ways to set up a server, as a superuser.
OWNER_CREATES_ROLES = [
    "CREATE ROLE ledger_owner LOGIN CREATEROLE",
    "CREATE DATABASE ledger OWNER ledger_owner",
]
SUPERUSER_CREATES_ROLES = [
    "CREATE ROLE ledger_owner LOGIN",
    "CREATE DATABASE ledger OWNER ledger_owner",
    "CREATE ROLE ledger_app LOGIN PASSWORD 'app-secret'",
    "CREATE ROLE ledger_reader LOGIN PASSWORD 'reader-secret'",
    "ALTER ROLE ledger_reader SET default_transaction_read_only = on",
    "GRANT ledger_app, ledger_reader TO ledger_owner WITH ADMIN OPTION",
]


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(OWNER_CREATES_ROLES, id="owner_creates_roles"),
        pytest.param(SUPERUSER_CREATES_ROLES, id="superuser_creates_roles"),
    ],
)
def test_the_documented_setup_works_with_an_owner_that_is_not_a_superuser(
    embedded_dir: Path, setup: list[str]
) -> None:
    """A superuser runs ``setup``; the owner migrates (creating ledger_app and ledger_reader if
    they do not exist) and, if it may, sets their passwords; the app login may serve and post,
    the reader cannot write, the owner's login may not serve."""
    from ledger.embedded import EmbeddedPostgres

    with EmbeddedPostgres(embedded_dir / "pgdata") as superuser:
        with psycopg.connect(superuser, autocommit=True) as conn:
            for sql in setup:
                conn.execute(sql.encode())
        params = {**conninfo_to_dict(superuser), "dbname": "ledger"}
        owner = make_conninfo(**{**params, "user": "ledger_owner"})
        app = postgres.login_as(owner, postgres.APP_ROLE)
        done = _ledger({"LEDGER_OWNER_DATABASE_URL": owner, "LEDGER_DATABASE_URL": app}, "migrate")
        assert done.returncode == 0, done.stderr
        with psycopg.connect(owner, autocommit=True) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (False,)
            if setup is OWNER_CREATES_ROLES:
                conn.execute("ALTER ROLE ledger_app PASSWORD 'app-secret'")
                conn.execute("ALTER ROLE ledger_reader PASSWORD 'reader-secret'")
            assert "the schema owner (or a member of it)" in privileges(conn)
        check_before_serving(app)
        with pytest.raises(SettingsError, match="could rewrite history"):
            check_before_serving(owner)
        assert _post_one(app, "books") == 4
        reader = postgres.login_as(owner, postgres.READER_ROLE)
        with psycopg.connect(reader) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (4,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("DELETE FROM tracking")
