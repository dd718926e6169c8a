"""Customers, their current disposition status and its append-only history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Customer, DispositionHistory
from server.storage import as_utc, bulk, history

# Hot-path statements are built once; only their parameters change per request.
_FIND_CUSTOMER = select(Customer.id, Customer.customer_id, Customer.disposition_status).where(
    Customer.tenant_id == bindparam("tenant_id"),
    Customer.sub_tenant_id == bindparam("sub_tenant_id"),
    Customer.customer_id == bindparam("customer_id"),
)


# The row records below are NamedTuples: a batch builds thousands of them, and a frozen
# dataclass takes about three times as long to make.
class CustomerState(NamedTuple):
    pk: int
    customer_id: str
    disposition_status: str | None


class StatusChange(NamedTuple):
    """One history row to append."""

    customer_pk: int
    previous_status: str | None
    new_status: str | None


async def find_customer(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    customer_id: str,
) -> CustomerState | None:
    """Read a customer (writers lock theirs with lock_customers)."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id, "customer_id": customer_id}
    row = (await conn.execute(_FIND_CUSTOMER, params)).first()
    return None if row is None else CustomerState(*row)


async def lock_customers(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str, customer_ids: Sequence[str]
) -> dict[str, CustomerState]:
    """Read and lock customers (PostgreSQL: FOR UPDATE; SQLite: the writer's BEGIN IMMEDIATE
    holds the write lock already); missing ids are absent from the result."""
    rows = await bulk.select_in(
        conn,
        "SELECT id, customer_id, disposition_status FROM customers"
        " WHERE tenant_id = ? AND sub_tenant_id = ? AND customer_id IN ({in}) ORDER BY id",
        (tenant_id, sub_tenant_id),
        sorted(set(customer_ids)),
        # SQLite: the writer's BEGIN IMMEDIATE already holds the database's write lock.
        suffix=" FOR UPDATE" if conn.dialect.name == "postgresql" else "",
    )
    return {customer_id: CustomerState(pk, customer_id, status) for pk, customer_id, status in rows}


async def insert_customers(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    customers: Sequence[tuple[str, str | None, str | None]],
    now: datetime,
) -> dict[str, int]:
    """Insert (customer_id, name, email) rows without a status; returns the primary keys of
    the rows inserted here.

    An id that exists by now is skipped (ON CONFLICT DO NOTHING): on PostgreSQL a concurrent
    transaction may have created it since lock_customers; this insert waits for that one to
    end, and the caller locks what it skipped. Rows go in id order so that two transactions
    inserting the same ids wait for each other instead of deadlocking.
    """
    if not customers:
        return {}
    at = bulk.db_time(conn, now)
    rows = await bulk.insert_rows(
        conn,
        "customers",
        ("tenant_id", "sub_tenant_id", "customer_id", "name", "email", "created_at", "updated_at"),
        [
            (tenant_id, sub_tenant_id, customer_id, name, email, at, at)
            for customer_id, name, email in sorted(customers)
        ],
        on_conflict_do_nothing=("tenant_id", "sub_tenant_id", "customer_id"),
        returning=("customer_id", "id"),
    )
    return {customer_id: pk for customer_id, pk in rows}


async def update_profile(
    conn: AsyncConnection, *, customer_pk: int, name: str | None, email: str | None, now: datetime
) -> None:
    """Refresh name and email from a newer call (None leaves a field as it is)."""
    values: dict[str, object] = {"updated_at": now}
    if name is not None:
        values["name"] = name
    if email is not None:
        values["email"] = email
    await conn.execute(update(Customer).where(Customer.id == customer_pk).values(**values))


async def apply_status_changes(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    changes: Sequence[StatusChange],
    source: str,
    partner_pk: int,
    request_id: str,
    now: datetime,
) -> None:
    """Set each customer's new status and append one history row per change."""
    await append_changes(
        conn,
        [
            RecordedChange(c, tenant_id, sub_tenant_id, source, partner_pk, request_id)
            for c in changes
        ],
        now=now,
    )


