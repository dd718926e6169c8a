"""Webhooks with two server replicas on PostgreSQL behind one Envoy: the replicas share the
endpoints by leases, so every change (whichever replica committed it) reaches the receiver once
in the normal case, in cursor order; when the replica delivering dies, the other takes the
endpoint over from its stored cursor. Each attempt is one JSON log line, without the secret.
Needs TEST_POSTGRES_URL; skipped without it."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from devstack import Credentials, Stack, onboard_at, start_stack
from tests.support.admin import admin
from tests.support.http_client import call
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, UPDATE
from tests.support.webhooks import Received, Receiver

# A killed replica's endpoints are taken over within ~3 s (not 10).
SERVER_ENV = {
    "WEBHOOK_ALLOW_PRIVATE_URLS": "true",
    "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "WEBHOOK_LEASE_SECONDS": "3",
}


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Stack, Credentials]]:
    with start_stack(
        postgres_url, workdir=tmp_path, replicas=[{}, {}], server_env=SERVER_ENV
    ) as stack:
        partner = onboard_at(postgres_url, "123", rate_limit_per_minute=1_000_000)
        body = json.dumps({"data": [batch_item(f"call-{n}", f"c{n}") for n in range(4)]})
        reply = call(stack.http_port, "POST", BATCH, body, partner.headers())
        assert reply.status == 200, reply.body
        yield stack, partner


def update(stack: Stack, partner: Credentials, customer: str, status: str) -> None:
    """One acknowledged update (a 503 while Envoy ejects a killed replica is sent again)."""
    body = json.dumps({"customer_id": customer, "disposition_status": status})
    deadline = time.monotonic() + 30
    while True:
        reply = call(stack.http_port, "PUT", UPDATE, body, partner.headers())
        if reply.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.status == 200, reply.body


def create_endpoint(database_url: str, url: str) -> dict[str, Any]:
    done = admin(
        database_url,
        "webhook",
        "create",
        "--tenant-id",
        "tenant1",
        "--sub-tenant-id",
        "*",
        "--url",
        url,
        "--event",
        "disposition.changed",
        WEBHOOK_ALLOW_PRIVATE_URLS="true",
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def attempt_lines(stack: Stack) -> list[dict[str, Any]]:
    return [
        line
        for server in stack.servers
        for line in server.log_lines()
        if line.get("message") == "webhook attempt"
    ]


@pytest.mark.postgres
def test_replicas_share_endpoints_and_send_each_change_once(
    replicas: tuple[Stack, Credentials],
) -> None:
    stack, partner = replicas
    receiver = Receiver().start()
    try:
        endpoint = create_endpoint(stack.database_url, receiver.url)
        statuses = [f"s{n}" for n in range(40)]
        for n, status in enumerate(statuses):  # round robin: both replicas commit some
            update(stack, partner, f"c{n % 4}", status)
        got = receiver.wait(lambda got: len(got) >= len(statuses), timeout=60)
        time.sleep(1)  # a double send would arrive by now
        got = list(receiver.received)
    finally:
        receiver.stop()
    ids = Counter(request.headers["webhook-id"] for request in got)
    assert len(ids) == len(statuses) and set(ids.values()) == {1}, ids.most_common(3)
    events = [Webhook(endpoint["secret"]).verify(r.body, r.headers) for r in got]
    cursors = [int(event["data"]["cursor"]) for event in events]
    assert cursors == sorted(cursors)  # one follower per endpoint: in cursor order
    assert [event["data"]["disposition_status"] for event in events] == statuses
    lines = attempt_lines(stack)
    assert len(lines) == len(statuses)
    assert {line["endpoint_id"] for line in lines} == {endpoint["id"]}
    assert {line["outcome"] for line in lines} == {"delivered"}
    assert set(lines[0]) >= {"event_id", "event_type", "attempt", "status_code", "duration_ms"}
    logs = "".join(server.log_path.read_text() for server in stack.servers if server.log_path)
    assert endpoint["secret"] not in logs and "whsec_" not in logs


@pytest.mark.postgres
def test_when_the_delivering_replica_dies_the_other_takes_over(
    replicas: tuple[Stack, Credentials],
) -> None:
    stack, partner = replicas
    receiver = Receiver().start()
    try:
        create_endpoint(stack.database_url, receiver.url)
        update(stack, partner, "c0", "before")
        receiver.wait(lambda got: len(got) == 1, timeout=30)
        deadline = time.monotonic() + 10
        holders: list[Any] = []
        while not holders:  # its log line follows the receiver's reply
            assert time.monotonic() < deadline, "no replica logged the attempt"
            holders = [
                server
                for server in stack.servers
                if any(line.get("message") == "webhook attempt" for line in server.log_lines())
            ]
            time.sleep(0.05)
        (holder,) = holders
        holder.stop(signal.SIGKILL)
        for n in range(5):  # through Envoy: the surviving replica commits them
            update(stack, partner, f"c{n % 4}", f"after-{n}")
        after = {f"after-{n}" for n in range(5)}
        # At least once: the survivor may send "before" again (killed before it was stored).
        got = receiver.wait(lambda got: after <= set(_statuses(got)), timeout=60)
    finally:
        receiver.stop()
    statuses = _statuses(got)
    assert statuses[0] == "before" and set(statuses[1:]) - {"before"} == after


def _statuses(received: list[Received]) -> list[str]:
    return [json.loads(r.body)["data"]["disposition_status"] for r in received]
