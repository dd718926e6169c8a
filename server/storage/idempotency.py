"""Idempotency keys: the first reply to a request sent with an `Idempotency-Key`, per partner.

Units of work store them with the changes they answer for (a Plan's KeyRecord); this module
reads them back.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import IdempotencyRecord
from server.records import StoredKey
from server.storage import as_utc

_K = IdempotencyRecord
_FIND = select(_K.method, _K.fingerprint, _K.response, _K.created_at).where(
    _K.partner_pk == bindparam("partner_pk"), _K.key == bindparam("key")
)


async def find_key(conn: AsyncConnection, *, partner_pk: int, key: str) -> StoredKey | None:
    """A partner's key."""
    row = (await conn.execute(_FIND, {"partner_pk": partner_pk, "key": key})).first()
    if row is None:
        return None
    return StoredKey(row.method, row.fingerprint, row.response, as_utc(row.created_at))
