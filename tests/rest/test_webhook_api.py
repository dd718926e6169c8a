"""A partner's webhook endpoints over REST, through the real stack (a server process and Envoy)
on each engine, delivering to a real HTTP receiver; the contract as a partner sees it: statuses,
exact envelopes, JSON shapes (tests/grpc_api/test_webhook_api.py: the same over gRPC).

Automatic retries wait a minute here (WEBHOOK_RETRY_BASE_SECONDS 60), so that a second attempt
within a test is the one it asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from devstack import Credentials
from tests.support.http_client import Reply, assert_rest_reply
from tests.support.rest import Stack, start_stack
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.envoy

ENDPOINTS = "/api/v1/partner/webhook-endpoints"
SERVER_ENV = {"WEBHOOK_ALLOW_PRIVATE_URLS": "true", "WEBHOOK_RETRY_BASE_SECONDS": "60"}
ENDPOINT_KEYS = {"id", "url", "events", "tenant_id", "sub_tenant_id", "enabled",
                 "disabled_reason", "created_at"}  # fmt: skip
NOT_FOUND = b'{"success":false,"message":"Webhook endpoint not found"}'
FORBIDDEN = b'{"success":false,"message":"Forbidden"}'


@pytest.fixture(scope="module")
def stack(stack_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("webhook-api"), stack_database_url, server_env=SERVER_ENV
    )


@pytest.fixture(scope="module")
def other(stack: Stack) -> Credentials:
    """Another partner, granted the same tenant and sub-tenant."""
    return stack.onboard("456")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


def ok(reply: Reply) -> Any:
    """The `data` of a 200 reply (None without one)."""
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/json"
    body = json.loads(reply.body)
    assert body["success"] is True
    return body.get("data")


def create(stack: Stack, url: str, *events: str) -> dict[str, Any]:
    created: dict[str, Any] = ok(stack.request("POST", ENDPOINTS, {"url": url, "events": events}))
    return created


def put(stack: Stack, status: str) -> None:
    reply = stack.put({"customer_id": "customer123", "disposition_status": status})
    assert reply.status == 200, reply.body


def deliveries_until(
    stack: Stack, endpoint_id: str, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    path = f"{ENDPOINTS}/{endpoint_id}/deliveries"
    for _ in range(200):
        found: list[dict[str, Any]] = ok(stack.request("GET", path))["items"]
        if done(found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"deliveries still {found}")


def paths(endpoint_id: str, delivery_id: str = "1") -> dict[str, tuple[str, str]]:
    """Each operation on one endpoint: (method, path)."""
    return {
        "delete": ("DELETE", f"{ENDPOINTS}/{endpoint_id}"),
        "rotate": ("POST", f"{ENDPOINTS}/{endpoint_id}/rotate-secret"),
        "deliveries": ("GET", f"{ENDPOINTS}/{endpoint_id}/deliveries"),
        "retry": ("POST", f"{ENDPOINTS}/{endpoint_id}/deliveries/{delivery_id}/retry"),
    }


def test_a_created_endpoint_gets_verifiable_events_and_is_listed_without_its_secret(
    stack: Stack, receiver: Receiver
) -> None:
    endpoint = create(stack, receiver.url, "disposition.changed")
    assert set(endpoint) == ENDPOINT_KEYS | {"secret"}  # no failing_since while healthy
    assert endpoint["id"].startswith("we_") and endpoint["secret"].startswith("whsec_")
    assert {k: endpoint[k] for k in ("url", "events", "tenant_id", "sub_tenant_id", "enabled",
                                     "disabled_reason")} == {
        "url": receiver.url, "events": ["disposition.changed"], "tenant_id": "tenant1",
        "sub_tenant_id": "subtenant1", "enabled": True, "disabled_reason": "",
    }  # fmt: skip

    put(stack, "interested")
    (delivery,) = receiver.wait(lambda got: len(got) == 1)
    event = Webhook(endpoint["secret"]).verify(delivery.body, delivery.headers)
    assert event["data"]["disposition_status"] == "interested"

    items = ok(stack.request("GET", ENDPOINTS))["items"]
    assert all("secret" not in item for item in items), items
    (shown,) = [item for item in items if item["id"] == endpoint["id"]]
    assert shown == {k: v for k, v in endpoint.items() if k != "secret"}

    (attempt,) = deliveries_until(stack, endpoint["id"], lambda found: len(found) == 1)
    assert set(attempt) == {"id", "event_id", "event_type", "status", "attempts",
                            "last_status_code", "last_error", "last_attempt_at", "delivered_at",
                            "created_at"}  # fmt: skip
    assert isinstance(attempt["id"], str) and attempt["id"].isdigit()  # an int64
    assert {k: attempt[k] for k in ("event_id", "event_type", "status", "attempts",
                                    "last_status_code", "last_error")} == {
        "event_id": delivery.headers["webhook-id"], "event_type": "disposition.changed",
        "status": "delivered", "attempts": 1, "last_status_code": 200, "last_error": "",
    }  # fmt: skip

    rotated = ok(stack.request("POST", paths(endpoint["id"])["rotate"][1]))
    assert set(rotated) == set(endpoint) and rotated["secret"] != endpoint["secret"]
    assert {**rotated, "secret": endpoint["secret"]} == endpoint


def test_a_failed_delivery_is_sent_again_on_request_and_delete_stops_deliveries(
    stack: Stack, receiver: Receiver
) -> None:
    answers = iter([500])
    receiver.answer = lambda _request: next(answers, 200)
    endpoint = create(stack, receiver.url, "disposition.changed")
    put(stack, "callback_requested")
    (first,) = receiver.wait(lambda got: len(got) == 1)
    (failed,) = deliveries_until(stack, endpoint["id"], lambda found: len(found) == 1)
    assert (failed["status"], failed["attempts"], failed["last_status_code"]) == ("pending", 1, 500)
    assert failed["last_error"] == "HTTP 500"

    retried = ok(stack.request("POST", paths(endpoint["id"], failed["id"])["retry"][1]))
    assert (retried["id"], retried["status"], retried["attempts"]) == (failed["id"], "pending", 1)
    _, again = receiver.wait(lambda got: len(got) == 2)
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    Webhook(endpoint["secret"]).verify(again.body, again.headers)
    (done,) = deliveries_until(stack, endpoint["id"], lambda found: found[0]["status"] != "pending")
    assert (done["status"], done["attempts"], done["last_status_code"]) == ("delivered", 2, 200)
    pending = ok(stack.request("GET", f"{ENDPOINTS}/{endpoint['id']}/deliveries?status=pending"))
    assert pending == {"endpoint_id": endpoint["id"], "items": []}

    assert_rest_reply(
        stack.request("DELETE", f"{ENDPOINTS}/{endpoint['id']}"), 200, b'{"success":true}'
    )
    later = Receiver().start()
    try:  # the next change reaches a live endpoint, and not the deleted one
        create(stack, later.url, "disposition.changed")
        put(stack, "sold")
        (got,) = later.wait(lambda got: len(got) == 1)
        assert got.event["data"]["disposition_status"] == "sold"
        assert len(receiver.received) == 2
    finally:
        later.stop()
    for method, path in paths(endpoint["id"], failed["id"]).values():
        assert_rest_reply(stack.request(method, path), 404, NOT_FOUND)


def test_another_partners_endpoints_are_not_found_and_ungranted_tenants_forbidden(
    stack: Stack, other: Credentials, receiver: Receiver
) -> None:
    endpoint = create(stack, receiver.url, "disposition.changed")
    put(stack, "interested")
    (delivery,) = deliveries_until(stack, endpoint["id"], lambda found: len(found) == 1)
    theirs = ok(stack.request("GET", ENDPOINTS, creds=other))["items"]
    assert endpoint["id"] not in [item["id"] for item in theirs]
    for name, (method, path) in paths(endpoint["id"], delivery["id"]).items():
        reply = stack.request(method, path, creds=other)
        assert (name, reply.status, reply.body) == (name, 404, NOT_FOUND)
        reply = stack.request(method, path, x_tenant_id="tenant9")
        assert (name, reply.status, reply.body) == (name, 403, FORBIDDEN)
    for method, body in (("GET", None), ("POST", {"url": receiver.url})):
        assert_rest_reply(stack.request(method, ENDPOINTS, body, x_tenant_id="tenant9"), 403,
                          FORBIDDEN)  # fmt: skip
    (mine,) = [e for e in ok(stack.request("GET", ENDPOINTS))["items"] if e["id"] == endpoint["id"]]
    assert mine["enabled"]  # untouched by the refused calls


def test_invalid_fields_are_422_naming_them(stack: Stack) -> None:
    def refused(reply: Reply) -> list[dict[str, str]]:
        assert reply.status == 422, reply.body
        body = json.loads(reply.body)
        assert (body["success"], body["message"]) == (False, "Validation failed")
        errors: list[dict[str, str]] = body["errors"]
        return errors

    assert refused(
        stack.request("POST", ENDPOINTS, {"url": "ftp://hooks.example.com/", "events": ["x"]})
    ) == [
        {"field": "url", "message": "url must be an https URL"},
        {"field": "events[0]",
         "message": "events[0] must be one of: disposition.changed, call.processed"},
    ]  # fmt: skip
    assert refused(stack.request("POST", ENDPOINTS, {"url": 7})) == [
        {"field": "url", "message": "url must be a string"}
    ]
    assert refused(stack.request("GET", f"{ENDPOINTS}/we_x/deliveries?page_size=101")) == [
        {"field": "page_size", "message": "page_size must not be greater than 100"}
    ]
    assert refused(stack.request("POST", f"{ENDPOINTS}/we_x/deliveries/abc/retry")) == [
        {"field": "delivery_id", "message": "delivery_id must be an integer"}
    ]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", ENDPOINTS, "GET, POST"),
        ("DELETE", ENDPOINTS, "GET, POST"),
        ("GET", f"{ENDPOINTS}/we_1", "DELETE"),
        ("POST", f"{ENDPOINTS}/we_1", "DELETE"),
        ("GET", f"{ENDPOINTS}/we_1/rotate-secret", "POST"),
        ("POST", f"{ENDPOINTS}/we_1/deliveries", "GET"),
        ("GET", f"{ENDPOINTS}/we_1/deliveries/1/retry", "POST"),
    ],
)
def test_other_methods_are_405_with_allow(stack: Stack, method: str, path: str, allow: str) -> None:
    reply = stack.request(method, path)
    assert_rest_reply(reply, 405, b'{"success":false,"message":"Method not allowed"}')
    assert reply.header("allow") == allow
