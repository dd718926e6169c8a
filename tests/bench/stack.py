"""The stack under test: child processes, a fresh database, the bench partner, RSS sampling."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.processes import stop_process
from gateway.stack import wait_serving
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Partner:
    """The bench partner's credentials and the tenant it acts for."""

    api_key: str
    api_secret: str
    tenant_id: str = "bench-tenant"
    sub_tenant_id: str = "bench-sub"

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
    admin(env, "grant", "--partner-id", "bench", "--tenant-id", partner.tenant_id,
          "--sub-tenant-id", partner.sub_tenant_id)  # fmt: skip
    return partner


@contextmanager
def grpc_server(
    env: dict[str, str], log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`disposition-server` on a free port, yielded once its health service says SERVING."""
    port = free_port()
    server_env = {**env, "GRPC_PORT": str(port), "LOG_LEVEL": "WARNING"}
    with (
        log_path.open("ab") as log,
        child([str(BIN / "disposition-server")], env=server_env, log=log) as proc,
    ):
        try:
            wait_serving(proc, port)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}; its log ends with:\n{tail}") from None
        yield proc, port


def ensure_running(server: subprocess.Popen[bytes], envoy_admin_port: int) -> None:
    """Fail fast, with a clear message, when a child died (or was killed) between runs."""
    if server.poll() is not None:
        raise RuntimeError(f"disposition-server exited with {server.returncode} during the bench")
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds while the `with` block runs."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = rss_mb(self.pid)
        if end is not None:
            self.samples.append(end)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def end(self) -> float:
        return self.samples[-1] if self.samples else 0.0
