"""Batch-call replays and `Idempotency-Key` through real Envoy and a real disposition-server
process: status, body bytes, headers, rows (over gRPC: tests/grpc_api/test_idempotency.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from devstack import Credentials
from server.models import IdempotencyRecord
from tests.support.http_client import assert_rest_reply
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, Stack, start_stack

REPLAYED = "idempotent-replayed"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("idempotency"), stack_database_url)


def rows(stack: Stack) -> dict[str, int]:
    return {
        table: stack.sql(f"SELECT count(*) FROM {table}")[0][0]
        for table in ("calls", "customers", "disposition_history", "idempotency_keys")
    }


def fresh(stack: Stack) -> tuple[Credentials, str]:
    """A new partner and key for a test (the stack is shared by the module)."""
    suffix = uuid.uuid4().hex[:8]
    return stack.onboard(f"p-{suffix}"), f"key-{suffix}"


def body(*call_ids: str) -> dict[str, Any]:
    return {"data": [batch_item(call_id, f"cust-{call_id}", "new") for call_id in call_ids]}


REUSED_BODY = (
    b'{"success":false,"message":"Validation failed","errors":[{"field":"Idempotency-Key",'
    b'"message":"Idempotency-Key was already used with a different request"}]}'
)


@pytest.mark.envoy
def test_rest_replay_is_byte_for_byte_and_applies_nothing(stack: Stack) -> None:
    creds, key = fresh(stack)
    first = stack.request("POST", BATCH, body("r1", "r2"), creds, idempotency_key=key)
    assert first.status == 200
    assert json.loads(first.body)["data"]["created_calls"] == 2
    assert first.header(REPLAYED) is None
    before = rows(stack)
    for _ in range(2):
        again = stack.request("POST", BATCH, body("r1", "r2"), creds, idempotency_key=key)
        assert_rest_reply(again, 200, first.body)
        assert again.header(REPLAYED) == "true"
        assert rows(stack) == before


@pytest.mark.envoy
def test_rest_same_key_with_another_body(stack: Stack) -> None:
    creds, key = fresh(stack)
    assert stack.request("POST", BATCH, body("d1"), creds, idempotency_key=key).status == 200
    before = rows(stack)
    reply = stack.request("POST", BATCH, body("d2"), creds, idempotency_key=key)
    assert_rest_reply(reply, 422, REUSED_BODY)
    assert reply.header(REPLAYED) is None
    assert rows(stack) == before


@pytest.mark.envoy
def test_rest_keys_are_per_partner(stack: Stack) -> None:
    (one, key), (two, _) = fresh(stack), fresh(stack)
    for creds in (one, two):
        reply = stack.request("POST", BATCH, body("same"), creds, idempotency_key=key)
        assert reply.status == 200
        assert json.loads(reply.body)["data"]["created_calls"] == 1
        assert reply.header(REPLAYED) is None


@pytest.mark.envoy
def test_rest_rejected_request_does_not_use_up_the_key(stack: Stack) -> None:
    creds, key = fresh(stack)
    bad = body("v1")
    bad["data"][0]["call"]["end_time"] = bad["data"][0]["call"]["start_time"]
    reply = stack.request("POST", BATCH, bad, creds, idempotency_key=key)
    assert_rest_reply(
        reply,
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":'
        b'"data[0].call.end_time","message":"data[0].call.end_time must be after '
        b'data[0].call.start_time"}]}',
    )
    fixed = stack.request("POST", BATCH, body("v1"), creds, idempotency_key=key)
    assert fixed.status == 200 and fixed.header(REPLAYED) is None
    assert json.loads(fixed.body)["data"]["created_calls"] == 1
    again = stack.request("POST", BATCH, body("v1"), creds, idempotency_key=key)
    assert_rest_reply(again, 200, fixed.body)
    assert again.header(REPLAYED) == "true"


@pytest.mark.envoy
def test_rest_expired_key_is_treated_as_new(stack: Stack) -> None:
    creds, key = fresh(stack)
    first = stack.request("POST", BATCH, body("e1"), creds, idempotency_key=key)
    assert json.loads(first.body)["data"]["created_calls"] == 1
    old = datetime.now(UTC) - timedelta(hours=25)
    K = IdempotencyRecord
    stack.sql(update(K).where(K.key == key).values(created_at=old))
    again = stack.request("POST", BATCH, body("e1"), creds, idempotency_key=key)
    assert again.status == 200 and again.header(REPLAYED) is None
    assert json.loads(again.body)["data"]["duplicate_calls"] == 1


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "Idempotency-Key must not be empty"),
        ("k" * 256, "Idempotency-Key must be at most 255 characters long"),
        ("cl\xe9", "Idempotency-Key must contain only printable ASCII characters"),
    ],
)
def test_rest_malformed_key(stack: Stack, key: str, message: str) -> None:
    creds, _ = fresh(stack)
    before = rows(stack)
    reply = stack.request("POST", BATCH, body("m1"), creds, idempotency_key=key)
    assert_rest_reply(reply, 400, f'{{"success":false,"message":"{message}"}}'.encode())
    assert rows(stack) == before


@pytest.mark.envoy
def test_rest_batch_update_replay(stack: Stack) -> None:
    creds, key = fresh(stack)
    assert stack.request("POST", BATCH, body("bu1"), creds).status == 200
    update = {"items": [{"customer_id": "cust-bu1", "disposition_status": "won"}]}
    path = "/api/v1/partner/ingest/disposition-status/batch"
    first = stack.request("POST", path, update, creds, idempotency_key=key)
    assert first.status == 200
    assert json.loads(first.body)["data"]["changed"] == 1
    before = rows(stack)
    again = stack.request("POST", path, update, creds, idempotency_key=key)
    assert_rest_reply(again, 200, first.body)
    assert again.header(REPLAYED) == "true"
    assert rows(stack) == before
    other = {"items": [{"customer_id": "cust-bu1", "disposition_status": "lost"}]}
    assert_rest_reply(
        stack.request("POST", path, other, creds, idempotency_key=key), 422, REUSED_BODY
    )
