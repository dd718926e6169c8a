"""Webhook endpoints, their leases and cursors, and their deliveries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import (
    DispositionHistory,
    Partner,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutbox,
)
from server.records import WebhookDeliveryRecord, WebhookEndpointRecord
from server.storage import as_utc

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

_ENDPOINT_COLUMNS = (
    WebhookEndpoint.id,
    WebhookEndpoint.endpoint_id,
    WebhookEndpoint.partner_pk,
    WebhookEndpoint.tenant_id,
    WebhookEndpoint.sub_tenant_id,
    WebhookEndpoint.url,
    WebhookEndpoint.events,
    WebhookEndpoint.secret,
    WebhookEndpoint.enabled,
    WebhookEndpoint.disabled_reason,
    WebhookEndpoint.failing_since,
    WebhookEndpoint.cursor,
    WebhookEndpoint.created_at,
)
_DELIVERY_COLUMNS = (
    WebhookDelivery.id,
    WebhookDelivery.endpoint_pk,
    WebhookDelivery.target_url,
    WebhookDelivery.partner_pk,
    WebhookDelivery.event_id,
    WebhookDelivery.event_type,
    WebhookDelivery.cursor,
    WebhookDelivery.body,
    WebhookDelivery.status,
    WebhookDelivery.attempts,
    WebhookDelivery.first_attempt_at,
    WebhookDelivery.next_attempt_at,
    WebhookDelivery.last_attempt_at,
    WebhookDelivery.last_status_code,
    WebhookDelivery.last_error,
    WebhookDelivery.delivered_at,
    WebhookDelivery.created_at,
)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _endpoint(row: Row[*tuple[Any, ...]]) -> WebhookEndpointRecord:
    return WebhookEndpointRecord(
        pk=row.id,
        endpoint_id=row.endpoint_id,
        partner_pk=row.partner_pk,
        tenant_id=row.tenant_id,
        sub_tenant_id=row.sub_tenant_id,
        url=row.url,
        events=tuple(row.events),
        secret=row.secret,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        failing_since=_utc(row.failing_since),
        cursor=row.cursor,
        created_at=as_utc(row.created_at),
    )


def _delivery(row: Row[*tuple[Any, ...]]) -> WebhookDeliveryRecord:
    return WebhookDeliveryRecord(
        pk=row.id,
        endpoint_pk=row.endpoint_pk,
        target_url=row.target_url,
        partner_pk=row.partner_pk,
        event_id=row.event_id,
        event_type=row.event_type,
        cursor=row.cursor,
        body=row.body,
        status=row.status,
        attempts=row.attempts,
        first_attempt_at=_utc(row.first_attempt_at),
        next_attempt_at=_utc(row.next_attempt_at),
        last_attempt_at=_utc(row.last_attempt_at),
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        delivered_at=_utc(row.delivered_at),
        created_at=as_utc(row.created_at),
    )


# -- endpoints -----------------------------------------------------------------------------


async def insert_endpoint(
    conn: AsyncConnection,
    *,
    endpoint_id: str,
    partner_pk: int | None,
    tenant_id: str,
    sub_tenant_id: str,
    url: str,
    events: Sequence[str],
    secret: str,
    cursor: int,
    now: datetime,
) -> WebhookEndpointRecord:
    pk = await conn.scalar(
        insert(WebhookEndpoint)
        .values(
            endpoint_id=endpoint_id,
            partner_pk=partner_pk,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            url=url,
            events=list(events),
            secret=secret,
            enabled=True,
            cursor=cursor,
            created_at=now,
        )
        .returning(WebhookEndpoint.id)
    )
    found = await get_endpoint(conn, endpoint_id=endpoint_id)
    assert found is not None and found.pk == pk
    return found


def _owned(
    stmt: Select[*tuple[Any, ...]],
    partner_pk: int | None,
    tenant_id: str | None,
    sub_tenant_id: str | None,
) -> Select[*tuple[Any, ...]]:
    """`stmt` kept to the endpoints of `partner_pk`, `tenant_id` and `sub_tenant_id` (each one
    when given)."""
    for column, value in (
        (WebhookEndpoint.partner_pk, partner_pk),
        (WebhookEndpoint.tenant_id, tenant_id),
        (WebhookEndpoint.sub_tenant_id, sub_tenant_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    return stmt


async def get_endpoint(
    conn: AsyncConnection,
    *,
    endpoint_id: str,
    partner_pk: int | None = None,
    tenant_id: str | None = None,
    sub_tenant_id: str | None = None,
) -> WebhookEndpointRecord | None:
    """The endpoint `endpoint_id`, only if it is of `partner_pk`, `tenant_id` and
    `sub_tenant_id` (each one when given)."""
    stmt = select(*_ENDPOINT_COLUMNS).where(WebhookEndpoint.endpoint_id == endpoint_id)
    row = (await conn.execute(_owned(stmt, partner_pk, tenant_id, sub_tenant_id))).first()
    return None if row is None else _endpoint(row)


async def endpoint_by_pk(conn: AsyncConnection, *, pk: int) -> WebhookEndpointRecord | None:
    row = (await conn.execute(select(*_ENDPOINT_COLUMNS).where(WebhookEndpoint.id == pk))).first()
    return None if row is None else _endpoint(row)


async def list_endpoints(
    conn: AsyncConnection,
    *,
    partner_pk: int | None = None,
    tenant_id: str | None = None,
    sub_tenant_id: str | None = None,
) -> list[WebhookEndpointRecord]:
    """The endpoints, oldest first (those of `partner_pk`, `tenant_id` and `sub_tenant_id`,
    each one when given)."""
    stmt = select(*_ENDPOINT_COLUMNS).order_by(WebhookEndpoint.id)
    rows = await conn.execute(_owned(stmt, partner_pk, tenant_id, sub_tenant_id))
    return [_endpoint(row) for row in rows]


async def count_partner_endpoints(conn: AsyncConnection, *, partner_pk: int) -> int:
    """How many endpoints the partner has; its row is locked first (PostgreSQL), so that two
    creations at once count one after the other."""
    await conn.execute(select(Partner.id).where(Partner.id == partner_pk).with_for_update())
    count = await conn.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.partner_pk == partner_pk)
    )
    return int(count or 0)


async def set_enabled(
    conn: AsyncConnection, *, endpoint_pk: int, enabled: bool, reason: str | None
) -> None:
    """Enable (clearing its failure record) or disable an endpoint, saying why."""
    values: dict[str, Any] = {"enabled": enabled, "disabled_reason": None if enabled else reason}
    if enabled:
        values["failing_since"] = None
    await conn.execute(
        update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_pk).values(**values)
    )


async def set_secret(conn: AsyncConnection, *, endpoint_pk: int, secret: str) -> None:
    await conn.execute(
        update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_pk).values(secret=secret)
    )


async def delete_endpoint(conn: AsyncConnection, *, endpoint_pk: int) -> None:
    """The endpoint and its deliveries. Its row is locked first (PostgreSQL): a batch being
    stored for it (record_batches updates that row before it inserts) or a fan-out inserting
    deliveries for it commits before, and its deliveries go too, or waits and finds it gone."""
    await conn.execute(
        select(WebhookEndpoint.id).where(WebhookEndpoint.id == endpoint_pk).with_for_update()
    )
    await conn.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_pk == endpoint_pk))
    await conn.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_pk))


# -- leases: which process delivers to which endpoint --------------------------------------


async def has_work(conn: AsyncConnection, *, now: datetime) -> tuple[bool, bool]:
    """Whether any endpoint is enabled, and whether any delivery is due (a read, so that idle
    processes take no write lock)."""
    endpoints = await conn.scalar(
        select(WebhookEndpoint.id).where(WebhookEndpoint.enabled).limit(1)
    )
    due = await conn.scalar(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .limit(1)
    )
    return endpoints is not None, due is not None


async def take_leases(
    conn: AsyncConnection, *, owner: str, now: datetime, until: datetime, share: bool = True
) -> list[WebhookEndpointRecord]:
    """Renew `owner`'s leases and take free ones (expired or never held), up to its share:
    the enabled endpoints divided by the processes holding live leases, this one included.
    The endpoints `owner` holds afterwards."""
    free = or_(WebhookEndpoint.lease_expires_at.is_(None), WebhookEndpoint.lease_expires_at < now)
    await conn.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.lease_owner == owner, WebhookEndpoint.lease_expires_at >= now)
        .values(lease_expires_at=until)
    )
    enabled = await conn.scalar(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.enabled)
    )
    others = await conn.scalar(
        select(func.count(func.distinct(WebhookEndpoint.lease_owner))).where(
            WebhookEndpoint.lease_owner != owner, WebhookEndpoint.lease_expires_at >= now
        )
    )
    held = await conn.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.lease_owner == owner, WebhookEndpoint.lease_expires_at >= now)
    )
    limit = -(-int(enabled or 0) // (int(others or 0) + 1)) if share else int(enabled or 0)
    wanted = max(limit - int(held or 0), 0)
    if wanted:
        candidates = await conn.scalars(
            select(WebhookEndpoint.id)
            .where(WebhookEndpoint.enabled, free)
            .order_by(WebhookEndpoint.lease_expires_at.is_not(None), WebhookEndpoint.id)
            .limit(wanted)
        )
        for pk in list(candidates):
            # Taken only if still free: another process may have taken it meanwhile.
            await conn.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == pk, free)
                .values(lease_owner=owner, lease_expires_at=until)
            )
    rows = await conn.execute(
        select(*_ENDPOINT_COLUMNS).where(
            WebhookEndpoint.lease_owner == owner,
            WebhookEndpoint.lease_expires_at >= now,
            WebhookEndpoint.enabled,
        )
    )
    return [_endpoint(row) for row in rows]


async def release_claims(conn: AsyncConnection, *, owner: str) -> None:
    """Hand `owner`'s claimed retries back (due again at once, for any process)."""
    await conn.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.claim_owner == owner)
        .values(claim_owner=None, claim_expires_at=None)
    )


