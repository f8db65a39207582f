"""The bench's finance figures (bench/run.py, rows 9) run on a small ledger: the code path the
full bench measures at 10^6 events, checked without running the bench."""

from __future__ import annotations

import importlib.util
import secrets
from typing import Any

from ledger import domain
from ledger.service import LedgerService
from tests.support import ROOT, pay, run


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_measures_a_filtered_transfers_page_and_a_prefix_aggregate(
    database_url: str,
) -> None:
    bench = _bench()
    ledger = "b" + secrets.token_hex(5)

    async def body(svc: LedgerService) -> dict[str, float]:
        await svc.create_ledger(ledger, None, {})
        writer = svc.writers.get(await svc.ledger_ref(ledger))
        await writer.submit([(domain.OpenAccount(f"a{i}", "liability"), {}) for i in range(120)])
        await writer.submit([(pay(f"t{i}", f"a{i % 120}", f"a{(i * 7 + 1) % 120}", 5), {})
                             for i in range(1_000)])
        figures: dict[str, float] = await bench.finance_lookups(svc, 5, ledger, 120)
        return figures

    figures = run(database_url, body)
    assert set(figures) == {"filtered_page_p50_ms", "filtered_page_p99_ms",
                            "filtered_page_examined_p50", "aggregate_p50_ms", "aggregate_p99_ms"}
    assert all(v > 0 for v in figures.values())
    # No transfer has the metadata: the page walked every candidate of the account (~17).
    assert 5 <= figures["filtered_page_examined_p50"] <= 60
