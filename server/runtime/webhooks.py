"""Webhook delivery: every enabled endpoint follows its tenant's change feed and receives each
`disposition.changed` event, signed, at least once.

The outbox is the disposition history itself: a change's history row (with its feed cursor) is
written in the transaction that makes the change, so a committed change always has its event and
a rolled-back one never does. Each endpoint keeps the cursor of the last change it was given.

- Leases: one process at a time delivers to an endpoint (the one holding its lease, renewed
  every `renew_seconds`); processes share the endpoints, and a process that dies loses its
  leases within `lease_seconds`, when another takes them over from the stored cursor.
- First attempts: the follower of an endpoint reads the changes after its cursor (woken by the
  change feed: at once for this process's commits, by LISTEN/NOTIFY for other replicas' on
  PostgreSQL) and sends them in cursor order with up to `max_in_flight` at once. The outcomes of
  every follower of the process are stored, and their cursors moved, in one transaction at most
  every `RECORD_SECONDS` (on SQLite every write takes the one writer the API's updates need, and
  a store per endpoint per batch held it about 15 ms, dozens of times a second). A crash before
  that store sends them again (at least once: receivers deduplicate on `webhook-id`); a stop
  stores them first.
- Retries: a failed attempt (non-2xx, timeout, connection error, refused address) is stored as
  pending with its next attempt due after an exponential, jittered delay; any process claims due
  deliveries. After the retry window (3 days) the delivery is marked failed (kept for replay),
  and an endpoint failing for that long is disabled.

The API never waits for a receiver: all of this runs beside the request handlers, and nothing
on a request's path reads or writes webhook state.

Observability: each attempt is logged (one JSON line, never the secret or the body) and
reported to a `DeliveryObserver` (the metrics); with `track_backlog`, the backlog is read every
`BACKLOG_SECONDS` into `backlog`, which metrics scrapes read from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from server.db import Database
from server.records import (
    Caller,
    ChangeRecord,
    WebhookDeliveryRecord,
    WebhookEndpointRecord,
)
from server.rules import webhooks as rules
from server.runtime.feed import ALL_SUB_TENANTS, FeedHub, wait_or_timeout
from server.runtime.webhook_http import DeliveryError, WebhookClient
from server.storage import as_utc
from server.storage import partners as partner_storage
from server.storage import webhooks as storage

log = logging.getLogger("disposition.webhooks")

RETRY_BATCH = 50
CLOSE_SECONDS = 5.0
UNGRANTED = "the partner is disabled or no longer granted this tenant"
PRUNE_EVERY = timedelta(minutes=1)
OUTBOX_BATCH = 100
OUTBOX_LINGER_SECONDS = 0.05
# The followers' outcomes are stored together at most this often; a follower with more than
# RECORD_BACKLOG unstored deliveries waits for the next store.
RECORD_SECONDS = 0.1
RECORD_BACKLOG = 5_000
# How often the backlog is read for metrics, and how far each of its counts goes.
BACKLOG_SECONDS = 2.0
BACKLOG_CAP = 10_000

# What became of an attempt (the metrics' outcomes): delivered, or failed and tried again
# later, or failed for good (retries ran out, or there is nothing to sign it with).
DELIVERED, RETRY_SCHEDULED, FAILED = storage.DELIVERED, "retry_scheduled", storage.FAILED
CALLBACK = "callback"  # the metrics' endpoint label of every callback_url delivery


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def disposition_event(change: ChangeRecord) -> tuple[str, bytes]:
    """The `disposition.changed` event of a history row: its id (stable: the receiver's
    idempotency key) and its body."""
    body = {
        "type": rules.DISPOSITION_CHANGED,
        "timestamp": _iso(change.changed_at),
        "data": {
            "tenant_id": change.tenant_id,
            "sub_tenant_id": change.sub_tenant_id,
            "customer_id": change.customer_id,
            "previous_status": change.previous_status or "",
            "disposition_status": change.new_status or "",
            "cursor": str(change.seq),
            "changed_at": _iso(change.changed_at),
            "source": change.source,
            "partner_id": change.partner_id,
            "request_id": change.request_id,
        },
    }
    return f"evt_{change.id}", json.dumps(body, separators=(",", ":")).encode()


def call_event(
    *,
    call_id: str,
    customer_id: str,
    tenant_id: str,
    sub_tenant_id: str,
    partner_pk: int,
    at: datetime,
) -> tuple[str, bytes]:
    """The `call.processed` event of a created call: its id (stable: derived from the call id,
    unique per partner) and its body."""
    digest = hashlib.sha256(f"{partner_pk}:{call_id}".encode()).hexdigest()[:24]
    body = {
        "type": rules.CALL_PROCESSED,
        "timestamp": _iso(at),
        "data": {
            "call_id": call_id,
            "customer_id": customer_id,
            "tenant_id": tenant_id,
            "sub_tenant_id": sub_tenant_id,
            "status": "created",
        },
    }
    return f"evt_call_{digest}", json.dumps(body, separators=(",", ":")).encode()


class DeliveryObserver(Protocol):
    """Told of each attempt's result, on the event loop (server/metrics.py)."""

    def attempted(
        self, endpoint_id: str, outcome: str, seconds: float | None, latency: float | None
    ) -> None:
        """`endpoint_id`: the endpoint's id, or CALLBACK; `outcome`: DELIVERED,
        RETRY_SCHEDULED or FAILED; `seconds`: the attempt's duration (None: none was made);
        `latency`: from the event to its 2xx (delivered only)."""