async def release_leases(conn: AsyncConnection, *, owner: str) -> None:
    await conn.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )


# -- after a batch of first attempts --------------------------------------------------------


@dataclass
class BatchOutcome:
    """What a follower did since the last store, for one endpoint: the deliveries it attempted
    (their rows), the cursor it reached, and its health: `failing_since` is None when its last
    batch succeeded, else when its run of failed batches began: since a success of this span
    (`recovered`), or before it (the stored time stays, or this one is stored)."""

    endpoint_pk: int
    endpoint_id: str
    cursor: int
    failing_since: datetime | None
    recovered: bool
    deliveries: dict[str, dict[str, Any]] = field(default_factory=dict)  # by event id

    def add(
        self, cursor: int, deliveries: Sequence[dict[str, Any]], healthy: bool, at: datetime
    ) -> None:
        """A later batch of the same endpoint (an event sent again replaces its earlier row)."""
        self.cursor = max(self.cursor, cursor)
        self.deliveries.update((row["event_id"], row) for row in deliveries)
        if healthy:
            self.failing_since, self.recovered = None, True
        elif self.failing_since is None:
            self.failing_since = at


async def record_batches(
    conn: AsyncConnection, *, owner: str, outcomes: Sequence[BatchOutcome]
) -> list[str]:
    """Store the followers' deliveries and move each endpoint's cursor, for the endpoints whose
    lease `owner` still holds (and that are still those endpoints: SQLite may give a deleted
    endpoint's row id to a new one). The ids of the endpoints it no longer holds (nothing stored
    for them: another process sends from the stored cursor)."""
    lost: list[str] = []
    kept: list[dict[str, Any]] = []
    for outcome in outcomes:
        moved = await conn.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.id == outcome.endpoint_pk,
                WebhookEndpoint.endpoint_id == outcome.endpoint_id,
                WebhookEndpoint.lease_owner == owner,
            )
            .values(
                cursor=outcome.cursor,
                failing_since=outcome.failing_since
                if outcome.failing_since is None or outcome.recovered
                else func.coalesce(WebhookEndpoint.failing_since, outcome.failing_since),
            )
        )
        if moved.rowcount != 1:
            lost.append(outcome.endpoint_id)
        else:
            kept += outcome.deliveries.values()
    if kept:
        await conn.execute(insert(WebhookDelivery), kept)
    return lost


