"""The restore drill: continuous archiving and a base backup with pgBackRest, a point-in-time
restore into a new data directory, and the ledger checked against the checkpoints an auditor
kept outside the database.

A restore to a moment between two signed checkpoints lost signed history, and `ledger verify
--checkpoint` says so (``signed_history_lost``: "log ends at X, checkpoint Y was signed"); a
complete restore verifies against both, each by a consistency proof. The test starts its own
Postgres 15 cluster on a free loopback port (as the ``postgres`` OS user when run as root),
with the data, the pgBackRest repository and the key in one temporary directory, removed at the
end; it skips with a clear message when pgbackrest is not installed. Every step has a timeout;
the whole drill takes about 15 s on an idle 2-core machine (50 s under a loaded one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from ledger import domain, postgres
from ledger.migrate import migrate
from ledger.money import Asset
from ledger.postgres import APP_ROLE, login_as
from ledger.service import LedgerService
from tests.cluster import reserve_port
from tests.support import served

PG_BIN = Path("/usr/lib/postgresql/15/bin")
STANZA = "drill"
USD = Asset("USD", 2)
ROOT = Path(__file__).resolve().parent.parent


def _missing() -> str | None:
    if shutil.which("pgbackrest") is None:
        return "pgbackrest is missing: apt-get install -y pgbackrest"
    if not (PG_BIN / "initdb").exists():
        return f"the Postgres 15 binaries are missing ({PG_BIN})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' OS user to run Postgres as"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _as_postgres(args: list[str]) -> list[str]:
    """Postgres refuses to run as root: as root, every cluster command runs as ``postgres``."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class Drill:
    root: Path
    port: int
    leases: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Its ports, and the restored clusters', held until the drill ends (another test run
    may not start a server on them, even while one is stopped)."""
    identifier: int = 0
    """The ``system_identifier`` of its cluster, which restores of its backups keep."""

    @property
    def conf(self) -> Path:
        return self.root / "pgbackrest.conf"

    def run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            _as_postgres(list(args)), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-2000:]}{done.stdout}")
        return done.stdout

    def pgbackrest(self, *args: str) -> str:
        return self.run("pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args)

    def start(self, data: Path) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", f"{data}.log", "-w", "-t", "60",
                 "start")

    def stop(self, data: Path) -> None:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")

    @staticmethod
    def owner_url(port: int) -> str:
        return f"host=127.0.0.1 port={port} user=postgres dbname=postgres"


@pytest.fixture
def drill() -> Iterator[Drill]:
    root = Path(tempfile.mkdtemp(prefix="ledger-restore-", dir="/tmp"))
    leases = contextlib.ExitStack()
    d = Drill(root, reserve_port(leases), leases)
    data = root / "data"
    try:
        for sub in ("repo", "sock", "log", "lock", "spool"):
            (root / sub).mkdir()
        d.conf.write_text(
            "[global]\n"
            f"repo1-path={root}/repo\nrepo1-retention-full=2\nlog-path={root}/log\n"
            f"lock-path={root}/lock\nspool-path={root}/spool\nlog-level-console=warn\n"
            "log-level-file=off\nstart-fast=y\n"
            f"[{STANZA}]\npg1-path={data}\npg1-port={d.port}\npg1-socket-path={root}/sock\n"
        )
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            for path in root.rglob("*"):
                shutil.chown(path, "postgres", "postgres")
        d.run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "--no-sync")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {d.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}/sock'\nshared_buffers = 32MB\n"
                "wal_level = replica\narchive_mode = on\n"
                f"archive_command = 'pgbackrest --config={d.conf} --stanza={STANZA}"
                " archive-push %p'\n"
            )
        d.start(data)
        d.identifier = _identifier(d.port)
        d.pgbackrest("stanza-create")
        d.pgbackrest("check")
        yield d
    finally:
        for data_dir in root.glob("data*"):
            if data_dir.is_dir():
                d.stop(data_dir)
        leases.close()
        shutil.rmtree(root, ignore_errors=True)


def _identifier(port: int) -> int:
    with psycopg.connect(Drill.owner_url(port)) as conn:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return int(row[0])


def post(url: str, ledger: str, keys: list[str], create: bool = False) -> int:
    """Posts one transfer per key (through the ledger's writer); returns the head after."""

    async def body() -> int:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        svc = LedgerService(pool)
        try:
            if create:
                await svc.create_ledger(ledger, [USD], {})
                for name in ("bank", "alice", "bob"):
                    await svc.open_account(ledger, domain.OpenAccount(name, "liability"), {})
            for n, key in enumerate(keys):
                who = ("alice", "bob")[n % 2]
                posting = domain.Posting("bank", who, USD, 100 + n)
                await svc.post_transfer(ledger, domain.PostTransfer(key, (posting,)), {})
            return await svc.head(ledger)
        finally:
            await svc.close()
            await pool.close()

    return asyncio.run(body())


def ledger_cli(
    url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": url,
        "LEDGER_LOG_LEVEL": "warning",
        **(env or {}),
    }
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True,
                          text=True, env=environment, timeout=60, cwd=ROOT)