class _Unobserved:
    def attempted(
        self, endpoint_id: str, outcome: str, seconds: float | None, latency: float | None
    ) -> None:
        pass


@dataclass(frozen=True, slots=True)
class WebhookBacklog:
    """What waits for delivery, as read at `read_at` (each count stops at BACKLOG_CAP):
    pending deliveries of callbacks and enabled endpoints, outbox rows not yet fanned out,
    changes past an enabled endpoint's cursor (disposition.changed not yet attempted), when
    the oldest of these was made (a pending delivery's creation: for a change, its first
    attempt; an outbox row's; a change's own), and the endpoints by state."""

    pending: int
    outbox: int
    changes: int
    oldest: datetime | None
    healthy: int
    failing: int
    disabled: int
    read_at: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: when, the status code (None: no reply) and what went wrong (None: 2xx)."""

    at: datetime
    status_code: int | None
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


async def _may_receive(conn: Any, endpoint: WebhookEndpointRecord) -> bool:
    """An operator's endpoint always; a partner's while the partner is enabled and granted the
    endpoint's tenant and sub-tenant."""
    if endpoint.partner_pk is None:
        return True
    return await partner_storage.may_receive(
        conn,
        partner_pk=endpoint.partner_pk,
        tenant_id=endpoint.tenant_id,
        sub_tenant_id=endpoint.sub_tenant_id,
    )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a delivery goes and what signs it: an endpoint, or a call's callback_url signed
    with its partner's webhook secret. `label` names it in logs (never the secret)."""

    label: str
    url: str
    secret: str
    callback: bool = False

    @classmethod
    def of(cls, endpoint: WebhookEndpointRecord) -> Target:
        return cls(endpoint.endpoint_id, endpoint.url, endpoint.secret)

    @property
    def endpoint_id(self) -> str:
        """Its metrics label: the endpoint's id, or CALLBACK (one label for every callback)."""
        return CALLBACK if self.callback else self.label


