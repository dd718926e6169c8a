"""Partners, their credentials and their tenant grants."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, bindparam, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import AccessVersion, Credential, Partner, TenantGrant
from server.records import CredentialRecord, PartnerRecord

WILDCARD = "*"


# Hot-path statements are built once; only their parameters change per request.
_FIND_CREDENTIAL = (
    select(
        Partner.id,
        Partner.partner_id,
        Partner.enabled,
        Partner.rate_limit_per_minute,
        Credential.secret_sha256,
    )
    .join(Credential, Credential.partner_pk == Partner.id)
    .where(Credential.api_key == bindparam("api_key"), Credential.revoked_at.is_(None))
)
_GRANT_MATCHES = (
    or_(TenantGrant.tenant_id == bindparam("tenant_id"), TenantGrant.tenant_id == WILDCARD),
    or_(
        TenantGrant.sub_tenant_id == bindparam("sub_tenant_id"),
        TenantGrant.sub_tenant_id == WILDCARD,
    ),
)
_HAS_GRANT = (
    select(TenantGrant.id)
    .where(TenantGrant.partner_pk == bindparam("partner_pk"), *_GRANT_MATCHES)
    .limit(1)
)
# The credential and, in the same statement, whether its partner holds the grant (the hot path:
# one read per request instead of two).
_FIND_CREDENTIAL_AND_GRANT = _FIND_CREDENTIAL.add_columns(
    exists()
    .where(TenantGrant.partner_pk == Partner.id, *_GRANT_MATCHES)
    .correlate(Partner)
    .label("granted")
)


_ACCESS_VERSION = select(AccessVersion.version).where(AccessVersion.id == 1)


async def access_version(conn: AsyncConnection) -> int | None:
    """The access version (None when its row is missing: caches must not be trusted)."""
    row = (await conn.execute(_ACCESS_VERSION)).first()
    return None if row is None else int(row[0])


async def bump_access_version(conn: AsyncConnection) -> None:
    """Move the access version, in the transaction that changes a partner, credential or grant:
    every server's credential cache is emptied once this commits."""
    moved = await conn.execute(
        update(AccessVersion).where(AccessVersion.id == 1).values(version=AccessVersion.version + 1)
    )
    if not moved.rowcount:
        await conn.execute(insert(AccessVersion).values(id=1, version=1))


async def find_active_credential(conn: AsyncConnection, *, api_key: str) -> CredentialRecord | None:
    """The unrevoked credential with this key and its partner, if any."""
    row = (await conn.execute(_FIND_CREDENTIAL, {"api_key": api_key})).first()
    return None if row is None else CredentialRecord(*row)


