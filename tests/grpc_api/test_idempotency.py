"""Batch-call replays and `Idempotency-Key` over gRPC against a real server and database, and on
PostgreSQL a twin request waiting on the key's unique index (the pure rules:
tests/unit/test_idempotency.py; through Envoy: tests/rest/test_idempotency.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import insert, select, text, update

from devstack import Credentials, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as pb
from server.app import App
from server.db import Database
from server.models import (
    Call,
    Customer,
    DispositionHistory,
    FeedSequence,
    IdempotencyRecord,
    Partner,
)
from server.records import Caller, Plan, Reads, Snapshot
from server.usecases import idempotency
from server.usecases import ingestion as domain
from tests.support.databases import count_rows, failing_inserts, settings_for
from tests.support.grpc_calls import batch_request, details, history, violations
from tests.support.payloads import batch_item

REPLAYED = "idempotent-replayed"
REUSED = [("Idempotency-Key", "Idempotency-Key was already used with a different request")]
APPLIED_TABLES = (Call, Customer, DispositionHistory, FeedSequence)


async def send(stub: Any, creds: Credentials, request: Any, key: str | None = None) -> Any:
    """(reply, its serialized bytes, the idempotent-replayed header or None)."""
    call = stub.IngestBatchCalls(request, metadata=creds.metadata(idempotency_key=key))
    reply = await call
    initial = await call.initial_metadata()
    return reply, reply.SerializeToString(deterministic=True), initial.get(REPLAYED)


async def refused(stub: Any, creds: Credentials, request: Any, key: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestBatchCalls(request, metadata=creds.metadata(idempotency_key=key))
    return caught.value


async def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a batch writes to, in primary-key order."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    async with db.read() as conn:
        for model in APPLIED_TABLES:
            table = model.__table__
            rows = await conn.execute(select(table).order_by(*table.primary_key.columns))
            tables[table.name] = [tuple(row) for row in rows]
    return tables


async def stored_keys(db: Database) -> list[tuple[str, str]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(IdempotencyRecord.key, IdempotencyRecord.response).order_by(IdempotencyRecord.id)
        )
        return [(key, response) for key, response in rows]


async def age_keys(db: Database, by: timedelta) -> None:
    """Move every stored key's creation back in time."""
    async with db.write() as conn:
        await conn.execute(update(IdempotencyRecord).values(created_at=datetime.now(UTC) - by))


def two_calls() -> Any:
    return batch_request(batch_item("call-1", "c1", "new"), batch_item("call-2", "c2"))


# --- replays without a key (call ids) ------------------------------------------------------


