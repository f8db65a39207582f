"""Each read is written once (issue 11): the query side, ``ledger/queries/``, holds every read
the service, the API, the CLI, the reports, the audit and the projections share.

Checked on the source itself, without a database: every SQL string in ``ledger/``, ``api/`` and
``projections/`` (string literals and f-strings, whitespace and case normalised) is collected;
the same read may not be written in two places, the reads that were once copied around may be
written only in ``ledger/queries/``, and tracking names only in ``ledger/queries/projections.py``.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ledger", "api", "projections")
QUERY_SIDE = "ledger/queries/"

SHARED_READS = {
    "a ledger by name": r"from ledgers( \w+)? where (\w+\.)?name = ",
    "a ledger's head by id": r"select head_position from ledgers where id = ",
    "a ledger's assets and scales": r"from assets where ledger_id = ",
    "recorded time to position": r"max\(position\).* recorded_at <= ",
    "a balance as of a position": r"cross join lateral \(select \* from entries",
    "posted sums on the effective axis": r"sum\((\w+\.)?amount\) filter",
    "an account by name": r"from accounts where ledger_id = %s and name = %s",
    "a tracked position": r"from tracking where application_name = %s$",
    "a page of the log": r"select position, topic, state, hash from events where ledger_id = %s"
    r" and position > %s order by position limit",
}
"""Reads that were written several times before the query side existed (issue 11)."""

ALLOWED = {
    ("ledger/log.py", "a ledger by name"),
    ("ledger/log.py", "a ledger's assets and scales"),
}
"""The write transaction's own reads: made on its connection, under the ledger's head lock and
inside its pipelined round trip (docs/architecture.md, "A command"), they cannot go through the
query side."""

TRACKING = re.compile(r"\b(positions|positions_next|publisher):")


@dataclass(frozen=True)
class Sql:
    path: str
    line: int
    text: str  # normalised


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
            for v in node.values
        )
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and _text(stmt.value) is not None:
                    found.add(id(stmt.value))
    return found


def strings(path: str, source: str) -> list[tuple[int, str]]:
    """Every string literal and f-string of a module (docstrings left out), with its line."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in inner:
            continue
        text = _text(node)
        if text is not None:
            out.append((node.lineno, text))
    return out


def reads(path: str, source: str) -> list[Sql]:
    """The SQL reads of a module: strings with a SELECT, not the locks and identifiers a
    write takes (``FOR UPDATE``, ``nextval``)."""
    found = []
    for line, text in strings(path, source):
        if "SELECT" not in text or "FOR UPDATE" in text or "nextval(" in text:
            continue
        found.append(Sql(path, line, " ".join(text.split()).lower()))
    return found


def problems(sources: dict[str, str]) -> list[str]:
    """What breaks "each read once" in ``sources`` (path → text): repeated statements, shared
    reads written outside the query side, tracking names outside their module."""
    out = []
    where: dict[str, list[Sql]] = defaultdict(list)
    for path, source in sources.items():
        for sql in reads(path, source):
            where[sql.text].append(sql)
            for name, pattern in SHARED_READS.items():
                inside = path.startswith(QUERY_SIDE) or (path, name) in ALLOWED
                if not inside and re.search(pattern, sql.text):
                    out.append(f"{path}:{sql.line}: {name} is read outside {QUERY_SIDE}")
        if path != QUERY_SIDE + "projections.py":
            for line, text in strings(path, source):
                if TRACKING.search(text):
                    out.append(f"{path}:{line}: a tracking name written outside its module")
    for text, places in where.items():
        if len(places) > 1:
            at = ", ".join(f"{p.path}:{p.line}" for p in places)
            out.append(f"the same read in {len(places)} places ({at}): {text[:80]}")
    return sorted(out)


def test_each_read_is_written_once_and_shared_reads_only_in_the_query_side() -> None:
    sources = {
        str(path.relative_to(ROOT)): path.read_text()
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert len([p for p in sources if p.startswith(QUERY_SIDE)]) >= 5
    assert sum(len(reads(p, s)) for p, s in sources.items()) > 100  # the inventory is not empty
    assert problems(sources) == []


def test_the_check_finds_a_copied_read_a_shared_read_elsewhere_and_a_tracking_name() -> None:
    """The check itself can fail: each kind of copy planted in made-up modules is reported."""
    copied = 'ROWS = "SELECT code, scale FROM audit_things WHERE ledger_id = %s"\n'
    sources = {
        "ledger/queries/ledgers.py": 'LEDGER = "SELECT id FROM ledgers WHERE name = %s"\n',
        "api/thing.py": copied + 'NAME = f"positions:{ledger}"\n',
        "projections/other.py": (
            'A = ("SELECT  code, scale\\n FROM audit_things"  " WHERE ledger_id = %s")\n'
            'B = "SELECT id, head_position FROM ledgers l WHERE l.name = %s"\n'
            'C = "SELECT 1 FROM tracking WHERE application_name = %s FOR UPDATE"\n'
        ),
        "ledger/log.py": 'D = "SELECT id, name FROM ledgers WHERE name = %s"\n',
    }
    found = problems(sources)
    assert found == [
        "api/thing.py:2: a tracking name written outside its module",
        "projections/other.py:2: a ledger by name is read outside ledger/queries/",
        "the same read in 2 places (api/thing.py:1, projections/other.py:1): "
        "select code, scale from audit_things where ledger_id = %s",
    ], found