def restore(d: Drill, into: str, *target: str) -> tuple[str, Path]:
    """Restores the newest backup and the archived WAL (up to ``target``) into a new data
    directory, starts it on a port of its own and waits for it to be promoted; returns the
    ledger's login on it."""
    data = d.root / into
    d.pgbackrest(f"--pg1-path={data}", "--archive-mode=off", *target, "restore")
    port = reserve_port(d.leases)
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"port = {port}\n")
    d.start(data)
    # The server on that port is the restore (a copy of the drill's cluster), no other's.
    assert _identifier(port) == d.identifier, "another Postgres answered on the restore's port"
    deadline = time.monotonic() + 60
    with psycopg.connect(Drill.owner_url(port), autocommit=True) as conn:
        while conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
            assert time.monotonic() < deadline, "the restored cluster was not promoted"
            time.sleep(0.2)
    return login_as(Drill.owner_url(port), APP_ROLE), data


def test_a_point_in_time_restore_that_lost_signed_history_is_reported_and_a_complete_one_verifies(
    drill: Drill,
) -> None:
    owner = Drill.owner_url(drill.port)
    migrate(owner)
    app = login_as(owner, APP_ROLE)
    name = "drill"
    keyfile = drill.root / "auditor" / "signing.pem"  # outside the database, as is what it signs
    keyfile.parent.mkdir()
    made = ledger_cli(app, "keygen", "--out", str(keyfile))
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()

    def seal(kept: Path) -> int:
        sealed = ledger_cli(app, "seal", "-l", name, env={"LEDGER_SIGNING_KEY_FILE": str(keyfile)})
        assert sealed.returncode == 0, sealed.stderr
        kept.write_text(sealed.stdout)
        return int(json.loads(sealed.stdout)["tree_size"])

    post(app, name, [f"a{i}" for i in range(30)], create=True)
    first = seal(drill.root / "auditor" / "first.json")
    drill.pgbackrest("--type=full", "backup")
    # pgBackRest records a backup's stop time in whole seconds: a target in the same second
    # may read as "before the backup" (seen on a loaded machine), so let that second pass.
    time.sleep(1.2)
    at_target = post(app, name, [f"b{i}" for i in range(20)])
    with psycopg.connect(owner) as conn:
        time.sleep(0.3)
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        time.sleep(0.3)
    post(app, name, [f"c{i}" for i in range(20)])
    second = seal(drill.root / "auditor" / "second.json")
    final = post(app, name, [f"d{i}" for i in range(5)])
    drill.pgbackrest("check")  # switches to a new WAL segment and waits until it is archived
    assert first < at_target < second < final

    kept = ["--checkpoint", str(drill.root / "auditor" / "first.json"),
            "--checkpoint", str(drill.root / "auditor" / "second.json")]
    # 1. To a moment between the two checkpoints: the second one's history is gone.
    url, _ = restore(drill, "data-pitr", "--type=time", f"--target={moment.isoformat(' ')}",
                     "--target-action=promote")
    lost = ledger_cli(url, "verify", "-l", name, "--public-key", public, *kept)
    assert lost.returncode == 1, lost.stderr
    signed_at = json.loads((drill.root / "auditor" / "second.json").read_text())["signed_at"]
    assert lost.stderr == (
        f"ledger: signed_history_lost: log ends at {at_target:,}, checkpoint {second:,} was"
        f" signed ({signed_at}): signed history was lost\n"
    )
    report = json.loads(lost.stdout)
    assert report["head"] == at_target
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["signed_history"]
    history = [c for c in report["checks"] if c["check"] == "signed_history"]
    assert history[0]["ok"] and "consistency proof" in history[0]["detail"]
    assert history[1]["error"] == "signed_history_lost"

    # 2. Everything archived: both checkpoints are prefixes of the log, by consistency proofs;
    # the ledger serves on it and its chain goes on.
    url, _ = restore(drill, "data-full")
    whole = ledger_cli(url, "verify", "-l", name, "--public-key", public, *kept)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    report = json.loads(whole.stdout)
    assert report["head"] == final and report["ok"]
    proofs = [c["detail"] for c in report["checks"] if c["check"] == "signed_history"]
    assert len(proofs) == 2 and all("consistency proof" in p for p in proofs)
    with served(url) as (base, token):
        headers = {"Authorization": f"Bearer {token}"}
        body = {"postings": [{"debit": "bank", "credit": "alice", "amount": "1",
                              "asset": "USD/2"}]}
        after = httpx.post(f"{base}/v1/ledgers/{name}/transfers", json=body,
                           headers={**headers, "Idempotency-Key": "after-restore"}, timeout=10)
        assert after.status_code == 201, after.text
        assert after.json()["position"] == final + 1
        assert httpx.get(f"{base}/v1/ledgers/{name}/verify", headers=headers,
                         timeout=30).json()["ok"]
