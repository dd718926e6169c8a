"""The dispatcher's clock-driven rules, on a real database with the clock moved by hand: a
delivery failing for the whole retry window is marked failed and kept for replay, an endpoint
failing that long is disabled, and a replay sends again."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from server.db import Database
from server.records import WebhookEndpointRecord
from server.runtime.feed import FeedHub
from server.runtime.webhooks import WebhookDispatcher
from server.storage import webhooks as storage
from server.usecases import webhooks

WINDOW = timedelta(days=3)


class Clock:
    """Starts at the real time: what the use cases stamp with the real clock (a replay's due
    time) must not be in this clock's future or past by days."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def closed_port_url() -> str:
    """A loopback URL nothing listens on: every attempt fails at once (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


@pytest.fixture
async def dispatcher(db: Database) -> AsyncIterator[tuple[WebhookDispatcher, Clock]]:
    clock = Clock()
    feed = FeedHub(db)
    sender = WebhookDispatcher(
        db,
        feed,
        timeout_seconds=2,
        retry_base_seconds=5,
        allow_private=True,
        max_in_flight=1,
        retry_window_seconds=WINDOW.total_seconds(),
        now=clock,
    )
    yield sender, clock
    await sender.close()
    await feed.close()


async def failing_endpoint(db: Database, sub_tenant_id: str) -> WebhookEndpointRecord:
    """An endpoint of tenant `t` whose URL refuses every connection."""
    created = await webhooks.create_endpoint(
        db, tenant_id="t", sub_tenant_id=sub_tenant_id, url=closed_port_url(), events=[],
        allow_private=True,
    )  # fmt: skip
    return created.endpoint


async def pending_delivery(db: Database, endpoint_pk: int, at: datetime) -> int:
    async with db.write() as conn:
        await storage.insert_deliveries(conn, [{
            "endpoint_pk": endpoint_pk, "target_url": None, "partner_pk": None,
            "event_id": "evt_1", "event_type": "disposition.changed", "cursor": 1,
            "body": '{"type":"disposition.changed"}', "status": storage.PENDING, "attempts": 1,
            "first_attempt_at": at, "next_attempt_at": at, "created_at": at,
        }])  # fmt: skip
        (delivery,) = await storage.list_deliveries(conn, endpoint_pk=endpoint_pk, limit=1)
    return delivery.pk


async def test_a_delivery_failing_for_the_whole_window_is_failed_then_replayed(
    db: Database, dispatcher: tuple[WebhookDispatcher, Clock]
) -> None:
    sender, clock = dispatcher
    endpoint = await failing_endpoint(db, "s")
    started = clock.now
    await pending_delivery(db, endpoint.pk, started)

    clock.now = started + timedelta(hours=1)  # inside the window: retried later
    assert await sender.retry_due() == 1
    (delivery,) = await webhooks.deliveries(db, endpoint_id=endpoint.endpoint_id)
    assert (delivery.status, delivery.attempts) == ("pending", 2)
    assert delivery.last_error is not None and delivery.last_error.startswith("cannot connect")
    assert delivery.next_attempt_at is not None and delivery.next_attempt_at > clock.now

    clock.now = started + WINDOW + timedelta(seconds=1)  # the window has passed
    assert await sender.retry_due() == 1
    (delivery,) = await webhooks.deliveries(db, endpoint_id=endpoint.endpoint_id)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == ("failed", 3, None)
    assert await sender.retry_due() == 0  # failed: never attempted again by itself

    replayed = await webhooks.replay(db, endpoint_id=endpoint.endpoint_id, delivery_ids=None)
    assert replayed == 1
    (delivery,) = await webhooks.deliveries(db, endpoint_id=endpoint.endpoint_id)
    assert (delivery.status, delivery.first_attempt_at) == ("pending", None)
    assert await sender.retry_due() == 1  # a new series of attempts, with its own window
    (delivery,) = await webhooks.deliveries(db, endpoint_id=endpoint.endpoint_id)
    assert (delivery.status, delivery.attempts) == ("pending", 4)


async def test_an_endpoint_failing_for_the_whole_window_is_disabled(
    db: Database, dispatcher: tuple[WebhookDispatcher, Clock]
) -> None:
    sender, clock = dispatcher
    endpoint = await failing_endpoint(db, "*")
    started = clock.now
    await pending_delivery(db, endpoint.pk, started)
    assert await sender.retry_due() == 1  # fails: the endpoint is failing from now on
    (listed,) = await webhooks.list_endpoints(db)
    assert listed.failing_since == started and listed.enabled

    clock.now = started + WINDOW - timedelta(minutes=1)
    await sender.renew_leases()
    (listed,) = await webhooks.list_endpoints(db)
    assert listed.enabled  # not yet

    clock.now = started + WINDOW + timedelta(minutes=1)
    await sender.renew_leases()
    (listed,) = await webhooks.list_endpoints(db)
    assert (listed.enabled, listed.disabled_reason) == (False, "failing for 3 days")
    (delivery,) = await webhooks.deliveries(db, endpoint_id=endpoint.endpoint_id)
    assert delivery.status == "failed"  # kept for replay

    enabled = await webhooks.set_enabled(db, endpoint_id=endpoint.endpoint_id, enabled=True)
    assert (enabled.enabled, enabled.failing_since, enabled.disabled_reason) == (True, None, None)


def _row(event_id: str, status: str, at: datetime) -> dict[str, object]:
    return {
        "endpoint_pk": None, "target_url": None, "partner_pk": None, "event_id": event_id,
        "event_type": "disposition.changed", "cursor": 1, "body": "{}", "status": status,
        "attempts": 1, "first_attempt_at": at, "last_attempt_at": at, "created_at": at,
    }  # fmt: skip


def test_batches_merge_into_one_outcome_per_endpoint() -> None:
    """The followers' batches kept between two stores: the furthest cursor, one row per event
    (the last attempt), and the endpoint's health as the batches left it."""
    t0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    failing = storage.BatchOutcome(1, "we_a", 5, None, False)
    failing.add(7, [_row("evt_1", storage.PENDING, t0)], healthy=False, at=t0)
    failing.add(9, [_row("evt_2", storage.PENDING, t0)], healthy=False, at=t0 + WINDOW)
    assert (failing.cursor, failing.failing_since, failing.recovered) == (9, t0, False)
    failing.add(6, [_row("evt_1", storage.DELIVERED, t0)], healthy=True, at=t0)  # sent again
    assert (failing.cursor, failing.failing_since, failing.recovered) == (9, None, True)
    assert {k: v["status"] for k, v in failing.deliveries.items()} == {
        "evt_1": storage.DELIVERED, "evt_2": storage.PENDING}  # fmt: skip
    failing.add(10, [], healthy=False, at=t0 + 2 * WINDOW)  # failing again since then
    assert (failing.failing_since, failing.recovered) == (t0 + 2 * WINDOW, True)


