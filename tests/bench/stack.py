"""The stack under test: child processes, a fresh database, the bench partner, RSS sampling.

Two topologies: `single` (one server on a fresh SQLite file, Envoy in front) and `cluster`
(N servers on a fresh PostgreSQL schema and a Redis key prefix of their own, Envoy balancing).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis
from sqlalchemy.engine import make_url

from gateway.envoy_process import EnvoyPorts, run_envoy
from gateway.processes import stop_process
from gateway.stack import wait_serving
from tests.support import free_port, sql

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Partner:
    """The bench partner's credentials and the tenant it acts for."""

    api_key: str
    api_secret: str
    tenant_id: str = "bench-tenant"
    sub_tenant_id: str = "bench-sub"
    # The ingestion suite's customers: beside the update load's, not among them.
    ingest_sub_tenant_id: str = "bench-ingest"

    def headers(self) -> dict[str, str]:
        return {
            "x-api-key": self.api_key,
            "x-api-secret": self.api_secret,
            "x-tenant-id": self.tenant_id,
            "x-sub-tenant-id": self.sub_tenant_id,
        }


@contextmanager
def child(
    argv: Sequence[str], *, env: dict[str, str], log: IO[bytes]
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is stopped when the block exits, however it exits."""
    proc = subprocess.Popen(list(argv), env=env, stdout=log, stderr=log, cwd=REPO)
    try:
        yield proc
    finally:
        stop_process(proc, grace=15)


def database_env(db_path: Path) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{db_path}"}


def admin(env: dict[str, str], *args: str) -> dict[str, str]:
    """Run `disposition-admin` and return its JSON output."""
    done = subprocess.run(
        [str(BIN / "disposition-admin"), *args], env=env, cwd=REPO, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"disposition-admin {' '.join(args)}: {done.stderr.decode()}")
    result: dict[str, str] = json.loads(done.stdout)
    return result


def create_partner(env: dict[str, str]) -> Partner:
    """The bench partner with a rate limit far above anything this machine can send."""
    issued = admin(env, "partner", "create", "--partner-id", "bench", "--name", "Bench",
                   "--rate-limit-per-minute", "100000000")  # fmt: skip
    partner = Partner(issued["api_key"], issued["api_secret"])
    for sub_tenant_id in (partner.sub_tenant_id, partner.ingest_sub_tenant_id):
        admin(env, "grant", "--partner-id", "bench", "--tenant-id", partner.tenant_id,
              "--sub-tenant-id", sub_tenant_id)  # fmt: skip
    return partner


@contextmanager
def _serving(
    argv: list[str], env: dict[str, str], port: int, log_path: Path, what: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A child gRPC server, yielded once its health service says SERVING on `port`."""
    with log_path.open("ab") as log, child(argv, env=env, log=log) as proc:
        try:
            wait_serving(proc, port)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what}: {exc}; its log ends with:\n{tail}") from None
        yield proc, port


SERVER = (str(BIN / "disposition-server"),)
# The server without the summary's counters (tests/bench/no_counters_server.py): what they cost.
NO_COUNTERS_SERVER = (sys.executable, "-m", "tests.bench.no_counters_server")
# The server that answers an update once validated, before storage: the per-stage table.
STAGE_SERVER = (sys.executable, "-m", "tests.bench.stage_server")


