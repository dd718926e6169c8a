"""A partner updates one customer's disposition status."""

from __future__ import annotations

from server.db import Database
from server.errors import CustomerNotFound
from server.records import Caller
from server.runtime import update_groups
from server.storage import customers

SOURCE_UPDATE = "disposition_update"


async def update_disposition_status(
    db: Database, *, caller: Caller, customer_id: str, disposition_status: str | None
) -> bool:
    """Apply one update for the caller's tenant; True if the status changed.

    None leaves the status as it is, "" clears it, anything else sets it (and must be
    in the tenant's catalog when it has one). A real change and its history row
    commit together before this returns. The fields' declared limits were checked on the
    request (server/rules/declared.py).
    """
    if disposition_status is None:
        async with db.read() as conn:
            found = await customers.find_customer(
                conn,
                tenant_id=caller.tenant_id,
                sub_tenant_id=caller.sub_tenant_id,
                customer_id=customer_id,
            )
        if found is None:
            raise CustomerNotFound(customer_id)
        return False
    groups = update_groups.groups_of(db)
    return await groups.submit(
        groups.update(
            caller.scope,
            customer_id,
            disposition_status or None,
            caller.partner_pk,
            caller.request_id,
            SOURCE_UPDATE,
        )
    )