class RecordedChange(NamedTuple):
    """A status change with what its history row records about who made it."""

    change: StatusChange
    tenant_id: str
    sub_tenant_id: str
    source: str
    partner_pk: int
    request_id: str


async def append_changes(
    conn: AsyncConnection, changes: Sequence[RecordedChange], *, now: datetime
) -> None:
    """Apply changes of any tenants in order: set each customer's status and append its history
    row, with the next change-feed cursors of its tenant. Three statements per tenant at most."""
    if not changes:
        return
    next_seq: dict[str, int] = {}
    for tenant_id, count in changes_per_tenant(changes):
        last_seq = await history.advance_cursor(conn, tenant_id=tenant_id, count=count)
        next_seq[tenant_id] = last_seq - count + 1
    at = bulk.db_time(conn, now)
    await bulk.execute_many(conn, SET_STATUS_SQL, status_rows(changes, at))
    await bulk.execute_many(conn, INSERT_HISTORY_SQL, history_rows(changes, next_seq, at))


# The statements of append_changes (also run by sqlite_writer.append_changes).
SET_STATUS_SQL = "UPDATE customers SET disposition_status = ?, updated_at = ? WHERE id = ?"
INSERT_HISTORY_SQL = (
    "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
    " previous_status, new_status, source, partner_pk, request_id, changed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def changes_per_tenant(changes: Sequence[RecordedChange]) -> list[tuple[str, int]]:
    """(tenant, number of changes), in one order for every writer: no lock cycles."""
    per_tenant: dict[str, int] = {}
    for recorded in changes:
        per_tenant[recorded.tenant_id] = per_tenant.get(recorded.tenant_id, 0) + 1
    return sorted(per_tenant.items())


def status_rows(changes: Sequence[RecordedChange], at: object) -> list[tuple[object, ...]]:
    """SET_STATUS_SQL's parameters: the new status of each change."""
    return [(r.change.new_status, at, r.change.customer_pk) for r in changes]


def history_rows(
    changes: Sequence[RecordedChange], next_seq: dict[str, int], at: object
) -> list[tuple[object, ...]]:
    """INSERT_HISTORY_SQL's parameters; `next_seq`: each tenant's first cursor (consumed)."""
    rows: list[tuple[object, ...]] = []
    for r in changes:
        seq = next_seq[r.tenant_id]
        next_seq[r.tenant_id] = seq + 1
        rows.append((seq, r.change.customer_pk, r.tenant_id, r.sub_tenant_id,
                     r.change.previous_status, r.change.new_status, r.source, r.partner_pk,
                     r.request_id, at))  # fmt: skip
    return rows


# The customer's current status with the time of its latest change (ix_history_customer).
_LAST_CHANGED_AT = (
    select(DispositionHistory.changed_at)
    .where(DispositionHistory.customer_pk == Customer.id)
    .order_by(DispositionHistory.id.desc())
    .limit(1)
    .scalar_subquery()
)
_FIND_STATUS = select(
    Customer.customer_id, Customer.disposition_status, Customer.created_at, _LAST_CHANGED_AT
).where(
    Customer.tenant_id == bindparam("tenant_id"),
    Customer.sub_tenant_id == bindparam("sub_tenant_id"),
    Customer.customer_id == bindparam("customer_id"),
)


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    customer_id: str
    disposition_status: str | None
    created_at: datetime
    last_changed_at: datetime | None  # None: the status never changed


async def find_status(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str, customer_id: str
) -> CustomerStatus | None:
    """A customer's current status and when it last changed, in one statement (UTC times)."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id, "customer_id": customer_id}
    row = (await conn.execute(_FIND_STATUS, params)).first()
    if row is None:
        return None
    customer_id_, status, created_at, last_changed_at = row
    return CustomerStatus(
        customer_id_,
        status,
        as_utc(created_at),
        None if last_changed_at is None else as_utc(last_changed_at),
    )
