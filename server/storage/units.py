"""Units of work: read, decide, write all or nothing. The write port that both engines implement,
and what both derive from a plan.

Every write of the partner API (single updates in group commits, batch updates, batch-call
ingestion) is one unit. The engine reads what `Reads` asks for, hands the `Snapshot` to the use
case's `decide`, and writes the `Plan` that decide returns, atomically (these records live in
server/records.py); `run` returns decide's
result only after the commit. `decide` is pure: no I/O and no request context (it may run on
the engine's thread, and more than once), and what it raises rolls the unit back.

- SQLite (sqlite_writer.py): the whole unit runs in the writer's thread inside BEGIN IMMEDIATE,
  one unit at a time: one hop from the event loop per unit.
- PostgreSQL (postgres_writer.py): one statement reads, one statement writes and commits. The
  write checks that everything decide relied on still holds (the statuses it changes, the
  customers and calls it creates, the idempotency key, the catalogs) and aborts itself if not;
  the unit then reads and decides again. Units commit concurrently.

Both engines maintain what follows from a plan in the same transaction: each change's history
row and feed cursor, the report counters (customers per status, changes per status per UTC
hour; see `status_deltas` and `hour_deltas`), and the webhook outbox's rows for the calls a plan
creates (`outbox_rows`; a change's history row is its own event).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple, Protocol, TypeVar

from server.records import Change, Plan, Reads, Snapshot

T = TypeVar("T")


Decide = Callable[[Snapshot], "tuple[Plan | None, T]"]

# Expired idempotency keys deleted per key stored.
PRUNE_KEYS = 100


class Units(Protocol):
    """An engine's way to run units of work."""

    @property
    def concurrency(self) -> int:
        """How many units may usefully run at once (SQLite: 1, its single writer)."""

    async def run(self, reads: Reads, decide: Callable[[Snapshot], tuple[Plan | None, T]]) -> T:
        """Read, decide, write (None: nothing), commit; decide's result after the commit."""

    async def close(self) -> None:
        """Release the engine's connections (a later run opens them again)."""


# -- what both engines derive from a plan ----------------------------------------------------


class CustomerUpdate(NamedTuple):
    """The net update of one existing customer: its status (when `set_status`, from `expected`,
    the status read, to `status`) and its profile."""

    customer_pk: int
    set_status: bool
    expected: str | None
    status: str | None
    name: str | None
    email: str | None


def customer_updates(plan: Plan) -> list[CustomerUpdate]:
    """One update per existing customer the plan touches, in primary key order (the order in
    which writers lock rows)."""
    net: dict[int, list[object]] = {}
    for change in plan.changes:
        if change.customer_pk is None:
            continue
        found = net.get(change.customer_pk)
        if found is None:
            net[change.customer_pk] = [True, change.previous_status, change.new_status, None, None]
        else:
            found[2] = change.new_status
    for profile in plan.profiles:
        found = net.get(profile.customer_pk)
        if found is None:
            net[profile.customer_pk] = [False, None, None, profile.name, profile.email]
        else:
            found[3], found[4] = profile.name, profile.email
    return [CustomerUpdate(pk, *fields) for pk, fields in sorted(net.items())]  # type: ignore[arg-type]


def tenant_counts(changes: Sequence[Change]) -> list[tuple[str, int]]:
    """(tenant, number of changes), sorted: the order in which writers take feed cursors."""
    per_tenant: dict[str, int] = {}
    for change in changes:
        per_tenant[change.tenant_id] = per_tenant.get(change.tenant_id, 0) + 1
    return sorted(per_tenant.items())


def cursor_offsets(changes: Sequence[Change]) -> list[int]:
    """For each change, how many later changes of its tenant the plan has: its cursor is the
    tenant's new last cursor minus this."""
    remaining = dict(tenant_counts(changes))
    offsets = []
    for change in changes:
        remaining[change.tenant_id] -= 1
        offsets.append(remaining[change.tenant_id])
    return offsets


def status_deltas(plan: Plan) -> list[tuple[str, str, str, int]]:
    """(tenant, sub-tenant, status or "", change in the number of customers), non-zero, sorted."""
    deltas: dict[tuple[str, str, str], int] = {}

    def add(tenant_id: str, sub_tenant_id: str, status: str | None, delta: int) -> None:
        key = (tenant_id, sub_tenant_id, status or "")
        deltas[key] = deltas.get(key, 0) + delta

    for new in plan.new_customers:
        add(new.tenant_id, new.sub_tenant_id, new.disposition_status, 1)
    first: dict[int, Change] = {}
    last: dict[int, Change] = {}
    for change in plan.changes:
        if change.customer_pk is not None:
            first.setdefault(change.customer_pk, change)
            last[change.customer_pk] = change
    for pk, change in first.items():
        add(change.tenant_id, change.sub_tenant_id, change.previous_status, -1)
        add(change.tenant_id, change.sub_tenant_id, last[pk].new_status, 1)
    return sorted((*key, delta) for key, delta in deltas.items() if delta)


def hour_of(at: datetime) -> datetime:
    """The UTC hour a time falls in (the report's bucket)."""
    return at.replace(minute=0, second=0, microsecond=0)


def hour_deltas(plan: Plan) -> list[tuple[str, str, str, int]]:
    """(tenant, sub-tenant, new status or "", changes) in the plan's hour, sorted."""
    counts: dict[tuple[str, str, str], int] = {}
    for change in plan.changes:
        key = (change.tenant_id, change.sub_tenant_id, change.new_status or "")
        counts[key] = counts.get(key, 0) + 1
    return sorted((*key, count) for key, count in counts.items())


# -- the webhook outbox ------------------------------------------------------------------------

OUTBOX_CALLS = "calls"


class OutboxRow(NamedTuple):
    """A row of `webhook_outbox`: `payload` is JSON."""

    kind: str
    tenant_id: str
    sub_tenant_id: str
    partner_pk: int
    payload: str


def outbox_rows(plan: Plan) -> list[OutboxRow]:
    """One `calls` row per tenant, sub-tenant and partner whose calls the plan creates: each
    call's id, customer id and callback URL (its `call.processed` event to come)."""
    groups: dict[tuple[str, str, int], list[list[str | None]]] = {}
    for call in plan.calls:
        key = (call.tenant_id, call.sub_tenant_id, call.partner_pk)
        groups.setdefault(key, []).append([call.call_id, call.customer_id, call.callback_url])
    return [
        OutboxRow(
            OUTBOX_CALLS,
            tenant_id,
            sub_tenant_id,
            partner_pk,
            json.dumps(calls, separators=(",", ":")),
        )
        for (tenant_id, sub_tenant_id, partner_pk), calls in groups.items()
    ]