# -- retries ---------------------------------------------------------------------------------


async def claim_due(
    conn: AsyncConnection, *, owner: str, now: datetime, until: datetime, limit: int
) -> list[WebhookDeliveryRecord]:
    """Pending deliveries whose next attempt is due, claimed by `owner` until `until` (a claim
    another process holds is skipped)."""
    free = or_(WebhookDelivery.claim_expires_at.is_(None), WebhookDelivery.claim_expires_at < now)
    enabled = select(WebhookEndpoint.id).where(WebhookEndpoint.enabled)
    due = and_(
        WebhookDelivery.status == PENDING,
        WebhookDelivery.next_attempt_at <= now,
        free,
        or_(WebhookDelivery.endpoint_pk.is_(None), WebhookDelivery.endpoint_pk.in_(enabled)),
    )
    candidates = select(WebhookDelivery.id).where(due).order_by(WebhookDelivery.id).limit(limit)
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    pks = list(await conn.scalars(candidates))
    if not pks:
        return []
    await conn.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(pks), due)
        .values(claim_owner=owner, claim_expires_at=until)
    )
    rows = await conn.execute(
        select(*_DELIVERY_COLUMNS)
        .where(WebhookDelivery.id.in_(pks), WebhookDelivery.claim_owner == owner)
        .order_by(WebhookDelivery.id)
    )
    return [_delivery(row) for row in rows]


