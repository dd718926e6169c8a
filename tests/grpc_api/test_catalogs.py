"""Disposition catalogs over gRPC, against a real server and database: enforced on every write
path, listed per tenant and sub-tenant. (The definition rules: tests/unit/test_catalogs.py; the
admin CLI's catalog commands: tests/system/test_admin_catalogs.py; REST:
tests/rest/test_catalogs.py.)"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as pb
from server.db import Database
from server.models import Call, Customer
from server.records import Disposition
from server.usecases import catalogs
from tests.support.databases import count_rows
from tests.support.grpc_calls import (
    as_dict,
    batch_request,
    details,
    fail,
    history,
    ingest,
    stored_status,
    update_request,
    violations,
)
from tests.support.payloads import batch_item

UNRESTRICTED = {"restricted": False, "scope": "", "dispositions": []}


def entries(*statuses: str) -> list[Disposition]:
    return [Disposition(status, status.replace("_", " ").title()) for status in statuses]


async def set_catalog(db: Database, sub_tenant_id: str, *statuses: str) -> None:
    await catalogs.set_catalog(
        db, tenant_id="tenant1", sub_tenant_id=sub_tenant_id, dispositions=entries(*statuses)
    )


async def listed(stub: Any, creds: Credentials, **headers: str) -> dict[str, Any]:
    reply = await stub.ListDispositions(
        pb.ListDispositionsRequest(), metadata=creds.metadata(**headers)
    )
    return as_dict(reply)


def catalog_json(scope: str, *statuses: str) -> dict[str, Any]:
    return {
        "success": True,
        "data": {
            "restricted": True,
            "scope": scope,
            "dispositions": [
                {
                    "disposition_status": s,
                    "label": s.replace("_", " ").title(),
                    "final": False,
                    "do_not_call": False,
                    "callback": False,
                }
                for s in statuses
            ],
        },
    }


# --- gRPC: the three write paths ------------------------------------------------------------


async def test_without_a_catalog_any_status_is_accepted(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    assert await listed(dispositions, partner) == {"success": True, "data": UNRESTRICTED}
    await ingest(ingestion, partner, "c1", status="anything_goes")
    await dispositions.UpdateDispositionStatus(
        update_request("c1", "whatever"), metadata=partner.metadata()
    )
    assert await stored_status(db, "c1") == "whatever"


async def test_single_update_is_checked_against_the_catalog(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1", status="legacy")  # before the catalog existed
    await set_catalog(db, "*", "interested", "callback_requested", "do_not_call")
    md = partner.metadata()
    error = await fail(
        dispositions.UpdateDispositionStatus(update_request("c1", "bogus"), metadata=md)
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == [
        (
            "disposition_status",
            "disposition_status must be one of: interested, callback_requested, do_not_call",
        )
    ]
    assert details(error)["ErrorInfo"].reason == "VALIDATION_FAILED"
    # Resending a status the catalog no longer has is a write of it: refused too.
    again = await fail(
        dispositions.UpdateDispositionStatus(update_request("c1", "legacy"), metadata=md)
    )
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The catalog is checked before the customer is looked up, like every field rule.
    unknown = await fail(
        dispositions.UpdateDispositionStatus(update_request("nobody", "bogus"), metadata=md)
    )
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stored_status(db, "c1") == "legacy"
    # Omitted (unchanged) and empty (clear) are always allowed; catalog statuses are.
    await dispositions.UpdateDispositionStatus(update_request("c1"), metadata=md)
    await dispositions.UpdateDispositionStatus(update_request("c1", "do_not_call"), metadata=md)
    await dispositions.UpdateDispositionStatus(update_request("c1", ""), metadata=md)
    assert await history(db, "c1") == [
        (None, "legacy", "batch_call"),
        ("legacy", "do_not_call", "disposition_update"),
        ("do_not_call", None, "disposition_update"),
    ]


async def test_batch_call_ingestion_is_atomic_and_names_every_refused_status(
    ingestion: Any, partner: Credentials, db: Database
) -> None:
    await set_catalog(db, "*", "new", "interested")
    items = [
        batch_item("call-1", "c1", "new"),
        batch_item("call-2", "c2", "bogus"),
        batch_item("call-3", "c3", ""),  # clears: always allowed
        batch_item("call-4", "c4"),  # no status: always allowed
        batch_item("call-5", "c5", "also_bogus"),
    ]
    error = await fail(
        ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    )
    assert error.details() == "Validation failed"
    assert violations(error) == [
        (
            "data[1].customer.disposition_status",
            "data[1].customer.disposition_status must be one of: new, interested",
        ),
        (
            "data[4].customer.disposition_status",
            "data[4].customer.disposition_status must be one of: new, interested",
        ),
    ]
    assert (await count_rows(db, Customer), await count_rows(db, Call)) == (0, 0)
    # With field problems too, one reply still lists every problem, in item order.
    items[0] = batch_item("call-1", "c1", "new", contact_number="555")
    error = await fail(
        ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    )
    assert [field for field, _ in violations(error)] == [
        "data[0].call.contact_number",
        "data[1].customer.disposition_status",
        "data[4].customer.disposition_status",
    ]
    items[0] = batch_item("call-1", "c1", "new")
    items[1] = batch_item("call-2", "c2", "interested")
    items[4] = batch_item("call-5", "c5", "interested")
    reply = await ingestion.IngestBatchCalls(batch_request(*items), metadata=partner.metadata())
    assert reply.data.created_calls == 5
    assert await stored_status(db, "c2") == "interested"


async def test_batch_update_refuses_statuses_outside_the_catalog_per_item(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1", "c2")
    await set_catalog(db, "*", "interested")
    request = json_format.ParseDict(
        {
            "items": [
                {"customer_id": "c1", "disposition_status": "interested"},
                {"customer_id": "c2", "disposition_status": "bogus"},
                {"customer_id": "c2", "disposition_status": ""},
            ]
        },
        pb.BatchUpdateDispositionStatusRequest(),
    )
    reply = await dispositions.BatchUpdateDispositionStatus(request, metadata=partner.metadata())
    assert [(i.status, i.changed) for i in reply.data.items] == [
        ("ok", True),
        ("invalid", False),
        ("ok", False),
    ]
    assert [(e.field, e.message) for e in reply.data.items[1].errors] == [
        ("items[1].disposition_status", "items[1].disposition_status must be one of: interested")
    ]
    assert await stored_status(db, "c1") == "interested"


# --- gRPC: scopes and tenants ---------------------------------------------------------------


async def test_a_sub_tenant_catalog_replaces_the_tenant_wide_one_and_clear_falls_back(
    dispositions: Any, ingestion: Any, db: Database
) -> None:
    creds = await onboard(
        db, "multi", grants=[("tenant1", "subtenant1"), ("tenant1", "subtenant2")]
    )
    other_sub = {"x_sub_tenant_id": "subtenant2"}
    await ingest(ingestion, creds, "c1")
    await ingestion.IngestBatchCalls(
        batch_request(batch_item("call-s2", "c1")), metadata=creds.metadata(**other_sub)
    )
    await set_catalog(db, "*", "interested", "not_interested")
    await set_catalog(db, "subtenant2", "sold")
    assert await listed(dispositions, creds) == catalog_json(
        "tenant", "interested", "not_interested"
    )
    assert await listed(dispositions, creds, **other_sub) == catalog_json("sub_tenant", "sold")

    async def update(status: str, **headers: str) -> grpc.StatusCode:
        try:
            await dispositions.UpdateDispositionStatus(
                update_request("c1", status), metadata=creds.metadata(**headers)
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    assert await update("sold") == grpc.StatusCode.INVALID_ARGUMENT
    assert await update("interested") == grpc.StatusCode.OK
    assert await update("interested", **other_sub) == grpc.StatusCode.INVALID_ARGUMENT
    assert await update("sold", **other_sub) == grpc.StatusCode.OK

    assert await catalogs.clear_catalog(db, tenant_id="tenant1", sub_tenant_id="subtenant2") == 1
    assert await listed(dispositions, creds, **other_sub) == catalog_json(
        "tenant", "interested", "not_interested"
    )
    assert await update("sold", **other_sub) == grpc.StatusCode.INVALID_ARGUMENT
    assert await update("not_interested", **other_sub) == grpc.StatusCode.OK

    assert await catalogs.clear_catalog(db, tenant_id="tenant1", sub_tenant_id="*") == 2
    assert await listed(dispositions, creds) == {"success": True, "data": UNRESTRICTED}
    assert await update("anything_again") == grpc.StatusCode.OK
    assert await update("anything_again", **other_sub) == grpc.StatusCode.OK


async def test_another_tenants_catalog_never_applies_or_shows(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    for sub_tenant_id in ("*", "subtenant1"):
        await catalogs.set_catalog(
            db, tenant_id="tenant2", sub_tenant_id=sub_tenant_id, dispositions=entries("only_t2")
        )
    await ingest(ingestion, partner, "c1", status="free")
    await dispositions.UpdateDispositionStatus(
        update_request("c1", "still_free"), metadata=partner.metadata()
    )
    assert await listed(dispositions, partner) == {"success": True, "data": UNRESTRICTED}
    error = await fail(
        dispositions.ListDispositions(
            pb.ListDispositionsRequest(), metadata=partner.metadata(x_tenant_id="tenant2")
        )
    )
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")


async def test_labels_and_flags_are_listed_in_catalog_order(
    dispositions: Any, partner: Credentials, db: Database
) -> None:
    await catalogs.set_catalog(
        db,
        tenant_id="tenant1",
        sub_tenant_id="subtenant1",
        dispositions=[
            Disposition("sold", "Sale closed", final=True),
            Disposition("dnc", "Do not call", final=True, do_not_call=True),
            Disposition("cb", "Call back", callback=True),
        ],
    )
    assert (await listed(dispositions, partner))["data"] == {
        "restricted": True,
        "scope": "sub_tenant",
        "dispositions": [
            {
                "disposition_status": "sold",
                "label": "Sale closed",
                "final": True,
                "do_not_call": False,
                "callback": False,
            },
            {
                "disposition_status": "dnc",
                "label": "Do not call",
                "final": True,
                "do_not_call": True,
                "callback": False,
            },
            {
                "disposition_status": "cb",
                "label": "Call back",
                "final": False,
                "do_not_call": False,
                "callback": True,
            },
        ],
    }


async def test_a_long_catalog_is_cut_short_in_the_message(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    statuses = [f"status_number_{n:03d}" for n in range(100)]  # 17 characters each
    await set_catalog(db, "*", *statuses)
    await ingest(ingestion, partner, "c1")
    error = await fail(
        dispositions.UpdateDispositionStatus(
            update_request("c1", "bogus"), metadata=partner.metadata()
        )
    )
    shown = statuses[:26]  # 26 * (17 + 2) = 494 <= 500 characters
    assert violations(error) == [
        ("disposition_status", f"disposition_status must be one of: {', '.join(shown)} and 74 more")
    ]
