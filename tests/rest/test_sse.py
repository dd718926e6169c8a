"""The change feed over plain HTTP: `GET /api/v1/partner/disposition-changes` as Server-Sent
Events (Envoy's transcoder, stream_sse_style_delimited), read with the standard library's HTTP
client as any partner could, through the real stack on each engine.

The server sends a heartbeat every HEARTBEAT_SECONDS instead of FEED_HEARTBEAT_SECONDS' 15 s, and
Envoy runs envoy.yaml with its stream idle and request timeouts (30 s and 60 s) scaled down the
same way, so that a stream can be shown to outlive them within seconds. The relationship is kept
as in production: heartbeat < idle timeout, and no route timeout on the feed's route
(test_production_timeouts_leave_a_heartbeating_stream_open checks envoy.yaml's own values).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from devstack import Credentials
from gateway import envoy_config
from gateway.openapi import DEFAULT_OUT
from server.settings import Settings
from tests.support.http_client import GRPC_HEADERS, assert_rest_reply
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, Stack, start_stack

pytestmark = pytest.mark.envoy

FEED = "/api/v1/partner/disposition-changes"
HEARTBEAT_SECONDS = 0.5
IDLE_TIMEOUT_SECONDS = 2  # envoy.yaml: 30 s; still 4 heartbeats
SCALED_TIMEOUTS = {
    "stream_idle_timeout: 30s": f"stream_idle_timeout: {IDLE_TIMEOUT_SECONDS}s",
    "request_timeout: 60s": f"request_timeout: {IDLE_TIMEOUT_SECONDS}s",
}
READ_TIMEOUT_SECONDS = 10  # a socket read that waits longer fails the test instead of hanging it
ENVOY_YAML = envoy_config.TEMPLATE  # the production config (the stack's fixture swaps TEMPLATE)


def scaled_template(directory: Path) -> Path:
    """envoy.yaml with the timeouts of SCALED_TIMEOUTS, written to `directory`."""
    text = ENVOY_YAML.read_text()
    for production, scaled in SCALED_TIMEOUTS.items():
        assert text.count(production) == 1, production
        text = text.replace(production, scaled)
    path = directory / "envoy.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stack(stack_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sse")
    with pytest.MonkeyPatch.context() as patch:
        # The template the dev stack renders Envoy's config from (gateway/envoy_config.py).
        patch.setattr(envoy_config, "TEMPLATE", scaled_template(tmp))
        server_env = {"FEED_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
        yield from start_stack(tmp, stack_database_url, server_env)


class EventStream:
    """One GET of the feed over HTTP/1.1, its events parsed as an EventSource would."""

    def __init__(self, port: int, headers: dict[str, str], query: str) -> None:
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=READ_TIMEOUT_SECONDS
        )
        self.connection.request("GET", FEED + query, headers=headers)
        self.response = self.connection.getresponse()

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def event(self) -> dict[str, Any]:
        """The next event's data. Every event is exactly one `data: <json>` line and a blank
        line (no `id:`, `event:` or comment lines)."""
        lines: list[bytes] = []
        while (line := self.response.readline()) != b"\n":
            assert line, f"the stream ended after {lines}"
            lines.append(line)
        assert len(lines) == 1 and lines[0].startswith(b"data: "), lines
        data: dict[str, Any] = json.loads(lines[0].removeprefix(b"data: "))
        return data

    def start(self) -> int:
        """The first event: no changes, the cursor the stream starts after."""
        assert self.response.status == 200
        first = self.event()
        assert first["changes"] == []
        return int(first["cursor"])

    def changes(self, count: int) -> tuple[list[dict[str, Any]], int]:
        """The next `count` changes, and how many heartbeats (events without changes) came
        between them; each event's cursor is that of its last change."""
        found: list[dict[str, Any]] = []
        heartbeats = 0
        while len(found) < count:
            event = self.event()
            if not event["changes"]:
                heartbeats += 1
                continue
            assert event["cursor"] == event["changes"][-1]["cursor"], event
            found += event["changes"]
        assert len(found) == count, found
        return found, heartbeats


