"""The read endpoints over gRPC: a customer's status, its history page by page, the tenant's
summary, against a real grpc.aio server and database (tests/rest/test_reports.py: the same
through Envoy)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from server.db import Database
from server.models import Customer, DispositionHistory
from server.storage import as_utc
from tests.support.grpc_calls import (
    batch_request,
    details,
    fail,
    ingest,
    update_request,
    violations,
)
from tests.support.payloads import batch_item, status_items


def status_request(customer_id: str) -> Any:
    return disposition_pb2.GetDispositionStatusRequest(customer_id=customer_id)


def history_request(customer_id: str, page_size: int = 0, page_token: str = "") -> Any:
    return disposition_pb2.ListDispositionHistoryRequest(
        customer_id=customer_id, page_size=page_size, page_token=page_token
    )


def summary_request(window_from: str = "", window_to: str = "") -> Any:
    return disposition_pb2.GetDispositionSummaryRequest(**{"from": window_from}, to=window_to)


async def stored_changes(
    db: Database, customer_id: str, tenant_id: str = "tenant1", sub_tenant_id: str = "subtenant1"
) -> list[tuple[int, datetime]]:
    """(cursor, changed_at) of a customer's history rows, newest first."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(DispositionHistory.seq, DispositionHistory.changed_at)
            .join(Customer, Customer.id == DispositionHistory.customer_pk)
            .where(
                Customer.customer_id == customer_id,
                Customer.tenant_id == tenant_id,
                Customer.sub_tenant_id == sub_tenant_id,
            )
            .order_by(DispositionHistory.id.desc())
        )
        return [(seq, as_utc(changed_at)) for seq, changed_at in rows]


async def created_at(db: Database, customer_id: str) -> datetime:
    async with db.read() as conn:
        value = (
            await conn.execute(
                select(Customer.created_at).where(Customer.customer_id == customer_id)
            )
        ).scalar_one()
    return as_utc(value)


def customer_status(customer_id: str, status: str, updated_at: datetime) -> Any:
    expected = disposition_pb2.GetDispositionStatusResponse(
        success=True,
        data=disposition_pb2.CustomerDispositionStatus(
            customer_id=customer_id, disposition_status=status
        ),
    )
    expected.data.updated_at.FromDatetime(updated_at)
    return expected


# --- GetDispositionStatus over gRPC --------------------------------------------------------------


