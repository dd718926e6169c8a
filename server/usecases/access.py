"""Who may call: a partner's authentication and its grant for a tenant, checked for every RPC
by the interceptor (server/interceptors.py) with the access cache in front of the database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from server.db import Database
from server.errors import Forbidden, SubTenantIdRequired, TenantIdRequired
from server.records import CredentialRecord
from server.rules.credentials import secret_matches
from server.runtime.access_cache import AccessCache
from server.storage import partners


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated partner."""

    partner_pk: int
    partner_id: str
    rate_limit_per_minute: int | None
    # Read with the credential when the tenant headers were given: (tenant, sub-tenant, granted).
    grant: tuple[str, str, bool] | None = None


def authenticate_cached(
    cache: AccessCache | None,
    *,
    api_key: str | None,
    api_secret: str | None,
    partner_id: str | None,
    tenant: tuple[str | None, str | None] = (None, None),
) -> Principal | None:
    """authenticate() from the cache alone: the Principal, or None when the database must be
    read (nothing cached, or not the grant for these tenant headers). Raises Forbidden."""
    if not api_key or not api_secret:
        raise Forbidden()
    record = None if cache is None else cache.credential(api_key)
    if record is None:
        return None
    assert cache is not None
    tenant_id, sub_tenant_id = tenant
    grant: tuple[str, str, bool] | None = None
    if _given(tenant_id) and _given(sub_tenant_id):
        granted = cache.grant(record.partner_pk, tenant_id, sub_tenant_id)
        if granted is None:
            return None  # read both again, in one statement
        grant = (tenant_id, sub_tenant_id, granted)
    return _principal(record, api_secret, partner_id, grant)


async def authenticate(
    db: Database,
    *,
    api_key: str | None,
    api_secret: str | None,
    partner_id: str | None,
    tenant: tuple[str | None, str | None] = (None, None),
    cache: AccessCache | None = None,
) -> Principal:
    """Check the key and secret; a non-empty `x-partner-id` must name the key's partner.

    With both tenant headers, the partner's grant for them is read in the same statement
    (Principal.grant), so that authorize_tenant needs no second read. With a cache, a
    credential and grant read before are not read again (see server.runtime.access_cache).
    """
    found = authenticate_cached(
        cache, api_key=api_key, api_secret=api_secret, partner_id=partner_id, tenant=tenant
    )
    if found is not None:
        return found
    assert api_key and api_secret  # authenticate_cached refuses the rest
    tenant_id, sub_tenant_id = tenant
    scoped = _given(tenant_id) and _given(sub_tenant_id)
    record, grant = await _read_access(db, api_key, tenant if scoped else None, cache)
    if record is None:
        raise Forbidden()
    return _principal(record, api_secret, partner_id, grant)


def _principal(
    record: CredentialRecord,
    api_secret: str,
    partner_id: str | None,
    grant: tuple[str, str, bool] | None,
) -> Principal:
    if not secret_matches(api_secret, record.secret_sha256):
        raise Forbidden()
    if not record.enabled or (partner_id and partner_id != record.partner_id):
        raise Forbidden()
    return Principal(record.partner_pk, record.partner_id, record.rate_limit_per_minute, grant)


async def _read_access(
    db: Database,
    api_key: str,
    tenant: tuple[str | None, str | None] | None,
    cache: AccessCache | None,
) -> tuple[CredentialRecord | None, tuple[str, str, bool] | None]:
    """The key's active credential and (for a tenant) its partner's grant, from the database."""
    generation = 0 if cache is None else cache.generation
    async with db.read() as conn:
        if tenant is None:
            record = await partners.find_active_credential(conn, api_key=api_key)
            grant = None
        else:
            tenant_id, sub_tenant_id = tenant
            assert tenant_id is not None and sub_tenant_id is not None
            found = await partners.find_active_credential_and_grant(
                conn, api_key=api_key, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
            )
            record = None if found is None else found[0]
            grant = None if found is None else (tenant_id, sub_tenant_id, found[1])
    if cache is not None and record is not None:
        cache.store_credential(generation, api_key, record)
        if grant is not None:
            cache.store_grant(generation, record.partner_pk, *grant)
    return record, grant


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


def granted_cached(
    partner_pk: int,
    tenant_id: str,
    sub_tenant_id: str,
    known: tuple[str, str, bool] | None,
    cache: AccessCache | None,
) -> bool | None:
    """Whether the partner holds the grant, as read by authenticate for this request (`known`)
    or cached; None when the database must be read."""
    if known is not None and known[0] == tenant_id and known[1] == sub_tenant_id:
        return known[2]
    return None if cache is None else cache.grant(partner_pk, tenant_id, sub_tenant_id)


async def authorize_tenant(
    db: Database,
    *,
    partner_pk: int,
    tenant_id: str,
    sub_tenant_id: str,
    known: tuple[str, str, bool] | None = None,
    cache: AccessCache | None = None,
) -> None:
    """The partner must hold a grant for this tenant and sub-tenant (`known`: as read by
    authenticate for this request)."""
    granted = granted_cached(partner_pk, tenant_id, sub_tenant_id, known, cache)
    if granted is None:
        generation = 0 if cache is None else cache.generation
        async with db.read() as conn:
            granted = await partners.has_grant(
                conn, partner_pk=partner_pk, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
            )
        if cache is not None:
            cache.store_grant(generation, partner_pk, tenant_id, sub_tenant_id, granted)
    if not granted:
        raise Forbidden()
