"""What the property tests (hypothesis) share: their settings, and a server process seeded with a
partner and three customers whose database tells when anything commits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from hypothesis import HealthCheck, settings

from devstack import Credentials, ServerProcess, onboard_at
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from tests.support.databases import CommitWatch
from tests.support.grpc_calls import batch_request
from tests.support.payloads import batch_item

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "60"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
SEEDED_CUSTOMERS = ("a", "0", "customer")


@dataclass
class Seeded:
    server: ServerProcess
    partner: Credentials
    watch: CommitWatch

    def data_version(self) -> int:
        """Moves whenever another connection commits a change to the server's database."""
        return self.watch.version()


@contextmanager
def seeded_server(tmp: Path) -> Iterator[Seeded]:
    """A server process on a new SQLite file in `tmp`: partner `prop` (a limit it never reaches)
    and SEEDED_CUSTOMERS with status `new`. Its log must hold no traceback at the end."""
    db = tmp / "disposition.db"
    url = f"sqlite+aiosqlite:///{db}"
    server = ServerProcess(url, tmp / "server.log")
    server.start()
    try:
        partner = onboard_at(url, "prop", rate_limit_per_minute=1_000_000_000)
        items = [batch_item(f"call-{c}", c, "new") for c in SEEDED_CUSTOMERS]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            ingestion_grpc.CallIngestionServiceStub(channel).IngestBatchCalls(
                batch_request(*items), metadata=partner.metadata(), timeout=30
            )
        yield Seeded(server, partner, CommitWatch(db))
    finally:
        server.stop()
    assert "Traceback" not in (tmp / "server.log").read_text()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