async def test_status_is_empty_since_creation_then_follows_each_change(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    md = partner.metadata()
    await ingest(ingestion, partner, "c1")
    reply = await dispositions.GetDispositionStatus(status_request("c1"), metadata=md)
    assert reply == customer_status("c1", "", await created_at(db, "c1"))
    for status in ("interested", "do_not_call", ""):
        await dispositions.UpdateDispositionStatus(update_request("c1", status), metadata=md)
        reply = await dispositions.GetDispositionStatus(status_request("c1"), metadata=md)
        (_, last_change), *_ = await stored_changes(db, "c1")
        assert reply == customer_status("c1", status, last_change)
    # A cleared status keeps the time of the change that cleared it, not the creation time.
    assert reply.data.updated_at.ToDatetime(UTC) > await created_at(db, "c1")


async def test_status_set_by_batch_call(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1", status="callback_requested")
    reply = await dispositions.GetDispositionStatus(
        status_request("c1"), metadata=partner.metadata()
    )
    (_, changed_at), *_ = await stored_changes(db, "c1")
    assert reply == customer_status("c1", "callback_requested", changed_at)


@pytest.mark.parametrize(
    ("customer_id", "message"),
    [
        ("", "customer_id should not be empty"),
        ("   ", "customer_id should not be empty"),
        ("c" * 256, "customer_id must be shorter than or equal to 255 characters"),
    ],
)
async def test_customer_id_is_validated_like_updates(
    dispositions: Any, partner: Credentials, customer_id: str, message: str
) -> None:
    for call in (
        dispositions.GetDispositionStatus(status_request(customer_id), metadata=partner.metadata()),
        dispositions.ListDispositionHistory(
            history_request(customer_id), metadata=partner.metadata()
        ),
    ):
        error = await fail(call)
        assert (error.code(), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "Validation failed",
        )
        assert violations(error) == [("customer_id", message)]
        assert details(error)["ErrorInfo"].reason == "VALIDATION_FAILED"


async def test_unknown_customer_is_not_found(dispositions: Any, partner: Credentials) -> None:
    for call in (
        dispositions.GetDispositionStatus(status_request("nobody"), metadata=partner.metadata()),
        dispositions.ListDispositionHistory(history_request("nobody"), metadata=partner.metadata()),
    ):
        error = await fail(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "Customer not found")
        assert details(error)["ErrorInfo"].reason == "CUSTOMER_NOT_FOUND"
        assert details(error)["ResourceInfo"].resource_name == "nobody"


# --- ListDispositionHistory over gRPC ------------------------------------------------------------


async def test_history_lists_every_field_of_both_sources_newest_first(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingestion.IngestBatchCalls(
        batch_request(batch_item("call-1", "c1", "new")),
        metadata=partner.metadata(x_request_id="ingest-1"),
    )
    for n, status in enumerate(("interested", "")):
        await dispositions.UpdateDispositionStatus(
            update_request("c1", status), metadata=partner.metadata(x_request_id=f"update-{n}")
        )
    reply = await dispositions.ListDispositionHistory(
        history_request("c1"), metadata=partner.metadata()
    )
    stored = await stored_changes(db, "c1")
    rows = [
        ("interested", "", "disposition_update", "update-1"),
        ("new", "interested", "disposition_update", "update-0"),
        ("", "new", "batch_call", "ingest-1"),
    ]
    expected = disposition_pb2.ListDispositionHistoryResponse(
        success=True, data=disposition_pb2.DispositionHistoryPage(customer_id="c1")
    )
    for (cursor, changed_at), (previous, new, source, request_id) in zip(stored, rows, strict=True):
        item = expected.data.items.add(
            cursor=cursor,
            customer_id="c1",
            previous_status=previous,
            disposition_status=new,
            source=source,
            partner_id="123",
            request_id=request_id,
            tenant_id="tenant1",
            sub_tenant_id="subtenant1",
        )
        item.changed_at.FromDatetime(changed_at)
    assert reply == expected
    assert [item.cursor for item in reply.data.items] == [3, 2, 1]


async def page_through(
    dispositions: Any, creds: Credentials, customer_id: str, page_size: int
) -> list[list[int]]:
    """Every page's cursors, following next_page_token until it is empty."""
    pages: list[list[int]] = []
    token = ""
    while True:
        reply = await dispositions.ListDispositionHistory(
            history_request(customer_id, page_size, token), metadata=creds.metadata()
        )
        pages.append([item.cursor for item in reply.data.items])
        token = reply.data.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not end"


async def test_history_pages_cover_every_change_once_newest_first(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "neighbour", status="a")  # another customer, same tenant
    statuses = ["a", "b"] * 3 + ["c"]  # 7 changes
    await ingestion.IngestBatchCalls(
        batch_request(*status_items("c1", statuses, "p")), metadata=partner.metadata()
    )
    newest_first = [cursor for cursor, _ in await stored_changes(db, "c1")]
    assert newest_first == [8, 7, 6, 5, 4, 3, 2]
    assert await page_through(dispositions, partner, "c1", 2) == [
        [8, 7],
        [6, 5],
        [4, 3],
        [2],
    ]
    # A last page that is exactly full has an empty token: no extra empty page.
    assert await page_through(dispositions, partner, "c1", 7) == [newest_first]
    assert await page_through(dispositions, partner, "c1", 6) == [newest_first[:6], [2]]
    assert await page_through(dispositions, partner, "c1", 500) == [newest_first]


async def test_history_page_size_defaults_to_50(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingestion.IngestBatchCalls(
        batch_request(*status_items("c1", ["a", "b"] * 30, "d")), metadata=partner.metadata()
    )
    pages = await page_through(dispositions, partner, "c1", 0)
    assert [len(page) for page in pages] == [50, 10]
    assert pages[0] + pages[1] == list(range(60, 0, -1))


async def test_customer_without_history_has_one_empty_page(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingest(ingestion, partner, "c1")
    reply = await dispositions.ListDispositionHistory(
        history_request("c1"), metadata=partner.metadata()
    )
    assert reply == disposition_pb2.ListDispositionHistoryResponse(
        success=True, data=disposition_pb2.DispositionHistoryPage(customer_id="c1")
    )


@pytest.mark.parametrize(
    ("page_size", "message"),
    [
        (-1, "page_size must not be less than 0"),
        (-(2**31), "page_size must not be less than 0"),
        (501, "page_size must not be greater than 500"),
        (2**31 - 1, "page_size must not be greater than 500"),
    ],
)
async def test_page_size_out_of_range(
    dispositions: Any, ingestion: Any, partner: Credentials, page_size: int, message: str
) -> None:
    await ingest(ingestion, partner, "c1")
    error = await fail(
        dispositions.ListDispositionHistory(
            history_request("c1", page_size), metadata=partner.metadata()
        )
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == [("page_size", message)]


async def test_page_token_must_be_one_this_listing_issued(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingestion.IngestBatchCalls(
        batch_request(*status_items("c1", ["a", "b", "c"], "t"), batch_item("t-x", "c2", "a")),
        metadata=partner.metadata(),
    )
    first = await dispositions.ListDispositionHistory(
        history_request("c1", 1), metadata=partner.metadata()
    )
    token = first.data.next_page_token
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
    second = await dispositions.ListDispositionHistory(
        history_request("c1", 1, token), metadata=partner.metadata()
    )
    assert [item.disposition_status for item in second.data.items] == ["b"]
    for bad in (
        "zz",
        "!!!!",
        token + "=",  # not the form issued
        token[:-1],
        token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1],
        "é" + token,
        "A" * 1000,
    ):
        error = await fail(
            dispositions.ListDispositionHistory(
                history_request("c1", 1, bad), metadata=partner.metadata()
            )
        )
        assert violations(error) == [("page_token", "page_token is invalid")], bad
    # A token continues only the listing that issued it: not another customer's.
    error = await fail(
        dispositions.ListDispositionHistory(
            history_request("c2", 1, token), metadata=partner.metadata()
        )
    )
    assert violations(error) == [("page_token", "page_token is invalid")]


async def test_every_history_violation_is_reported_before_existence(
    dispositions: Any, partner: Credentials
) -> None:
    error = await fail(
        dispositions.ListDispositionHistory(
            history_request("", -5, "nope"), metadata=partner.metadata()
        )
    )
    assert violations(error) == [
        ("customer_id", "customer_id should not be empty"),
        ("page_size", "page_size must not be less than 0"),
        ("page_token", "page_token is invalid"),
    ]


# --- GetDispositionSummary over gRPC -------------------------------------------------------------


def summary(
    statuses: list[tuple[str, int, int]],
    *,
    window: tuple[str, str] = ("", ""),
    tenant: tuple[str, str] = ("tenant1", "subtenant1"),
) -> Any:
    """The expected summary data (generated_at is left for the caller to copy)."""
    customers = sum(c for _, c, _ in statuses)
    return disposition_pb2.DispositionSummary(
        tenant_id=tenant[0],
        sub_tenant_id=tenant[1],
        **{"from": window[0]},
        to=window[1],
        total_customers=customers,
        customers_without_status=sum(c for s, c, _ in statuses if s == ""),
        total_changes=sum(n for _, _, n in statuses),
        statuses=[
            disposition_pb2.DispositionStatusCount(disposition_status=s, customers=c, changes=n)
            for s, c, n in statuses
        ],
    )


async def get_summary(dispositions: Any, creds: Credentials, *window: str) -> Any:
    before = datetime.now(UTC)
    reply = await dispositions.GetDispositionSummary(
        summary_request(*window), metadata=creds.metadata()
    )
    assert reply.success
    generated_at = reply.data.generated_at.ToDatetime(UTC)
    assert before - timedelta(seconds=1) <= generated_at <= datetime.now(UTC)
    reply.data.ClearField("generated_at")
    return reply.data


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


async def test_summary_counts_customers_and_changes_in_windows(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    md = partner.metadata()
    empty = await get_summary(dispositions, partner)
    assert empty == summary([])
    await ingestion.IngestBatchCalls(
        batch_request(
            batch_item("s-1", "a"),
            batch_item("s-2", "b", "interested"),
            batch_item("s-3", "c", "interested"),
            batch_item("s-4", "d"),
        ),
        metadata=md,
    )
    await dispositions.UpdateDispositionStatus(update_request("c", "do_not_call"), metadata=md)
    await dispositions.UpdateDispositionStatus(update_request("d", "callback"), metadata=md)
    await dispositions.UpdateDispositionStatus(update_request("d", ""), metadata=md)
    assert await get_summary(dispositions, partner) == summary(
        [("", 2, 1), ("callback", 0, 1), ("do_not_call", 1, 1), ("interested", 1, 2)]
    )
    (_, t4), (_, t3) = await stored_changes(db, "d")
    (_, t2), (_, t1) = await stored_changes(db, "c")
    assert t1 < t2 < t3 < t4
    # [from, to): the start is included, the end is not; customers are always all counted.
    window = (iso(t2), iso(t4))
    assert await get_summary(dispositions, partner, *window) == summary(
        [("", 2, 0), ("callback", 0, 1), ("do_not_call", 1, 1), ("interested", 1, 0)],
        window=window,
    )
    window = (iso(t4), "")
    assert await get_summary(dispositions, partner, *window) == summary(
        [("", 2, 1), ("do_not_call", 1, 0), ("interested", 1, 0)], window=window
    )
    window = ("", t2.isoformat())  # +00:00 is UTC too, echoed as sent
    assert await get_summary(dispositions, partner, *window) == summary(
        [("", 2, 0), ("do_not_call", 1, 0), ("interested", 1, 2)], window=window
    )
    window = ("2000-01-01T00:00:00Z", iso(t1))
    assert await get_summary(dispositions, partner, *window) == summary(
        [("", 2, 0), ("do_not_call", 1, 0), ("interested", 1, 0)], window=window
    )


async def test_summary_reads_every_acknowledged_write(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    md = partner.metadata()
    await ingest(ingestion, partner, "c1")
    for n in range(1, 21):
        status = ("interested", "do_not_call")[n % 2]
        await dispositions.UpdateDispositionStatus(update_request("c1", status), metadata=md)
        data = await get_summary(dispositions, partner)
        assert (data.total_changes, data.customers_without_status) == (n, 0)
        assert {s.disposition_status: s.customers for s in data.statuses}[status] == 1


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (("bad", ""), [("from", "from must be a valid ISO 8601 date string")]),
        (("", "2026-11-26"), [("to", "to must be a valid ISO 8601 date string")]),
        (("  ", ""), [("from", "from must be a valid ISO 8601 date string")]),
        (
            ("2026-11-26T10:00:00+01:00", "x"),
            [
                ("from", "from must be in UTC (end with Z or +00:00)"),
                ("to", "to must be a valid ISO 8601 date string"),
            ],
        ),
        (("2026-11-26T10:00:00Z", "2026-11-26T10:00:00+00:00"), [("to", "to must be after from")]),
        (("2026-11-26T10:00:00Z", "2026-11-26T09:59:59.999Z"), [("to", "to must be after from")]),
    ],
)
async def test_summary_window_is_validated(
    dispositions: Any,
    partner: Credentials,
    window: tuple[str, str],
    expected: list[tuple[str, str]],
) -> None:
    error = await fail(
        dispositions.GetDispositionSummary(summary_request(*window), metadata=partner.metadata())
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == expected


# --- tenant isolation over gRPC ------------------------------------------------------------------


async def test_reads_stay_in_the_callers_tenant_and_sub_tenant(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    other_tenant = await onboard(db, "456", grants=[("tenant2", "subtenant1")])
    sibling = await onboard(db, "789", grants=[("tenant1", "subtenant2")])
    await ingest(ingestion, partner, "mine", status="interested")
    await ingest(ingestion, partner, "shared", status="from-subtenant1")
    await ingest(ingestion, sibling, "shared", status="from-subtenant2")
    for creds in (other_tenant, sibling):
        for call in (
            dispositions.GetDispositionStatus(status_request("mine"), metadata=creds.metadata()),
            dispositions.ListDispositionHistory(history_request("mine"), metadata=creds.metadata()),
        ):
            error = await fail(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
    shared = await dispositions.GetDispositionStatus(
        status_request("shared"), metadata=sibling.metadata()
    )
    assert shared.data.disposition_status == "from-subtenant2"
    history = await dispositions.ListDispositionHistory(
        history_request("shared"), metadata=sibling.metadata()
    )
    assert [(i.disposition_status, i.partner_id, i.sub_tenant_id) for i in history.data.items] == [
        ("from-subtenant2", "789", "subtenant2")
    ]
    assert await get_summary(dispositions, sibling) == summary(
        [("from-subtenant2", 1, 1)], tenant=("tenant1", "subtenant2")
    )
    assert await get_summary(dispositions, other_tenant) == summary(
        [], tenant=("tenant2", "subtenant1")
    )
    assert await get_summary(dispositions, partner) == summary(
        [("from-subtenant1", 1, 1), ("interested", 1, 1)]
    )


@pytest.mark.parametrize(
    "overrides", [{"x_tenant_id": "tenant2"}, {"x_sub_tenant_id": "subtenant2"}]
)
async def test_tenant_not_granted_is_forbidden(
    dispositions: Any, ingestion: Any, partner: Credentials, overrides: dict[str, str]
) -> None:
    await ingest(ingestion, partner, "c1")
    md = partner.metadata(**overrides)
    for call in (
        dispositions.GetDispositionStatus(status_request("c1"), metadata=md),
        dispositions.ListDispositionHistory(history_request("c1"), metadata=md),
        dispositions.GetDispositionSummary(summary_request(), metadata=md),
    ):
        error = await fail(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
