"""Webhooks through the real stack, on both engines: an operator creates an endpoint with the real
`disposition-admin`, a partner changes statuses through Envoy, and a real HTTP receiver gets
signed `disposition.changed` deliveries, verified with the Standard Webhooks reference library."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devstack import ServerProcess
from server.db import Database
from tests.support.admin import admin
from tests.support.databases import failing_inserts, settings_for
from tests.support.payloads import batch_item
from tests.support.rest import Stack, start_stack
from tests.support.webhooks import Received, Receiver

# Quick retries, and a killed process's endpoints taken over within ~3 s (not 10).
FAST_RETRIES = {
    "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "WEBHOOK_ALLOW_PRIVATE_URLS": "true",
    "WEBHOOK_LEASE_SECONDS": "3",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    """As `make run` starts it: the server and one disposition-webhooks worker, which
    delivers (WEBHOOK_DELIVERY=worker)."""
    yield from start_stack(tmp_path, database_url, server_env=FAST_RETRIES, webhook_workers=1)


def cli(stack: Stack, *args: str, **env: str) -> Any:
    done = admin(stack.database_url, "webhook", *args, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def create_endpoint(stack: Stack, url: str, *events: str) -> dict[str, Any]:
    flags = [arg for event in events for arg in ("--event", event)]
    return dict(
        cli(
            stack,
            "create",
            "--tenant-id",
            "tenant1",
            "--sub-tenant-id",
            "subtenant1",
            "--url",
            url,
            *flags,
            WEBHOOK_ALLOW_PRIVATE_URLS="true",
        )
    )


def put(stack: Stack, status: str, customer_id: str = "customer123") -> None:
    reply = stack.put({"customer_id": customer_id, "disposition_status": status})
    assert reply.status == 200, reply.body


def statuses(received: list[Received]) -> list[str]:
    return [r.event["data"]["disposition_status"] for r in received]


def test_a_change_is_delivered_signed_and_verifies(stack: Stack, receiver: Receiver) -> None:
    endpoint = create_endpoint(stack, receiver.url)
    assert endpoint["id"].startswith("we_") and endpoint["secret"].startswith("whsec_")
    assert endpoint["url"] == receiver.url
    assert endpoint["events"] == ["disposition.changed", "call.processed"]
    put(stack, "interested")
    (delivery,) = receiver.wait(lambda got: len(got) == 1)
    payload = Webhook(endpoint["secret"]).verify(delivery.body, delivery.headers)
    assert payload["type"] == "disposition.changed"
    data = payload["data"]
    assert {k: data[k] for k in ("tenant_id", "sub_tenant_id", "customer_id", "previous_status",
                                 "disposition_status", "source", "partner_id")} == {
        "tenant_id": "tenant1", "sub_tenant_id": "subtenant1", "customer_id": "customer123",
        "previous_status": "", "disposition_status": "interested",
        "source": "disposition_update", "partner_id": "123",
    }  # fmt: skip
    (history,) = stack.sql("SELECT id, seq, request_id FROM disposition_history")
    assert delivery.headers["webhook-id"] == f"evt_{history.id}"
    assert data["cursor"] == str(history.seq) and data["request_id"] == history.request_id
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 60
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(delivery.body.replace(b"interested", b"xinterestedx"),
                                           delivery.headers)  # fmt: skip
    (listed,) = cli(stack, "list")
    assert "secret" not in listed and listed["id"] == endpoint["id"] and listed["enabled"]
    shown = cli(stack, "deliveries", "--id", endpoint["id"])
    assert [(d["event_id"], d["status"], d["attempts"], d["last_status_code"]) for d in shown] == [
        (f"evt_{history.id}", "delivered", 1, 200)
    ]


def test_with_a_worker_only_the_worker_delivers(stack: Stack, receiver: Receiver) -> None:
    """WEBHOOK_DELIVERY=worker: the server never takes an endpoint, even with several to share
    (two processes delivering would split them by lease)."""
    for _ in range(4):
        create_endpoint(stack, receiver.url, "disposition.changed")
    put(stack, "interested")
    receiver.wait(lambda got: len(got) == 4)
    (worker,) = stack.workers

    def attempts(process: ServerProcess) -> int:
        return sum(1 for line in process.log_lines() if line["message"] == "webhook attempt")

    deadline = time.monotonic() + 10  # each attempt is logged once its reply is read
    while attempts(worker) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert attempts(worker) == 4
    assert attempts(stack.server) == 0
    (owner,) = {row.lease_owner for row in stack.sql("SELECT lease_owner FROM webhook_endpoints")}
    assert worker.process is not None and f":{worker.process.pid}:" in owner


def test_failed_attempts_are_retried_with_the_same_webhook_id(
    stack: Stack, receiver: Receiver
) -> None:
    attempts: dict[str, int] = {}

    def flaky(request: Received) -> int:
        event_id = request.headers["webhook-id"]
        attempts[event_id] = attempts.get(event_id, 0) + 1
        return 503 if attempts[event_id] <= 2 else 204

    receiver.answer = flaky
    endpoint = create_endpoint(stack, receiver.url)
    put(stack, "interested")
    got = receiver.wait(lambda got: len(got) == 3)
    assert len({r.headers["webhook-id"] for r in got}) == 1
    for request in got:  # each attempt signed anew, all valid
        Webhook(endpoint["secret"]).verify(request.body, request.headers)
    deadline = time.monotonic() + 10
    while True:
        (shown,) = cli(stack, "deliveries", "--id", endpoint["id"])
        if shown["status"] == "delivered" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (shown["status"], shown["attempts"], shown["last_status_code"]) == ("delivered", 3, 204)
    (listed,) = cli(stack, "list")
    assert listed["failing_since"] is None  # healthy again


async def test_a_rolled_back_change_never_produces_an_event(
    stack: Stack, receiver: Receiver
) -> None:
    create_endpoint(stack, receiver.url)
    db = Database(settings_for(stack.database_url))
    try:
        async with failing_inserts(db, "disposition_history"):
            reply = stack.put({"customer_id": "customer123", "disposition_status": "lost"})
            assert reply.status == 500, reply.body
    finally:
        await db.dispose()
    put(stack, "callback_requested")
    got = receiver.wait(lambda got: len(got) >= 1)
    time.sleep(0.5)  # anything queued behind it would have arrived in cursor order anyway
    assert statuses(receiver.received) == ["callback_requested"], statuses(got)


def test_events_follow_cursor_order_and_disabled_endpoints_catch_up(
    stack: Stack, receiver: Receiver
) -> None:
    endpoint = create_endpoint(stack, receiver.url, "disposition.changed")
    for status in ("a", "b", "c"):
        put(stack, status)
    receiver.wait(lambda got: len(got) == 3)
    cli(stack, "disable", "--id", endpoint["id"])
    put(stack, "d")
    time.sleep(1)
    assert statuses(receiver.received) == ["a", "b", "c"]
    (listed,) = cli(stack, "list")
    assert (listed["enabled"], listed["disabled_reason"]) == (False, "disabled by an operator")
    cli(stack, "enable", "--id", endpoint["id"])
    put(stack, "e")
    got = receiver.wait(lambda got: len(got) == 5)
    assert statuses(got) == ["a", "b", "c", "d", "e"]
    cursors = [int(r.event["data"]["cursor"]) for r in got]
    assert cursors == sorted(cursors)
    rotated = cli(stack, "rotate-secret", "--id", endpoint["id"])
    assert rotated["secret"] != endpoint["secret"]
    put(stack, "f")
    (last,) = receiver.wait(lambda got: len(got) == 6)[5:]
    Webhook(rotated["secret"]).verify(last.body, last.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(last.body, last.headers)
    assert cli(stack, "delete", "--id", endpoint["id"]) == {"id": endpoint["id"], "deleted": True}
    gone = admin(stack.database_url, "webhook", "deliveries", "--id", endpoint["id"])
    assert gone.returncode == 3 and f"no webhook endpoint {endpoint['id']!r}" in gone.stderr


def test_undelivered_events_survive_a_sigkill_of_the_stack(stack: Stack, tmp_path: Path) -> None:
    receiver = Receiver().start()
    port = receiver.port
    receiver.stop()  # down: nothing listens on the endpoint's port
    endpoint = create_endpoint(stack, f"http://127.0.0.1:{port}/hooks")
    for status in ("one", "two", "three"):
        put(stack, status)
    (worker,) = stack.workers
    for process in (worker, stack.server):
        process.stop(signal.SIGKILL)
    receiver = Receiver(port=port).start()
    try:
        stack.server.start()
        worker.start()  # the killed worker's lease expires: taken over within ~3 s
        got = receiver.wait(lambda got: {"one", "two", "three"} <= set(statuses(got)), timeout=60)
        for request in got:
            Webhook(endpoint["secret"]).verify(request.body, request.headers)
    finally:
        receiver.stop()


def test_urls_inside_the_network_are_refused_at_creation_and_at_delivery(
    stack: Stack, receiver: Receiver
) -> None:
    for url, message in [
        ("http://hooks.example.com/x", "url must be an https URL"),
        ("https://localhost/x", "url must not point to a private or internal address"),
        ("https://10.0.0.7/x", "url must not point to a private or internal address"),
        ("https://169.254.169.254/latest/meta-data", "must not point to a private or internal"),
        ("https://hooks.invalid/x", "url cannot resolve hooks.invalid"),
    ]:
        refused = admin(stack.database_url, "webhook", "create", "--tenant-id", "tenant1",
                        "--sub-tenant-id", "subtenant1", "--url", url)  # fmt: skip
        assert refused.returncode == 2, (url, refused.stdout)
        assert message in refused.stderr, (url, refused.stderr)
    args = ["--tenant-id", "t", "--sub-tenant-id", "s", "--url", "https://hooks.example.com/"]
    wrong = admin(stack.database_url, "webhook", "create", *args, "--event", "nope")
    assert wrong.returncode == 2
    assert "events[0] must be one of: disposition.changed, call.processed" in wrong.stderr
    assert cli(stack, "list") == []


def test_a_private_url_is_refused_again_at_delivery(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """Created while private URLs were allowed (or a host that resolved elsewhere then): the
    server, which does not allow them, refuses to connect and records why."""
    strict = {"WEBHOOK_RETRY_BASE_SECONDS": "0.2"}
    for stack in start_stack(tmp_path, database_url, server_env=strict):
        endpoint = create_endpoint(stack, receiver.url)
        put(stack, "interested")
        deadline = time.monotonic() + 20
        shown: list[dict[str, Any]] = []
        while not shown and time.monotonic() < deadline:
            shown = cli(stack, "deliveries", "--id", endpoint["id"])
            time.sleep(0.1)
        assert shown, "no delivery recorded"
        assert shown[0]["status"] == "pending"
        assert shown[0]["last_error"] == "127.0.0.1 resolves to a private or internal address"
        assert receiver.received == []


def ingest(stack: Stack, *items: dict[str, Any]) -> Any:
    reply = stack.ingest(stack.partner, *items)
    return reply


def test_a_callback_url_gets_one_call_processed_signed_with_the_partners_secret(
    stack: Stack, receiver: Receiver
) -> None:
    done = admin(stack.database_url, "partner", "rotate-webhook-secret", "--partner-id", "123")
    assert done.returncode == 0, done.stderr
    secret = json.loads(done.stdout)["webhook_secret"]
    assert secret.startswith("whsec_")
    calls_only = create_endpoint(stack, receiver.url, "call.processed")
    item = {**batch_item("cb-call-1", "customer-cb"), "callback_url": receiver.url + "?call=1"}
    reply = ingest(stack, item, batch_item("cb-call-2", "customer-cb"))
    assert reply.status == 200, reply.body
    got = receiver.wait(lambda got: len(got) == 3)  # the endpoint: 2 calls; the callback: 1
    by_target: dict[str, list[Received]] = {}
    for request in got:
        by_target.setdefault(request.headers["x-target"], []).append(request)
    (callback,) = by_target["/hooks/disposition?call=1"]
    payload = Webhook(secret).verify(callback.body, callback.headers)
    assert payload["type"] == "call.processed"
    assert payload["data"] == {
        "call_id": "cb-call-1", "customer_id": "customer-cb", "tenant_id": "tenant1",
        "sub_tenant_id": "subtenant1", "status": "created",
    }  # fmt: skip
    endpoint_calls = by_target["/hooks/disposition"]
    assert sorted(Webhook(calls_only["secret"]).verify(r.body, r.headers)["data"]["call_id"]
                  for r in endpoint_calls) == ["cb-call-1", "cb-call-2"]  # fmt: skip
    # The endpoint's event and the callback's are the same event: the same webhook-id.
    assert callback.headers["webhook-id"] in {r.headers["webhook-id"] for r in endpoint_calls}
    # A retried batch: the calls are duplicates, nobody is notified again.
    assert ingest(stack, item).status == 200
    put(stack, "interested", "customer-cb")  # a disposition change: not for this endpoint
    time.sleep(1)
    assert len(receiver.received) == 3


def test_a_callback_url_inside_the_network_makes_the_batch_a_422(
    database_url: str, tmp_path: Path
) -> None:
    for stack in start_stack(tmp_path, database_url):  # private URLs not allowed
        urls = ["https://hooks.example.com/ok", "http://hooks.example.com/plain",
                "https://10.1.2.3/x", "https://localhost/x"]  # fmt: skip
        items = [{**batch_item(f"c{i}", "cust"), "callback_url": url} for i, url in enumerate(urls)]
        reply = ingest(stack, *items)
        assert reply.status == 422, reply.body
        assert json.loads(reply.body)["errors"] == [
            {"field": "data[1].callback_url",
             "message": "data[1].callback_url must be an https URL"},
            {"field": "data[2].callback_url",
             "message": "data[2].callback_url must not point to a private or internal address"},
            {"field": "data[3].callback_url",
             "message": "data[3].callback_url must not point to a private or internal address"},
        ]  # fmt: skip
        assert stack.sql("SELECT count(*) FROM calls WHERE call_id LIKE 'c_'")[0][0] == 0


def test_partner_create_prints_a_webhook_secret(stack: Stack) -> None:
    done = admin(stack.database_url, "partner", "create", "--partner-id", "hooked", "--name", "H")
    assert done.returncode == 0, done.stderr
    issued = json.loads(done.stdout)
    assert set(issued) == {"partner_id", "api_key", "api_secret", "webhook_secret"}
    assert issued["webhook_secret"].startswith("whsec_")
    rotated = admin(stack.database_url, "partner", "rotate-secret", "--partner-id", "hooked")
    assert "webhook_secret" not in json.loads(rotated.stdout)  # only the API secret changes
