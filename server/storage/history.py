"""The disposition history as a change feed: cursors per tenant and reads of changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Customer, DispositionHistory, FeedSequence, Partner
from server.records import ChangeRecord
from server.storage import as_utc

_LAST_SEQS = select(FeedSequence.tenant_id, FeedSequence.last_seq).where(
    FeedSequence.tenant_id.in_(bindparam("tenant_ids", expanding=True))
)


async def last_cursors(conn: AsyncConnection, *, tenant_ids: Sequence[str]) -> dict[str, int]:
    """The last cursor handed out for each tenant (absent: no change yet)."""
    rows = await conn.execute(_LAST_SEQS, {"tenant_ids": list(tenant_ids)})
    return {tenant_id: int(seq) for tenant_id, seq in rows}


def select_changes() -> Select[*tuple[Any, ...]]:
    """History rows as ChangeRecord columns (join customers and partners for public ids)."""
    h = DispositionHistory
    return (
        select(
            h.seq,
            h.id,
            Customer.customer_id,
            h.tenant_id,
            h.sub_tenant_id,
            h.previous_status,
            h.new_status,
            h.changed_at,
            h.source,
            Partner.partner_id,
            h.request_id,
        )
        .join(Customer, Customer.id == h.customer_pk)
        .join(Partner, Partner.id == h.partner_pk)
    )


def to_record(row: Row[*tuple[Any, ...]]) -> ChangeRecord:
    """A row of select_changes() as a ChangeRecord (SQLite's naive datetimes are UTC)."""
    fields = row._asdict()
    fields["changed_at"] = as_utc(fields["changed_at"])
    return ChangeRecord(**fields)


_CHANGES_AFTER = (
    select_changes()
    .where(
        DispositionHistory.tenant_id == bindparam("tenant_id"),
        DispositionHistory.seq > bindparam("after"),
    )
    .order_by(DispositionHistory.seq)
    .limit(bindparam("limit"))
)
_CHANGES_AFTER_IN_SUB_TENANT = _CHANGES_AFTER.where(
    DispositionHistory.sub_tenant_id == bindparam("sub_tenant_id")
)


async def changes_after(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str | None,
    after: int,
    limit: int,
) -> list[ChangeRecord]:
    """The tenant's changes with a cursor above `after`, in cursor order (None: all sub-tenants)."""
    params: dict[str, object] = {"tenant_id": tenant_id, "after": after, "limit": limit}
    stmt = _CHANGES_AFTER
    if sub_tenant_id is not None:
        stmt, params["sub_tenant_id"] = _CHANGES_AFTER_IN_SUB_TENANT, sub_tenant_id
    return [to_record(row) for row in await conn.execute(stmt, params)]


# A customer's history, newest first, keyset-paged on the history id (ix_history_customer).
_CUSTOMER_CHANGES = (
    select_changes()
    .where(DispositionHistory.customer_pk == bindparam("customer_pk"))
    .order_by(DispositionHistory.id.desc())
    .limit(bindparam("limit"))
)
_CUSTOMER_CHANGES_BEFORE = _CUSTOMER_CHANGES.where(DispositionHistory.id < bindparam("before_id"))


async def customer_changes(
    conn: AsyncConnection, *, customer_pk: int, before_id: int | None, limit: int
) -> list[ChangeRecord]:
    """Up to `limit` of a customer's changes with an id below `before_id` (None: the newest)."""
    params: dict[str, object] = {"customer_pk": customer_pk, "limit": limit}
    stmt = _CUSTOMER_CHANGES
    if before_id is not None:
        stmt, params["before_id"] = _CUSTOMER_CHANGES_BEFORE, before_id
    return [to_record(row) for row in await conn.execute(stmt, params)]
