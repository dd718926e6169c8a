"""The stack under test: child processes, a fresh database, the bench partner, RSS sampling.

Two topologies: `single` (one server on a fresh SQLite file, Envoy in front) and `cluster`
(N servers on a fresh PostgreSQL schema and a Redis key prefix of their own, Envoy balancing).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from sqlalchemy.engine import make_url

import devstack.server
from devstack import Credentials, EnvoyPorts, ServerProcess, Stack, onboard, run_envoy, start_stack
from server.db import Database
from server.settings import Settings
from tests.support.databases import sql

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


TENANT, SUB_TENANT = "bench-tenant", "bench-sub"
# The ingestion suite's customers: beside the update load's, not among them.
INGEST_SUB_TENANT = "bench-ingest"


def database_env(db_path: Path) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{db_path}"}


def create_partner(database_url: str) -> Credentials:
    """Migrate the database; the bench partner, with a rate limit far above anything this
    machine can send, acting for TENANT/SUB_TENANT (and granted INGEST_SUB_TENANT)."""

    async def go() -> Credentials:
        db = Database(Settings(database_url=database_url, grpc_port=0))
        try:
            await db.create_schema()
            return await onboard(
                db, "bench", grants=[(TENANT, SUB_TENANT), (TENANT, INGEST_SUB_TENANT)],
                rate_limit_per_minute=100_000_000,
            )  # fmt: skip
        finally:
            await db.dispose()

    return asyncio.run(go())


SERVER = devstack.server.SERVER
# The server without the summary's counters (tests/bench/no_counters_server.py): what they cost.
NO_COUNTERS_SERVER = (sys.executable, "-m", "tests.bench.no_counters_server")
# The server that answers an update once validated, before storage: the per-stage table.
STAGE_SERVER = (sys.executable, "-m", "tests.bench.stage_server")
# The ceiling: a server whose update does no work at all (noop_server.py).
NOOP_SERVER = (sys.executable, "-m", "tests.bench.noop_server")


@contextmanager
def grpc_server(
    env: dict[str, str], log_path: Path, argv: Sequence[str] = SERVER
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`disposition-server` (or `argv`) on a free port, yielded once it logged "serving"."""
    server = ServerProcess(None, log_path, argv=argv, **{**env, "LOG_LEVEL": "WARNING"})
    server.start()
    try:
        assert server.process is not None
        yield server.process, server.port
    finally:
        server.stop()


def noop_server(log_path: Path) -> AbstractContextManager[tuple[subprocess.Popen[bytes], int]]:
    """The ceiling's no-op server on a free port, yielded once it logged "serving"."""
    return grpc_server(dict(os.environ), log_path, NOOP_SERVER)


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
    partner: Credentials
    servers: list[subprocess.Popen[bytes]]
    server_ports: list[int]
    envoy: EnvoyPorts
    grpc_port: int  # where gRPC load goes: the one server (single) or Envoy (cluster)
    history_rows: Callable[[], int]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # disposition-webhooks

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    @property
    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]


def _processes(running: Stack) -> list[subprocess.Popen[bytes]]:
    return [server.process for server in running.servers if server.process is not None]


def _workers(running: Stack) -> list[subprocess.Popen[bytes]]:
    return [worker.process for worker in running.workers if worker.process is not None]


def single_topology(
    workdir: Path,
    stack: ExitStack,
    seed: Callable[[Path], None] | None = None,
    argv: Sequence[str] = SERVER,
    server_env: Mapping[str, str] | None = None,
    webhook_workers: int = 0,
) -> Topology:
    """One server on a fresh SQLite file (WAL), Envoy in front; gRPC load goes to the server.
    `seed` gets the database file after the bench partner is made, before the server starts;
    `server_env` is the server's environment beyond the bench's; `webhook_workers`: how many
    disposition-webhooks processes deliver (none: the server does)."""
    db = workdir / "bench.db"
    env = database_env(db)
    partner = create_partner(env["DATABASE_URL"])
    if seed is not None:
        seed(db)
    running = stack.enter_context(start_stack(
        env["DATABASE_URL"], workdir=workdir, argv=argv,
        server_env={**(server_env or {}), "LOG_LEVEL": "WARNING"},
        webhook_workers=[{}] * webhook_workers,
    ))  # fmt: skip
    return Topology(
        "single",
        "fresh SQLite file (WAL), SQLITE_SYNCHRONOUS=FULL (server default), in-process rate limits",
        env, partner, _processes(running), running.server_ports, running.envoy,
        running.grpc_port, lambda: history_rows(db), _workers(running),
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
    partner = create_partner(schema_url)  # migrates the schema first
    if seed is not None:
        seed(schema_url)
    running = stack.enter_context(start_stack(
        schema_url, workdir=workdir, replicas=[{}] * replicas, argv=argv,
        server_env={"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix, "LOG_LEVEL": "WARNING"},
    ))  # fmt: skip
    ports = running.server_ports

    def count() -> int:
        return int(sql(schema_url, "SELECT count(*) FROM disposition_history")[0][0])

    return Topology(
        "cluster",
        f"{replicas} replica(s) on PostgreSQL ({make_url(database_url).host}, schema {tag}), "
        "rate limits in Redis",
        env, partner, _processes(running), ports, running.envoy,
        ports[0] if replicas == 1 else running.http_port, count,
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
