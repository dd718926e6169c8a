"""Batch call ingestion over gRPC against a real server and SQLite file."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from sqlalchemy import select

from devstack import Credentials
from server.db import Database
from server.models import Call, Customer
from tests.support.databases import count_rows
from tests.support.grpc_calls import as_dict, batch_request, history, stored_status, violations
from tests.support.payloads import batch_item


async def test_batch_creates_customers_calls_and_initial_history(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    reply = await ingestion.IngestBatchCalls(
        batch_request(
            batch_item("call-1", "customer123", "new"),
            batch_item("call-2", "customer123", "interested"),
            batch_item("call-3", "customer456"),
        ),
        metadata=partner.metadata(),
    )
    assert as_dict(reply) == {
        "success": True,
        "data": {
            "created_calls": 3,
            "duplicate_calls": 0,
            "created_customers": 2,
            "items": [
                {
                    "index": 0,
                    "call_id": "call-1",
                    "customer_id": "customer123",
                    "status": "created",
                    "customer_created": True,
                },
                {
                    "index": 1,
                    "call_id": "call-2",
                    "customer_id": "customer123",
                    "status": "created",
                    "customer_created": False,
                },
                {
                    "index": 2,
                    "call_id": "call-3",
                    "customer_id": "customer456",
                    "status": "created",
                    "customer_created": True,
                },
            ],
        },
    }
    assert await stored_status(db, "customer123") == "interested"
    assert await stored_status(db, "customer456") is None
    assert await history(db, "customer123") == [
        (None, "new", "batch_call"),
        ("new", "interested", "batch_call"),
    ]
    assert await count_rows(db, Call) == 3


async def test_replayed_batch_creates_nothing_twice(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    request = batch_request(batch_item("call-1", "c1", "new"), batch_item("call-2", "c2"))
    await ingestion.IngestBatchCalls(request, metadata=partner.metadata())
    reply = await ingestion.IngestBatchCalls(request, metadata=partner.metadata())
    assert (reply.data.created_calls, reply.data.duplicate_calls, reply.data.created_customers) == (
        0,
        2,
        0,
    )
    assert [item.status for item in reply.data.items] == ["duplicate", "duplicate"]
    assert (await count_rows(db, Call), await count_rows(db, Customer)) == (2, 2)
    assert await history(db, "c1") == [(None, "new", "batch_call")]


async def test_invalid_item_rejects_whole_batch_with_every_problem(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    bad = batch_item(
        "call-2",
        "c2",
        recording_url="ftp://x/a.mp3",
        start_time="2026-11-26T10:00:00+02:00",
        end_time="yesterday",
        contact_number="4155550123",
    )
    bad["agent"] = {"id": "", "email": "not-an-email", "name": "n" * 256}
    bad["callback_url"] = "not a url"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingestion.IngestBatchCalls(
            batch_request(batch_item("call-1", "c1", "new"), bad, batch_item("call-1", "c3")),
            metadata=partner.metadata(),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [
        ("data[1].call.recording_url", "data[1].call.recording_url must be a URL address"),
        (
            "data[1].call.start_time",
            "data[1].call.start_time must be in UTC (end with Z or +00:00)",
        ),
        ("data[1].call.end_time", "data[1].call.end_time must be a valid ISO 8601 date string"),
        (
            "data[1].call.contact_number",
            "data[1].call.contact_number must be a phone number in E.164 format, e.g. +14155550123",
        ),
        ("data[1].agent.id", "data[1].agent.id should not be empty"),
        ("data[1].agent.email", "data[1].agent.email must be an email"),
        (
            "data[1].agent.name",
            "data[1].agent.name must be shorter than or equal to 255 characters",
        ),
        ("data[1].callback_url", "data[1].callback_url must be a URL address"),
        ("data[2].call.id", "data[2].call.id must be unique within the batch"),
    ]
    assert (await count_rows(db, Call), await count_rows(db, Customer)) == (0, 0)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"recording_url": "https://x.example/a.ogg"},
            "data[0].call.recording_url must point to an MP3, WAV, AAC or M4A file",
        ),
        (
            {"end_time": "2026-11-26T09:30:00Z"},
            "data[0].call.end_time must be after data[0].call.start_time",
        ),
        (
            {"start_time": "2026-11-26"},
            "data[0].call.start_time must be a valid ISO 8601 date string",
        ),
    ],
)
async def test_call_rules(
    ingestion: Any, partner: Credentials, overrides: dict[str, str], expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingestion.IngestBatchCalls(
            batch_request(batch_item("call-1", "c1", **overrides)), metadata=partner.metadata()
        )
    assert [message for _, message in violations(caught.value)] == [expected]


async def test_accepted_formats(ingestion: Any, partner: Credentials, db: Database) -> None:
    item = batch_item(
        "call-1",
        "c1",
        recording_url="https://x.example/rec/A.M4A?sig=abc",
        start_time="2026-11-26T09:30:00.250+00:00",
        end_time="2026-11-26T09:31:00Z",
    )
    item["metadata"] = {"campaign": "winter"}
    item["custom_fields"] = [{"internal_name": "lead_score", "value": "87"}]
    reply = await ingestion.IngestBatchCalls(batch_request(item), metadata=partner.metadata())
    assert reply.data.created_calls == 1
    async with db.read() as conn:
        row = (await conn.execute(select(Call.call_metadata, Call.custom_fields))).one()
    assert row == ({"campaign": "winter"}, [{"internal_name": "lead_score", "value": "87"}])


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, ("data", "data should not be empty")),
        (1001, ("data", "data must contain no more than 1000 elements")),
    ],
)
async def test_batch_size_limits(
    ingestion: Any, partner: Credentials, size: int, expected: tuple[str, str]
) -> None:
    items = [batch_item(f"call-{i}", f"c{i}") for i in range(size)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    assert violations(caught.value) == [expected]


async def test_a_thousand_problems_are_capped_so_the_error_always_arrives(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    # Every problem would need a 122 KB trailer, beyond any gRPC client's metadata limit (8 KB).
    items = [batch_item(f"call-{i}", f"c{i}", contact_number="555") for i in range(1000)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "Validation failed"
    field = "data[{}].call.contact_number"
    message = f"{field} must be a phone number in E.164 format, e.g. +14155550123"
    assert violations(caught.value) == [
        *((field.format(i), message.format(i)) for i in range(33)),
        ("", "967 more problems not listed; fix the listed ones and retry to see the rest"),
    ]
    trailer = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert 4000 < len(trailer) < 4300
    assert await count_rows(db, Call) == 0


async def test_full_batch_of_1000(ingestion: Any, partner: Credentials, db: Database) -> None:
    items = [batch_item(f"call-{i}", f"c{i}", "new") for i in range(1000)]
    reply = await ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    assert (reply.data.created_calls, reply.data.created_customers) == (1000, 1000)
    assert await count_rows(db, Customer) == 1000


async def test_customers_are_scoped_to_tenant_and_sub_tenant(ingestion: Any, db: Database) -> None:
    from devstack import onboard

    creds = await onboard(db, "multi", grants=[("tenant1", "a"), ("tenant1", "b")])
    for sub in ("a", "b"):
        scoped = Credentials("multi", creds.api_key, creds.api_secret, "tenant1", sub)
        reply = await ingestion.IngestBatchCalls(
            batch_request(batch_item(f"call-{sub}", "same-id")), metadata=scoped.metadata()
        )
        assert reply.data.created_customers == 1
    assert await count_rows(db, Customer) == 2


async def test_customer_profile_takes_the_latest_non_empty_values(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    first, second, later = (batch_item(f"call-{i}", "c1") for i in range(3))
    first["customer"].update(name="Ada", email="ada@example.com")
    second["customer"].update(name="Ada Lovelace")
    await ingestion.IngestBatchCalls(batch_request(first, second), metadata=partner.metadata())
    await ingestion.IngestBatchCalls(batch_request(later), metadata=partner.metadata())
    async with db.read() as conn:
        row = (await conn.execute(select(Customer.name, Customer.email))).one()
    assert tuple(row) == ("Ada Lovelace", "ada@example.com")
