"""The REST tests' stack: the dev stack (a disposition-server process and Envoy) on a database of
either engine, with partner 123 and customer123 as in the documentation, and REST helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Executable, Row

from devstack import Credentials, EnvoyPorts, ServerProcess, onboard_at
from devstack import start_stack as start_devstack
from tests.support.databases import settings_for, sql
from tests.support.http_client import Reply, call
from tests.support.payloads import batch_item

UPDATE = "/api/v1/partner/ingest/disposition-status"
BATCH = "/api/v1/partner/ingest/batch-call"
BATCH_UPDATE = "/api/v1/partner/ingest/disposition-status/batch"


@dataclass
class Stack:
    database_url: str
    db_path: Path | None  # the SQLite file (None on PostgreSQL)
    server: ServerProcess
    envoy: EnvoyPorts
    partner: Credentials
    workers: list[ServerProcess] = field(default_factory=list)  # disposition-webhooks

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        creds: Credentials | None = None,
        **headers: str | None,
    ) -> Reply:
        """A REST call through Envoy; `body` is JSON-encoded unless bytes; headers as overrides."""
        raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        headers_ = (creds or self.partner).headers(**headers)
        return call(self.envoy.http_port, method, path, raw, headers_)

    def put(self, body: object, creds: Credentials | None = None, **headers: str | None) -> Reply:
        return self.request("PUT", UPDATE, body, creds, **headers)

    def ingest(self, creds: Credentials, *items: dict[str, object]) -> Reply:
        return call(
            self.envoy.http_port, "POST", BATCH, json.dumps({"data": list(items)}), creds.headers()
        )

    def onboard(self, partner_id: str, **kwargs: object) -> Credentials:
        return onboard_at(self.database_url, partner_id, **kwargs)

    def sql(self, statement: str | Executable, **params: Any) -> list[Row[Any]]:
        """One statement on the stack's database (either engine), committed."""
        return sql(self.database_url, statement, **params)

    def history(self, customer_id: str) -> list[tuple[str | None, str | None, str, str]]:
        rows = self.sql(
            "SELECT h.previous_status, h.new_status, h.source, h.request_id"
            " FROM disposition_history h JOIN customers c ON c.id = h.customer_pk"
            " WHERE c.customer_id = :customer_id ORDER BY h.id",
            customer_id=customer_id,
        )
        return [tuple(row) for row in rows]


def start_stack(
    tmp: Path,
    database_url: str | None = None,
    server_env: Mapping[str, str] | None = None,
    *,
    webhook_workers: int = 0,
) -> Iterator[Stack]:
    """The stack on `database_url` (at head already on PostgreSQL), else a new SQLite file;
    `server_env`: the server's extra environment; `webhook_workers`: how many
    disposition-webhooks processes deliver the webhooks (none: the server does)."""
    url = database_url or f"sqlite+aiosqlite:///{tmp / 'disposition.db'}"
    with start_devstack(
        url, workdir=tmp, server_env=server_env, webhook_workers=[{}] * webhook_workers
    ) as running:
        stack = Stack(
            url, settings_for(url).sqlite_path(), running.servers[0], running.envoy,
            Credentials("", "", ""), running.workers,
        )  # fmt: skip
        stack.partner = stack.onboard("123")
        reply = stack.ingest(stack.partner, batch_item("call-1", "customer123"))
        assert reply.status == 200, reply.body
        yield stack
