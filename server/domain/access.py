"""Who may call: authentication of a partner and its grant for a tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from server.db import Database
from server.domain.credentials import secret_matches
from server.errors import Forbidden, SubTenantIdRequired, TenantIdRequired
from server.storage import partners


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated partner."""

    partner_pk: int
    partner_id: str
    rate_limit_per_minute: int | None
    # Read with the credential when the tenant headers were given: (tenant, sub-tenant, granted).
    grant: tuple[str, str, bool] | None = None


async def authenticate(
    db: Database,
    *,
    api_key: str | None,
    api_secret: str | None,
    partner_id: str | None,
    tenant: tuple[str | None, str | None] = (None, None),
) -> Principal:
    """Check the key and secret; a non-empty `x-partner-id` must name the key's partner.

    With both tenant headers, the partner's grant for them is read in the same statement
    (Principal.grant), so that authorize_tenant needs no second read.
    """
    if not api_key or not api_secret:
        raise Forbidden()
    tenant_id, sub_tenant_id = tenant
    grant: tuple[str, str, bool] | None = None
    async with db.read() as conn:
        if _given(tenant_id) and _given(sub_tenant_id):
            found = await partners.find_active_credential_and_grant(
                conn, api_key=api_key, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
            )
            record = None if found is None else found[0]
            if found is not None:
                grant = (tenant_id, sub_tenant_id, found[1])
        else:
            record = await partners.find_active_credential(conn, api_key=api_key)
    if record is None or not secret_matches(api_secret, record.secret_sha256):
        raise Forbidden()
    if not record.enabled or (partner_id and partner_id != record.partner_id):
        raise Forbidden()
    return Principal(record.partner_pk, record.partner_id, record.rate_limit_per_minute, grant)


def require_tenant(tenant_id: str | None, sub_tenant_id: str | None) -> tuple[str, str]:
    """Both tenant headers must be present and not blank."""
    if not _given(tenant_id):
        raise TenantIdRequired()
    if not _given(sub_tenant_id):
        raise SubTenantIdRequired()
    return tenant_id, sub_tenant_id


def _given(header: str | None) -> TypeGuard[str]:
    """A tenant header counts when present and not blank."""
    return header is not None and bool(header.strip())


async def authorize_tenant(
    db: Database,
    *,
    partner_pk: int,
    tenant_id: str,
    sub_tenant_id: str,
    known: tuple[str, str, bool] | None = None,
) -> None:
    """The partner must hold a grant for this tenant and sub-tenant (`known`: as read by
    authenticate for this request)."""
    if known is not None and known[:2] == (tenant_id, sub_tenant_id):
        if not known[2]:
            raise Forbidden()
        return
    async with db.read() as conn:
        granted = await partners.has_grant(
            conn, partner_pk=partner_pk, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
        )
    if not granted:
        raise Forbidden()
