"""Idempotency keys: the first reply to a request sent with an `Idempotency-Key`, per partner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import IdempotencyRecord
from server.storage import as_utc, dialect_insert

PENDING = ""  # the response of a key claimed by a transaction that has not stored its reply yet

_K = IdempotencyRecord
_FIND = select(_K.method, _K.fingerprint, _K.response, _K.created_at).where(
    _K.partner_pk == bindparam("partner_pk"), _K.key == bindparam("key")
)
_FIND_FOR_UPDATE = _FIND.with_for_update()


def _claim(dialect: str) -> object:
    return (
        dialect_insert(dialect)(_K)
        .values(
            partner_pk=bindparam("partner_pk"),
            key=bindparam("key"),
            method=bindparam("method"),
            fingerprint=bindparam("fingerprint"),
            response=PENDING,
            created_at=bindparam("now"),
        )
        .on_conflict_do_nothing(index_elements=[_K.partner_pk, _K.key])
        .returning(_K.id)
    )


_CLAIM = {"sqlite": _claim("sqlite"), "postgresql": _claim("postgresql")}


@dataclass(frozen=True, slots=True)
class StoredKey:
    method: str
    fingerprint: str
    response: str  # PENDING until the claiming transaction stores its reply
    created_at: datetime


async def claim_key(
    conn: AsyncConnection,
    *,
    partner_pk: int,
    key: str,
    method: str,
    fingerprint: str,
    now: datetime,
) -> bool:
    """Insert the key as PENDING; False when the partner already has it.

    On PostgreSQL a key inserted by a transaction still in flight makes this wait until that
    transaction ends (then False if it committed, True if it rolled back). SQLite's single
    writer already serializes the transactions that claim keys.
    """
    params = {
        "partner_pk": partner_pk,
        "key": key,
        "method": method,
        "fingerprint": fingerprint,
        "now": now,
    }
    stmt = _CLAIM[conn.dialect.name]
    return (await conn.execute(stmt, params)).first() is not None  # type: ignore[call-overload]


async def find_key(
    conn: AsyncConnection, *, partner_pk: int, key: str, for_update: bool = False
) -> StoredKey | None:
    """A partner's key; with for_update its row stays locked until the transaction ends."""
    stmt = _FIND_FOR_UPDATE if for_update else _FIND
    row = (await conn.execute(stmt, {"partner_pk": partner_pk, "key": key})).first()
    if row is None:
        return None
    return StoredKey(row.method, row.fingerprint, row.response, as_utc(row.created_at))


async def reclaim_key(
    conn: AsyncConnection,
    *,
    partner_pk: int,
    key: str,
    method: str,
    fingerprint: str,
    now: datetime,
) -> None:
    """Reuse an expired key (locked by find_key(for_update=True)) for a new request: PENDING."""
    await conn.execute(
        update(_K)
        .where(_K.partner_pk == partner_pk, _K.key == key)
        .values(method=method, fingerprint=fingerprint, response=PENDING, created_at=now)
    )


async def store_response(
    conn: AsyncConnection, *, partner_pk: int, key: str, response: str
) -> None:
    """Record the reply of the request that claimed the key (same transaction)."""
    await conn.execute(
        update(_K).where(_K.partner_pk == partner_pk, _K.key == key).values(response=response)
    )


async def delete_expired(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete at most `limit` keys created before `before`, oldest first; returns how many.

    Rows locked by other transactions (a key being reclaimed) are skipped (PostgreSQL).
    """
    oldest = (
        select(_K.id)
        .where(_K.created_at < before)
        .order_by(_K.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await conn.execute(delete(_K).where(_K.id.in_(oldest)))
    return int(result.rowcount)
