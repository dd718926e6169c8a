"""A partner reads: a customer's status, its history page by page, the tenant's summary."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from server.db import Database
from server.errors import CustomerNotFound, ValidationFailed
from server.records import Caller, ChangeRecord
from server.rules import validation
from server.storage import customers, history, reports

DEFAULT_PAGE_SIZE = 50  # its range is declared on the request


# A page token: version, id of the last change sent, digest of the listing it continues.
_TOKEN = struct.Struct(">BQ8s")
_TOKEN_VERSION = 1
_MAX_TOKEN_LENGTH = 64


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    customer_id: str
    disposition_status: str  # "" when none
    updated_at: datetime  # of the latest change, else the customer's creation (UTC)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    customer_id: str
    items: tuple[ChangeRecord, ...]  # newest first
    next_page_token: str  # "" on the last page


@dataclass(frozen=True, slots=True)
class StatusCount:
    disposition_status: str  # "" for none / cleared
    customers: int
    changes: int


@dataclass(frozen=True, slots=True)
class Summary:
    tenant_id: str
    sub_tenant_id: str
    window_from: str  # as requested; "" when open
    window_to: str
    total_customers: int
    customers_without_status: int
    total_changes: int
    statuses: tuple[StatusCount, ...]  # sorted by status
    generated_at: datetime


async def get_status(db: Database, *, caller: Caller, customer_id: str) -> CustomerStatus:
    """The customer's current status in the caller's tenant and sub-tenant."""
    tenant_id, sub_tenant_id = caller.scope
    async with db.read() as conn:
        found = await customers.find_status(
            conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, customer_id=customer_id
        )
    if found is None:
        raise CustomerNotFound(customer_id)
    return CustomerStatus(
        customer_id=found.customer_id,
        disposition_status=found.disposition_status or "",
        updated_at=found.last_changed_at or found.created_at,
    )


async def list_history(
    db: Database,
    *,
    caller: Caller,
    customer_id: str,
    page_size: int,
    page_token: str,
    problems: Sequence[tuple[str, str]] = (),
) -> HistoryPage:
    """One page of the customer's changes, newest first; the token continues the listing.

    `problems`: the declared limits the request broke (checked on it, server/rules/declared.py),
    reported with a page token that is not one this listing issued."""
    tenant_id, sub_tenant_id = caller.scope
    listing = _listing_digest(tenant_id, sub_tenant_id, customer_id)
    violations: validation.Violations = list(problems)
    limit = page_size or DEFAULT_PAGE_SIZE  # 0: the default (its range is declared)
    before_id = None
    if page_token and not any(field == "page_token" for field, _ in problems):
        before_id = _decode_token(page_token, listing)
        if before_id is None:
            violations.append(("page_token", "page_token is invalid"))
    if violations:
        raise ValidationFailed(violations)
    async with db.read() as conn:
        found = await customers.find_customer(
            conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, customer_id=customer_id
        )
        if found is None:
            raise CustomerNotFound(customer_id)
        # One row more than asked tells whether another page exists.
        rows = await history.customer_changes(
            conn, customer_pk=found.pk, before_id=before_id, limit=limit + 1
        )
    more = len(rows) > limit
    items = tuple(rows[:limit])
    return HistoryPage(
        customer_id=customer_id,
        items=items,
        next_page_token=_encode_token(items[-1].id, listing) if more else "",
    )


def _listing_digest(tenant_id: str, sub_tenant_id: str, customer_id: str) -> bytes:
    """Binds a token to its listing: a token of another customer or tenant is invalid."""
    key = json.dumps([tenant_id, sub_tenant_id, customer_id]).encode()
    return hashlib.sha256(key).digest()[:8]


def _encode_token(last_id: int, listing: bytes) -> str:
    packed = _TOKEN.pack(_TOKEN_VERSION, last_id, listing)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def _decode_token(token: str, listing: bytes) -> int | None:
    """The last id of a token this listing issued, or None."""
    if len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
        return None
    try:
        packed = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(packed) != _TOKEN.size:
        return None
    version, last_id, digest = _TOKEN.unpack(packed)
    if version != _TOKEN_VERSION or digest != listing or last_id < 1:
        return None
    if _encode_token(last_id, listing) != token:  # only the exact form issued
        return None
    return int(last_id)


async def get_summary(db: Database, *, caller: Caller, window_from: str, window_to: str) -> Summary:
    """Customers by current status and the changes made in `[from, to)` (empty: open)."""
    violations: validation.Violations = []
    start = validation.utc_date(violations, "from", window_from) if window_from else None
    end = validation.utc_date(violations, "to", window_to) if window_to else None
    if start is not None and end is not None and end <= start:
        violations.append(("to", "to must be after from"))
    if violations:
        raise ValidationFailed(violations)
    tenant_id, sub_tenant_id = caller.scope
    async with db.read() as conn:
        counts = await reports.status_counts(
            conn,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            changed_from=start,
            changed_before=end,
        )
    statuses = sorted(counts.customers.keys() | counts.changes.keys())
    return Summary(
        tenant_id=tenant_id,
        sub_tenant_id=sub_tenant_id,
        window_from=window_from,
        window_to=window_to,
        total_customers=sum(counts.customers.values()),
        customers_without_status=counts.customers.get("", 0),
        total_changes=sum(counts.changes.values()),
        statuses=tuple(
            StatusCount(status, counts.customers.get(status, 0), counts.changes.get(status, 0))
            for status in statuses
        ),
        generated_at=datetime.now(UTC),
    )
