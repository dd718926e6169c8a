"""Disposition catalogs: enforced on every write path, listed per tenant and sub-tenant, managed
with the admin CLI. gRPC against a real server and SQLite file; REST through real Envoy and a
real server process; the CLI as real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import func, select

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as pb
from server.db import Database
from server.models import Call, Customer
from server.records import Disposition
from server.usecases import catalogs
from server.usecases.catalogs import InvalidCatalog, parse_definitions
from tests.grpc_helpers import (
    batch_request,
    details,
    fail,
    history,
    ingest,
    stored_status,
    update_request,
    violations,
)
from tests.http_helpers import assert_rest_reply
from tests.rest_stack import BATCH, Stack, start_stack
from tests.support import batch_item
from tests.test_tooling import admin

DISPOSITIONS = "/api/v1/partner/dispositions"
BATCH_UPDATE = "/api/v1/partner/ingest/disposition-status/batch"
UNRESTRICTED = {"restricted": False, "scope": "", "dispositions": []}


def entries(*statuses: str) -> list[Disposition]:
    return [Disposition(status, status.replace("_", " ").title()) for status in statuses]


async def set_catalog(db: Database, sub_tenant_id: str, *statuses: str) -> None:
    await catalogs.set_catalog(
        db, tenant_id="tenant1", sub_tenant_id=sub_tenant_id, dispositions=entries(*statuses)
    )


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
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


async def count(db: Database, model: Any) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


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
    assert (await count(db, Customer), await count(db, Call)) == (0, 0)
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


# --- the definition rules (pure) ------------------------------------------------------------


def test_definitions_default_label_and_flags() -> None:
    assert parse_definitions([{"disposition_status": "new"}]) == [Disposition("new", "new")]
    assert parse_definitions([{"disposition_status": "dnc", "label": None, "final": True}]) == [
        Disposition("dnc", "dnc", final=True)
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"disposition_status": "x"}, "the catalog must be a JSON list of dispositions"),
        ([], "the catalog lists no dispositions (use 'catalog clear' to remove it)"),
        (
            [{"disposition_status": f"s{n}"} for n in range(501)],
            "the catalog must list at most 500 dispositions",
        ),
        (["new"], "[0] must be an object"),
        ([{}], "[0].disposition_status must be a string"),
        ([{"disposition_status": " "}], "[0].disposition_status should not be empty"),
        (
            [{"disposition_status": "s" * 256}],
            "[0].disposition_status must be shorter than or equal to 255 characters",
        ),
        (
            [{"disposition_status": "a\tb"}],
            "[0].disposition_status must not contain control characters",
        ),
        ([{"disposition_status": "a", "label": 3}], "[0].label must be a string"),
        ([{"disposition_status": "a", "final": "yes"}], "[0].final must be true or false"),
        ([{"disposition_status": "a", "do_not_cal": True}], "[0].do_not_cal is not a known field"),
        (
            [{"disposition_status": "a"}, {"disposition_status": "b"}, {"disposition_status": "a"}],
            "[2].disposition_status 'a' is listed twice",
        ),
        (
            [{"disposition_status": ""}, {"disposition_status": "b", "callback": 1}],
            "[0].disposition_status should not be empty; [1].callback must be true or false",
        ),
    ],
)
def test_definition_rules(raw: object, message: str) -> None:
    with pytest.raises(InvalidCatalog) as caught:
        parse_definitions(raw)
    assert str(caught.value) == message


# --- the admin CLI, as real processes -------------------------------------------------------


def write(tmp_path: Path, name: str, content: object) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_admin_catalog_set_list_clear(database_url: str, tmp_path: Path) -> None:
    good = write(
        tmp_path,
        "catalog.json",
        [
            {"disposition_status": "interested"},
            {
                "disposition_status": "dnc",
                "label": "Do not call",
                "final": True,
                "do_not_call": True,
            },
        ],
    )
    stored = {
        "tenant_id": "tenant1",
        "sub_tenant_id": "*",
        "dispositions": [
            {
                "disposition_status": "interested",
                "label": "interested",
                "final": False,
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
        ],
    }
    done = admin(database_url, "catalog", "set", "--tenant", "tenant1", "--file", good)
    assert (done.returncode, json.loads(done.stdout)) == (0, stored), done.stderr
    listed_now = admin(database_url, "catalog", "list", "--tenant", "tenant1")
    assert (listed_now.returncode, json.loads(listed_now.stdout)) == (0, stored)
    sub = admin(database_url, "catalog", "list", "--tenant", "tenant1", "--sub-tenant", "s1")
    assert json.loads(sub.stdout) == {
        "tenant_id": "tenant1",
        "sub_tenant_id": "s1",
        "dispositions": [],
    }
    # Spelled like `grant` too (--tenant-id, --sub-tenant-id), with the same answers.
    spelled = admin(database_url, "catalog", "list", "--tenant-id", "tenant1")
    assert (spelled.returncode, json.loads(spelled.stdout)) == (0, stored)
    spelled_sub = admin(
        database_url, "catalog", "list", "--tenant-id", "tenant1", "--sub-tenant-id", "s1"
    )
    assert json.loads(spelled_sub.stdout) == json.loads(sub.stdout)

    # `set` replaces the whole catalog.
    replacement = write(
        tmp_path, "replacement.json", [{"disposition_status": "sold", "callback": True}]
    )
    assert (
        admin(
            database_url, "catalog", "set", "--tenant", "tenant1", "--file", replacement
        ).returncode
        == 0
    )
    assert json.loads(admin(database_url, "catalog", "list", "--tenant", "tenant1").stdout)[
        "dispositions"
    ] == [
        {
            "disposition_status": "sold",
            "label": "sold",
            "final": False,
            "do_not_call": False,
            "callback": True,
        }
    ]

    cleared = admin(database_url, "catalog", "clear", "--tenant", "tenant1")
    assert (cleared.returncode, json.loads(cleared.stdout)) == (
        0,
        {"tenant_id": "tenant1", "sub_tenant_id": "*", "cleared": 1},
    )
    again = admin(database_url, "catalog", "clear", "--tenant", "tenant1")
    assert (again.returncode, again.stdout) == (3, "")
    assert "tenant 'tenant1' has no catalog for sub-tenant '*'" in again.stderr


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "cannot read"),
        ("{not json", "is not valid JSON"),
        ([], "the catalog lists no dispositions"),
        (
            [{"disposition_status": "a"}, {"disposition_status": "a"}],
            "[1].disposition_status 'a' is listed twice",
        ),
        (
            [{"disposition_status": "bad\u0007bell"}],
            "[0].disposition_status must not contain control characters",
        ),
        ([{"disposition_status": f"s{n}"} for n in range(501)], "at most 500 dispositions"),
    ],
)
def test_admin_catalog_set_refuses_a_bad_file(
    database_url: str, tmp_path: Path, content: object, error: str
) -> None:
    before = write(tmp_path, "before.json", [{"disposition_status": "kept"}])
    assert admin(database_url, "catalog", "set", "--tenant", "t", "--file", before).returncode == 0
    path = (
        str(tmp_path / "missing.json") if content is None else write(tmp_path, "bad.json", content)
    )
    done = admin(database_url, "catalog", "set", "--tenant", "t", "--file", path)
    assert (done.returncode, done.stdout) == (2, "")
    assert error in done.stderr and "Traceback" not in done.stderr
    kept = json.loads(admin(database_url, "catalog", "list", "--tenant", "t").stdout)
    assert [entry["disposition_status"] for entry in kept["dispositions"]] == ["kept"]


def test_admin_catalog_needs_a_real_tenant(database_url: str, tmp_path: Path) -> None:
    good = write(tmp_path, "c.json", [{"disposition_status": "a"}])
    for args in (["--tenant", "*"], ["--tenant", " "], []):
        done = admin(database_url, "catalog", "set", *args, "--file", good)
        assert done.returncode == 2 and "Traceback" not in done.stderr


# --- REST through Envoy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("catalog-stack"), stack_database_url)


@pytest.mark.envoy
def test_rest_catalog_on_every_write_path(stack: Stack, tmp_path: Path) -> None:
    creds = stack.onboard("rest-cat", grants=[("cat-tenant", "s1")])
    assert stack.ingest(creds, batch_item("rc-1", "rc-customer")).status == 200
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, creds),
        200,
        b'{"success":true,"data":{"restricted":false,"scope":"","dispositions":[]}}',
    )
    catalog_file = write(
        tmp_path,
        "catalog.json",
        [
            {"disposition_status": "interested", "label": "Interested"},
            {"disposition_status": "do_not_call", "do_not_call": True},
        ],
    )
    done = admin(
        stack.database_url, "catalog", "set", "--tenant", "cat-tenant", "--file", catalog_file
    )
    assert done.returncode == 0, done.stderr
    # Takes effect on the next request, without a restart.
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, creds),
        200,
        b'{"success":true,"data":{"restricted":true,"scope":"tenant","dispositions":['
        b'{"disposition_status":"interested","label":"Interested","final":false,'
        b'"do_not_call":false,"callback":false},'
        b'{"disposition_status":"do_not_call","label":"do_not_call","final":false,'
        b'"do_not_call":true,"callback":false}]}}',
    )
    refused = (
        b'{"success":false,"message":"Validation failed","errors":[{"field":"disposition_status",'
        b'"message":"disposition_status must be one of: interested, do_not_call"}]}'
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "bogus"}, creds),
        422,
        refused,
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "interested"}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": None}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": ""}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.request("POST", BATCH, {"data": [batch_item("rc-2", "rc-customer", "nope")]}, creds),
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":'
        b'"data[0].customer.disposition_status","message":"data[0].customer.disposition_status'
        b' must be one of: interested, do_not_call"}]}',
    )
    assert_rest_reply(
        stack.request(
            "POST",
            BATCH_UPDATE,
            {
                "items": [
                    {"customer_id": "rc-customer", "disposition_status": "nope"},
                    {"customer_id": "rc-customer", "disposition_status": "do_not_call"},
                ]
            },
            creds,
        ),
        200,
        b'{"success":true,"data":{"ok":1,"not_found":0,"invalid":1,"changed":1,"items":['
        b'{"index":0,"customer_id":"rc-customer","status":"invalid","changed":false,"errors":'
        b'[{"field":"items[0].disposition_status","message":"items[0].disposition_status must be'
        b' one of: interested, do_not_call"}]},'
        b'{"index":1,"customer_id":"rc-customer","status":"ok","changed":true,"errors":[]}]}}',
    )
    assert [row[:3] for row in stack.history("rc-customer")] == [
        (None, "interested", "disposition_update"),
        ("interested", None, "disposition_update"),
        (None, "do_not_call", "batch_update"),
    ]
    assert stack.sql("SELECT count(*) FROM calls WHERE call_id = 'rc-2'") == [(0,)]
    cleared = admin(stack.database_url, "catalog", "clear", "--tenant", "cat-tenant")
    assert cleared.returncode == 0, cleared.stderr
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "bogus"}, creds),
        200,
        b'{"success":true}',
    )


@pytest.mark.envoy
def test_rest_catalogs_are_per_tenant_and_sub_tenant(stack: Stack, tmp_path: Path) -> None:
    creds = stack.onboard("rest-scopes", grants=[("scope-tenant", "s1"), ("scope-tenant", "s2")])
    stranger = stack.onboard("rest-stranger", grants=[("elsewhere", "s1")])
    own = write(tmp_path, "own.json", [{"disposition_status": "s2_only"}])
    wide = write(tmp_path, "wide.json", [{"disposition_status": "everyone"}])
    for args in (["--sub-tenant", "s2", "--file", own], ["--file", wide]):
        assert (
            admin(
                stack.database_url, "catalog", "set", "--tenant", "scope-tenant", *args
            ).returncode
            == 0
        )
    scope_of = {
        sub: json.loads(stack.request("GET", DISPOSITIONS, None, creds, x_sub_tenant_id=sub).body)[
            "data"
        ]
        for sub in ("s1", "s2")
    }
    assert [
        (d["scope"], [e["disposition_status"] for e in d["dispositions"]])
        for d in scope_of.values()
    ] == [
        ("tenant", ["everyone"]),
        ("sub_tenant", ["s2_only"]),
    ]
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, stranger),
        200,
        b'{"success":true,"data":{"restricted":false,"scope":"","dispositions":[]}}',
    )
    for headers in (
        {"x_tenant_id": "scope-tenant"},
        {"x_tenant_id": "scope-tenant", "x_sub_tenant_id": "s2"},
    ):
        assert_rest_reply(
            stack.request("GET", DISPOSITIONS, None, stranger, **headers),
            403,
            b'{"success":false,"message":"Forbidden"}',
        )