async def record_attempt(
    conn: AsyncConnection, *, delivery_pk: int, values: dict[str, Any]
) -> None:
    """A retry's outcome (and the end of its claim)."""
    await conn.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_pk)
        .values(claim_owner=None, claim_expires_at=None, **values)
    )


async def mark_endpoint(
    conn: AsyncConnection, *, endpoint_pk: int, healthy: bool, now: datetime
) -> None:
    """A retry's effect on its endpoint's health record."""
    value = None if healthy else func.coalesce(WebhookEndpoint.failing_since, now)
    await conn.execute(
        update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_pk).values(failing_since=value)
    )


async def disable_failing(conn: AsyncConnection, *, since: datetime, reason: str) -> list[str]:
    """Disable the enabled endpoints failing since before `since`, and mark their pending
    deliveries failed (kept for replay); the endpoints' ids."""
    rows = list(
        await conn.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.enabled, WebhookEndpoint.failing_since < since)
            .values(enabled=False, disabled_reason=reason, lease_owner=None, lease_expires_at=None)
            .returning(WebhookEndpoint.id, WebhookEndpoint.endpoint_id)
        )
    )
    if rows:
        await conn.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_pk.in_([row.id for row in rows]),
                WebhookDelivery.status == PENDING,
            )
            .values(status=FAILED, next_attempt_at=None, claim_owner=None, claim_expires_at=None)
        )
    return [row.endpoint_id for row in rows]


async def prune_delivered(conn: AsyncConnection, *, before: datetime) -> None:
    """Forget deliveries that succeeded before `before` (failed ones are kept for replay)."""
    await conn.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.status == DELIVERED, WebhookDelivery.delivered_at < before
        )
    )


# -- reads and replays for operators and partners --------------------------------------------