@contextmanager
def grpc_server(
    env: dict[str, str], log_path: Path, argv: Sequence[str] = SERVER
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`disposition-server` (or `argv`) on a free port, yielded once its health service says
    SERVING."""
    port = free_port()
    server_env = {**env, "GRPC_PORT": str(port), "LOG_LEVEL": "WARNING"}
    with _serving(list(argv), server_env, port, log_path, "disposition-server") as started:
        yield started


@contextmanager
def noop_server(log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The ceiling's no-op server (noop_server.py) on a free port, yielded once SERVING."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.noop_server", "--port", str(port)]
    with _serving(argv, dict(os.environ), port, log_path, "no-op server") as started:
        yield started


def ensure_running(
    servers: Sequence[subprocess.Popen[bytes]],
    envoy_admin_port: int,
    what: str = "disposition-server",
) -> None:
    """Fail fast, with a clear message, when a child died (or was killed) between runs."""
    for server in servers:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.returncode} during the bench")
    try:
        url = f"http://127.0.0.1:{envoy_admin_port}/ready"
        with urllib.request.urlopen(url, timeout=5) as reply:
            ready = reply.status == 200
    except OSError:
        ready = False
    if not ready:
        raise RuntimeError("Envoy stopped answering its admin /ready during the bench")


def history_rows(db_path: Path) -> int:
    """Rows in the append-only history (read-only connection; WAL lets it run beside the server)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        (count,) = conn.execute("SELECT count(*) FROM disposition_history").fetchone()
    return int(count)


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB (None once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes have used so far (0 for any that has gone)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def total_rss_mb(pids: Sequence[int]) -> float | None:
    """The processes' VmRSS added up (None once they have all gone)."""
    values = [value for value in map(rss_mb, pids) if value is not None]
    return sum(values) if values else None


class RssSampler:
    """Samples the processes' total VmRSS every `interval` seconds while the `with` block runs."""

    def __init__(self, *pids: int, interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = total_rss_mb(self.pids)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = total_rss_mb(self.pids)
        if end is not None:
            self.samples.append(end)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def end(self) -> float:
        return self.samples[-1] if self.samples else 0.0


@dataclass
class Topology:
    """The running stack: what the load targets and how its writes are counted."""

    name: str
    description: str
    env: dict[str, str]
    partner: Partner
    servers: list[subprocess.Popen[bytes]]
    server_ports: list[int]
    envoy: EnvoyPorts
    grpc_port: int  # where gRPC load goes: the one server (single) or Envoy (cluster)
    history_rows: Callable[[], int]

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]


def single_topology(
    workdir: Path,
    stack: ExitStack,
    seed: Callable[[Path], None] | None = None,
    argv: Sequence[str] = SERVER,
) -> Topology:
    """One server on a fresh SQLite file (WAL), Envoy in front; gRPC load goes to the server.
    `seed` gets the database file after the bench partner is made, before the server starts."""
    db = workdir / "bench.db"
    env = database_env(db)
    partner = create_partner(env)
    if seed is not None:
        seed(db)
    server, port = stack.enter_context(grpc_server(env, workdir / "server.log", argv))
    envoy = stack.enter_context(run_envoy(grpc_port=port, log_path=workdir / "envoy.log"))
    return Topology(
        "single",
        "fresh SQLite file (WAL), SQLITE_SYNCHRONOUS=FULL (server default), in-process rate limits",
        env, partner, [server], [port], envoy, port, lambda: history_rows(db),
    )  # fmt: skip


def cluster_topology(
    workdir: Path,
    stack: ExitStack,
    *,
    replicas: int,
    database_url: str,
    redis_url: str,
    seed: Callable[[str], None] | None = None,
    argv: Sequence[str] = SERVER,
) -> Topology:
    """`replicas` servers on a PostgreSQL schema and a Redis key prefix of this run (both
    removed afterwards), Envoy balancing over them; gRPC load goes through Envoy too (one
    replica: straight to it, as for a single SQLite server). `seed` gets the schema's URL after
    the bench partner is made, before the servers start."""
    tag = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    url = make_url(database_url).update_query_dict({"search_path": tag})
    schema_url = url.render_as_string(hide_password=False)
    prefix = f"{tag}:"
    env = {**os.environ, "DATABASE_URL": schema_url, "REDIS_URL": redis_url,
           "REDIS_KEY_PREFIX": prefix}  # fmt: skip

    def cleanup() -> None:
        sql(database_url, f'DROP SCHEMA IF EXISTS "{tag}" CASCADE')
        with redis.Redis.from_url(redis_url) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)

    stack.callback(cleanup)  # runs after every child below has stopped
    admin(env, "migrate")
    partner = create_partner(env)
    if seed is not None:
        seed(schema_url)
    started = [
        stack.enter_context(grpc_server(env, workdir / f"server{i}.log", argv))
        for i in range(replicas)
    ]
    ports = [port for _, port in started]
    envoy = stack.enter_context(run_envoy(grpc_port=ports, log_path=workdir / "envoy.log"))

    def count() -> int:
        return int(sql(schema_url, "SELECT count(*) FROM disposition_history")[0][0])

    return Topology(
        "cluster",
        f"{replicas} replica(s) on PostgreSQL ({make_url(database_url).host}, schema {tag}), "
        "rate limits in Redis",
        env, partner, [server for server, _ in started], ports, envoy,
        ports[0] if replicas == 1 else envoy.http_port, count,
    )  # fmt: skip


@dataclass
class Ceiling:
    """The no-op servers behind their own Envoy: what the real topology's load is compared with."""

    servers: list[subprocess.Popen[bytes]]
    server_ports: list[int]
    envoy: EnvoyPorts
    grpc_port: int  # where gRPC load goes: as for the real topology, direct or through Envoy

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]


def ceiling_for(topology: Topology, workdir: Path, stack: ExitStack) -> Ceiling:
    """As many no-op servers as the topology has servers, behind an Envoy rendered from the
    same envoy.yaml with the same options; gRPC load goes direct (single) or through Envoy
    (cluster), as it does for the real topology."""
    started = [
        stack.enter_context(noop_server(workdir / f"noop{i}.log"))
        for i in range(len(topology.servers))
    ]
    ports = [port for _, port in started]
    envoy = stack.enter_context(run_envoy(grpc_port=ports, log_path=workdir / "envoy-ceiling.log"))
    direct = topology.grpc_port in topology.server_ports
    return Ceiling(
        [server for server, _ in started], ports, envoy, ports[0] if direct else envoy.http_port
    )
