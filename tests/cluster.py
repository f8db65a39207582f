"""A pg_auto_failover cluster on loopback ports, for tests: a monitor, a primary, a standby.

Everything lives in one temporary directory (data dirs, Unix sockets, pg_autoctl's config and
state, logs) and is stopped and removed at the end, even when the test fails. Postgres refuses
to run as root, so when the tests run as root every ``pg_autoctl`` runs as the ``postgres`` OS
user. Tests that use it skip with a clear message when ``pg_autoctl`` is not installed
(``apt-get install -y postgresql-15-auto-failover``).

Several clusters run at once on one machine (two test runs, or two pytest-xdist workers), so
nothing a cluster uses may be shared or taken by another:

- every TCP port is held from its choice to the cluster's end (:func:`reserve_port`: a socket
  bound to it, which the kernel's port choice for others then avoids, and a lock file), also
  while a node is down between a stop and a restart;
- the network namespace's /30 is locked too, and checked unused;
- each cluster's Unix sockets are in its own directory (``PG_REGRESS_SOCK_DIR``, which
  ``pg_autoctl`` passes to Postgres as ``-k``), not the shared ``/var/run/postgresql``, where
  two servers on one port number would meet;
- every URL a test connects with is checked, host by host, to reach this cluster
  (:meth:`Cluster.check_ours`: the ``system_identifier`` that initdb drew for node_a, which its
  standbys share, and the monitor's own).
"""

from __future__ import annotations

import contextlib
import fcntl
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

from ledger.migrate import migrate

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
    return postgres_missing()


def postgres_missing() -> str | None:
    """Why a Postgres 15 server (:func:`lonely_primary`) cannot be started here, or None."""
    if not (PG_BIN / "pg_ctl").exists():
        return f"the Postgres 15 binaries are missing ({PG_BIN})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' OS user to run Postgres as"
    return None


LOCKS = Path("/tmp/ledger-test-locks")
"""Lock files of the ports and subnets held by the clusters running on this machine."""


