"""The regression guard's verdict (bench/run.py --check), without measuring anything: the
passes are replaced by given ratios."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT


def _bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, passes: list[dict[str, float]]) -> Any:
    spec = importlib.util.spec_from_file_location("bench_run_check", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    @contextmanager
    def no_cluster() -> Iterator[tuple[str, str]]:
        yield "postgresql://unused", "postgresql://unused"

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"ratios": {"single": 1.0, "batch": 4.0}}))
    monkeypatch.setattr(bench, "cluster", no_cluster)
    monkeypatch.setattr(bench, "BASELINE", baseline)
    monkeypatch.setattr(bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    bench.calls = 0

    def check_pass(url: str) -> dict[str, float]:
        bench.calls += 1
        return passes[bench.calls - 1]

    monkeypatch.setattr(bench, "check_pass", check_pass)
    return bench


def test_ratios_within_a_quarter_of_the_baseline_pass_in_one_pass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = _bench(monkeypatch, tmp_path, [{"single": 0.76, "batch": 3.01}])
    assert bench.check(False, 0) == 0
    assert bench.calls == 1


def test_a_ratio_more_than_a_quarter_below_fails_when_the_rerun_is_below_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = _bench(
        monkeypatch, tmp_path, [{"single": 0.74, "batch": 4.0}, {"single": 0.70, "batch": 4.0}]
    )
    assert bench.check(False, 0) == 1
    assert bench.calls == 2


def test_a_ratio_below_in_the_first_pass_passes_when_the_rerun_is_back_above(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = _bench(
        monkeypatch, tmp_path, [{"single": 0.5, "batch": 4.0}, {"single": 0.9, "batch": 2.0}]
    )
    # each figure's better pass counts: single 0.9 (rerun), batch 4.0 (first pass)
    assert bench.check(False, 0) == 0
    assert bench.calls == 2


def test_the_baseline_written_is_the_median_of_the_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    passes = [{"single": s, "batch": b} for s, b in ((0.2, 2.0), (0.4, 1.0), (0.3, 9.0))]
    bench = _bench(monkeypatch, tmp_path, passes)
    monkeypatch.setattr(bench, "CHECK_FIGURES", {"single": "s", "batch": "b"})
    monkeypatch.setattr(bench, "settings_of", lambda url: {"postgres": "18"})
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.check(True, 3) == 0
    written = json.loads(bench.BASELINE.read_text())
    assert written["ratios"] == {"single": 0.3, "batch": 2.0}
    assert len(written["passes"]) == 3 and written["measured_at_commit"]
