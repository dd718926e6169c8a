"""gRPC helpers for tests: calls, decoded rich error details, the change feed's watcher, history
rows, and waiting for a running server to notice an admin change."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import select

from devstack import Credentials
from disposition.v1 import call_ingestion_service_pb2 as ingestion_pb2
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from server.app import App
from server.db import Database
from server.models import Customer, DispositionHistory
from tests.support.payloads import batch_item


async def fail(call: Any) -> grpc.aio.AioRpcError:
    """The error a call ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def update_request(customer_id: str, status: str | None = None) -> Any:
    request = disposition_pb2.UpdateDispositionStatusRequest(customer_id=customer_id)
    if status is not None:
        request.disposition_status = status
    return request


def as_dict(message: Any) -> dict[str, Any]:
    """A reply as JSON-like data, every field present (proto field names)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def batch_request(*items: dict[str, Any]) -> Any:
    return json_format.ParseDict({"data": list(items)}, ingestion_pb2.IngestBatchCallsRequest())


async def ingest(stub: Any, creds: Credentials, *customers: str, status: str | None = None) -> Any:
    items = [batch_item(call_id_for(creds, c), c, status) for c in customers]
    return await stub.IngestBatchCalls(batch_request(*items), metadata=creds.metadata())


def call_id_for(creds: Credentials, customer_id: str) -> str:
    """A stable call id (at most 255 characters) for a test's customer."""
    return f"call-{creds.partner_id}-{hashlib.sha1(customer_id.encode()).hexdigest()}"


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, keyed by type name, decoded the way a client
    would: grpcio-status's `rpc_status.from_call`, which also checks that the rich status
    agrees with the call's own code and message (ValueError if not)."""
    found: dict[str, Any] = {}
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError is a Call
    for detail in status.details if status is not None else ():
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.ResourceInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in details(error)["BadRequest"].field_violations]


async def trailing(error_or_call: Any, key: str) -> str | None:
    """A trailing metadata value of a finished call or of an AioRpcError."""
    metadata = error_or_call.trailing_metadata()
    if not isinstance(error_or_call, grpc.aio.AioRpcError):
        metadata = await metadata
    for name, value in metadata or ():
        if name == key:
            return str(value)
    return None


async def history(db: Database, customer_id: str) -> list[tuple[str | None, str | None, str]]:
    """(previous, new, source) of a customer's history, oldest first."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                DispositionHistory.previous_status,
                DispositionHistory.new_status,
                DispositionHistory.source,
            )
            .join(Customer, Customer.id == DispositionHistory.customer_pk)
            .where(Customer.customer_id == customer_id)
            .order_by(DispositionHistory.id)
        )
        return [(p, n, s) for p, n, s in rows]


async def stored_status(db: Database, customer_id: str, tenant_id: str = "tenant1") -> Any:
    async with db.read() as conn:
        return (
            await conn.execute(
                select(Customer.disposition_status).where(
                    Customer.customer_id == customer_id, Customer.tenant_id == tenant_id
                )
            )
        ).scalar_one()


async def access_change_seen(app: App, before: int, timeout: float = 5.0) -> None:
    """Wait until the server's own poller has emptied its access cache since generation
    `before` (what an admin change, made by another process, leads to)."""
    cache = app.access_cache
    assert cache is not None, "the server runs without an access cache"
    deadline = asyncio.get_running_loop().time() + timeout
    while cache.generation == before:
        assert asyncio.get_running_loop().time() < deadline, "the access cache never noticed"
        await asyncio.sleep(0.005)


class Watcher:
    """A WatchDispositionChanges stream read by a background task into a queue."""

    def __init__(self, stub: Any, creds: Credentials, **request: Any) -> None:
        self.call = stub.WatchDispositionChanges(
            disposition_pb2.WatchDispositionChangesRequest(**request), metadata=creds.metadata()
        )
        self.replies: asyncio.Queue[disposition_pb2.WatchDispositionChangesResponse] = (
            asyncio.Queue()
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for reply in self.call:
            await self.replies.put(reply)

    async def first(self) -> disposition_pb2.WatchDispositionChangesResponse:
        return await asyncio.wait_for(self.replies.get(), 10)

    async def changes(self, count: int) -> list[disposition_pb2.DispositionChange]:
        """The next `count` changes (heartbeats skipped); no more in the replies that bring them."""
        found: list[disposition_pb2.DispositionChange] = []
        while len(found) < count:
            reply = await asyncio.wait_for(self.replies.get(), 10)
            found.extend(reply.changes)
        assert len(found) == count, found
        return found

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()
