"""The documented contract end to end: HTTP client -> real Envoy -> real disposition-server
process -> real SQLite file. Every row of the documented error table and every Envoy-side
case, byte for byte (status, JSON body, headers)."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from gateway import openapi
from server.db import Database
from server.records import Disposition
from server.usecases import catalogs, partners
from tests.support.databases import run, settings_for
from tests.support.grpc_calls import batch_request, violations
from tests.support.http_client import Reply, assert_rest_reply, call
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, UPDATE, Stack, start_stack

pytestmark = pytest.mark.envoy

MAX_BODY = 5_242_880
METHOD_NOT_ALLOWED = b'{"success":false,"message":"Method not allowed"}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("stack"), stack_database_url)


# --- every documented response -------------------------------------------------------------


def test_documented_example_succeeds_and_records_history(stack: Stack) -> None:
    reply = stack.put(
        {"customer_id": "customer123", "disposition_status": "interested"},
        x_partner_id="123",
        x_request_id="doc-example-1",
    )
    assert_rest_reply(reply, 200, b'{"success":true}')
    assert reply.header("x-request-id") == "doc-example-1"
    assert stack.history("customer123")[-1] == (
        None,
        "interested",
        "disposition_update",
        "doc-example-1",
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x_api_key": None},
        {"x_api_secret": "ds_wrong"},
        {"x_api_key": None, "x_api_secret": None},
        {"x_partner_id": "456"},
        {"x_tenant_id": "someone-elses-tenant"},
    ],
)
def test_forbidden(stack: Stack, headers: dict[str, str | None]) -> None:
    reply = stack.put({"customer_id": "customer123", "disposition_status": "x"}, **headers)
    assert_rest_reply(reply, 403, b'{"success":false,"message":"Forbidden"}')


def test_missing_tenant_id(stack: Stack) -> None:
    reply = stack.put({"customer_id": "customer123"}, x_tenant_id=None)
    assert_rest_reply(reply, 400, b'{"success":false,"message":"Tenant ID is required"}')


def test_missing_sub_tenant_id(stack: Stack) -> None:
    reply = stack.put({"customer_id": "customer123"}, x_sub_tenant_id="  ")
    assert_rest_reply(reply, 400, b'{"success":false,"message":"Sub-Tenant ID is required"}')


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"customer_id": ""}, [("customer_id", "customer_id should not be empty")]),
        ({"disposition_status": "x"}, [("customer_id", "customer_id should not be empty")]),
        ({"customer_id": None}, [("customer_id", "customer_id should not be empty")]),
        (
            {"customer_id": "c" * 256},
            [("customer_id", "customer_id must be shorter than or equal to 255 characters")],
        ),
        ({"customer_id": 123}, [("customer_id", "customer_id must be a string")]),
        (
            {"customer_id": "customer123", "disposition_status": 5},
            [("disposition_status", "disposition_status must be a string")],
        ),
        (
            {"customer_id": "", "disposition_status": "s" * 256},
            [
                ("customer_id", "customer_id should not be empty"),
                (
                    "disposition_status",
                    "disposition_status must be shorter than or equal to 255 characters",
                ),
            ],
        ),
    ],
)
def test_validation_failed(stack: Stack, body: object, errors: list[tuple[str, str]]) -> None:
    expected = {
        "success": False,
        "message": "Validation failed",
        "errors": [{"field": field, "message": message} for field, message in errors],
    }
    reply = stack.put(body)
    assert_rest_reply(reply, 422, json.dumps(expected, separators=(",", ":")).encode())


def test_customer_not_found(stack: Stack) -> None:
    other = stack.onboard("other", grants=[("tenant2", "subtenant1")])
    assert stack.ingest(other, batch_item("their-call", "their-customer")).status == 200
    for customer_id in ("nobody", "their-customer"):
        reply = stack.put({"customer_id": customer_id, "disposition_status": "interested"})
        assert_rest_reply(reply, 404, b'{"success":false,"message":"Customer not found"}')


def test_rate_limit_exceeded(stack: Stack) -> None:
    limited = stack.onboard("limited", rate_limit_per_minute=2)
    assert stack.ingest(limited, batch_item("l-call", "l-customer")).status == 200
    assert stack.put({"customer_id": "l-customer"}, limited).status == 200
    reply = stack.put({"customer_id": "l-customer"}, limited)
    assert_rest_reply(
        reply, 429, b'{"success":false,"message":"Rate limit exceeded. Try again in 60 seconds."}'
    )
    assert 1 <= int(reply.header("retry-after") or "0") <= 60


def quota_headers(reply: Reply) -> dict[str, str | None]:
    names = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")
    return {name: reply.header(name) for name in names}


def test_authenticated_replies_carry_the_rate_limit_headers(stack: Stack) -> None:
    limited = stack.onboard("quota", rate_limit_per_minute=3)
    assert stack.ingest(limited, batch_item("q-call", "q-customer")).status == 200
    replies = [
        stack.put({"customer_id": "q-customer", "disposition_status": "interested"}, limited),
        stack.put({"customer_id": ""}, limited),  # 422
        stack.put({"customer_id": "q-customer"}, limited),  # 429
    ]
    assert [reply.status for reply in replies] == [200, 422, 429]
    remaining = []
    for reply in replies:
        quota = quota_headers(reply)
        assert (quota["ratelimit-limit"], quota["ratelimit-policy"]) == ("3", "3;w=60")
        assert 1 <= int(quota["ratelimit-reset"] or "0") <= 60
        remaining.append(quota["ratelimit-remaining"])
    assert remaining == ["1", "0", "0"]  # the ingestion took the first of the 3
    # Both count down to the window's end (read a moment apart: at most a second between).
    retry_after, reset = replies[2].header("retry-after"), replies[2].header("ratelimit-reset")
    assert abs(int(retry_after or "0") - int(reset or "0")) <= 1
    # Before authentication (a wrong secret) and outside the API (an unknown path): none.
    wrong = stack.put({"customer_id": "q-customer"}, limited, x_api_secret="ds_wrong")
    unknown = stack.request("GET", "/api/v1/partner/nowhere", None, limited)
    assert [wrong.status, unknown.status] == [403, 404]
    for reply in (wrong, unknown):
        assert set(quota_headers(reply).values()) == {None}


def test_omitted_null_empty_and_repeated_status(stack: Stack) -> None:
    creds = stack.onboard("semantics")
    assert stack.ingest(creds, batch_item("s-call", "s-customer", "new")).status == 200
    for body in (
        {"customer_id": "s-customer"},
        {"customer_id": "s-customer", "disposition_status": None},
        {"customer_id": "s-customer", "disposition_status": "callback_requested"},
        {"customer_id": "s-customer", "disposition_status": "callback_requested"},
        {"customer_id": "s-customer", "disposition_status": ""},
        {"customer_id": "s-customer", "future_field": {"nested": [1]}},
    ):
        assert_rest_reply(stack.put(body, creds), 200, b'{"success":true}')
    assert [row[:3] for row in stack.history("s-customer")] == [
        (None, "new", "batch_call"),
        ("new", "callback_requested", "disposition_update"),
        ("callback_requested", None, "disposition_update"),
    ]


def test_batch_call_reply(stack: Stack) -> None:
    creds = stack.onboard("batcher")
    reply = stack.ingest(creds, batch_item("b-1", "b-customer", "interested"))
    expected = (
        b'{"success":true,"data":{"created_calls":1,"duplicate_calls":0,"created_customers":1,'
        b'"items":[{"index":0,"call_id":"b-1","customer_id":"b-customer","status":"created",'
        b'"customer_created":true}]}}'
    )
    assert_rest_reply(reply, 200, expected)
    bad = stack.ingest(creds, batch_item("b-2", "b-customer", contact_number="555"))
    assert_rest_reply(
        bad,
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":'
        b'"data[0].call.contact_number","message":"data[0].call.contact_number must be a phone'
        b' number in E.164 format, e.g. +14155550123"}]}',
    )


def validation_failed(errors: list[tuple[str, str]]) -> bytes:
    body = {
        "success": False,
        "message": "Validation failed",
        "errors": [{"field": field, "message": message} for field, message in errors],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def test_a_thousand_problems_are_capped_so_the_422_always_arrives(stack: Stack) -> None:
    # Listing all 1,000 needs a 163 KB (base64) trailer: Envoy refused it, the client got a 502.
    creds = stack.onboard("many-problems")
    items = [batch_item(f"m-{i}", f"m-customer-{i}", contact_number="555") for i in range(1000)]
    reply = stack.request("POST", BATCH, {"data": items}, creds)
    field = "data[{}].call.contact_number"
    message = f"{field} must be a phone number in E.164 format, e.g. +14155550123"
    listed = [(field.format(i), message.format(i)) for i in range(33)]
    more = ("", "967 more problems not listed; fix the listed ones and retry to see the rest")
    assert_rest_reply(reply, 422, validation_failed([*listed, more]))
    # The same capped list reaches a native gRPC client through Envoy (which base64-encodes it).
    address = f"127.0.0.1:{stack.envoy.http_port}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        ingestion_grpc.CallIngestionServiceStub(channel).IngestBatchCalls(
            batch_request(*items), metadata=creds.metadata(), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [*listed, more]


def test_a_thousand_statuses_outside_the_catalog_are_capped(stack: Stack) -> None:
    creds = stack.onboard("many-statuses", grants=[("many-tenant", "s1")])

    async def restrict() -> None:
        db = Database(settings_for(stack.database_url))
        try:
            await catalogs.set_catalog(
                db,
                tenant_id="many-tenant",
                sub_tenant_id=catalogs.TENANT_WIDE,
                dispositions=[Disposition("new", "New"), Disposition("interested", "Interested")],
            )
        finally:
            await db.dispose()

    run(restrict())
    items = [batch_item(f"s-{i}", f"s-customer-{i}", "bogus") for i in range(1000)]
    reply = stack.request("POST", BATCH, {"data": items}, creds)
    field = "data[{}].customer.disposition_status"
    listed = [
        (field.format(i), f"{field} must be one of: new, interested".format(i)) for i in range(36)
    ]
    more = ("", "964 more problems not listed; fix the listed ones and retry to see the rest")
    assert_rest_reply(reply, 422, validation_failed([*listed, more]))
    # A few problems are all listed, as before.
    assert_rest_reply(stack.ingest(creds, *items[:3]), 422, validation_failed(listed[:3]))


# --- Envoy-side cases, same envelope -------------------------------------------------------


@pytest.mark.parametrize("body", [b"{nope", b'{"customer_id": "customer123"', b"[]", b"nul"])
def test_malformed_json(stack: Stack, body: bytes) -> None:
    assert_rest_reply(stack.put(body), 400, b'{"success":false,"message":"Invalid JSON body"}')


def test_empty_body_is_a_missing_customer_id(stack: Stack) -> None:
    assert_rest_reply(
        stack.put(b""),
        422,
        b'{"success":false,"message":"Validation failed","errors":'
        b'[{"field":"customer_id","message":"customer_id should not be empty"}]}',
    )


def test_payload_limit(stack: Stack) -> None:
    head, tail = b'{"customer_id":"customer123","padding":"', b'"}'
    exact = head + b"x" * (MAX_BODY - len(head) - len(tail)) + tail
    assert len(exact) == MAX_BODY
    assert_rest_reply(stack.put(exact), 200, b'{"success":true}')
    too_big = exact[:-2] + b'x"}'
    assert_rest_reply(stack.put(too_big), 413, b'{"success":false,"message":"Payload too large"}')


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/"), ("PUT", "/api/v1/partner/ingest/nope"), ("GET", "/api/v2")]
)
def test_unknown_path(stack: Stack, method: str, path: str) -> None:
    reply = call(stack.envoy.http_port, method, path, None, stack.partner.headers())
    assert_rest_reply(reply, 404, b'{"success":false,"message":"Not found"}')


@pytest.mark.parametrize(("method", "path"), [("GET", UPDATE), ("POST", UPDATE), ("PUT", BATCH)])
def test_wrong_method(stack: Stack, method: str, path: str) -> None:
    reply = call(stack.envoy.http_port, method, path, b"{}", stack.partner.headers())
    assert_rest_reply(reply, 405, b'{"success":false,"message":"Method not allowed"}')


def _documented_paths() -> dict[str, set[str]]:
    """Every documented path (its variables filled in) and the methods it takes."""
    document = json.loads(Path(openapi.DEFAULT_OUT).read_text())
    return {
        re.sub(r"\{[^}]+\}", "1", path): {method.upper() for method in operations}
        for path, operations in document["paths"].items()
    }


@pytest.mark.parametrize("method", ["QUERY", "PATCH", "FROB"])
@pytest.mark.parametrize("content_type", [None, "application/json"])
def test_every_documented_path_answers_other_methods_405_with_allow(
    stack: Stack, method: str, content_type: str | None
) -> None:
    """QUERY too, with or without a Content-Type (Envoy refuses a QUERY without one with a 400
    before routing: envoy.yaml's local reply mappers turn that into the route's 405)."""
    for path, methods in _documented_paths().items():
        connection = http.client.HTTPConnection("127.0.0.1", stack.envoy.http_port, timeout=30)
        headers = stack.partner.headers()
        if content_type is not None:
            headers["content-type"] = content_type
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        reply = Reply(response.status, response.getheaders(), response.read())
        connection.close()
        # A QUERY without Content-Type is answered before routing, without an x-request-id.
        assert (path, reply.status, reply.body) == (path, 405, METHOD_NOT_ALLOWED)
        assert reply.header("content-type") == "application/json"
        allow = {value.strip() for value in (reply.header("allow") or "").split(",")}
        assert allow == methods, (method, path, reply.header("allow"))


def test_internal_error_is_a_500_envelope_logged_with_request_id(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A real fault: the history table disappears under the running server."""
    for stack in start_stack(tmp_path_factory.mktemp("broken")):
        with sqlite3.connect(stack.db_path) as conn:
            conn.execute("DROP TABLE disposition_history")
        reply = stack.put(
            {"customer_id": "customer123", "disposition_status": "interested"},
            x_request_id="req-boom",
        )
        assert_rest_reply(reply, 500, b'{"success":false,"message":"Internal server error"}')
        assert b"disposition_history" not in reply.body
        errors = [e for e in stack.server.log_lines() if e["level"] == "ERROR"]
        assert errors and errors[0]["request_id"] == "req-boom"
        assert "no such table" in errors[0]["exception"]


