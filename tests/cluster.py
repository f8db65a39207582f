"""A pg_auto_failover cluster on loopback ports, for tests: a monitor, a primary, a standby.

Everything lives in one temporary directory (data dirs, pg_autoctl's config and state, logs)
and is stopped and removed at the end, even when the test fails. Postgres refuses to run as
root, so when the tests run as root every ``pg_autoctl`` runs as the ``postgres`` OS user.
Tests that use it skip with a clear message when ``pg_autoctl`` is not installed
(``apt-get install -y postgresql-15-auto-failover``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DBNAME = "ledger"
CONNECTION_OPTIONS = (
    "&connect_timeout=2&keepalives_idle=5&keepalives_interval=2&keepalives_count=3"
    "&tcp_user_timeout=10000"
)
"""As docs/operations.md recommends: skip a dead host quickly, and notice a connection whose
peer went silent (a partition) in seconds rather than the kernel's two hours."""
START_TIMEOUT_S = 90.0
MONITOR_SETTINGS = {
    # Defaults: a check every 5 s, unhealthy after 20 s, then 30 s for the old primary to demote
    # itself: ~50 s to promotion. Scaled down together for the tests (~8 s), keeping the rule
    # that makes two primaries impossible: the monitor waits longer (primary_demote_timeout)
    # than an isolated primary's keeper takes to demote itself (network_partition_timeout).
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "3000",
    "pgautofailover.primary_demote_timeout": "6000",
}
NETWORK_PARTITION_TIMEOUT_S = 3


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if shutil.which("pg_autoctl") is None:
        return "pg_autoctl is missing: apt-get install -y postgresql-15-auto-failover"
    if not (PG_BIN / "pg_ctl").exists():
        return f"the Postgres 15 binaries are missing ({PG_BIN})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' OS user to run Postgres as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    pgdata: Path
    port: int
    host: str = "127.0.0.1"
    netns: str | None = None
    """The network namespace the node runs in (its own host, for partitions), if any."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"host={self.host} port={self.port} dbname={DBNAME} user=postgres"

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class Cluster:
    root: Path
    monitor: Node
    nodes: list[Node] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    link: str | None = None
    """The host side of the veth pair to the namespaced node: down is a partition."""

    # --- running pg_autoctl -------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_DATA_HOME": str(self.root / "share"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "LANG": "C.UTF-8",
        }

    def _argv(self, *args: str, netns: str | None = None) -> list[str]:
        argv = ["pg_autoctl", *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", "env", *_env_args(self._env()), *argv]
        return ["ip", "netns", "exec", netns, *argv] if netns else argv

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = True, node: Node | None = None
    ) -> str:
        """Runs one ``pg_autoctl`` command (in ``node``'s namespace if it has one); its exact
        command line is kept in ``self.log``."""
        self.log.append("pg_autoctl " + " ".join(args))
        done = subprocess.run(
            self._argv(*args, netns=node.netns if node else None),
            env=self._env(),
            capture_output=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"pg_autoctl {' '.join(args)} exited {done.returncode}:\n"
                + done.stderr.decode(errors="replace")[-3000:]
            )
        return done.stdout.decode()

    def _run(self, node: Node) -> None:
        logfile = (self.root / f"{node.name}.log").open("ab")
        node.process = subprocess.Popen(
            self._argv("run", "--pgdata", str(node.pgdata), netns=node.netns),
            env=self._env(),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,  # its own process group: stopped as one at the end
        )
        logfile.close()

    # --- the cluster ---------------------------------------------------------------------------

    def monitor_uri(self) -> str:
        return self.ctl(
            "show", "uri", "--pgdata", str(self.monitor.pgdata), "--formation", "monitor"
        ).strip()

    def app_uri(self) -> str:
        """The application's multi-host URI, as pg_auto_failover prints it
        (``target_session_attrs=read-write``)."""
        uri = self.ctl(
            "show", "uri", "--pgdata", str(self.monitor.pgdata), "--formation", "default"
        ).strip()
        return uri + "&user=postgres" + CONNECTION_OPTIONS

    def states(self) -> dict[str, str]:
        """Node name → its current state, as the monitor sees it."""
        out = self.ctl("show", "state", "--pgdata", str(self.monitor.pgdata), "--json", check=False)
        try:
            rows: list[dict[str, Any]] = json.loads(out)
        except ValueError:
            return {}
        return {
            str(r["nodename"]): str(r["current_group_state"])
            for r in rows
            if r["current_group_state"] == r["assigned_group_state"]
        }

    def wait_states(self, wanted: dict[str, str], timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.states()
            if all(states.get(n) == s for n, s in wanted.items()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster states {states}, wanted {wanted}\n{self.tail()}")

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until one node is primary and the other a secondary (caught up), both settled."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.states()
            if sorted(states.values()) == ["primary", "secondary"]:
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster states {states}\n{self.tail()}")

    def primary(self) -> Node:
        states = self.states()
        for node in self.nodes:
            if states.get(node.name) in ("primary", "wait_primary", "single"):
                return node
        raise LookupError(f"no primary: {states}")

    def standby(self) -> Node:
        states = self.states()
        for node in self.nodes:
            if states.get(node.name) == "secondary":
                return node
        raise LookupError(f"no secondary: {states}")

    def kill_node(self, node: Node) -> None:
        """The node's machine dies: SIGKILL of its postmaster and of its keeper (which would
        otherwise restart Postgres in place, often before the monitor fails over)."""
        pid = node.postmaster_pid()
        assert pid is not None and node.process is not None, f"{node.name} is not running"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=10)

    def read_only_url(self, node: Node) -> str:
        return node.url

    def tail(self) -> str:
        parts = []
        for node in [self.monitor, *self.nodes]:
            path = self.root / f"{node.name}.log"
            if path.exists():
                parts.append(f"--- {node.name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def partition(self) -> None:
        """Cuts the link to the namespaced node, both ways (packets are dropped, not refused)."""
        assert self.link is not None, "the cluster was made without a namespace"
        subprocess.run(["ip", "link", "set", self.link, "down"], check=True)

    def heal(self) -> None:
        assert self.link is not None
        subprocess.run(["ip", "link", "set", self.link, "up"], check=True)

    def stop(self) -> None:
        """Stops every keeper and Postgres, whatever state they are in."""
        for node in [*self.nodes, self.monitor]:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(Exception):
                    self.ctl(
                        "stop", "--pgdata", str(node.pgdata), "--immediate", timeout=20, node=node
                    )
        for node in [*self.nodes, self.monitor]:
            if node.process is not None:
                with contextlib.suppress(Exception):
                    node.process.wait(timeout=10)
                if node.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.process.pid, signal.SIGKILL)
                    node.process.wait(timeout=10)
            pid = node.postmaster_pid()
            if pid is not None:  # a postmaster that outlived its keeper
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _env_args(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def netns_missing() -> str | None:
    """Why node_b cannot have a network namespace of its own here, or None."""
    if shutil.which("ip") is None:
        return "ip (iproute2) is missing"
    name = f"lhacheck{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    if made.returncode != 0:
        return "network namespaces are not allowed here: " + made.stderr.decode().strip()
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


def _make_netns(name: str, here: str, there: str) -> None:
    """A namespace joined to this one by a veth pair (a /30): ``here`` here, ``there`` there."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    # Inside, no DNS server is reachable: lookups (pg_autoctl does some) fail at once.
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    run("ip", "netns", "add", name)
    run("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n")
    run("ip", "link", "set", f"{name}n", "netns", name)
    run("ip", "addr", "add", f"{here}/30", "dev", f"{name}h")
    run("ip", "link", "set", f"{name}h", "up")
    run("ip", "netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", f"{name}n")
    run("ip", "netns", "exec", name, "ip", "link", "set", f"{name}n", "up")
    run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")


