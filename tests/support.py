"""Helpers shared by the tests: real servers, real databases, real credentials."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.processes import stop_process
from server.db import Database
from server.domain import partners
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Credentials:
    partner_id: str
    api_key: str
    api_secret: str
    tenant_id: str = "tenant1"
    sub_tenant_id: str = "subtenant1"

    def headers(self, **overrides: str | None) -> dict[str, str]:
        """REST headers / gRPC metadata; pass name=None to drop one (underscores -> dashes)."""
        headers = {
            "x-api-key": self.api_key,
            "x-api-secret": self.api_secret,
            "x-tenant-id": self.tenant_id,
            "x-sub-tenant-id": self.sub_tenant_id,
        }
        for name, value in overrides.items():
            key = name.replace("_", "-")
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return headers

    def metadata(self, **overrides: str | None) -> tuple[tuple[str, str], ...]:
        return tuple(self.headers(**overrides).items())


def settings_for(database_url: str, **overrides: Any) -> Settings:
    return Settings(database_url=database_url, grpc_port=0, **overrides)


async def onboard(
    db: Database,
    partner_id: str,
    *,
    grants: Sequence[tuple[str, str]] = (("tenant1", "subtenant1"),),
    rate_limit_per_minute: int | None = None,
) -> Credentials:
    """Create a partner with its grants, as `disposition-admin` would."""
    issued = await partners.create_partner(
        db,
        partner_id=partner_id,
        name=f"Partner {partner_id}",
        rate_limit_per_minute=rate_limit_per_minute,
    )
    for tenant_id, sub_tenant_id in grants:
        await partners.grant(
            db, partner_id=partner_id, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
        )
    tenant, sub = grants[0] if grants else ("tenant1", "subtenant1")
    return Credentials(partner_id, issued.api_key, issued.api_secret, tenant, sub)


def batch_item(
    call_id: str, customer_id: str, status: str | None = None, **call: str
) -> dict[str, Any]:
    """A valid batch-call item (JSON form); keyword arguments override call fields."""
    customer: dict[str, Any] = {"id": customer_id}
    if status is not None:
        customer["disposition_status"] = status
    return {
        "call": {
            "id": call_id,
            "recording_url": "https://recordings.example.com/calls/1.mp3",
            "start_time": "2026-11-26T09:30:00Z",
            "end_time": "2026-11-26T09:34:10Z",
            "contact_number": "+14155550123",
            **call,
        },
        "agent": {"id": "agent-7", "email": "agent7@example.com", "name": "Agent Seven"},
        "customer": customer,
    }


class ServerProcess:
    """`disposition-server` as a real child process on an ephemeral port."""

    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "GRPC_PORT": "0",
            "SHUTDOWN_GRACE_SECONDS": "5",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> int:
        log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [str(BIN / "disposition-server")], env=self.env, stdout=log, stderr=log, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_bytes()[offset:].splitlines():
                if b'"serving"' in line:
                    self.port = int(json.loads(line)["port"])
                    return self.port
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        return stop_process(self.process, grace=timeout, sig=sig)

    def log_lines(self) -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in self.log_path.read_text().splitlines()
            if line.startswith("{")
        ]


@contextmanager
def server_process(database_url: str, log_path: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(database_url, log_path, **env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(coro: Any) -> Any:
    """Run a coroutine from synchronous test code (its own event loop)."""
    return asyncio.run(coro)
