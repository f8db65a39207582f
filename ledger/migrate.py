"""Applies ``schema.sql`` and then ``migrations/NNNN_name.sql``, once each, in order; and checks,
before serving, that the schema is current and that the server's login cannot rewrite history.

Migrating is idempotent and safe from several processes at once (an advisory lock serialises
them). It needs the schema owner's login (``LEDGER_OWNER_DATABASE_URL``); serving needs only
``ledger_app``'s (``LEDGER_DATABASE_URL``), which can run no DDL at all (ADR 0011).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import structlog

from ledger.settings import SettingsError

logger = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "schema.sql").is_file():  # installed from a wheel: setup.py ships them here
    ROOT = Path(__file__).resolve().parent / "sql"
SCHEMA = ROOT / "schema.sql"
MIGRATIONS = ROOT / "migrations"
_LOCK_ID = 7_346_118_201  # any constant: the advisory lock of ``ledger migrate``
HISTORY_TABLES = ("events", "entries", "transfers", "checkpoints")
"""Append-only: no runtime login may UPDATE, DELETE or TRUNCATE them."""
DEV_SWITCH = "LEDGER_INSECURE_PRIVILEGED_DB_LOGIN"


def pending_files(applied: set[int]) -> list[tuple[int, Path]]:
    files = [(1, SCHEMA)]
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_[a-z0-9_]+\.sql", path.name)
        if match is None:
            raise ValueError(f"{path.name}: migrations are named NNNN_words.sql")
        files.append((int(match.group(1)), path))
    return [(v, p) for v, p in files if v not in applied]


def migrate(url: str, until: int | None = None) -> int:
    """Brings the database to the newest schema version (or to ``until``); returns the version
    it is at. Refuses, before changing anything, while an index is invalid: a ``CREATE INDEX
    CONCURRENTLY`` that failed, or is still running, leaves one that a migration's ``IF NOT
    EXISTS`` would take for built (docs/operations.md, "Indexes built without blocking
    writes")."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        invalid = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace"
                " ORDER BY 1"
            )
        ]
        if invalid:
            raise SettingsError(
                f"index {invalid[0]} is invalid (a CREATE INDEX CONCURRENTLY that failed or is"
                f" still running): wait for it, or DROP INDEX CONCURRENTLY {invalid[0]} and"
                " build it again, then migrate"
            )
        applied = applied_versions(conn)
        for version, path in pending_files(applied):
            if until is not None and version > until:
                break
            conn.execute(path.read_text().encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (version, path.name),
            )
        return schema_version(conn)


def newest_version() -> int:
    """The schema version this program needs: its newest migration."""
    return max(version for version, _ in pending_files(set()))


def applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    """The migrations applied to the database; empty if none (or this login may not see them)."""
    try:
        with conn.transaction():
            rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        return set()
    return {int(r[0]) for r in rows}


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version (its newest migration applied); 0 if it has none."""
    return max(applied_versions(conn), default=0)


def privileges(conn: psycopg.Connection[Any]) -> list[str]:
    """What this login could use to rewrite history, in words; empty for ``ledger_app``."""
    row = conn.execute(
        "SELECT r.rolsuper, r.rolbypassrls, pg_has_role(current_user, c.relowner, 'MEMBER'),"
        " has_schema_privilege('public', 'CREATE'),"
        " array(SELECT t || ' ' || p FROM unnest(%s::text[]) t,"
        "   unnest(array['UPDATE', 'DELETE', 'TRUNCATE']) p WHERE has_table_privilege(t, p))"
        " FROM pg_roles r, pg_class c"
        " WHERE r.rolname = current_user AND c.oid = 'public.events'::regclass",
        (list(HISTORY_TABLES),),
    ).fetchone()
    assert row is not None
    superuser, bypassrls, owner, create, rights = row
    found = ["a superuser"] if superuser else []
    found += ["the schema owner (or a member of it)"] if owner else []
    found += ["BYPASSRLS"] if bypassrls else []
    found += ["CREATE on schema public"] if create else []
    found += list(rights)
    return found


def check_before_serving(url: str, allow_privileged: bool = False) -> None:
    """Refuses (SettingsError, one line) a schema that is not current, and a login that could
    rewrite history unless ``allow_privileged`` (the development switch)."""
    with psycopg.connect(url, autocommit=True) as conn:
        applied = applied_versions(conn)
        have, need = max(applied, default=0), newest_version()
        # Not only the newest: a migration numbered below one already applied (two branches
        # landing out of order) would otherwise be skipped until the next `ledger migrate`.
        missing = [version for version, _ in pending_files(applied)]
        if have < need:
            raise SettingsError(
                f"LEDGER_DATABASE_URL: the schema is at version {have}, this program needs"
                f" {need}: run `ledger migrate` (as the owner, LEDGER_OWNER_DATABASE_URL)"
            )
        if missing:
            raise SettingsError(
                f"LEDGER_DATABASE_URL: the schema lacks migration {missing[0]:04d}: run"
                " `ledger migrate` (as the owner, LEDGER_OWNER_DATABASE_URL)"
            )
        found = privileges(conn)
        login = conn.info.user
    if not found:
        return
    if not allow_privileged:
        raise SettingsError(
            f"LEDGER_DATABASE_URL: {login!r} could rewrite history ({', '.join(found)}): log in"
            f" as ledger_app (docs/operations.md, Database roles), or set {DEV_SWITCH}=true"
            " in development"
        )
    logger.warning("serving with a privileged database login", login=login, rights=found)
