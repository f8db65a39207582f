"""The compiled build (setup.py, ``LEDGER_COMPILE=1``): built as a user would build it, it
passes the rules' tests; and the checkout's own install stays pure Python.

The compiled test builds a wheel with mypyc (build isolation, as ``pip wheel`` does for a
user: about 20 s), installs it with its dependencies in a virtualenv of its own (about 30 s)
and runs the rule tests there, from a copy of ``tests/`` so that the checkout's sources cannot
be imported instead (about 45 s). Too slow for the default run: ``.ci/run`` runs it as a step of
its own,

    LEDGER_TEST_COMPILED=1 .venv/bin/python -m pytest tests/test_compiled.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import pytest

import ledger

ROOT = Path(__file__).resolve().parent.parent
RULE_TESTS = (
    "test_domain.py",  # the rules on an in-memory state, with hypothesis
    "test_fast_path.py",  # the writer's fast path decides as the rules do (hypothesis)
    "test_money.py",
    "test_decisions.py",  # the writer's decisions with and without its cache
    "test_write_plan.py",
    "test_codes.py",  # every error code at the rule level, in checking order, and over HTTP
    "test_vectors.py",  # known answers: event bytes, request hashes, the chain
    "test_model.py",  # the ledger against its model, on Postgres
)
COMPILED = ["ledger.domain", "ledger.money"]


def test_the_checkouts_editable_install_runs_pure_python() -> None:
    """A compiled module left in the checkout would shadow its source: every test would then
    test the last build, not the code."""
    assert ledger.compiled_modules() == []
    out = subprocess.run(
        [sys.executable, "-m", "ledger", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("ledger ") and " pure, Python " in out.stdout


@pytest.mark.skipif(
    not os.environ.get("LEDGER_TEST_COMPILED"),
    reason="slow (compiles): LEDGER_TEST_COMPILED=1, as .ci/run does",
)
def test_the_compiled_wheel_passes_the_rule_tests() -> None:
    # Not pytest's tmp_path: the embedded Postgres runs as another user, who must be able to
    # reach its binaries in the venv, and pytest keeps its own directory private (0700).
    tmp_path = Path(tempfile.mkdtemp(prefix="ledger-compiled-", dir="/tmp"))
    try:
        _build_install_and_test(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _build_install_and_test(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        env={**os.environ, "LEDGER_COMPILE": "1"},
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("ledger-*.whl")
    assert "-cp3" in wheel.name  # a platform wheel: it holds extension modules

    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel), "pytest", "hypothesis", "httpx"],
        capture_output=True,
        check=True,
    )

    version = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "ledger"), "version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"compiled ({', '.join(COMPILED)})" in version.stdout, version.stdout

    # Tests from a copy, run where the checkout is not on the path: what they import is the
    # installed wheel (checked by the first assertion of the run below).
    work = tmp_path / "work"
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")  # pytest's settings
    check = (
        "import ledger.domain, ledger.money, sys;"
        "sys.exit(not all(m.__file__.endswith('.so') for m in (ledger.domain, ledger.money)))"
    )
    subprocess.run([str(python), "-c", check], cwd=work, check=True)
    tests = subprocess.run(
        [str(python), "-m", "pytest", *(f"tests/{t}" for t in RULE_TESTS)],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    summary = tests.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