async def test_replay_without_key_changes_no_row(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    first, _, _ = await send(ingestion, partner, two_calls())
    assert (first.data.created_calls, first.data.created_customers) == (2, 2)
    before = await snapshot(db)
    # The same call ids again, once as sent and once with other statuses and profiles.
    changed = [batch_item("call-1", "c1", "lost"), batch_item("call-2", "c2", "interested")]
    changed[0]["customer"]["name"] = "Someone Else"
    for request in (two_calls(), batch_request(*changed)):
        reply, _, replayed = await send(ingestion, partner, request)
        data = reply.data
        assert (data.created_calls, data.duplicate_calls, data.created_customers) == (0, 2, 0)
        assert [(i.status, i.customer_created) for i in data.items] == [("duplicate", False)] * 2
        assert replayed is None
        assert await snapshot(db) == before
    assert (len(before["calls"]), len(before["customers"])) == (2, 2)
    assert await history(db, "c1") == [(None, "new", "batch_call")]
    assert await stored_keys(db) == []


# --- Idempotency-Key over gRPC ---------------------------------------------------------------


async def test_first_request_stores_its_outcome_with_the_batch(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    reply, _, replayed = await send(ingestion, partner, two_calls(), key="k1")
    assert (reply.data.created_calls, replayed) == (2, None)
    [(key, response)] = await stored_keys(db)
    assert key == "k1"
    assert json.loads(response) == {
        "items": [
            {
                "index": 0,
                "call_id": "call-1",
                "customer_id": "c1",
                "status": "created",
                "customer_created": True,
            },
            {
                "index": 1,
                "call_id": "call-2",
                "customer_id": "c2",
                "status": "created",
                "customer_created": True,
            },
        ]
    }
    async with db.read() as conn:
        method, fingerprint = (
            await conn.execute(select(IdempotencyRecord.method, IdempotencyRecord.fingerprint))
        ).one()
    assert method == domain.METHOD == "disposition.v1.CallIngestionService/IngestBatchCalls"
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


async def test_replay_returns_the_first_reply_and_applies_nothing(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    _, first_bytes, first_replayed = await send(ingestion, partner, two_calls(), key="k1")
    before = await snapshot(db)
    for _ in range(2):
        again, again_bytes, replayed = await send(ingestion, partner, two_calls(), key="k1")
        assert again_bytes == first_bytes
        assert [item.status for item in again.data.items] == ["created", "created"]
        assert (first_replayed, replayed) == (None, "true")
        assert await snapshot(db) == before
    assert len(await stored_keys(db)) == 1
    assert await history(db, "c1") == [(None, "new", "batch_call")]


async def test_same_key_with_another_body_is_refused(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    await send(ingestion, partner, two_calls(), key="k1")
    before = await snapshot(db)
    other = batch_request(batch_item("call-3", "c3"))
    error = await refused(ingestion, partner, other, "k1")
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == REUSED
    assert details(error)["ErrorInfo"].reason == "IDEMPOTENCY_KEY_REUSED"
    # A body that is also invalid: the key is judged first.
    invalid = batch_request(batch_item("call-3", "c3", contact_number="555"))
    assert violations(await refused(ingestion, partner, invalid, "k1")) == REUSED
    assert await snapshot(db) == before
    assert len(await stored_keys(db)) == 1


async def test_same_key_and_body_for_another_sub_tenant_is_refused(
    ingestion: Any, db: Database
) -> None:
    creds = await onboard(db, "multi", grants=[("tenant1", "a"), ("tenant1", "b")])
    await send(ingestion, creds, two_calls(), key="k1")
    elsewhere = Credentials("multi", creds.api_key, creds.api_secret, "tenant1", "b")
    assert violations(await refused(ingestion, elsewhere, two_calls(), "k1")) == REUSED


async def test_same_key_on_another_endpoint_is_refused(
    ingestion: Any, dispositions: Any, partner: Credentials, db: Database
) -> None:
    await send(ingestion, partner, two_calls(), key="k1")
    before = await snapshot(db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispositions.BatchUpdateDispositionStatus(
            batch_update_request(("c1", "won")), metadata=partner.metadata(idempotency_key="k1")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == REUSED
    assert await snapshot(db) == before
    assert len(await stored_keys(db)) == 1


def batch_update_request(*items: tuple[str, str]) -> Any:
    return pb.BatchUpdateDispositionStatusRequest(
        items=[pb.DispositionStatusUpdate(customer_id=c, disposition_status=s) for c, s in items]
    )


async def test_batch_update_replay_returns_the_first_reply_and_applies_nothing(
    ingestion: Any, dispositions: Any, partner: Credentials, db: Database
) -> None:
    await send(ingestion, partner, two_calls())
    request = batch_update_request(("c1", "won"), ("c2", "lost"), ("nobody", "x"))
    call = dispositions.BatchUpdateDispositionStatus(
        request, metadata=partner.metadata(idempotency_key="bu-1")
    )
    first = await call
    assert (await call.initial_metadata()).get(REPLAYED) is None
    assert (first.data.ok, first.data.not_found, first.data.changed) == (2, 1, 2)
    before = await snapshot(db)
    for _ in range(2):
        call = dispositions.BatchUpdateDispositionStatus(
            request, metadata=partner.metadata(idempotency_key="bu-1")
        )
        again = await call
        assert again.SerializeToString(deterministic=True) == first.SerializeToString(
            deterministic=True
        )
        assert (await call.initial_metadata()).get(REPLAYED) == "true"
        assert await snapshot(db) == before
    # Without the key the same batch runs again: nothing changes, but nothing is replayed.
    plain = await dispositions.BatchUpdateDispositionStatus(request, metadata=partner.metadata())
    assert (plain.data.ok, plain.data.changed) == (2, 0)
    # The key with another batch is refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispositions.BatchUpdateDispositionStatus(
            batch_update_request(("c1", "other")),
            metadata=partner.metadata(idempotency_key="bu-1"),
        )
    assert violations(caught.value) == REUSED
    assert await history(db, "c1") == [(None, "new", "batch_call"), ("new", "won", "batch_update")]


async def test_keys_are_per_partner(ingestion: Any, partner: Credentials, db: Database) -> None:
    other = await onboard(db, "456", grants=[("tenant1", "subtenant1")])
    _, first_bytes, _ = await send(ingestion, partner, two_calls(), key="k1")
    reply, other_bytes, replayed = await send(ingestion, other, two_calls(), key="k1")
    assert (reply.data.created_calls, replayed) == (2, None)  # call ids are per partner too
    assert other_bytes != first_bytes  # the customers existed: not created again
    assert reply.data.created_customers == 0
    assert await count_rows(db, Call) == 4
    assert [key for key, _ in await stored_keys(db)] == ["k1", "k1"]


async def test_rejected_request_does_not_use_up_the_key(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    invalid = batch_request(batch_item("call-1", "c1", contact_number="555"))
    error = await refused(ingestion, partner, invalid, "k1")
    assert violations(error) == [
        (
            "data[0].call.contact_number",
            "data[0].call.contact_number must be a phone number in E.164 format, e.g. +14155550123",
        )
    ]
    assert await stored_keys(db) == []
    reply, _, replayed = await send(ingestion, partner, two_calls(), key="k1")
    assert (reply.data.created_calls, replayed) == (2, None)
    assert (await send(ingestion, partner, two_calls(), key="k1"))[2] == "true"


async def test_failure_after_the_batch_stores_neither_batch_nor_key(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    async with failing_inserts(db, "idempotency_keys"):
        error = await refused(ingestion, partner, two_calls(), "k1")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert (await count_rows(db, Call), await count_rows(db, Customer)) == (0, 0)
    assert await stored_keys(db) == []
    reply, _, replayed = await send(ingestion, partner, two_calls(), key="k1")
    assert (reply.data.created_calls, replayed) == (2, None)


async def test_failure_during_the_batch_releases_the_key(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    async with failing_inserts(db, "calls"):
        assert (await refused(ingestion, partner, two_calls(), "k1")).code() == (
            grpc.StatusCode.INTERNAL
        )
    assert (await count_rows(db, Customer), await stored_keys(db)) == (0, [])
    assert (await send(ingestion, partner, two_calls(), key="k1"))[0].data.created_calls == 2


async def test_key_is_kept_for_24_hours_then_treated_as_new(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    _, first_bytes, _ = await send(ingestion, partner, two_calls(), key="k1")
    await age_keys(db, timedelta(hours=23, minutes=59))
    assert (await send(ingestion, partner, two_calls(), key="k1"))[1:] == (first_bytes, "true")
    await age_keys(db, timedelta(hours=24, seconds=1))
    reply, _, replayed = await send(ingestion, partner, two_calls(), key="k1")
    assert (reply.data.duplicate_calls, replayed) == (2, None)  # ran again: call ids are known
    _, again_bytes, replayed = await send(ingestion, partner, two_calls(), key="k1")
    assert (again_bytes, replayed) == (reply.SerializeToString(deterministic=True), "true")
    # An expired key may also carry another body.
    await age_keys(db, timedelta(days=2))
    other = batch_request(batch_item("call-3", "c3"))
    assert (await send(ingestion, partner, other, key="k1"))[0].data.created_calls == 1
    assert len(await stored_keys(db)) == 1


async def test_expired_keys_are_pruned_when_a_key_is_stored(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    for n in range(3):
        await send(ingestion, partner, batch_request(batch_item(f"old-{n}", "c1")), key=f"old{n}")
    await age_keys(db, timedelta(hours=25))
    await send(ingestion, partner, two_calls(), key="fresh")
    assert [key for key, _ in await stored_keys(db)] == ["fresh"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "Idempotency-Key must not be empty"),
        ("   ", "Idempotency-Key must not be empty"),
        ("k" * 256, "Idempotency-Key must be at most 255 characters long"),
    ],
)
async def test_malformed_key_is_a_bad_request(
    ingestion: Any, partner: Credentials, db: Database, key: str, message: str
) -> None:
    error = await refused(ingestion, partner, two_calls(), key)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert set(details(error)) == {"ErrorInfo"}
    assert details(error)["ErrorInfo"].reason == "INVALID_IDEMPOTENCY_KEY"
    assert (await count_rows(db, Call), await stored_keys(db)) == (0, [])


async def test_longest_key_is_accepted(ingestion: Any, partner: Credentials) -> None:
    key = "K" * 255
    await send(ingestion, partner, two_calls(), key=key)
    assert (await send(ingestion, partner, two_calls(), key=key))[2] == "true"


async def test_concurrent_requests_with_one_key_apply_once(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    items = [batch_item(f"call-{i}", f"c{i % 3}", f"s{i}") for i in range(12)]
    replies = await asyncio.gather(
        *(send(ingestion, partner, batch_request(*items), key="k1") for _ in range(8))
    )
    assert len({reply_bytes for _, reply_bytes, _ in replies}) == 1
    assert sorted(str(replayed) for _, _, replayed in replies) == ["None"] + ["true"] * 7
    reply = replies[0][0]
    assert (reply.data.created_calls, reply.data.created_customers) == (12, 3)
    assert (await count_rows(db, Call), await count_rows(db, Customer)) == (12, 3)
    assert len(await history(db, "c0")) == 4
    assert len(await stored_keys(db)) == 1


async def test_concurrent_requests_replay_from_the_write_transaction(
    ingestion: Any, partner: Credentials, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the read-only fast path every twin reaches claim(): one runs, the rest replay."""

    async def miss(*_args: Any, **_kwargs: Any) -> None:
        return None

    monkeypatch.setattr(idempotency, "replay", miss)
    replies = await asyncio.gather(
        *(send(ingestion, partner, two_calls(), key="k1") for _ in range(5))
    )
    assert len({reply_bytes for _, reply_bytes, _ in replies}) == 1
    assert sorted(str(replayed) for _, _, replayed in replies) == ["None"] + ["true"] * 4
    assert (await count_rows(db, Call), len(await history(db, "c1"))) == (2, 1)
    other = batch_request(batch_item("call-9", "c9"))
    assert violations(await refused(ingestion, partner, other, "k1")) == REUSED


# --- PostgreSQL: a twin waits on the key's unique index ---------------------------------------


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """This run's PostgreSQL schema, emptied (skips without TEST_POSTGRES_URL)."""
    return postgres_url


@pytest.mark.postgres
async def test_postgres_concurrent_requests_with_one_key_apply_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def miss(*_args: Any, **_kwargs: Any) -> None:
        return None

    db = Database(settings_for(pg_url))
    creds = await onboard(db, "123")
    server = App(settings_for(pg_url), Database(settings_for(pg_url)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingestion_grpc.CallIngestionServiceStub(channel)
            for key, fast_path in (("k1", True), ("k2", False)):
                if not fast_path:
                    monkeypatch.setattr(idempotency, "replay", miss)
                request = batch_request(*(batch_item(f"{key}-{i}", f"c{i % 3}") for i in range(9)))
                replies = await asyncio.gather(
                    *(send(stub, creds, request, key=key) for _ in range(8))
                )
                assert len({reply_bytes for _, reply_bytes, _ in replies}) == 1
                assert sorted(str(flag) for _, _, flag in replies) == ["None"] + ["true"] * 7
        assert await count_rows(db, Call) == 18
        assert [key for key, _ in await stored_keys(db)] == ["k1", "k2"]
    finally:
        await server.stop(grace=1)
        await db.dispose()


async def blocked_by(db: Database, pid: int, timeout: float = 30) -> None:
    """Until a PostgreSQL backend waits for a lock that backend `pid` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    query = text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
    while True:
        async with db.read() as conn:
            if (await conn.execute(query, {"pid": pid})).scalar_one():
                return
        assert asyncio.get_running_loop().time() < deadline, "nothing waits for the first"
        await asyncio.sleep(0.01)


@pytest.mark.postgres
async def test_postgres_twin_waits_for_the_first_transaction(pg_url: str) -> None:
    """A unit whose key another transaction is inserting waits for it: if that one rolls back,
    the unit stores its own outcome; if it commits, the unit reads again and replays it."""
    db = Database(settings_for(pg_url))
    await onboard(db, "123")
    async with db.read() as conn:
        partner_pk = (await conn.execute(select(Partner.id))).scalar_one()
    caller = Caller(partner_pk, "123", "t", "s", "r")

    def decode(data: Any) -> Any:
        return data

    async def twin(request: idempotency.IdempotentRequest | None) -> Any:
        def decide(snapshot: Snapshot) -> tuple[Plan | None, Any]:
            if (replayed := idempotency.replayed(snapshot.key, request, decode)) is not None:
                return None, replayed
            now = datetime.now(UTC)
            key = idempotency.record(request, {"by": "twin"}, snapshot.key, now)
            return Plan(now, key=key), idempotency.Result({"by": "twin"})

        return await db.units.run(Reads(key=idempotency.ref(request)), decide)

    async def first(request: idempotency.IdempotentRequest, *, commit: bool) -> Any:
        """The key inserted by another transaction that ends after the twin started."""
        with contextlib.suppress(RuntimeError):
            async with db.write() as conn:
                await conn.execute(
                    insert(IdempotencyRecord).values(
                        partner_pk=partner_pk, key=request.key, method=request.method,
                        fingerprint=request.fingerprint, response=json.dumps({"by": "first"}),
                        created_at=datetime.now(UTC),
                    )
                )  # fmt: skip
                pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                waiting = asyncio.create_task(twin(request))
                await blocked_by(db, pid)
                assert not waiting.done()  # blocked on the uncommitted key
                if not commit:
                    raise RuntimeError("crash")
        return await waiting

    try:
        crashing = idempotency.prepare("k1", caller=caller, method="M", payload=[1])
        assert crashing is not None
        assert await first(crashing, commit=False) == idempotency.Result({"by": "twin"})
        request = idempotency.prepare("k2", caller=caller, method="M", payload=[1])
        assert request is not None
        assert await first(request, commit=True) == idempotency.Result(
            {"by": "first"}, replayed=True
        )
        assert [key for key, _ in await stored_keys(db)] == ["k1", "k2"]
    finally:
        await db.dispose()
