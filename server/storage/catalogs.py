"""Disposition catalogs: the statuses a tenant (or one of its sub-tenants) accepts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import String, bindparam, case, delete, exists, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import CatalogEntry
from server.records import TENANT_WIDE, Disposition, EffectiveCatalog

_ENTRY = CatalogEntry
_COLUMNS = (
    _ENTRY.disposition_status,
    _ENTRY.label,
    _ENTRY.final,
    _ENTRY.do_not_call,
    _ENTRY.callback,
)

# The sub-tenant's own catalog when it has one, else the tenant-wide one: a single statement
# (one snapshot, so a catalog being replaced is never half-seen), served by uq_catalog's
# (tenant_id, sub_tenant_id, ...) prefix. Built once; only its parameters change per request.
_HAS_OWN = exists().where(
    _ENTRY.tenant_id == bindparam("tenant_id"),
    _ENTRY.sub_tenant_id == bindparam("sub_tenant_id"),
)
EFFECTIVE_CATALOG = (
    select(_ENTRY.sub_tenant_id, *_COLUMNS)
    .where(
        _ENTRY.tenant_id == bindparam("tenant_id"),
        _ENTRY.sub_tenant_id
        == case(
            (_HAS_OWN, bindparam("sub_tenant_id", type_=String())),
            else_=literal(TENANT_WIDE, String()),
        ),
    )
    .order_by(_ENTRY.position)
)
_EXACT = (
    select(*_COLUMNS)
    .where(
        _ENTRY.tenant_id == bindparam("tenant_id"),
        _ENTRY.sub_tenant_id == bindparam("sub_tenant_id"),
    )
    .order_by(_ENTRY.position)
)


async def effective_catalog(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str
) -> EffectiveCatalog:
    """The sub-tenant's own catalog, else the tenant-wide one, else none (one query)."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    rows = (await conn.execute(EFFECTIVE_CATALOG, params)).all()
    if not rows:
        return EffectiveCatalog(None, [])
    return EffectiveCatalog(rows[0][0], [Disposition(*row[1:]) for row in rows])


async def list_catalog(
    conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str
) -> list[Disposition]:
    """Exactly the catalog defined for this tenant and sub-tenant (`*`: tenant-wide)."""
    params = {"tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    return [Disposition(*row) for row in await conn.execute(_EXACT, params)]


async def delete_catalog(conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str) -> int:
    """Remove the catalog defined for this tenant and sub-tenant; returns how many entries."""
    result = await conn.execute(
        delete(CatalogEntry).where(
            CatalogEntry.tenant_id == tenant_id, CatalogEntry.sub_tenant_id == sub_tenant_id
        )
    )
    return int(result.rowcount)


async def replace_catalog(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    dispositions: Sequence[Disposition],
    now: datetime,
) -> None:
    """Replace the catalog of this tenant and sub-tenant with `dispositions`, in their order."""
    await delete_catalog(conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id)
    if not dispositions:
        return
    await conn.execute(
        insert(CatalogEntry),
        [
            {
                "tenant_id": tenant_id,
                "sub_tenant_id": sub_tenant_id,
                "position": position,
                "disposition_status": entry.disposition_status,
                "label": entry.label,
                "final": entry.final,
                "do_not_call": entry.do_not_call,
                "callback": entry.callback,
                "created_at": now,
            }
            for position, entry in enumerate(dispositions)
        ],
    )
