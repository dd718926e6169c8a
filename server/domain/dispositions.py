"""Updating a customer's disposition status."""

from __future__ import annotations

from server import context
from server.db import Database
from server.domain import update_groups, validation
from server.errors import CustomerNotFound, ValidationFailed
from server.storage import customers
from server.storage.units import Scope

SOURCE_UPDATE = "disposition_update"


def validate_update(customer_id: str, disposition_status: str | None) -> None:
    violations: validation.Violations = []
    validation.required_text(violations, "customer_id", customer_id)
    validation.disposition_status(violations, "disposition_status", disposition_status)
    if violations:
        raise ValidationFailed(violations)


async def update_disposition_status(
    db: Database, *, customer_id: str, disposition_status: str | None
) -> bool:
    """Apply one update for the caller's tenant; True if the status changed.

    None leaves the status as it is, "" clears it, anything else sets it (and must be
    in the tenant's catalog when it has one). A real change and its history row
    commit together before this returns.
    """
    validate_update(customer_id, disposition_status)
    ctx = context.get()
    tenant_id, sub_tenant_id, partner_pk = ctx.tenant_id, ctx.sub_tenant_id, ctx.partner_pk
    assert tenant_id is not None and sub_tenant_id is not None and partner_pk is not None
    if disposition_status is None:
        async with db.read() as conn:
            found = await customers.find_customer(
                conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, customer_id=customer_id
            )
        if found is None:
            raise CustomerNotFound(customer_id)
        return False
    groups = update_groups.groups_of(db)
    return await groups.submit(
        groups.update(
            Scope(tenant_id, sub_tenant_id),
            customer_id,
            disposition_status or None,
            partner_pk,
            ctx.request_id,
            SOURCE_UPDATE,
        )
    )
