"""An operator (the admin CLI) manages partners: onboarding, grants, secrets.

Every change moves the access version in its own transaction, so that servers drop the
credentials and grants they cache (server.runtime.access_cache)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from server.db import Database
from server.records import PartnerRecord
from server.rules import webhooks
from server.rules.credentials import hash_secret, new_api_key, new_api_secret
from server.storage import partners


class PartnerExists(Exception):
    """A partner with this id already exists."""


class UnknownPartner(Exception):
    """No partner with this id."""


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """Shown once: only the secret's hash is stored. `webhook_secret` (at onboarding) signs the
    partner's callback_url deliveries."""

    partner_id: str
    api_key: str
    api_secret: str
    webhook_secret: str | None = None


async def create_partner(
    db: Database, *, partner_id: str, name: str, rate_limit_per_minute: int | None = None
) -> IssuedCredential:
    now = datetime.now(UTC)
    webhook_secret = webhooks.new_secret()
    async with db.write() as conn:
        if await partners.get_partner(conn, partner_id=partner_id) is not None:
            raise PartnerExists(partner_id)
        partner_pk = await partners.insert_partner(
            conn,
            partner_id=partner_id,
            name=name,
            rate_limit_per_minute=rate_limit_per_minute,
            now=now,
            webhook_secret=webhook_secret,
        )
        await partners.bump_access_version(conn)
        issued = await _issue(conn, partner_pk=partner_pk, partner_id=partner_id, now=now)
    return replace(issued, webhook_secret=webhook_secret)


async def rotate_secret(db: Database, *, partner_id: str) -> IssuedCredential:
    """Revoke every credential of the partner at once and issue a new key and secret."""
    now = datetime.now(UTC)
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        await partners.revoke_credentials(conn, partner_pk=partner.pk, now=now)
        await partners.bump_access_version(conn)
        return await _issue(conn, partner_pk=partner.pk, partner_id=partner_id, now=now)


async def rotate_webhook_secret(db: Database, *, partner_id: str) -> str:
    """A new secret for the partner's callback_url deliveries, used from the next attempt on."""
    secret = webhooks.new_secret()
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        await partners.set_webhook_secret(conn, partner_pk=partner.pk, secret=secret)
    return secret


async def set_enabled(db: Database, *, partner_id: str, enabled: bool) -> None:
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        await partners.update_partner(conn, partner_pk=partner.pk, enabled=enabled)
        await partners.bump_access_version(conn)


async def set_rate_limit(db: Database, *, partner_id: str, per_minute: int) -> None:
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        await partners.update_partner(conn, partner_pk=partner.pk, rate_limit_per_minute=per_minute)
        await partners.bump_access_version(conn)


async def grant(db: Database, *, partner_id: str, tenant_id: str, sub_tenant_id: str) -> bool:
    """Grant a tenant/sub-tenant (`*` = all); False if it was granted already."""
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        granted = await partners.insert_grant(
            conn,
            partner_pk=partner.pk,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            now=datetime.now(UTC),
        )
        if granted:
            await partners.bump_access_version(conn)
        return granted


async def revoke(db: Database, *, partner_id: str, tenant_id: str, sub_tenant_id: str) -> bool:
    """Withdraw a grant; False if there was no such grant."""
    async with db.write() as conn:
        partner = await _require(conn, partner_id)
        removed = await partners.delete_grant(
            conn, partner_pk=partner.pk, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
        )
        if removed:
            await partners.bump_access_version(conn)
        return removed


async def describe(db: Database) -> list[tuple[PartnerRecord, list[tuple[str, str]]]]:
    """Every partner with its grants."""
    async with db.read() as conn:
        return [
            (partner, await partners.list_grants(conn, partner_pk=partner.pk))
            for partner in await partners.list_partners(conn)
        ]


async def _require(conn: AsyncConnection, partner_id: str) -> PartnerRecord:
    partner = await partners.get_partner(conn, partner_id=partner_id)
    if partner is None:
        raise UnknownPartner(partner_id)
    return partner


async def _issue(
    conn: AsyncConnection, *, partner_pk: int, partner_id: str, now: datetime
) -> IssuedCredential:
    api_key, api_secret = new_api_key(), new_api_secret()
    await partners.insert_credential(
        conn, partner_pk=partner_pk, api_key=api_key, secret_sha256=hash_secret(api_secret), now=now
    )
    return IssuedCredential(partner_id, api_key, api_secret)
