"""A partner's credentials and the tenant it acts for, and how the dev stack issues them.

One type for every caller of a stack (make run's demo partner, the tests, the bench, the crash
test): it renders the REST headers and the gRPC metadata the API documents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from server.db import Database
from server.settings import Settings
from server.usecases import partners

DEFAULT_TENANT = ("tenant1", "subtenant1")


@dataclass(frozen=True)
class Credentials:
    partner_id: str
    api_key: str
    api_secret: str
    tenant_id: str = DEFAULT_TENANT[0]
    sub_tenant_id: str = DEFAULT_TENANT[1]

    def headers(self, **overrides: str | None) -> dict[str, str]:
        """REST headers / gRPC metadata; pass name=None to drop one (underscores -> dashes)."""
        headers = {
            "x-api-key": self.api_key,
            "x-api-secret": self.api_secret,
            "x-tenant-id": self.tenant_id,
            "x-sub-tenant-id": self.sub_tenant_id,
        }
        for name, value in overrides.items():
            key = name.replace("_", "-")
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return headers

    def metadata(self, **overrides: str | None) -> tuple[tuple[str, str], ...]:
        return tuple(self.headers(**overrides).items())


async def onboard(
    db: Database,
    partner_id: str,
    *,
    grants: Sequence[tuple[str, str]] = (DEFAULT_TENANT,),
    rate_limit_per_minute: int | None = None,
) -> Credentials:
    """Create a partner with its grants, as `disposition-admin` does; it acts for the first."""
    issued = await partners.create_partner(
        db,
        partner_id=partner_id,
        name=f"Partner {partner_id}",
        rate_limit_per_minute=rate_limit_per_minute,
    )
    for tenant_id, sub_tenant_id in grants:
        await partners.grant(
            db, partner_id=partner_id, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
        )
    tenant, sub = grants[0] if grants else DEFAULT_TENANT
    return Credentials(partner_id, issued.api_key, issued.api_secret, tenant, sub)


def onboard_at(database_url: str, partner_id: str, **kwargs: object) -> Credentials:
    """`onboard` from synchronous code, on its own connection to `database_url` (a database at
    the current schema)."""

    async def go() -> Credentials:
        db = Database(Settings(database_url=database_url, grpc_port=0))
        try:
            return await onboard(db, partner_id, **kwargs)  # type: ignore[arg-type]
        finally:
            await db.dispose()

    return asyncio.run(go())