def free_port() -> int:
    """A port free now, for a socket nothing will listen on (refused connections); use
    :func:`reserve_port` for a port a server will listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lock(stack: contextlib.ExitStack, name: str) -> bool:
    """Takes ``LOCKS/name`` (released by ``stack``, or when this process dies); False if
    another process holds it. The holder removes the file as it releases it, so that runs leave
    no files behind; a file removed after this process opened it is no lock any more (its
    inode differs from the path's), and counts as held."""
    LOCKS.mkdir(mode=0o1777, exist_ok=True)
    path = LOCKS / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return False
    stack.callback(_unlock, path, fd)
    return True


def _unlock(path: Path, fd: int) -> None:
    """Removes the lock file while still holding it, then releases it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def reserve_port(stack: contextlib.ExitStack) -> int:
    """A port held until ``stack`` closes, for a server (Postgres, uvicorn) to listen on.

    The hold is a socket bound to the port on every address with SO_REUSEADDR, never
    listening: the kernel then never picks that port for another process's ``bind(("", 0))``
    (such as :func:`free_port` in a run of older code), nor lets a bind without SO_REUSEADDR
    take it, while a server that sets SO_REUSEADDR (Postgres and uvicorn do) binds it
    explicitly. It also covers the seconds a node is down between a stop and a restart. A lock
    file per port keeps out the other runs of this code that chose it a moment before."""
    for _ in range(100):
        hold = socket.socket()
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("0.0.0.0", 0))
        port = int(hold.getsockname()[1])
        if _lock(stack, f"port-{port}.lock"):
            stack.callback(hold.close)
            return port
        hold.close()
    raise RuntimeError("no free port could be reserved in 100 tries")


@dataclass
class Node:
    name: str
    pgdata: Path
    port: int
    host: str = "127.0.0.1"
    netns: str | None = None
    """The network namespace the node runs in (its own host, for partitions), if any."""
    process: subprocess.Popen[bytes] | None = None
    sockets: Path | None = None
    """The directory of its Unix socket (the cluster's own)."""

    @property
    def url(self) -> str:
        return f"host={self.host} port={self.port} dbname={DBNAME} user=postgres"

    @property
    def local_url(self) -> str:
        """Its Unix socket, as postgres: reachable from this host even across a partition."""
        return f"host={self.sockets} port={self.port} dbname={DBNAME} user=postgres"

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
    leases: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """The ports and subnet this cluster holds (:func:`reserve_port`), released at its end."""
    identifiers: dict[str, int] = field(default_factory=dict)
    """Node name → the ``system_identifier`` of its Postgres, read through its own socket."""

    @property
    def sockets(self) -> Path:
        return self.root / "sockets"

    # --- running pg_autoctl -------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_DATA_HOME": str(self.root / "share"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "LANG": "C.UTF-8",
            # Every Postgres of this cluster puts its Unix socket here (pg_autoctl passes it
            # as -k), and pg_autoctl finds them here: not in /var/run/postgresql, shared by
            # every cluster on the machine.
            "PG_REGRESS_SOCK_DIR": str(self.sockets),
            "PGHOST": str(self.sockets),
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

    def check_ours(self, url: str) -> str:
        """``url`` itself, once every host in it that answers has answered with this
        cluster's ``system_identifier`` (read as postgres: the login in the URL may not read
        it), and at least one has. A URL that reaches any other Postgres (another run's
        cluster on a port it took) fails here, before a test writes or reads through it. A
        host that does not answer (a node down) is no other cluster: its port is still held."""
        params = conninfo_to_dict(url)
        hosts = str(params.get("host", "")).split(",")
        ports = str(params.get("port", "")).split(",")
        if len(ports) == 1:
            ports = ports * len(hosts)
        reached, silent = 0, []
        for host, port in zip(hosts, ports, strict=True):
            single = {
                k: v for k, v in params.items() if k not in ("target_session_attrs", "password")
            }
            single.update(host=host, port=port, user="postgres")
            try:
                conn = psycopg.connect(make_conninfo("", **single), autocommit=True)
            except psycopg.OperationalError as error:
                silent.append(f"{host}:{port}: {error}")
                continue
            with conn:
                self.assert_ours(conn)
            reached += 1
        assert reached, f"no host of {url} answered: {silent}"
        return url

    def assert_ours(self, conn: psycopg.Connection[Any]) -> None:
        """That ``conn`` (a superuser's) is connected to a data node of this cluster."""
        ours = {v for name, v in self.identifiers.items() if name != "monitor"}
        theirs = _identifier(conn)
        info = conn.info
        assert theirs in ours, (
            f"{info.host}:{info.port} is another cluster's Postgres ({theirs}, ours {ours})"
        )

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

    def wait_healthy(
        self, timeout: float = START_TIMEOUT_S, among: list[Node] | None = None
    ) -> None:
        """Until one node (of ``among``, by default all) is primary and every other a
        secondary (caught up), all settled."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        names = [n.name for n in among or self.nodes]
        wanted = ["primary"] + ["secondary"] * (len(names) - 1)
        while time.monotonic() < deadline:
            states = self.states()
            if sorted(states.get(n, "") for n in names) == wanted:
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

    def restart(self, node: Node) -> None:
        """Starts a killed node's keeper again: it restarts Postgres and rejoins as told by
        the monitor (the standby of whichever node is primary now)."""
        assert node.process is not None and node.process.poll() is not None, "still running"
        self._run(node)

    def setting(self, node: Node, name: str) -> str:
        """A setting of ``node``'s Postgres as it is now, through its socket."""
        with psycopg.connect(with_dbname(node.local_url, "postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        assert row is not None
        return str(row[0])

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
def cluster(partitionable: bool = False, standbys: int = 1) -> Iterator[Cluster]:
    """A monitor, a primary and ``standbys`` synchronous standbys (node_a, node_b, ...);
    everything removed at the end. With ``partitionable``, node_b runs in a network namespace
    of its own, joined by a veth pair whose link :meth:`Cluster.partition` cuts (the others
    then listen on that link's address)."""
    root = Path(tempfile.mkdtemp(prefix="ledger-ha-", dir="/tmp"))
    os.chmod(root, 0o755)
    for sub in ("config", "share", "run", "sockets"):
        (root / sub).mkdir(mode=0o700)
    for path in (root, root / "config", root / "share", root / "run", root / "sockets"):
        _chown_to_postgres(path)
    c = Cluster(root, Node("monitor", root / "monitor", 0))
    netns = None
    try:
        here = there = "127.0.0.1"
        if partitionable:
            netns = f"lha{secrets.token_hex(3)}"
            subnet, here, there = _reserve_subnet(c.leases)
        c.monitor.host, c.monitor.port = here, reserve_port(c.leases)
        if netns:
            _make_netns(netns, here, there)
            c.link = f"{netns}h"
        c.ctl(
            "create", "monitor", "--pgdata", str(c.monitor.pgdata),
            "--pgport", str(c.monitor.port), "--hostname", here,
            "--listen", here, "--auth", "trust", "--no-ssl",
        )  # fmt: skip
        c._run(c.monitor)
        c.monitor.sockets = c.sockets
        monitor_uri = _wait_uri(c)
        local = with_dbname(c.monitor.local_url, "pg_auto_failover")
        with psycopg.connect(local, autocommit=True) as conn:
            c.identifiers["monitor"] = _identifier(conn)
            for name, value in MONITOR_SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {name} = {value}")
            conn.execute("SELECT pg_reload_conf()")
        with psycopg.connect(monitor_uri, autocommit=True) as conn:  # TCP: the same server?
            assert _identifier(conn) == c.identifiers["monitor"], "another monitor answered"
        for index in range(1 + standbys):
            name = f"node_{'abcdefgh'[index]}"
            elsewhere = name == "node_b" and netns is not None
            node = Node(
                name, root / name, reserve_port(c.leases), there if elsewhere else here,
                netns if elsewhere else None, sockets=c.sockets,
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
            # Each node is settled before the next is created (standbys are clones of node_a).
            c.wait_states({name: "single" if index == 0 else "secondary"})
            if index == 0:
                c.identifiers[name] = _identifier_of(node)
        c.wait_healthy()
        assert c.primary().name == "node_a", c.states()
        for node in c.nodes[1:]:  # clones of node_a: the same identifier
            c.identifiers[node.name] = _identifier_of(node)
            assert c.identifiers[node.name] == c.identifiers["node_a"], c.identifiers
        if netns:  # --pg-hba-lan lets in the replication and postgres; the ledger's logins too
            for node in c.nodes:
                with (node.pgdata / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {subnet} trust\n")
                with psycopg.connect(with_dbname(node.local_url, "postgres")) as conn:
                    conn.execute("SELECT pg_reload_conf()")
        c.check_ours(c.app_uri())
        yield c
    finally:
        c.stop()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        c.leases.close()
        shutil.rmtree(root, ignore_errors=True)


def _identifier(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return int(row[0])


def _identifier_of(node: Node) -> int:
    """The ``system_identifier`` of ``node``'s Postgres, through its socket, once it is up
    (``single`` is settled during ``pg_autoctl create``, before ``run`` starts Postgres)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = with_dbname(node.local_url, "postgres")
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                return _identifier(conn)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _reserve_subnet(stack: contextlib.ExitStack) -> tuple[str, str, str]:
    """A /30 in 10.231/16 (one of 16,384) no other cluster here uses, held until ``stack``
    closes: (the subnet, this side's address, the namespace's)."""
    for _ in range(100):
        third, fourth = secrets.randbelow(256), secrets.randbelow(64) * 4
        base = f"10.231.{third}"
        if not _lock(stack, f"net-{base}.{fourth}.lock"):
            continue
        shown = subprocess.run(
            ["ip", "-o", "addr", "show", "to", f"{base}.{fourth}/30"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        if not shown.stdout.strip():  # not taken by a run of older code either
            return f"{base}.{fourth}/30", f"{base}.{fourth + 1}", f"{base}.{fourth + 2}"
    raise RuntimeError("no free /30 in 10.231/16 in 100 tries")


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
    return make_conninfo("", **{**conninfo_to_dict(url), "dbname": dbname})


@contextlib.contextmanager
def lonely_primary() -> Iterator[str]:
    """A Postgres 15 whose every commit waits for a synchronous standby that never comes
    (``synchronous_standby_names = 'nobody'``), as a primary's do while its standby is gone
    and the monitor has not yet given it up; migrated (without waiting), on a socket of its
    own. Yields its owner's URL (as postgres); stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="ledger-lonely-", dir="/tmp"))
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    for path in (root, sockets):
        _chown_to_postgres(path)

    def run(*argv: str) -> None:
        if os.geteuid() == 0:
            argv = ("runuser", "-u", "postgres", "--", *argv)
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    with contextlib.ExitStack() as leases:
        port = reserve_port(leases)  # the socket's name; it listens on no TCP address
        try:
            run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                "--no-sync")  # fmt: skip
            with (data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{sockets}'\n"
                    "shared_buffers = 32MB\nsynchronous_standby_names = 'nobody'\n"
                )
            run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start")
            url = f"host={sockets} port={port} dbname=postgres user=postgres"
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SET synchronous_commit = local")
                conn.execute(f"CREATE DATABASE {DBNAME}")
            owner = with_dbname(url, DBNAME)
            migrate(owner + " options='-c synchronous_commit=local'")
            yield owner
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
            shutil.rmtree(root, ignore_errors=True)
