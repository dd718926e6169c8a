"""`Idempotency-Key`: a retried request returns the first reply instead of running again.

Like Stripe's: keys are per partner and kept for 24 hours; only a request that executed
successfully stores its outcome (a rejected one can be fixed and sent again under the same
key); the same key with another body, tenant or endpoint is refused.

A write use case uses it in three steps, with the same `decode` for both replay paths:

    request = idempotency.prepare(raw_key, caller=caller, method=METHOD, payload=items)
    if (replayed := await idempotency.replay(db, request, decode)) is not None:
        return replayed                            # before validation: no write at all
    ...validate...
    reads = Reads(..., key=idempotency.ref(request))

    def decide(snapshot):                          # the unit of work (storage.units.Units)
        if (replayed := idempotency.replayed(snapshot.key, request, decode)) is not None:
            return None, replayed                  # a concurrent twin committed first
        ...build the plan and the outcome (a dataclass)...
        plan.key = idempotency.record(request, outcome, snapshot.key, now)
        return plan, idempotency.Result(outcome)   # the key commits with the changes

A twin running at the same moment writes nothing: on SQLite the single writer runs the units
one after the other, so the second reads the first one's key; on PostgreSQL the second one's
insert of the key waits for the first and finds it taken, so its unit reads and decides again.

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

from server.db import Database
from server.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from server.records import Caller, KeyRecord, KeyRef, StoredKey
from server.storage import idempotency as keys

HEADER = "idempotency-key"  # request metadata / HTTP header `Idempotency-Key`
REPLAYED_HEADER = "idempotent-replayed"  # response metadata / HTTP header, "true" on a replay
MAX_KEY_LENGTH = 255
TTL = timedelta(hours=24)

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


def prepare(
    raw_key: str | None, *, caller: Caller, method: str, payload: object
) -> IdempotentRequest | None:
    """The caller's keyed request, or None without a key (raises on a malformed key).

    The fingerprint covers the method, the tenant and sub-tenant, and `payload`: the
    operation's whole domain input.
    """
    key = parse_key(raw_key)
    if key is None:
        return None
    scoped = {"tenant_id": caller.tenant_id, "sub_tenant_id": caller.sub_tenant_id, "body": payload}
    return IdempotentRequest(caller.partner_pk, key, method, fingerprint(method, scoped))


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
    if stored is None or _expired(stored, _now()):
        return None
    return _replayed(stored, request, decode)


def ref(request: IdempotentRequest | None) -> KeyRef | None:
    """The key a unit of work reads (None without one)."""
    return None if request is None else KeyRef(request.partner_pk, request.key)


def replayed(
    stored: StoredKey | None, request: IdempotentRequest | None, decode: Callable[[Any], T]
) -> Result[T] | None:
    """In a unit of work: the outcome stored with the key as the unit read it, None when the
    request must run (no key sent, none stored, or an expired one it takes over).

    Raises IdempotencyKeyReused when the key was used for a different request.
    """
    if request is None or stored is None or _expired(stored, _now()):
        return None
    return _replayed(stored, request, decode)


def record(
    request: IdempotentRequest | None, outcome: object, stored: StoredKey | None, now: datetime
) -> KeyRecord | None:
    """In a unit of work: the key and the outcome to store with the changes (None without a
    key); `stored` is the expired record it takes over, if any."""
    if request is None:
        return None
    return KeyRecord(
        request.partner_pk,
        request.key,
        request.method,
        request.fingerprint,
        to_json(outcome),
        None if stored is None else stored.created_at,
        now - TTL,
    )


def _replayed(
    stored: StoredKey, request: IdempotentRequest, decode: Callable[[Any], T]
) -> Result[T]:
    if stored.method != request.method or stored.fingerprint != request.fingerprint:
        raise IdempotencyKeyReused()
    return Result(decode(json.loads(stored.response)), replayed=True)


def _expired(stored: StoredKey, now: datetime) -> bool:
    return stored.created_at < now - TTL


def _now() -> datetime:
    return datetime.now(UTC)
