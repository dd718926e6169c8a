"""POST /api/v1/partner/ingest/disposition-status/batch through real Envoy and a real server
process, byte for byte (over gRPC: tests/grpc_api/test_batch_update.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import Credentials
from tests.support.http_client import assert_rest_reply
from tests.support.payloads import batch_item
from tests.support.rest import BATCH_UPDATE, Stack, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("batch-update-stack"), stack_database_url)


def post(stack: Stack, body: object, creds: Credentials | None = None, **headers: str) -> Any:
    return stack.request("POST", BATCH_UPDATE, body, creds, **headers)


@pytest.mark.envoy
def test_rest_mixed_batch(stack: Stack) -> None:
    creds = stack.onboard("rest-batch")
    assert stack.ingest(creds, batch_item("rb-1", "rb-customer", "new")).status == 200
    reply = post(
        stack,
        {
            "items": [
                {"customer_id": "rb-customer", "disposition_status": "interested"},
                {"customer_id": "rb-nobody", "disposition_status": "interested"},
                {"customer_id": "rb-customer", "disposition_status": None},
                {"customer_id": "", "disposition_status": "x"},
                {"customer_id": "rb-customer", "disposition_status": "callback_requested"},
            ]
        },
        creds,
        x_request_id="rest-batch-1",
    )
    assert_rest_reply(
        reply,
        200,
        b'{"success":true,"data":{"ok":3,"not_found":1,"invalid":1,"changed":2,"items":['
        b'{"index":0,"customer_id":"rb-customer","status":"ok","changed":true,"errors":[]},'
        b'{"index":1,"customer_id":"rb-nobody","status":"not_found","changed":false,"errors":[]},'
        b'{"index":2,"customer_id":"rb-customer","status":"ok","changed":false,"errors":[]},'
        b'{"index":3,"customer_id":"","status":"invalid","changed":false,"errors":[{"field":'
        b'"items[3].customer_id","message":"items[3].customer_id should not be empty"}]},'
        b'{"index":4,"customer_id":"rb-customer","status":"ok","changed":true,"errors":[]}]}}',
    )
    assert reply.header("x-request-id") == "rest-batch-1"
    assert stack.history("rb-customer") == [
        (None, "new", "batch_call", stack.history("rb-customer")[0][3]),
        ("new", "interested", "batch_update", "rest-batch-1"),
        ("interested", "callback_requested", "batch_update", "rest-batch-1"),
    ]


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"items": []}, b"items should not be empty"),
        ({}, b"items should not be empty"),
        (b"", b"items should not be empty"),
        (
            {"items": [{"customer_id": f"c{n}"} for n in range(1001)]},
            b"items must contain no more than 1000 elements",
        ),
    ],
)
def test_rest_envelope_problems(stack: Stack, body: object, message: bytes) -> None:
    assert_rest_reply(
        post(stack, body),
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":"items","message":"'
        + message
        + b'"}]}',
    )


@pytest.mark.envoy
def test_rest_wrong_types_and_bad_json(stack: Stack) -> None:
    assert_rest_reply(
        post(stack, b'{"items": [{"customer_id": "x"'),
        400,
        b'{"success":false,"message":"Invalid JSON body"}',
    )
    # A body the gateway cannot transcode is refused as a whole, before any item is applied.
    assert_rest_reply(
        post(stack, {"items": [{"customer_id": "customer123"}, {"customer_id": 7}]}),
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":"items[1].customer_id",'
        b'"message":"items[1].customer_id must be a string"}]}',
    )


@pytest.mark.envoy
def test_rest_all_invalid_batch_is_200(stack: Stack) -> None:
    assert_rest_reply(
        post(stack, {"items": [{"customer_id": " "}]}),
        200,
        b'{"success":true,"data":{"ok":0,"not_found":0,"invalid":1,"changed":0,"items":['
        b'{"index":0,"customer_id":" ","status":"invalid","changed":false,"errors":[{"field":'
        b'"items[0].customer_id","message":"items[0].customer_id should not be empty"}]}]}}',
    )


@pytest.mark.envoy
def test_rest_rate_limited_partner(stack: Stack) -> None:
    limited = stack.onboard("rest-limited", rate_limit_per_minute=1)
    body = {"items": [{"customer_id": "rl-nobody", "disposition_status": "x"}] * 3}
    first = post(stack, body, limited)
    assert first.status == 200 and json.loads(first.body)["data"]["not_found"] == 3
    reply = post(stack, body, limited)
    assert_rest_reply(
        reply, 429, b'{"success":false,"message":"Rate limit exceeded. Try again in 60 seconds."}'
    )
    assert 1 <= int(reply.header("retry-after") or "0") <= 60


@pytest.mark.envoy
def test_rest_tenant_not_granted(stack: Stack) -> None:
    body = {"items": [{"customer_id": "customer123", "disposition_status": "hijacked"}]}
    assert_rest_reply(
        post(stack, body, x_tenant_id="tenant2"), 403, b'{"success":false,"message":"Forbidden"}'
    )
    assert stack.sql("SELECT count(*) FROM disposition_history WHERE new_status = 'hijacked'") == [
        (0,)
    ]


@pytest.mark.envoy
def test_rest_other_methods_are_not_allowed(stack: Stack) -> None:
    reply = stack.request("PUT", BATCH_UPDATE, {"items": []})
    assert_rest_reply(reply, 405, b'{"success":false,"message":"Method not allowed"}')
    assert reply.header("allow") == "POST"
