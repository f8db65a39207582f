"""`ledger migrate` over indexes an operator built beforehand without blocking writes
(docs/operations.md, "Indexes built without blocking writes"), and its refusal of an invalid
index left by a concurrent build that failed."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from ledger.migrate import check_before_serving, migrate, newest_version
from ledger.settings import SettingsError

DOCS = Path(__file__).resolve().parent.parent / "docs"
INDEXES = ("events_periods", "events_account_history")


def documented_statements() -> list[str]:
    """The operator's SQL block of the section, one statement each."""
    text = (DOCS / "operations.md").read_text()
    section = text[text.index("## Indexes built without blocking writes") :]
    block = re.search(r"```sql\n(.*?)```", section, re.S)
    assert block is not None
    return [s.strip() for s in block.group(1).split(";\n") if s.strip()]


def definitions(url: str) -> dict[str, tuple[str, bool]]:
    with psycopg.connect(url) as conn:
        return {
            name: (definition, valid)
            for name, definition, valid in conn.execute(
                "SELECT c.relname, pg_get_indexdef(c.oid), i.indisvalid FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY(%s)",
                (list(INDEXES),),
            )
        }


def test_migrating_over_indexes_built_concurrently_beforehand_skips_them(
    empty_database: str, owner_database_url: str
) -> None:
    assert migrate(empty_database, until=6) == 6
    assert definitions(empty_database) == {}
    with psycopg.connect(empty_database, autocommit=True) as conn:  # no transaction: as psql
        for statement in documented_statements():
            conn.execute(statement)  # type: ignore[arg-type]  # (SQL text from the docs)
    built = definitions(empty_database)
    assert set(built) == set(INDEXES) and all(valid for _, valid in built.values())
    assert migrate(empty_database) == newest_version()
    # Skipped, and the same as the migrations build on a database nobody prepared.
    assert definitions(empty_database) == built == definitions(owner_database_url)


def test_migrate_refuses_while_a_concurrent_build_that_failed_left_an_invalid_index(
    empty_database: str,
) -> None:
    assert migrate(empty_database, until=6) == 6
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE duplicates (x int)")
        conn.execute("INSERT INTO duplicates VALUES (1), (1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY duplicates_x ON duplicates (x)")
    with pytest.raises(SettingsError, match="index duplicates_x is invalid"):
        migrate(empty_database)
    with psycopg.connect(empty_database) as conn:  # nothing was applied
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (6,)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("DROP INDEX CONCURRENTLY duplicates_x")
    assert migrate(empty_database) == newest_version()


def test_serving_is_refused_while_a_migration_below_the_newest_is_missing(
    empty_database: str,
) -> None:
    """Two branches that land their migrations out of order (0010 applied, then 0009 added)
    leave a database whose newest version is current but which lacks one: `serve` refuses it
    until `ledger migrate` applies the missing one, instead of running without it."""
    migrate(empty_database)
    check_before_serving(empty_database, allow_privileged=True)  # complete: accepted
    below = newest_version() - 1
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (below,))
    with pytest.raises(SettingsError, match=f"lacks migration {below:04d}: run `ledger migrate`"):
        check_before_serving(empty_database, allow_privileged=True)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'restored')", (below,)
        )
    check_before_serving(empty_database, allow_privileged=True)
