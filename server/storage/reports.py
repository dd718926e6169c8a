"""Aggregates over a tenant's customers and disposition history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import CompoundSelect, bindparam, func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Customer, DispositionHistory

_CUSTOMERS, _CHANGES = 0, 1


def _status_counts(*, bounded_from: bool, bounded_to: bool) -> CompoundSelect[int, str, int]:
    """Customers by current status and changes by new status, in one statement (one snapshot).

    NULL statuses count under "". The changes' window uses ix_history_tenant_changed_at.
    """
    customer_status = func.coalesce(Customer.disposition_status, "")
    customers = (
        select(literal(_CUSTOMERS), customer_status, func.count())
        .where(
            Customer.tenant_id == bindparam("tenant_id"),
            Customer.sub_tenant_id == bindparam("sub_tenant_id"),
        )
        .group_by(customer_status)
    )
    h = DispositionHistory
    new_status = func.coalesce(h.new_status, "")
    changes = select(literal(_CHANGES), new_status, func.count()).where(
        h.tenant_id == bindparam("tenant_id"), h.sub_tenant_id == bindparam("sub_tenant_id")
    )
    if bounded_from:
        changes = changes.where(h.changed_at >= bindparam("changed_from"))
    if bounded_to:
        changes = changes.where(h.changed_at < bindparam("changed_before"))
    return union_all(customers, changes.group_by(new_status))


_STATUS_COUNTS = {
    (bounded_from, bounded_to): _status_counts(bounded_from=bounded_from, bounded_to=bounded_to)
    for bounded_from in (False, True)
    for bounded_to in (False, True)
}


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Per status ("" for none): customers whose current status it is, changes that set it."""

    customers: dict[str, int]
    changes: dict[str, int]


async def status_counts(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    changed_from: datetime | None,
    changed_before: datetime | None,
) -> StatusCounts:
    """Count changes with `changed_from <= changed_at < changed_before` (None: unbounded, UTC)."""
    stmt = _STATUS_COUNTS[changed_from is not None, changed_before is not None]
    params: dict[str, object] = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    if changed_from is not None:
        params["changed_from"] = changed_from
    if changed_before is not None:
        params["changed_before"] = changed_before
    counts = StatusCounts({}, {})
    for kind, status, count in await conn.execute(stmt, params):
        target = counts.customers if kind == _CUSTOMERS else counts.changes
        target[status] = int(count)
    return counts
