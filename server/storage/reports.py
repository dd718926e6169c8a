"""Aggregates over a tenant's customers and disposition history, from the maintained counters.

Every unit of work moves `status_counts` (customers per current status) and
`status_change_hours` (changes per new status per UTC hour) in the transaction of its changes
(storage/units.py). A summary reads those rows, and for a window that does not fall on whole
hours, counts the changes of its partial hours at the edges in the history itself (through
ix_history_tenant_changed_at): at most two hours of rows, however large the tenant. One
statement, one snapshot.

`scanned_status_counts` counts the same from the customers and the history themselves, a
GROUP BY over all of the tenant's rows: the reference the maintained answer is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CompoundSelect, Select, bindparam, func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Customer, DispositionHistory, StatusChangeHour, StatusCount
from server.records import StatusCounts

_CUSTOMERS, _CHANGES = 0, 1
_HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Window:
    """How a window `[start, end)` (None: open) is counted: whole hours `[hours_from,
    hours_to)` from the hourly counters (None for no whole hour), the rest from the history."""

    hours: tuple[datetime | None, datetime | None] | None
    edges: tuple[tuple[datetime | None, datetime | None], ...]

    @classmethod
    def of(cls, start: datetime | None, end: datetime | None) -> Window:
        first = None if start is None else _ceil_hour(start)
        last = None if end is None else _floor_hour(end)
        if first is not None and last is not None and first >= last:  # no whole hour inside
            return cls(None, ((start, end),))
        edges = []
        if start is not None and first is not None and start < first:
            edges.append((start, first))
        if end is not None and last is not None and last < end:
            edges.append((last, end))
        return cls((first, last), tuple(edges))


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + _HOUR


def _scope(table: Any) -> tuple[Any, ...]:
    return (
        table.tenant_id == bindparam("tenant_id"),
        table.sub_tenant_id == bindparam("sub_tenant_id"),
    )


def _maintained(window: Window) -> CompoundSelect[int, str, int]:
    """The summary statement for a window's shape (its bounds are parameters)."""
    parts: list[Select[int, str, int]] = [
        select(literal(_CUSTOMERS), StatusCount.disposition_status, StatusCount.customers).where(
            *_scope(StatusCount), StatusCount.customers != 0
        )
    ]
    if window.hours is not None:
        h = StatusChangeHour
        hours = select(literal(_CHANGES), h.disposition_status, func.sum(h.changes)).where(
            *_scope(h)
        )
        if window.hours[0] is not None:
            hours = hours.where(h.hour >= bindparam("hours_from", type_=h.hour.type))
        if window.hours[1] is not None:
            hours = hours.where(h.hour < bindparam("hours_to", type_=h.hour.type))
        parts.append(hours.group_by(h.disposition_status))
    for n, (start, end) in enumerate(window.edges):
        parts.append(
            _changes_between(n, bounded_from=start is not None, bounded_to=end is not None)
        )
    return union_all(*parts)


def _changes_between(n: int, *, bounded_from: bool, bounded_to: bool) -> Select[int, str, int]:
    """Changes by new status from the history, `from_<n> <= changed_at < to_<n>`."""
    h = DispositionHistory
    new_status = func.coalesce(h.new_status, "")
    changes = select(literal(_CHANGES), new_status, func.count()).where(*_scope(h))
    if bounded_from:
        changes = changes.where(h.changed_at >= bindparam(f"from_{n}", type_=h.changed_at.type))
    if bounded_to:
        changes = changes.where(h.changed_at < bindparam(f"to_{n}", type_=h.changed_at.type))
    return changes.group_by(new_status)


_STATEMENTS: dict[tuple[Any, ...], CompoundSelect[int, str, int]] = {}


def _shape(window: Window) -> tuple[Any, ...]:
    """What a window's statement depends on: which bounds it has (not their values)."""
    hours = None if window.hours is None else tuple(b is not None for b in window.hours)
    return hours, tuple((a is not None, b is not None) for a, b in window.edges)


async def status_counts(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    changed_from: datetime | None,
    changed_before: datetime | None,
) -> StatusCounts:
    """Count changes with `changed_from <= changed_at < changed_before` (None: unbounded, UTC)."""
    window = Window.of(changed_from, changed_before)
    shape = _shape(window)
    stmt = _STATEMENTS.get(shape)
    if stmt is None:
        stmt = _STATEMENTS[shape] = _maintained(window)
    params: dict[str, object] = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    if window.hours is not None:
        params["hours_from"], params["hours_to"] = window.hours
    for n, (start, end) in enumerate(window.edges):
        params[f"from_{n}"], params[f"to_{n}"] = start, end
    return await _counts(conn, stmt, {k: v for k, v in params.items() if v is not None})


async def _counts(
    conn: AsyncConnection, stmt: CompoundSelect[int, str, int], params: dict[str, object]
) -> StatusCounts:
    counts = StatusCounts({}, {})
    for kind, status, count in await conn.execute(stmt, params):
        target = counts.customers if kind == _CUSTOMERS else counts.changes
        target[status] = target.get(status, 0) + int(count)
    return StatusCounts(
        {s: n for s, n in counts.customers.items() if n},
        {s: n for s, n in counts.changes.items() if n},
    )


def _customers_by_status() -> Select[int, str, int]:
    status = func.coalesce(Customer.disposition_status, "")  # one expression: one bind in both
    return (
        select(literal(_CUSTOMERS), status, func.count()).where(*_scope(Customer)).group_by(status)
    )


_SCANNED = {
    (bounded_from, bounded_to): union_all(
        _customers_by_status(),
        _changes_between(0, bounded_from=bounded_from, bounded_to=bounded_to),
    )
    for bounded_from in (False, True)
    for bounded_to in (False, True)
}


async def scanned_status_counts(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    changed_from: datetime | None,
    changed_before: datetime | None,
) -> StatusCounts:
    """status_counts, counted from all of the scope's customers and history rows."""
    params: dict[str, object] = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    if changed_from is not None:
        params["from_0"] = changed_from
    if changed_before is not None:
        params["to_0"] = changed_before
    stmt = _SCANNED[changed_from is not None, changed_before is not None]
    return await _counts(conn, stmt, params)