class WebhookDispatcher:
    def __init__(
        self,
        db: Database,
        feed: FeedHub,
        *,
        timeout_seconds: float,
        retry_base_seconds: float,
        allow_private: bool,
        max_in_flight: int,
        retry_window_seconds: float = rules.RETRY_WINDOW_SECONDS,
        lease_seconds: float = 10.0,
        renew_seconds: float = 2.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        observer: DeliveryObserver | None = None,
        track_backlog: bool = False,
    ) -> None:
        self.db = db
        self.feed = feed
        self.retry_base_seconds = retry_base_seconds
        self.max_in_flight = max_in_flight
        self.retry_window = timedelta(seconds=retry_window_seconds)
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_poll_seconds = min(0.5, retry_base_seconds)
        self.now = now
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.client = WebhookClient(timeout_seconds=timeout_seconds, allow_private=allow_private)
        # By endpoint id, not row id: SQLite gives a deleted endpoint's row id to the next one.
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pruned_at: datetime | None = None
        self._outbox_wake = asyncio.Event()  # a commit of this process: maybe an outbox row
        self._due_wake = asyncio.Event()  # deliveries were fanned out: due now
        self._lease_wake = asyncio.Event()  # an endpoint was created here: take it now
        self._unstored: dict[str, storage.BatchOutcome] = {}  # by endpoint id
        self._store_wake = asyncio.Event()
        self._stored = asyncio.Event()  # set (and replaced) by each store
        db.on_commit(self._outbox_wake.set)
        self.observer: DeliveryObserver = observer or _Unobserved()
        self.track_backlog = track_backlog
        self.backlog: WebhookBacklog | None = None  # the last reading (track_backlog)

    def wake(self) -> None:
        """An endpoint was created by this process: take its lease now, not at the next
        renewal."""
        self._lease_wake.set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep_leases(), name="webhook-leases"),
            asyncio.create_task(self._retry(), name="webhook-retries"),
            asyncio.create_task(self._fan_out(), name="webhook-outbox"),
            asyncio.create_task(self._store_outcomes(), name="webhook-store"),
        ]
        if self.track_backlog:
            self._tasks.append(asyncio.create_task(self._watch_backlog(), name="webhook-backlog"))

    async def close(self) -> None:
        """Stop delivering, store what was sent, and hand the endpoints back (another process
        takes them at once, from the stored cursors)."""
        tasks = [*self._tasks, *self._followers.values()]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a stop never waits on a receiver
            await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
        self._followers.clear()
        with contextlib.suppress(Exception):
            await self.store_outcomes()
        with contextlib.suppress(Exception):
            async with self.db.write() as conn:
                await storage.release_leases(conn, owner=self.owner)
                await storage.release_claims(conn, owner=self.owner)
        await self.client.close()

    # -- leases ------------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        failing = False
        while True:
            try:
                await self.renew_leases()
                failing = False
            except Exception:
                if not failing:  # once per outage
                    log.exception("webhooks: cannot renew the endpoints' leases")
                failing = True
                self._follow_only([])  # a lease that cannot be renewed may be taken over
            await wait_or_timeout(self._lease_wake, self.renew_seconds)
            self._lease_wake.clear()

    async def renew_leases(self) -> None:
        """One round: disable endpoints failing for the whole retry window, forget old
        successful deliveries, renew and take leases, and follow exactly the endpoints held."""
        now = self.now()
        if not self._followers:
            async with self.db.read() as conn:
                endpoints, _ = await storage.has_work(conn, now=now)
            if not endpoints:  # nothing to deliver to: no write, no lock
                return
        async with self.db.write() as conn:
            disabled = await storage.disable_failing(
                conn, since=now - self.retry_window, reason="failing for 3 days"
            )
            for endpoint in await storage.list_endpoints(conn):
                if endpoint.enabled and not await _may_receive(conn, endpoint):
                    await storage.set_enabled(
                        conn, endpoint_pk=endpoint.pk, enabled=False, reason=UNGRANTED
                    )
                    disabled.append(endpoint.endpoint_id)
            if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
                await storage.prune_delivered(conn, before=now - self.retry_window)
                self._pruned_at = now
            held = await storage.take_leases(
                conn, owner=self.owner, now=now, until=now + timedelta(seconds=self.lease_seconds)
            )
        for endpoint_id in disabled:
            log.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint_id})
        self._follow_only(held)

    def _follow_only(self, held: Sequence[WebhookEndpointRecord]) -> None:
        wanted = {endpoint.endpoint_id: endpoint for endpoint in held}
        for endpoint_id in list(self._followers):
            task = self._followers[endpoint_id]
            if endpoint_id not in wanted or task.done():
                task.cancel()
                del self._followers[endpoint_id]
        for endpoint_id, endpoint in wanted.items():
            if endpoint_id not in self._followers:
                self._followers[endpoint_id] = asyncio.create_task(
                    self._follow(endpoint), name=f"webhook-{endpoint_id}"
                )

    # -- first attempts, in cursor order ---------------------------------------------------

    async def _follow(self, endpoint: WebhookEndpointRecord) -> None:
        sub_tenant_id = endpoint.sub_tenant_id
        caller = Caller(
            partner_pk=0,
            partner_id="webhooks",
            tenant_id=endpoint.tenant_id,
            sub_tenant_id=ALL_SUB_TENANTS if sub_tenant_id == "*" else sub_tenant_id,
            request_id=f"webhook-{endpoint.endpoint_id}",
        )
        async for batch in self.feed.watch(
            caller=caller, after_cursor=endpoint.cursor, start_at_latest=False
        ):
            if not batch.changes:
                continue
            # As stored now: a disable, a revoked grant, a new secret or URL applies to every
            # change committed after it (the batch's changes were read after this).
            async with self.db.read() as conn:
                current = await storage.endpoint_by_pk(conn, pk=endpoint.pk)
            if current is None or current.endpoint_id != endpoint.endpoint_id:
                return  # deleted (its row id may be another endpoint's now)
            if not current.enabled:
                return  # the lease loop stops following it
            if not await self._owner_may_receive(current):
                return
            deliveries: list[dict[str, Any]] = []
            healthy = True
            if rules.DISPOSITION_CHANGED in current.events:
                events = [disposition_event(change) for change in batch.changes]
                outcomes = await self._send_in_order(current, events)
                for change, (event_id, body), outcome in zip(
                    batch.changes, events, outcomes, strict=True
                ):
                    deliveries.append(self._first_attempt(current, change, event_id, body, outcome))
                    healthy = healthy and outcome.ok
            if self._record(current, batch.cursor, deliveries, healthy):
                await self._stored.wait()  # too much unstored: wait for the store

    def _record(
        self,
        endpoint: WebhookEndpointRecord,
        cursor: int,
        deliveries: Sequence[dict[str, Any]],
        healthy: bool,
    ) -> bool:
        """Keep a batch's outcome for the next store; True when the follower should wait."""
        pending = self._unstored.get(endpoint.endpoint_id)
        if pending is None:
            pending = self._unstored[endpoint.endpoint_id] = storage.BatchOutcome(
                endpoint.pk, endpoint.endpoint_id, cursor, None, False
            )
        pending.add(cursor, deliveries, healthy, self.now())
        self._store_wake.set()
        return len(pending.deliveries) > RECORD_BACKLOG

    async def _store_outcomes(self) -> None:
        failing = False
        while True:
            await self._store_wake.wait()
            await asyncio.sleep(RECORD_SECONDS)  # the outcomes of the next moment: one write
            self._store_wake.clear()
            try:
                await self.store_outcomes()
                failing = False
            except Exception:
                if not failing:
                    log.exception("webhooks: cannot store the deliveries' outcomes")
                failing = True

    async def store_outcomes(self) -> None:
        """Store the followers' outcomes and cursors in one transaction. An endpoint whose lease
        this process lost (or whose outcomes could not be stored) stops being followed here:
        it is sent again from its stored cursor (at least once), by whoever holds it."""
        outcomes, self._unstored = list(self._unstored.values()), {}
        stored, self._stored = self._stored, asyncio.Event()
        try:
            if outcomes:
                async with self.db.write() as conn:
                    lost = await storage.record_batches(conn, owner=self.owner, outcomes=outcomes)
                for endpoint_id in lost:
                    self._stop_following(endpoint_id)
        except BaseException:
            for outcome in outcomes:
                self._stop_following(outcome.endpoint_id)
            raise
        finally:
            stored.set()

    def _stop_following(self, endpoint_id: str) -> None:
        task = self._followers.pop(endpoint_id, None)
        if task is not None:
            task.cancel()

    async def _owner_may_receive(self, endpoint: WebhookEndpointRecord) -> bool:
        """False (and the endpoint disabled, saying why) when its partner may no longer
        receive its tenant's events: nothing is sent to it from then on."""
        async with self.db.read() as conn:
            if await _may_receive(conn, endpoint):
                return True
        async with self.db.write() as conn:
            await storage.set_enabled(
                conn, endpoint_pk=endpoint.pk, enabled=False, reason=UNGRANTED
            )
        log.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint.endpoint_id})
        return False

    async def _send_in_order(
        self, endpoint: WebhookEndpointRecord, events: Sequence[tuple[str, bytes]]
    ) -> list[Outcome]:
        """Attempt each event once: started in order, at most max_in_flight at a time."""
        window = asyncio.Semaphore(self.max_in_flight)

        target = Target.of(endpoint)

        async def one(event_id: str, body: bytes) -> Outcome:
            try:
                return await self.attempt(target, event_id, rules.DISPOSITION_CHANGED, body, 1)
            finally:
                window.release()

        tasks = []
        for event_id, body in events:
            await window.acquire()
            tasks.append(asyncio.create_task(one(event_id, body)))
        return list(await asyncio.gather(*tasks))

    def _first_attempt(
        self,
        endpoint: WebhookEndpointRecord,
        change: ChangeRecord,
        event_id: str,
        body: bytes,
        outcome: Outcome,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "endpoint_pk": endpoint.pk,
            "target_url": None,
            "partner_pk": None,
            "event_id": event_id,
            "event_type": rules.DISPOSITION_CHANGED,
            "cursor": change.seq,
            "body": body.decode(),
            "attempts": 1,
            "first_attempt_at": outcome.at,
            "last_attempt_at": outcome.at,
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
            "created_at": outcome.at,
            "claim_owner": None,
            "claim_expires_at": None,
        }
        if outcome.ok:
            self._report(endpoint.endpoint_id, outcome, DELIVERED, as_utc(change.changed_at))
            return {**row, "status": storage.DELIVERED, "delivered_at": outcome.at,
                    "next_attempt_at": None}  # fmt: skip
        self._report(endpoint.endpoint_id, outcome, RETRY_SCHEDULED, None)
        delay = rules.retry_delay(1, self.retry_base_seconds)
        return {**row, "status": storage.PENDING, "delivered_at": None,
                "next_attempt_at": outcome.at + timedelta(seconds=delay)}  # fmt: skip

    def _report(
        self, endpoint_id: str, outcome: Outcome, result: str, event_at: datetime | None
    ) -> None:
        """Tell the observer what became of an attempt; `event_at`: when its event happened
        (delivered only: the latency runs from it to the end of the attempt)."""
        latency = None
        if event_at is not None:
            latency = (outcome.at - event_at).total_seconds() + outcome.seconds
        self.observer.attempted(endpoint_id, result, outcome.seconds, latency)

    # -- one attempt -------------------------------------------------------------------------

    async def attempt(
        self, target: Target, event_id: str, event_type: str, body: bytes, number: int
    ) -> Outcome:
        """POST one event, signed now; logged (never with the secret or the body)."""
        at, started = self.now(), time.perf_counter()
        headers = rules.delivery_headers(target.secret, event_id, int(time.time()), body)
        status_code: int | None = None
        error: str | None
        try:
            status_code = await self.client.post(target.url, headers, body)
            error = None if 200 <= status_code < 300 else f"HTTP {status_code}"
        except TimeoutError:
            error = f"timed out after {self.client.timeout_seconds:g} s"
        except DeliveryError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"connection failed: {exc.strerror or type(exc).__name__}"
        outcome = Outcome(at, status_code, error, time.perf_counter() - started)
        log.info(
            "webhook attempt",
            extra={
                "endpoint_id": target.label,
                "event_id": event_id,
                "event_type": event_type,
                "attempt": number,
                "outcome": "delivered" if outcome.ok else "failed",
                "status_code": status_code,
                "error": error,
                "duration_ms": round(outcome.seconds * 1000, 3),
            },
        )
        return outcome

    # -- retries -----------------------------------------------------------------------------

    async def _retry(self) -> None:
        failing = False
        while True:
            claimed = 0
            try:
                claimed = await self.retry_due()
                failing = False
            except Exception:
                if not failing:
                    log.exception("webhooks: cannot run due retries")
                failing = True
            if claimed < RETRY_BATCH:
                await wait_or_timeout(self._due_wake, self.retry_poll_seconds)
                self._due_wake.clear()

    # -- the outbox: call.processed ---------------------------------------------------------

    async def _fan_out(self) -> None:
        failing = False
        while True:
            taken = 0
            try:
                taken = await self.fan_out()
                failing = False
            except Exception:
                if not failing:
                    log.exception("webhooks: cannot fan out the outbox")
                failing = True
            if taken < OUTBOX_BATCH:
                await wait_or_timeout(self._outbox_wake, self.retry_poll_seconds)
                # Every commit wakes this loop: the commits of the next moment share one look
                # at the outbox, instead of one read each on a busy server.
                await asyncio.sleep(OUTBOX_LINGER_SECONDS)
                self._outbox_wake.clear()

    async def fan_out(self) -> int:
        """Turn outbox rows into due deliveries (one per receiving endpoint, and one per
        callback_url), deleting the rows in the same transaction; how many rows."""
        async with self.db.read() as conn:
            if not await storage.outbox_waiting(conn):
                return 0
        now = self.now()
        deliveries: list[dict[str, Any]] = []
        async with self.db.write() as conn:
            rows = await storage.take_outbox(conn, limit=OUTBOX_BATCH)
            for row in rows:
                endpoints = await storage.endpoints_for(
                    conn,
                    tenant_id=row.tenant_id,
                    sub_tenant_id=row.sub_tenant_id,
                    event_type=rules.CALL_PROCESSED,
                )
                endpoints = [e for e in endpoints if await _may_receive(conn, e)]
                for call_id, customer_id, callback_url in json.loads(row.payload):
                    event_id, body = call_event(
                        call_id=call_id,
                        customer_id=customer_id,
                        tenant_id=row.tenant_id,
                        sub_tenant_id=row.sub_tenant_id,
                        partner_pk=row.partner_pk,
                        at=as_utc(row.created_at),
                    )
                    due = {"event_id": event_id, "event_type": rules.CALL_PROCESSED,
                           "cursor": None, "body": body.decode(), "status": storage.PENDING,
                           "attempts": 0, "next_attempt_at": now, "created_at": now}  # fmt: skip
                    deliveries += [
                        {**due, "endpoint_pk": e.pk, "target_url": None, "partner_pk": None}
                        for e in endpoints
                    ]
                    if callback_url:
                        deliveries.append({**due, "endpoint_pk": None,
                                           "target_url": callback_url,
                                           "partner_pk": row.partner_pk})  # fmt: skip
            await storage.insert_deliveries(conn, deliveries)
            await storage.delete_outbox(conn, pks=[row.id for row in rows])
        if deliveries:
            self._due_wake.set()
        return len(rows)

    async def _targets(self, conn: Any, due: Sequence[WebhookDeliveryRecord]) -> dict[int, Target]:
        """Where each delivery goes and its signing secret, as stored now (by delivery)."""
        endpoints = {e.pk: e for e in await storage.list_endpoints(conn)}
        secrets_by_partner = await partner_storage.webhook_secrets(
            conn, partner_pks=[d.partner_pk for d in due if d.partner_pk is not None]
        )
        targets: dict[int, Target] = {}
        for delivery in due:
            if delivery.endpoint_pk is not None and delivery.endpoint_pk in endpoints:
                targets[delivery.pk] = Target.of(endpoints[delivery.endpoint_pk])
            elif delivery.target_url and delivery.partner_pk in secrets_by_partner:
                targets[delivery.pk] = Target(
                    f"callback:{delivery.partner_pk}",
                    delivery.target_url,
                    secrets_by_partner[delivery.partner_pk],
                    callback=True,
                )
        return targets

    async def retry_due(self) -> int:
        """Attempt the deliveries that are due (first attempts of fanned-out events, and
        retries); how many."""
        now = self.now()
        timeout = self.client.timeout_seconds
        async with self.db.read() as conn:
            _, due_now = await storage.has_work(conn, now=now)
        if not due_now:
            return 0
        async with self.db.write() as conn:
            due = await storage.claim_due(
                conn,
                owner=self.owner,
                now=now,
                until=now + timedelta(seconds=timeout * 2 + 10),
                limit=RETRY_BATCH,
            )
            targets = await self._targets(conn, due)
        window = asyncio.Semaphore(self.max_in_flight)

        async def one(delivery: WebhookDeliveryRecord) -> None:
            async with window:
                target = targets.get(delivery.pk)
                number = delivery.attempts + 1
                if target is None:  # a callback whose partner has no secret any more
                    self.observer.attempted(CALLBACK, FAILED, None, None)
                    async with self.db.write() as conn:
                        await storage.record_attempt(
                            conn,
                            delivery_pk=delivery.pk,
                            values={
                                "status": storage.FAILED,
                                "next_attempt_at": None,
                                "last_error": "no signing secret",
                            },
                        )
                    return
                outcome = await self.attempt(
                    target, delivery.event_id, delivery.event_type, delivery.body.encode(), number
                )
                first = delivery.first_attempt_at or outcome.at
                values: dict[str, Any] = {
                    "attempts": number,
                    "first_attempt_at": first,
                    "last_attempt_at": outcome.at,
                    "last_status_code": outcome.status_code,
                    "last_error": outcome.error,
                }
                if outcome.ok:
                    values |= {"status": storage.DELIVERED, "delivered_at": outcome.at,
                               "next_attempt_at": None}  # fmt: skip
                    self._report(target.endpoint_id, outcome, DELIVERED, _event_time(delivery))
                elif outcome.at - first >= self.retry_window:
                    values |= {"status": storage.FAILED, "next_attempt_at": None}
                    self._report(target.endpoint_id, outcome, FAILED, None)
                else:
                    delay = rules.retry_delay(number, self.retry_base_seconds)
                    values["next_attempt_at"] = outcome.at + timedelta(seconds=delay)
                    self._report(target.endpoint_id, outcome, RETRY_SCHEDULED, None)
                async with self.db.write() as conn:
                    await storage.record_attempt(conn, delivery_pk=delivery.pk, values=values)
                    if delivery.endpoint_pk is not None:
                        await storage.mark_endpoint(
                            conn,
                            endpoint_pk=delivery.endpoint_pk,
                            healthy=outcome.ok,
                            now=outcome.at,
                        )

        await asyncio.gather(*(one(delivery) for delivery in due))
        return len(due)

    # -- the backlog, for metrics --------------------------------------------------------------

    async def _watch_backlog(self) -> None:
        failing = False
        while True:
            try:
                self.backlog = await self.read_backlog()
                failing = False
            except Exception:
                if not failing:
                    log.exception("webhooks: cannot read the backlog")
                failing = True
            await asyncio.sleep(BACKLOG_SECONDS)

    async def read_backlog(self) -> WebhookBacklog:
        """What waits for delivery now, in one read (a bounded cost: each count stops at
        BACKLOG_CAP, and endpoints are few)."""
        async with self.db.read() as conn:
            endpoints = await storage.list_endpoints(conn)
            enabled = [e for e in endpoints if e.enabled]
            pending, oldest = await storage.pending_backlog(
                conn, enabled_pks=[e.pk for e in enabled], cap=BACKLOG_CAP
            )
            outbox, oldest_row = await storage.outbox_backlog(conn, cap=BACKLOG_CAP)
            changes, times = 0, [oldest, oldest_row]
            for endpoint in enabled:
                if rules.DISPOSITION_CHANGED not in endpoint.events:
                    continue
                sub_tenant_id = endpoint.sub_tenant_id
                count, first = await storage.changes_backlog(
                    conn,
                    tenant_id=endpoint.tenant_id,
                    sub_tenant_id=None if sub_tenant_id == ALL_SUB_TENANTS else sub_tenant_id,
                    after=endpoint.cursor,
                    cap=BACKLOG_CAP,
                )
                changes += count
                times.append(first)
        known = [when for when in times if when is not None]
        failing = sum(1 for e in enabled if e.failing_since is not None)
        return WebhookBacklog(
            pending=pending,
            outbox=outbox,
            changes=min(changes, BACKLOG_CAP),
            oldest=min(known, default=None),
            healthy=len(enabled) - failing,
            failing=failing,
            disabled=len(endpoints) - len(enabled),
            read_at=self.now(),
        )


def _event_time(delivery: WebhookDeliveryRecord) -> datetime:
    """When a stored delivery's event happened: its body's `timestamp`."""
    return as_utc(datetime.fromisoformat(json.loads(delivery.body)["timestamp"]))
