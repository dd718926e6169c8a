"""`Idempotency-Key`: a retried request returns the first reply instead of running again.

Like Stripe's: keys are per partner and kept for 24 hours; only a request that executed
successfully stores its outcome (a rejected one can be fixed and sent again under the same
key); the same key with another body, tenant or endpoint is refused.

A write operation uses it in four steps, with the same `decode` for both replay paths:

    request = idempotency.prepare(raw_key, method=METHOD, payload=items)
    if (replayed := await idempotency.replay(db, request, decode)) is not None:
        return replayed                                   # before validation: no write lock
    ...validate...
    async with db.write() as conn:
        if (replayed := await idempotency.claim(conn, request, decode)) is not None:
            return replayed                               # a concurrent twin committed first
        ...apply, build the outcome (a dataclass)...
        await idempotency.record(conn, request, outcome)  # commits with the changes
    return idempotency.Result(outcome)

Every step accepts `request=None` (no key sent) and then does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from server import context
from server.db import Database
from server.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from server.storage import idempotency as keys
from server.storage.idempotency import StoredKey

HEADER = "idempotency-key"  # request metadata / HTTP header `Idempotency-Key`
REPLAYED_HEADER = "idempotent-replayed"  # response metadata / HTTP header, "true" on a replay
MAX_KEY_LENGTH = 255
TTL = timedelta(hours=24)
PRUNE_LIMIT = 100  # expired keys deleted per stored key

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """A request sent with a key: who sent it, under which key, and what it asked for."""

    partner_pk: int
    key: str
    method: str
    fingerprint: str


@dataclasses.dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """An operation's outcome, and whether it is the stored outcome of an earlier request."""

    value: T
    replayed: bool = False


def parse_key(raw: str | None) -> str | None:
    """The key as sent, or None without one; raises InvalidIdempotencyKey for a malformed one."""
    if raw is None:
        return None
    if not raw.strip():
        raise InvalidIdempotencyKey("Idempotency-Key must not be empty")
    if len(raw) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters long"
        )
    if not _PRINTABLE_ASCII.fullmatch(raw):
        raise InvalidIdempotencyKey("Idempotency-Key must contain only printable ASCII characters")
    return raw


def fingerprint(method: str, payload: object) -> str:
    """SHA-256 (hex) of a canonical JSON of the method and its input (dataclasses allowed)."""
    return hashlib.sha256(to_json({"method": method, "request": payload}).encode()).hexdigest()


def to_json(value: object) -> str:
    """Canonical JSON (sorted keys, no spaces); dataclasses become objects, tuples arrays."""
    return json.dumps(value, default=_plain, sort_keys=True, separators=(",", ":"))


def _plain(value: object) -> object:
    # One level at a time (json recurses), without dataclasses.asdict's deep copies.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def prepare(raw_key: str | None, *, method: str, payload: object) -> IdempotentRequest | None:
    """The calling partner's keyed request, or None without a key (raises on a malformed key).

    The fingerprint covers the method, the tenant and sub-tenant, and `payload`: the
    operation's whole domain input.
    """
    key = parse_key(raw_key)
    if key is None:
        return None
    ctx = context.get()
    assert ctx.partner_pk is not None
    scoped = {"tenant_id": ctx.tenant_id, "sub_tenant_id": ctx.sub_tenant_id, "body": payload}
    return IdempotentRequest(ctx.partner_pk, key, method, fingerprint(method, scoped))


async def replay(
    db: Database, request: IdempotentRequest | None, decode: Callable[[Any], T]
) -> Result[T] | None:
    """The stored outcome of this key, read without the write lock; None if there is none yet.

    Raises IdempotencyKeyReused when the key was used for a different request.
    """
    if request is None:
        return None
    async with db.read() as conn:
        stored = await keys.find_key(conn, partner_pk=request.partner_pk, key=request.key)
    if stored is None or stored.response == keys.PENDING or _expired(stored, _now()):
        return None
    return _replayed(stored, request, decode)


async def claim(
    conn: AsyncConnection, request: IdempotentRequest | None, decode: Callable[[Any], T]
) -> Result[T] | None:
    """First step of the write transaction: None when this request may run (the key is now
    held until commit, and record() must store its outcome), else the stored outcome.

    A concurrent request with the same key waits here until the first one commits (PostgreSQL:
    the key's unique index; SQLite: the single writer), then replays its outcome. An expired
    key is taken over as new. Raises IdempotencyKeyReused like replay().
    """
    if request is None:
        return None
    now = _now()
    partner_pk, key = request.partner_pk, request.key
    method, fingerprint_ = request.method, request.fingerprint
    for _ in range(3):  # the key may be pruned between the two statements: claim it again
        if await keys.claim_key(
            conn, partner_pk=partner_pk, key=key, method=method, fingerprint=fingerprint_, now=now
        ):
            return None
        stored = await keys.find_key(conn, partner_pk=partner_pk, key=key, for_update=True)
        if stored is None:
            continue
        if _expired(stored, now):
            await keys.reclaim_key(
                conn,
                partner_pk=partner_pk,
                key=key,
                method=method,
                fingerprint=fingerprint_,
                now=now,
            )
            return None
        return _replayed(stored, request, decode)
    raise RuntimeError(f"idempotency key of partner {request.partner_pk} could not be claimed")


async def record(conn: AsyncConnection, request: IdempotentRequest | None, outcome: object) -> None:
    """Last step of the write transaction: store the outcome with the key (as to_json(outcome)),
    and delete a few expired keys."""
    if request is None:
        return
    await keys.store_response(
        conn, partner_pk=request.partner_pk, key=request.key, response=to_json(outcome)
    )
    await keys.delete_expired(conn, before=_now() - TTL, limit=PRUNE_LIMIT)


def _replayed(
    stored: StoredKey, request: IdempotentRequest, decode: Callable[[Any], T]
) -> Result[T]:
    if stored.method != request.method or stored.fingerprint != request.fingerprint:
        raise IdempotencyKeyReused()
    if stored.response == keys.PENDING:  # only the claiming transaction itself could see this
        raise RuntimeError("idempotency key claimed twice in one transaction")
    return Result(decode(json.loads(stored.response)), replayed=True)


def _expired(stored: StoredKey, now: datetime) -> bool:
    return stored.created_at < now - TTL


def _now() -> datetime:
    return datetime.now(UTC)
