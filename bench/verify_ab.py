"""What ``transfer_status_match_log`` adds to ``ledger verify``: verify with and without it
(A: without, B: with), alternated on the same ledger in the same minutes, and the check alone.

    .venv/bin/python bench/verify_ab.py --events 100000 --rounds 3

The ledger: ``--events`` transfers between 10,000 accounts, every 10th one reversed in part
and every 20th a hold (half of them captured), so that ``transfer_status`` has rows of every
kind. Without LEDGER_DATABASE_URL it starts its own Postgres, like bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import ACCOUNTS, LEDGER, USD, cluster, database, setup_ledger  # noqa: E402

from ledger import audit, domain, postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.postgres import APP_ROLE, login_as  # noqa: E402
from ledger.service import LedgerService  # noqa: E402


def command(i: int) -> list[domain.Command]:
    a, b = f"a{i % ACCOUNTS}", f"a{(i * 7 + 1) % ACCOUNTS}"
    if a == b:
        b = f"a{(i + 1) % ACCOUNTS}"
    posting = domain.Posting(a, b, USD, 1000 + i % 100)
    if i % 20 == 0:
        hold = domain.PostTransfer(f"h{i}", (posting,), pending=True)
        return [hold] + ([domain.PostPending(f"c{i}", f"h{i}", amount=500)] if i % 40 else [])
    plain = [domain.PostTransfer(f"t{i}", (posting,))]
    return plain + ([domain.ReverseTransfer(f"r{i}", f"t{i}", amount=10)] if i % 10 == 0 else [])


async def build(url: str, events: int) -> None:
    pool = postgres.async_pool(url, 4)
    await pool.open()
    svc = LedgerService(pool)
    try:
        await setup_ledger(svc)
        writer = svc.writers.get(await svc.ledger_ref(LEDGER))
        i = 0
        while i < events:
            # Commands that refer to each other go in order: one submit per 1,000 of them.
            batch = [c for n in range(i, min(i + 1000, events)) for c in command(n)]
            await writer.submit([(c, {}) for c in batch])
            i += 1000
    finally:
        await svc.close()
        await pool.close()


def timed(url: str, with_check: bool) -> float:
    check = audit._transfer_status_matches_log
    if not with_check:
        audit._transfer_status_matches_log = lambda *args: None  # type: ignore[assignment]
    try:
        with postgres.connect(url) as conn:
            started = time.perf_counter()
            report = audit.verify(conn, LEDGER)
            took = time.perf_counter() - started
        assert report.ok, report.failed()
        return took
    finally:
        audit._transfer_status_matches_log = check  # type: ignore[assignment]


def alone(url: str) -> float:
    with postgres.connect(url) as conn:
        ledger_id = conn.execute("SELECT id FROM ledgers WHERE name = %s", (LEDGER,)).fetchone()
        assert ledger_id is not None
        report = audit.Report(LEDGER)
        started = time.perf_counter()
        audit._transfer_status_matches_log(conn, ledger_id[0], report)
        took = time.perf_counter() - started
    assert report.ok, report.checks
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with cluster() as (server_url, _), database(server_url, "verify_ab") as owner_url:
        migrate(owner_url)
        url = login_as(owner_url, APP_ROLE)
        asyncio.run(build(url, args.events))
        with postgres.connect(url) as conn:
            head = conn.execute(
                "SELECT head_position FROM ledgers WHERE name = %s", (LEDGER,)
            ).fetchone()
            rows = conn.execute("SELECT count(*) FROM transfer_status").fetchone()
        print(f"ledger: {head[0] if head else 0:,} events, {rows[0] if rows else 0:,} status rows")
        timed(url, True)  # warm the cache
        a, b, c = [], [], []
        for _ in range(args.rounds):
            a.append(timed(url, False))
            b.append(timed(url, True))
            c.append(alone(url))
        print("A verify without the check, s:", " ".join(f"{x:.2f}" for x in a))
        print("B verify with the check, s:   ", " ".join(f"{x:.2f}" for x in b))
        print("the check alone, s:           ", " ".join(f"{x:.2f}" for x in c))
        print(f"median B/A: {statistics.median(b) / statistics.median(a):.3f}")


if __name__ == "__main__":
    main()