async def test_outcomes_are_stored_only_while_the_lease_is_held(db: Database) -> None:
    t0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    endpoint = await failing_endpoint(db, "s1")

    def outcome(cursor: int, event_id: str) -> storage.BatchOutcome:
        kept = storage.BatchOutcome(endpoint.pk, endpoint.endpoint_id, 0, None, False)
        row = {**_row(event_id, storage.DELIVERED, t0), "endpoint_pk": endpoint.pk}
        kept.add(cursor, [row], healthy=True, at=t0)
        return kept

    async def stored() -> tuple[int, list[str]]:
        async with db.read() as conn:
            (current,) = await storage.list_endpoints(conn)
            rows = await storage.list_deliveries(conn, endpoint_pk=endpoint.pk, limit=10)
        return current.cursor, [r.event_id for r in rows]

    until = t0 + timedelta(seconds=10)
    async with db.write() as conn:
        await storage.take_leases(conn, owner="me", now=t0, until=until)
        assert await storage.record_batches(conn, owner="me", outcomes=[outcome(42, "evt_1")]) == []
    assert await stored() == (42, ["evt_1"])
    async with db.write() as conn:  # another process takes the endpoint over
        await storage.release_leases(conn, owner="me")
        await storage.take_leases(conn, owner="other", now=t0, until=until)
        lost = await storage.record_batches(conn, owner="me", outcomes=[outcome(50, "evt_2")])
    assert lost == [endpoint.endpoint_id]
    assert await stored() == (42, ["evt_1"])  # nothing of it stored: "other" sends from 42