async def list_deliveries(
    conn: AsyncConnection, *, endpoint_pk: int, limit: int, status: str | None = None
) -> list[WebhookDeliveryRecord]:
    """The endpoint's deliveries, newest first."""
    stmt = (
        select(*_DELIVERY_COLUMNS)
        .where(WebhookDelivery.endpoint_pk == endpoint_pk)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    return [_delivery(row) for row in await conn.execute(stmt)]


async def get_delivery(
    conn: AsyncConnection, *, endpoint_pk: int, delivery_pk: int
) -> WebhookDeliveryRecord | None:
    """The delivery `delivery_pk`, if it is one of the endpoint's."""
    row = (
        await conn.execute(
            select(*_DELIVERY_COLUMNS).where(
                WebhookDelivery.id == delivery_pk, WebhookDelivery.endpoint_pk == endpoint_pk
            )
        )
    ).first()
    return None if row is None else _delivery(row)


async def replay(
    conn: AsyncConnection, *, endpoint_pk: int, delivery_pks: Sequence[int] | None, now: datetime
) -> int:
    """Make deliveries pending again, due now (None: every failed one of the endpoint); how
    many. A replay is a new series of attempts: its retry window starts again."""
    stmt = update(WebhookDelivery).where(WebhookDelivery.endpoint_pk == endpoint_pk)
    if delivery_pks is None:
        stmt = stmt.where(WebhookDelivery.status == FAILED)
    else:
        stmt = stmt.where(WebhookDelivery.id.in_(list(delivery_pks)))
    result = await conn.execute(
        stmt.values(
            status=PENDING,
            next_attempt_at=now,
            first_attempt_at=None,
            claim_owner=None,
            claim_expires_at=None,
        )
    )
    return int(result.rowcount)


# -- the backlog, for metrics: each count stops at `cap`, so that a reading costs a bounded time ---


async def pending_backlog(
    conn: AsyncConnection, *, enabled_pks: Sequence[int], cap: int
) -> tuple[int, datetime | None]:
    """Pending deliveries (callbacks', and enabled endpoints'), counted up to `cap`, and the
    creation time of the oldest of those counted (None: none)."""
    counted = (
        select(WebhookDelivery.created_at)
        .where(
            WebhookDelivery.status == PENDING,
            or_(
                WebhookDelivery.endpoint_pk.is_(None),
                WebhookDelivery.endpoint_pk.in_(list(enabled_pks)),
            ),
        )
        .limit(cap)
        .subquery()
    )
    row = (await conn.execute(select(func.count(), func.min(counted.c.created_at)))).one()
    return int(row[0]), _utc(row[1])


async def outbox_backlog(conn: AsyncConnection, *, cap: int) -> tuple[int, datetime | None]:
    """Outbox rows not fanned out yet, counted up to `cap`, and the oldest's creation time."""
    counted = select(WebhookOutbox.id).limit(cap).subquery()
    count = await conn.scalar(select(func.count()).select_from(counted))
    oldest = await conn.scalar(select(WebhookOutbox.created_at).order_by(WebhookOutbox.id).limit(1))
    return int(count or 0), _utc(oldest)


async def changes_backlog(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str | None, after: int, cap: int
) -> tuple[int, datetime | None]:
    """Changes of the tenant (of one sub-tenant, unless None) after cursor `after`, counted up
    to `cap`, and when the first of them was made (both from the history's cursor indexes)."""
    scope = [DispositionHistory.tenant_id == tenant_id, DispositionHistory.seq > after]
    if sub_tenant_id is not None:
        scope.append(DispositionHistory.sub_tenant_id == sub_tenant_id)
    counted = select(DispositionHistory.id).where(*scope).limit(cap).subquery()
    count = await conn.scalar(select(func.count()).select_from(counted))
    if not count:
        return 0, None
    first = await conn.scalar(
        select(DispositionHistory.changed_at)
        .where(*scope)
        .order_by(DispositionHistory.seq)
        .limit(1)
    )
    return int(count), _utc(first)


# -- the outbox: events written with the change, fanned out into deliveries -------------------


async def outbox_waiting(conn: AsyncConnection) -> bool:
    return await conn.scalar(select(WebhookOutbox.id).limit(1)) is not None


async def take_outbox(conn: AsyncConnection, *, limit: int) -> list[Row[Any]]:
    """The oldest outbox rows, locked until this transaction ends (rows another process is
    fanning out are skipped on PostgreSQL; SQLite has one writer at a time). The caller deletes
    them in the same transaction."""
    stmt = (
        select(
            WebhookOutbox.id,
            WebhookOutbox.kind,
            WebhookOutbox.tenant_id,
            WebhookOutbox.sub_tenant_id,
            WebhookOutbox.partner_pk,
            WebhookOutbox.payload,
            WebhookOutbox.created_at,
        )
        .order_by(WebhookOutbox.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return list(await conn.execute(stmt))


async def delete_outbox(conn: AsyncConnection, *, pks: Sequence[int]) -> None:
    await conn.execute(delete(WebhookOutbox).where(WebhookOutbox.id.in_(list(pks))))


async def endpoints_for(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str, event_type: str
) -> list[WebhookEndpointRecord]:
    """The enabled endpoints that receive `event_type` of this tenant and sub-tenant."""
    rows = await conn.execute(
        select(*_ENDPOINT_COLUMNS).where(
            WebhookEndpoint.enabled,
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.sub_tenant_id.in_([sub_tenant_id, "*"]),
        )
    )
    return [e for e in map(_endpoint, rows) if event_type in e.events]


async def insert_deliveries(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(insert(WebhookDelivery), list(rows))
