"""Customers, their current disposition status and its append-only history."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Customer, DispositionHistory
from server.records import CustomerState, CustomerStatusRecord
from server.storage import as_utc

# Hot-path statements are built once; only their parameters change per request.
_FIND_CUSTOMER = select(Customer.id, Customer.customer_id, Customer.disposition_status).where(
    Customer.tenant_id == bindparam("tenant_id"),
    Customer.sub_tenant_id == bindparam("sub_tenant_id"),
    Customer.customer_id == bindparam("customer_id"),
)


async def find_customer(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    customer_id: str,
) -> CustomerState | None:
    """Read a customer."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id, "customer_id": customer_id}
    row = (await conn.execute(_FIND_CUSTOMER, params)).first()
    return None if row is None else CustomerState(*row)


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


async def find_status(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str, customer_id: str
) -> CustomerStatusRecord | None:
    """A customer's current status and when it last changed, in one statement (UTC times)."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id, "customer_id": customer_id}
    row = (await conn.execute(_FIND_STATUS, params)).first()
    if row is None:
        return None
    customer_id_, status, created_at, last_changed_at = row
    return CustomerStatusRecord(
        customer_id_,
        status,
        as_utc(created_at),
        None if last_changed_at is None else as_utc(last_changed_at),
    )