async def find_active_credential_and_grant(
    conn: AsyncConnection, *, api_key: str, tenant_id: str, sub_tenant_id: str
) -> tuple[CredentialRecord, bool] | None:
    """find_active_credential, and has_grant for its partner, in one statement."""
    params = {"api_key": api_key, "tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    row = (await conn.execute(_FIND_CREDENTIAL_AND_GRANT, params)).first()
    return None if row is None else (CredentialRecord(*row[:5]), bool(row[5]))


async def has_grant(
    conn: AsyncConnection, *, partner_pk: int, tenant_id: str, sub_tenant_id: str
) -> bool:
    """Whether the partner may act for this tenant and sub-tenant (`*` matches any)."""
    params = {"partner_pk": partner_pk, "tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    return (await conn.execute(_HAS_GRANT, params)).first() is not None


async def may_receive(
    conn: AsyncConnection, *, partner_pk: int, tenant_id: str, sub_tenant_id: str
) -> bool:
    """Whether the partner is enabled and still granted this tenant and sub-tenant (`*`: a
    grant for every sub-tenant): what a partner's webhook endpoint needs to receive events."""
    enabled = await conn.scalar(select(Partner.enabled).where(Partner.id == partner_pk))
    return bool(enabled) and await has_grant(
        conn, partner_pk=partner_pk, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
    )


def _select_partners() -> Select[int, str, str, bool, int | None, datetime]:
    """The columns of a PartnerRecord, in its field order."""
    return select(
        Partner.id,
        Partner.partner_id,
        Partner.name,
        Partner.enabled,
        Partner.rate_limit_per_minute,
        Partner.created_at,
    )


async def get_partner(conn: AsyncConnection, *, partner_id: str) -> PartnerRecord | None:
    stmt = _select_partners().where(Partner.partner_id == partner_id)
    row = (await conn.execute(stmt)).first()
    return None if row is None else PartnerRecord(*row)


async def list_partners(conn: AsyncConnection) -> list[PartnerRecord]:
    stmt = _select_partners().order_by(Partner.partner_id)
    return [PartnerRecord(*row) for row in await conn.execute(stmt)]


async def insert_partner(
    conn: AsyncConnection,
    *,
    partner_id: str,
    name: str,
    rate_limit_per_minute: int | None,
    now: datetime,
    webhook_secret: str | None = None,
) -> int:
    stmt = (
        insert(Partner)
        .values(
            partner_id=partner_id,
            name=name,
            enabled=True,
            rate_limit_per_minute=rate_limit_per_minute,
            created_at=now,
            webhook_secret=webhook_secret,
        )
        .returning(Partner.id)
    )
    return int((await conn.execute(stmt)).scalar_one())


async def set_webhook_secret(conn: AsyncConnection, *, partner_pk: int, secret: str) -> None:
    await conn.execute(
        update(Partner).where(Partner.id == partner_pk).values(webhook_secret=secret)
    )


async def webhook_secrets(conn: AsyncConnection, *, partner_pks: Sequence[int]) -> dict[int, str]:
    """The partners' callback signing secrets (partners without one are left out)."""
    rows = await conn.execute(
        select(Partner.id, Partner.webhook_secret).where(
            Partner.id.in_(list(partner_pks)), Partner.webhook_secret.is_not(None)
        )
    )
    return {row.id: row.webhook_secret for row in rows}


async def update_partner(
    conn: AsyncConnection,
    *,
    partner_pk: int,
    enabled: bool | None = None,
    rate_limit_per_minute: int | None = None,
) -> None:
    values: dict[str, object] = {}
    if enabled is not None:
        values["enabled"] = enabled
    if rate_limit_per_minute is not None:
        values["rate_limit_per_minute"] = rate_limit_per_minute
    if values:
        await conn.execute(update(Partner).where(Partner.id == partner_pk).values(**values))


async def insert_credential(
    conn: AsyncConnection, *, partner_pk: int, api_key: str, secret_sha256: str, now: datetime
) -> None:
    await conn.execute(
        insert(Credential).values(
            partner_pk=partner_pk, api_key=api_key, secret_sha256=secret_sha256, created_at=now
        )
    )


async def revoke_credentials(conn: AsyncConnection, *, partner_pk: int, now: datetime) -> int:
    """Revoke every active credential of the partner; returns how many."""
    result = await conn.execute(
        update(Credential)
        .where(Credential.partner_pk == partner_pk, Credential.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)


async def list_grants(conn: AsyncConnection, *, partner_pk: int) -> list[tuple[str, str]]:
    stmt = (
        select(TenantGrant.tenant_id, TenantGrant.sub_tenant_id)
        .where(TenantGrant.partner_pk == partner_pk)
        .order_by(TenantGrant.tenant_id, TenantGrant.sub_tenant_id)
    )
    return [(t, s) for t, s in await conn.execute(stmt)]


async def insert_grant(
    conn: AsyncConnection, *, partner_pk: int, tenant_id: str, sub_tenant_id: str, now: datetime
) -> bool:
    """Grant a tenant and sub-tenant; False if the partner already had that grant."""
    exists = await conn.execute(
        select(TenantGrant.id).where(
            TenantGrant.partner_pk == partner_pk,
            TenantGrant.tenant_id == tenant_id,
            TenantGrant.sub_tenant_id == sub_tenant_id,
        )
    )
    if exists.first() is not None:
        return False
    await conn.execute(
        insert(TenantGrant).values(
            partner_pk=partner_pk, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, created_at=now
        )
    )
    return True


async def delete_grant(
    conn: AsyncConnection, *, partner_pk: int, tenant_id: str, sub_tenant_id: str
) -> bool:
    """Remove one grant; False if there was none."""
    result = await conn.execute(
        delete(TenantGrant).where(
            TenantGrant.partner_pk == partner_pk,
            TenantGrant.tenant_id == tenant_id,
            TenantGrant.sub_tenant_id == sub_tenant_id,
        )
    )
    return bool(result.rowcount)