@contextmanager
def watching(
    stack: Stack, query: str = "", creds: Credentials | None = None
) -> Iterator[EventStream]:
    stream = EventStream(stack.envoy.http_port, (creds or stack.partner).headers(), query)
    try:
        yield stream
    finally:
        stream.connection.close()  # the client goes away, as a closed browser tab does


def set_statuses(stack: Stack, statuses: list[str]) -> None:
    for status in statuses:
        reply = stack.put({"customer_id": "customer123", "disposition_status": status})
        assert (reply.status, reply.body) == (200, b'{"success":true}')


def fresh(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"sse-{tag}-{n}" for n in range(count)]


def current_status(stack: Stack) -> str:
    reply = stack.request("GET", "/api/v1/partner/customers/customer123/disposition-status")
    assert reply.status == 200, reply.body
    status: str = json.loads(reply.body)["data"]["disposition_status"]
    return status


def reply_validator() -> Any:
    """The OpenAPI document's schema of one event's data (WatchDispositionChangesResponse)."""
    document = json.loads(Path(DEFAULT_OUT).read_text())
    success = document["paths"][FEED]["get"]["responses"]["200"]["content"]
    data = success["text/event-stream"]["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    schema = {**data["contentSchema"], "components": document["components"]}
    return jsonschema_rs.validator_for(schema)


def test_changes_arrive_as_server_sent_events_in_commit_order(stack: Stack) -> None:
    before = current_status(stack)
    statuses = fresh(3)
    with watching(stack, "?start_at_latest=true") as feed:
        assert feed.header("content-type") == "text/event-stream"
        assert feed.header("content-length") is None
        assert feed.header("transfer-encoding") == "chunked"
        assert feed.header("x-request-id")
        assert (feed.header("ratelimit-limit"), feed.header("ratelimit-policy")) == (
            "120", "120;w=60")  # fmt: skip
        assert 0 <= int(feed.header("ratelimit-remaining") or "-1") < 120
        leaked = {name.lower() for name, _ in feed.response.getheaders()} & GRPC_HEADERS
        assert not leaked
        start = feed.start()
        set_statuses(stack, statuses)
        changes, _ = feed.changes(3)
    assert [(int(c["cursor"]), c["previous_status"], c["disposition_status"]) for c in changes] == [
        (start + 1, before, statuses[0]),
        (start + 2, statuses[0], statuses[1]),
        (start + 3, statuses[1], statuses[2]),
    ]
    first = changes[0]
    assert {key: first[key] for key in ("customer_id", "source", "partner_id")} == {
        "customer_id": "customer123",
        "source": "disposition_update",
        "partner_id": "123",
    }
    assert (first["tenant_id"], first["sub_tenant_id"]) == ("tenant1", "subtenant1")
    assert first["request_id"] and first["changed_at"].endswith("Z")
    validator = reply_validator()
    assert [str(e) for e in validator.iter_errors({"changes": changes, "cursor": "1"})] == []


def test_resuming_after_the_last_cursor_received_has_no_gap_and_no_repeat(stack: Stack) -> None:
    before, after = fresh(2), fresh(3)
    with watching(stack, "?start_at_latest=true") as feed:
        start = feed.start()
        set_statuses(stack, before)
        seen, _ = feed.changes(2)
    last = int(seen[-1]["cursor"])
    set_statuses(stack, after)  # while disconnected
    with watching(stack, f"?after_cursor={last}") as feed:
        assert feed.start() == last
        missed, _ = feed.changes(3)
        set_statuses(stack, ["sse-live"])
        [live], _ = feed.changes(1)
    received = [*seen, *missed, live]
    assert [int(c["cursor"]) for c in received] == list(range(start + 1, start + 7))
    assert [c["disposition_status"] for c in received] == [*before, *after, "sse-live"]


def test_start_at_latest_sends_only_later_changes(stack: Stack) -> None:
    [earlier], [later] = fresh(1), fresh(1)
    set_statuses(stack, [earlier])
    with watching(stack, "?start_at_latest=true") as feed:
        start = feed.start()
        set_statuses(stack, [later])
        [change], _ = feed.changes(1)
    assert (int(change["cursor"]), change["disposition_status"]) == (start + 1, later)
    with watching(stack, f"?after_cursor={start - 1}") as feed:  # the one it skipped
        feed.start()
        both, _ = feed.changes(2)
    assert [(int(c["cursor"]), c["disposition_status"]) for c in both] == [
        (start, earlier),
        (start + 1, later),
    ]


@pytest.mark.parametrize(
    ("query", "headers", "status", "body"),
    [
        ("", {"x_api_secret": "ds_wrong"}, 403, b'{"success":false,"message":"Forbidden"}'),
        ("", {"x_api_key": None}, 403, b'{"success":false,"message":"Forbidden"}'),
        ("", {"x_tenant_id": None}, 400, b'{"success":false,"message":"Tenant ID is required"}'),
        ("", {"x_sub_tenant_id": None}, 400,
         b'{"success":false,"message":"Sub-Tenant ID is required"}'),
        ("", {"x_tenant_id": "tenant-not-granted"}, 403,
         b'{"success":false,"message":"Forbidden"}'),
        ("?after_cursor=-1", {}, 422, b'{"success":false,"message":"Validation failed","errors":'
         b'[{"field":"after_cursor","message":"after_cursor must not be less than 0"}]}'),
        ("?after_cursor=soon", {}, 422, b'{"success":false,"message":"Validation failed","errors":'
         b'[{"field":"after_cursor","message":"after_cursor must be an integer"}]}'),
    ],
)  # fmt: skip
def test_refusals_before_the_stream_are_the_documented_envelopes(
    stack: Stack, query: str, headers: dict[str, str | None], status: int, body: bytes
) -> None:
    reply = stack.request("GET", FEED + query, None, None, **headers)
    assert_rest_reply(reply, status, body)


def test_a_rate_limited_stream_is_a_429_with_retry_after(stack: Stack) -> None:
    limited = stack.onboard("sse-limited", rate_limit_per_minute=1)
    with watching(stack, "?start_at_latest=true", limited) as feed:
        feed.start()  # the minute's one request
    reply = stack.request("GET", FEED, None, limited)
    body = b'{"success":false,"message":"Rate limit exceeded. Try again in 60 seconds."}'
    assert_rest_reply(reply, 429, body)
    retry_after = reply.header("retry-after")
    assert retry_after is not None and 1 <= int(retry_after) <= 60


def test_a_heartbeat_arrives_on_an_idle_stream(stack: Stack) -> None:
    with watching(stack, "?start_at_latest=true") as feed:
        start = feed.start()
        assert feed.event() == {"changes": [], "cursor": str(start)}


def test_a_heartbeating_stream_outlives_the_idle_and_request_timeouts(stack: Stack) -> None:
    if stack.db_path is None:
        pytest.skip("Envoy's timeouts and the hub's heartbeats do not depend on the engine")
    # The scaled timeouts are in force: a request whose body never comes is cut by them.
    stalled = http.client.HTTPConnection(
        "127.0.0.1", stack.envoy.http_port, timeout=READ_TIMEOUT_SECONDS
    )
    try:
        stalled.putrequest("PUT", "/api/v1/partner/ingest/disposition-status")
        for name, value in {**stack.partner.headers(), "content-length": "10"}.items():
            stalled.putheader(name, value)
        stalled.endheaders()
        assert stalled.getresponse().status == 408
    finally:
        stalled.close()
    [status] = fresh(1)
    with watching(stack, "?start_at_latest=true") as feed:
        start = feed.start()
        # A slow client: it reads nothing for three idle timeouts; the heartbeats wait for it.
        time.sleep(3 * IDLE_TIMEOUT_SECONDS)
        set_statuses(stack, [status])
        [change], heartbeats = feed.changes(1)
    assert (int(change["cursor"]), change["disposition_status"]) == (start + 1, status)
    assert heartbeats >= 3 * IDLE_TIMEOUT_SECONDS  # about 2 per second, none lost


def test_heartbeats_go_on_while_other_sub_tenants_keep_the_tenant_moving(stack: Stack) -> None:
    """A sub-tenant's watcher gets nothing of the others' changes, yet the tenant's cursor moves
    with each of them; its heartbeats must still come every period, or proxies (and Envoy's
    idle timeout) would close its stream while the rest of the tenant is busy."""
    creds = stack.onboard(
        "sse-busy",
        grants=[("sse-tenant", "quiet"), ("sse-tenant", "busy")],
        rate_limit_per_minute=1_000_000,
    )
    busy = {"x_sub_tenant_id": "busy"}
    item = batch_item("sse-busy-call", "customer123")
    assert stack.request("POST", BATCH, {"data": [item]}, creds, **busy).status == 200
    written: list[int] = []  # the writes' HTTP statuses
    stop = threading.Event()

    def keep_the_tenant_busy() -> None:
        while not stop.is_set():
            body = {"customer_id": "customer123", "disposition_status": f"b{len(written) % 2}"}
            written.append(stack.put(body, creds, **busy).status)

    with watching(stack, "?start_at_latest=true", creds) as feed:  # sub-tenant "quiet"
        start = feed.start()
        writer = threading.Thread(target=keep_the_tenant_busy)
        writer.start()
        try:
            events = []
            deadline = time.monotonic() + 8 * HEARTBEAT_SECONDS
            while time.monotonic() < deadline:
                events.append(feed.event())
        finally:
            stop.set()
            writer.join()
    assert set(written) == {200} and len(written) >= 8  # more often than once per heartbeat
    assert len(events) >= 4 and all(event["changes"] == [] for event in events), events
    # Each heartbeat names how far the tenant's feed was read for this sub-tenant.
    cursors = [int(event["cursor"]) for event in events]
    assert cursors == sorted(cursors) and cursors[-1] > start


def test_production_timeouts_leave_a_heartbeating_stream_open() -> None:
    """envoy.yaml: the feed's route has no route timeout and keeps the listener's stream idle
    timeout, which is longer than the server's default heartbeat period; nothing else bounds a
    stream's life."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    typed = manager["typed_config"]
    (host,) = typed["route_config"]["virtual_hosts"]
    [route] = [r for r in host["routes"] if r["match"].get("path") == FEED]
    assert route["route"]["timeout"] == "0s"
    assert not {"idle_timeout", "max_stream_duration"} & set(route["route"])
    assert "max_stream_duration" not in typed.get("common_http_protocol_options", {})
    heartbeat = Settings(database_url="sqlite+aiosqlite://", grpc_port=0).feed_heartbeat_seconds
    assert heartbeat < int(typed["stream_idle_timeout"].removesuffix("s"))
    assert HEARTBEAT_SECONDS < IDLE_TIMEOUT_SECONDS  # the same relationship, scaled
    [transcoder] = [f for f in typed["http_filters"] if f["name"].endswith("grpc_json_transcoder")]
    assert transcoder["typed_config"]["print_options"]["stream_sse_style_delimited"] is True


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_405_with_allow_get(stack: Stack, method: str) -> None:
    reply = stack.request(method, FEED, {} if method in ("POST", "PUT") else None)
    assert_rest_reply(reply, 405, b'{"success":false,"message":"Method not allowed"}')
    assert reply.header("allow") == "GET"
