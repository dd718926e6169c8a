"""Concurrent writers on either engine (PostgreSQL: real row locks and unique-index waits).

Updates of one customer serialize on its row; batch-call ingestions racing for the same new
customers and call ids serialize on the unique indexes (INSERT ... ON CONFLICT DO NOTHING,
then lock, or start over) instead of failing with a unique violation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from devstack import Credentials
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.models import Call, Customer, DispositionHistory
from tests.support.databases import settings_for
from tests.support.grpc_calls import batch_request, history, stored_status, update_request
from tests.support.payloads import batch_item

WRITERS = 24


@pytest.fixture
async def channel_to(database_url: str, db: Database) -> AsyncIterator[grpc.aio.Channel]:
    """A real server on the test's database, with a rate limit the burst stays under."""
    settings = settings_for(database_url, rate_limit_per_minute=100_000)
    server = App(settings, Database(settings))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop(grace=1)


async def count(db: Database, column: Any, **where: Any) -> int:
    stmt = select(func.count(column))
    for name, value in where.items():
        stmt = stmt.where(getattr(column.class_, name) == value)
    async with db.read() as conn:
        return int((await conn.execute(stmt)).scalar_one())


def assert_unbroken(rows: list[tuple[str | None, str | None, str]], final: str | None) -> None:
    """Each row starts where the previous one ended, and the last one is the stored status."""
    chain = [None] + [new for _, new, _ in rows]
    assert [previous for previous, _, _ in rows] == chain[:-1]
    assert chain[-1] == final


async def test_concurrent_updates_of_one_customer_lose_nothing(
    channel_to: grpc.aio.Channel, db: Database, partner: Credentials
) -> None:
    ingestion = ingestion_grpc.CallIngestionServiceStub(channel_to)
    updates = disposition_grpc.DispositionServiceStub(channel_to)
    await ingestion.IngestBatchCalls(
        batch_request(batch_item("c-1", "contended")), metadata=partner.metadata()
    )
    statuses = [f"status-{i}" for i in range(WRITERS)]
    replies = await asyncio.gather(
        *(
            updates.UpdateDispositionStatus(
                update_request("contended", status), metadata=partner.metadata()
            )
            for status in statuses
        )
    )
    assert all(reply.success for reply in replies)
    rows = await history(db, "contended")
    # Every update is a real change (distinct statuses): one history row each, none lost.
    assert sorted(new for _, new, _ in rows) == sorted(statuses)
    assert_unbroken(rows, await stored_status(db, "contended"))


async def test_concurrent_batches_creating_the_same_customers_and_calls(
    channel_to: grpc.aio.Channel, db: Database, partner: Credentials
) -> None:
    """Retries of one batch and batches sharing new customers, all at once: every call and
    customer is stored once, each is reported `created` exactly once, no request fails."""
    ingestion = ingestion_grpc.CallIngestionServiceStub(channel_to)
    customers = [f"shared-{i}" for i in range(5)]

    def same_batch() -> Any:  # the same call ids every time: concurrent retries
        return batch_request(
            *(batch_item(f"retry-{c}", c, "from-retry") for c in reversed(customers))
        )

    def own_batch(n: int) -> Any:  # new call ids, the same new customers, another order
        ordered = customers[n % 5 :] + customers[: n % 5]
        return batch_request(*(batch_item(f"own-{n}-{c}", c, f"own-{n}") for c in ordered))

    requests = [same_batch() if n % 2 else own_batch(n) for n in range(WRITERS)]
    replies = await asyncio.gather(
        *(ingestion.IngestBatchCalls(r, metadata=partner.metadata()) for r in requests)
    )
    retried = [reply.data for n, reply in enumerate(replies) if n % 2]
    assert sum(data.created_calls for data in retried) == 5
    assert sum(data.duplicate_calls for data in retried) == 5 * (len(retried) - 1)
    assert sum(reply.data.created_customers for reply in replies) == 5
    assert await count(db, Call.id) == 5 + 5 * (WRITERS - len(retried))
    assert await count(db, Customer.id) == 5
    for customer in customers:
        assert_unbroken(await history(db, customer), await stored_status(db, customer))
    async with db.read() as conn:
        seqs = (await conn.execute(select(DispositionHistory.seq))).scalars().all()
    assert sorted(seqs) == list(range(1, len(seqs) + 1))  # the feed's cursors: no gap, no twin
