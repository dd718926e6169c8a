"""BatchUpdateDispositionStatus over gRPC against a real server and database (the REST form,
POST /api/v1/partner/ingest/disposition-status/batch: tests/rest/test_batch_update.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import select

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as pb
from server.db import Database
from server.models import Customer, DispositionHistory
from tests.support.grpc_calls import (
    as_dict,
    details,
    fail,
    history,
    ingest,
    stored_status,
    violations,
)


def batch(*items: dict[str, Any]) -> Any:
    return json_format.ParseDict({"items": list(items)}, pb.BatchUpdateDispositionStatusRequest())


def item(customer_id: str, status: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": customer_id}
    if status is not None:
        body["disposition_status"] = status
    return body


BLANK = "should not be blank; send an empty string to clear it"
TOO_LONG = "must be shorter than or equal to 255 characters"
CONTROL = "must not contain control characters"


def err(index: int, field: str, rule: str) -> tuple[str, str]:
    return f"items[{index}].{field}", f"items[{index}].{field} {rule}"


def outcome(
    index: int,
    customer_id: str,
    status: str,
    changed: bool = False,
    errors: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "customer_id": customer_id,
        "status": status,
        "changed": changed,
        "errors": [{"field": f, "message": m} for f, m in errors or []],
    }


async def feed_rows(db: Database, tenant_id: str = "tenant1") -> list[tuple[int, str, str]]:
    """(cursor, customer_id, request_id) of the tenant's history, in cursor order."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(DispositionHistory.seq, Customer.customer_id, DispositionHistory.request_id)
            .join(Customer, Customer.id == DispositionHistory.customer_pk)
            .where(DispositionHistory.tenant_id == tenant_id)
            .order_by(DispositionHistory.seq)
        )
        return [(seq, cid, rid) for seq, cid, rid in rows]


async def test_mixed_outcomes_apply_in_order_in_one_transaction(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1", "c2", status="new")
    reply = await dispositions.BatchUpdateDispositionStatus(
        batch(
            item("c1", "interested"),
            item("nobody", "interested"),
            item("", "x"),
            item("c2", "  "),
            item("c1", "interested"),  # the same status again: ok, unchanged
            item("c2"),  # omitted: unchanged
            item("c1", ""),  # clears
            item("c2", "s" * 256),
            item("c\n2", None),
        ),
        metadata=partner.metadata(x_request_id="batch-req-1"),
    )
    assert as_dict(reply) == {
        "success": True,
        "data": {
            "ok": 4,
            "not_found": 1,
            "invalid": 4,
            "changed": 2,
            "items": [
                outcome(0, "c1", "ok", changed=True),
                outcome(1, "nobody", "not_found"),
                outcome(2, "", "invalid", errors=[err(2, "customer_id", "should not be empty")]),
                outcome(3, "c2", "invalid", errors=[err(3, "disposition_status", BLANK)]),
                outcome(4, "c1", "ok"),
                outcome(5, "c2", "ok"),
                outcome(6, "c1", "ok", changed=True),
                outcome(7, "c2", "invalid", errors=[err(7, "disposition_status", TOO_LONG)]),
                outcome(8, "c\n2", "invalid", errors=[err(8, "customer_id", CONTROL)]),
            ],
        },
    }
    assert (await stored_status(db, "c1"), await stored_status(db, "c2")) == (None, "new")
    assert await history(db, "c1") == [
        (None, "new", "batch_call"),
        ("new", "interested", "batch_update"),
        ("interested", None, "batch_update"),
    ]
    assert await history(db, "c2") == [(None, "new", "batch_call")]
    # Change-feed cursors follow on from ingestion's; one request id for the whole batch.
    assert (await feed_rows(db))[2:] == [(3, "c1", "batch-req-1"), (4, "c1", "batch-req-1")]


async def test_a_customer_repeated_in_a_batch_gets_one_history_row_per_real_change(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1", "c2")
    statuses = ["a", "b", "b", "a", None, "", "", "c"]
    reply = await dispositions.BatchUpdateDispositionStatus(
        batch(*(item("c1", s) for s in statuses), item("c2", "z")), metadata=partner.metadata()
    )
    assert [i.changed for i in reply.data.items] == [
        True, True, False, True, False, True, False, True, True,
    ]  # fmt: skip
    assert (reply.data.ok, reply.data.changed) == (9, 6)
    assert await history(db, "c1") == [
        (None, "a", "batch_update"),
        ("a", "b", "batch_update"),
        ("b", "a", "batch_update"),
        ("a", None, "batch_update"),
        (None, "c", "batch_update"),
    ]
    assert await stored_status(db, "c1") == "c"
    assert [seq for seq, _, _ in await feed_rows(db)] == [1, 2, 3, 4, 5, 6]


async def test_an_all_invalid_batch_is_answered_item_by_item_and_stores_nothing(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1")
    reply = await dispositions.BatchUpdateDispositionStatus(
        batch(item("", "a"), item("c1", " ")), metadata=partner.metadata()
    )
    assert (reply.success, reply.data.ok, reply.data.invalid, reply.data.changed) == (
        True,
        0,
        2,
        0,
    )
    assert await history(db, "c1") == []


async def test_a_batch_only_sees_its_own_tenant_and_sub_tenant(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    other = await onboard(db, "other", grants=[("tenant2", "subtenant1")])
    await ingest(ingestion, other, "theirs")
    reply = await dispositions.BatchUpdateDispositionStatus(
        batch(item("theirs", "x")), metadata=partner.metadata()
    )
    assert [i.status for i in reply.data.items] == ["not_found"]
    assert await stored_status(db, "theirs", tenant_id="tenant2") is None


@pytest.mark.parametrize(
    ("count", "message"),
    [(0, "items should not be empty"), (1001, "items must contain no more than 1000 elements")],
)
async def test_envelope_problems_reject_the_whole_batch(
    dispositions: Any, partner: Credentials, count: int, message: str
) -> None:
    error = await fail(
        dispositions.BatchUpdateDispositionStatus(
            batch(*(item(f"c{n}", "x") for n in range(count))), metadata=partner.metadata()
        )
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == [("items", message)]


async def test_a_full_batch_of_1000(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1")
    items = [item("c1", f"s{n}") for n in range(500)] + [item(f"x{n}", "y") for n in range(500)]
    reply = await dispositions.BatchUpdateDispositionStatus(
        batch(*items), metadata=partner.metadata()
    )
    data = reply.data
    assert (data.ok, data.not_found, data.invalid, data.changed) == (500, 500, 0, 500)
    assert len(await history(db, "c1")) == 500
    assert await stored_status(db, "c1") == "s499"


async def test_rate_limit_counts_a_batch_as_one_request(
    dispositions: Any, ingestion: Any, db: Database
) -> None:
    limited = await onboard(db, "limited", rate_limit_per_minute=2)
    await ingest(ingestion, limited, "c1")  # request 1
    many = batch(*(item("c1", f"s{n}") for n in range(50)))
    reply = await dispositions.BatchUpdateDispositionStatus(many, metadata=limited.metadata())
    assert reply.data.changed == 50  # request 2, however many items
    error = await fail(dispositions.BatchUpdateDispositionStatus(many, metadata=limited.metadata()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= details(error)["RetryInfo"].retry_delay.seconds <= 60


async def test_a_tenant_not_granted_is_forbidden(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1")
    error = await fail(
        dispositions.BatchUpdateDispositionStatus(
            batch(item("c1", "x")), metadata=partner.metadata(x_tenant_id="tenant2")
        )
    )
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
    assert await history(db, "c1") == []
