"""Applies ``schema.sql`` and then ``migrations/NNNN_name.sql``, once each, in order.

Idempotent and safe to run from several processes at once (an advisory lock serialises them).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema.sql"
MIGRATIONS = ROOT / "migrations"
_LOCK_ID = 7_346_118_201  # any constant: the advisory lock of ``ledger migrate``


def pending_files(applied: set[int]) -> list[tuple[int, Path]]:
    files = [(1, SCHEMA)]
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_[a-z0-9_]+\.sql", path.name)
        if match is None:
            raise ValueError(f"{path.name}: migrations are named NNNN_words.sql")
        files.append((int(match.group(1)), path))
    return [(v, p) for v, p in files if v not in applied]


def migrate(url: str) -> int:
    """Brings the database to the newest schema version; returns that version."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, path in pending_files(applied):
            conn.execute(path.read_text().encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (version, path.name),
            )
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    assert row is not None
    return int(row[0])