@contextlib.contextmanager
def cluster(partitionable: bool = False) -> Iterator[Cluster]:
    """A monitor, a primary and a synchronous standby; everything removed at the end. With
    ``partitionable``, node_b runs in a network namespace of its own, joined by a veth pair
    whose link :meth:`Cluster.partition` cuts (the others then listen on that link's address)."""
    root = Path(tempfile.mkdtemp(prefix="ledger-ha-", dir="/tmp"))
    os.chmod(root, 0o755)
    for sub in ("config", "share", "run"):
        (root / sub).mkdir(mode=0o700)
    for path in (root, root / "config", root / "share", root / "run"):
        _chown_to_postgres(path)
    here = there = "127.0.0.1"
    netns = None
    if partitionable:
        netns = f"lha{secrets.token_hex(3)}"
        # One of 16,384 /30s in 10.231/16: two runs at once on one machine do not collide.
        third, fourth = secrets.randbelow(256), secrets.randbelow(64) * 4
        subnet = f"10.231.{third}.{fourth}/30"
        here, there = f"10.231.{third}.{fourth + 1}", f"10.231.{third}.{fourth + 2}"
    c = Cluster(root, Node("monitor", root / "monitor", free_port(), here))
    try:
        if netns:
            _make_netns(netns, here, there)
            c.link = f"{netns}h"
        c.ctl(
            "create", "monitor", "--pgdata", str(c.monitor.pgdata),
            "--pgport", str(c.monitor.port), "--hostname", here,
            "--listen", here, "--auth", "trust", "--no-ssl",
        )  # fmt: skip
        c._run(c.monitor)
        monitor_uri = _wait_uri(c)
        with psycopg.connect(
            f"host=/var/run/postgresql port={c.monitor.port} dbname=pg_auto_failover user=postgres",
            autocommit=True,
        ) as conn:
            for name, value in MONITOR_SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {name} = {value}")
            conn.execute("SELECT pg_reload_conf()")
        for name in ("node_a", "node_b"):
            elsewhere = name == "node_b" and netns is not None
            node = Node(
                name, root / name, free_port(), there if elsewhere else here,
                netns if elsewhere else None,
            )  # fmt: skip
            c.nodes.append(node)
            c.ctl(
                "create", "postgres", "--pgdata", str(node.pgdata),
                "--pgport", str(node.port), "--hostname", node.host,
                "--listen", node.host, "--auth", "trust", "--no-ssl", "--dbname", DBNAME,
                "--monitor", monitor_uri, "--name", name,
                *(("--pg-hba-lan",) if netns else ()),
                node=node,
            )  # fmt: skip
            c.ctl(
                "config", "set", "--pgdata", str(node.pgdata),
                "timeout.network_partition_timeout", str(NETWORK_PARTITION_TIMEOUT_S),
                node=node,
            )  # fmt: skip
            c._run(node)
            # The first node must be primary before the second is created (it is cloned).
            c.wait_states({"node_a": "single"} if name == "node_a" else {})
        c.wait_states({"node_a": "primary", "node_b": "secondary"})
        if netns:  # --pg-hba-lan lets in the replication and postgres; the ledger's logins too
            for node in c.nodes:
                with (node.pgdata / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {subnet} trust\n")
                with psycopg.connect(
                    f"host=/var/run/postgresql port={node.port} dbname=postgres user=postgres"
                ) as conn:
                    conn.execute("SELECT pg_reload_conf()")
        yield c
    finally:
        c.stop()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_uri(c: Cluster) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            uri = c.monitor_uri()
            with psycopg.connect(uri, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return uri
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def with_dbname(url: str, dbname: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(url), "dbname": dbname})