def test_server_down_is_a_503_envelope(tmp_path_factory: pytest.TempPathFactory) -> None:
    for stack in start_stack(tmp_path_factory.mktemp("down")):
        stack.server.stop()
        reply = stack.put({"customer_id": "customer123", "disposition_status": "interested"})
        assert_rest_reply(reply, 503, b'{"success":false,"message":"Service unavailable"}')


def test_admin_changes_take_effect_on_the_running_stack(stack: Stack) -> None:
    creds = stack.onboard("revocable")
    assert stack.ingest(creds, batch_item("r-call", "r-customer")).status == 200

    async def revoke() -> None:
        db = Database(settings_for(stack.database_url))
        try:
            await partners.revoke(
                db, partner_id="revocable", tenant_id="tenant1", sub_tenant_id="subtenant1"
            )
        finally:
            await db.dispose()

    assert stack.put({"customer_id": "r-customer"}, creds).status == 200  # cached by now
    run(revoke())
    # The server notices within its access poll period (ACCESS_POLL_SECONDS, 50 ms).
    deadline = time.monotonic() + 5
    while (reply := stack.put({"customer_id": "r-customer"}, creds)).status == 200:
        assert time.monotonic() < deadline, "the revoked grant still works"
        time.sleep(0.01)
    assert_rest_reply(reply, 403, b'{"success":false,"message":"Forbidden"}')
