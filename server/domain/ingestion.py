"""Batch call ingestion: stores calls and creates (or refreshes) their customers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server import context
from server.db import Database
from server.domain import catalogs, idempotency, validation
from server.errors import ValidationFailed
from server.storage import calls, customers
from server.storage.customers import StatusChange

MAX_BATCH = 1000
SOURCE_BATCH_CALL = "batch_call"
METHOD = "disposition.v1.CallIngestionService/IngestBatchCalls"  # for idempotency keys
_ATTEMPTS = 3  # a batch racing another one for the same call ids starts over (PostgreSQL)


# The inputs and outcomes below are made a thousand per batch: not frozen, because a frozen
# dataclass takes about three times as long to make. Nothing mutates them.
@dataclass(slots=True)
class CallInput:
    id: str
    recording_url: str
    start_time: str
    end_time: str
    contact_number: str


@dataclass(slots=True)
class AgentInput:
    id: str
    email: str = ""
    name: str = ""


@dataclass(slots=True)
class CustomerInput:
    id: str
    name: str = ""
    email: str = ""
    disposition_status: str | None = None


@dataclass(slots=True)
class BatchItem:
    call: CallInput | None
    agent: AgentInput | None
    customer: CustomerInput | None
    callback_url: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    custom_fields: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class ItemOutcome:
    index: int
    call_id: str
    customer_id: str
    status: str  # "created" or "duplicate"
    customer_created: bool


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    items: list[ItemOutcome]

    def count(self, status: str) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def created_customers(self) -> int:
        return sum(1 for item in self.items if item.customer_created)

    @classmethod
    def from_json(cls, data: Any) -> BatchOutcome:
        """The outcome stored with an idempotency key (idempotency.to_json), rebuilt."""
        return cls([ItemOutcome(**item) for item in data["items"]])


def validate_batch(
    items: Sequence[BatchItem], catalog: catalogs.Catalog = catalogs.UNRESTRICTED
) -> list[tuple[datetime, datetime]]:
    """Every problem of every item, or the parsed (start, end) times of each item.

    Statuses are checked against `catalog` too (ingest_batch checks them in its transaction).
    """
    out: validation.Violations = []
    if not items:
        raise ValidationFailed([("data", "data should not be empty")])
    if len(items) > MAX_BATCH:
        raise ValidationFailed([("data", f"data must contain no more than {MAX_BATCH} elements")])
    times: list[tuple[datetime, datetime]] = []
    seen_calls: set[str] = set()
    for index, item in enumerate(items):
        times.append(_validate_item(out, f"data[{index}]", item, seen_calls, catalog))
    if out:
        raise ValidationFailed(out)
    return times


_NO_TIME = datetime.min.replace(tzinfo=UTC)  # an item without valid times (it fails anyway)


def _validate_item(
    out: validation.Violations,
    at: str,
    item: BatchItem,
    seen_calls: set[str],
    catalog: catalogs.Catalog,
) -> tuple[datetime, datetime]:
    start = end = _NO_TIME
    if item.call is None:
        out.append((f"{at}.call", f"{at}.call should not be empty"))
    else:
        call = item.call
        if validation.required_text(out, f"{at}.call.id", call.id):
            if call.id in seen_calls:
                out.append((f"{at}.call.id", f"{at}.call.id must be unique within the batch"))
            seen_calls.add(call.id)
        validation.recording_url(out, f"{at}.call.recording_url", call.recording_url)
        parsed_start = validation.utc_timestamp(out, f"{at}.call.start_time", call.start_time)
        parsed_end = validation.utc_timestamp(out, f"{at}.call.end_time", call.end_time)
        if parsed_start and parsed_end:
            start, end = parsed_start, parsed_end
            if end <= start:
                out.append(
                    (
                        f"{at}.call.end_time",
                        f"{at}.call.end_time must be after {at}.call.start_time",
                    )
                )
        validation.e164(out, f"{at}.call.contact_number", call.contact_number)
    if item.agent is None:
        out.append((f"{at}.agent", f"{at}.agent should not be empty"))
    else:
        validation.required_text(out, f"{at}.agent.id", item.agent.id)
        validation.optional_email(out, f"{at}.agent.email", item.agent.email)
        validation.optional_text(out, f"{at}.agent.name", item.agent.name)
    if item.customer is None:
        out.append((f"{at}.customer", f"{at}.customer should not be empty"))
    else:
        validation.required_text(out, f"{at}.customer.id", item.customer.id)
        validation.optional_text(out, f"{at}.customer.name", item.customer.name)
        validation.optional_email(out, f"{at}.customer.email", item.customer.email)
        status_field, status = f"{at}.customer.disposition_status", item.customer.disposition_status
        if validation.disposition_status(out, status_field, status):
            catalog.check(out, status_field, status)
    validation.optional_url(out, f"{at}.callback_url", item.callback_url)
    for key, value in item.metadata.items():
        validation.required_text(out, f"{at}.metadata", key)
        validation.optional_text(out, f"{at}.metadata.{key}", value, max_length=2048)
    for position, (name, value) in enumerate(item.custom_fields):
        where = f"{at}.custom_fields[{position}]"
        validation.required_text(out, f"{where}.internal_name", name)
        validation.optional_text(out, f"{where}.value", value, max_length=2048)
    return start, end


async def ingest_batch(
    db: Database, *, items: Sequence[BatchItem], idempotency_key: str | None = None
) -> idempotency.Result[BatchOutcome]:
    """Validate everything, then store every new call in one transaction.

    Customer statuses must be in the tenant's catalog (when it has one), read in the write
    transaction itself; any problem rejects the whole batch. With an idempotency key, a
    repeated request gets the stored outcome of the first one, which commits with the batch.
    """
    ctx = context.get()
    assert ctx.partner_pk is not None and ctx.tenant_id and ctx.sub_tenant_id
    scope = {"tenant_id": ctx.tenant_id, "sub_tenant_id": ctx.sub_tenant_id}
    request = idempotency.prepare(idempotency_key, method=METHOD, payload=items)
    if (replayed := await idempotency.replay(db, request, BatchOutcome.from_json)) is not None:
        return replayed
    try:
        times = validate_batch(items)  # field rules first, without holding the write lock
    except ValidationFailed:
        # Name the statuses the catalog refuses in the same reply (nothing is written here).
        async with db.read() as conn:
            catalog = await catalogs.load(conn, **scope)
        if catalog.restricted:
            validate_batch(items, catalog)
        raise
    now = datetime.now(UTC)
    for _ in range(_ATTEMPTS):
        try:
            return await _store(db, items, times, request, now)
        except _CallsRaced:
            continue
    raise RuntimeError(f"batch-call: call ids raced {_ATTEMPTS} times")


class _CallsRaced(Exception):
    """Calls this transaction meant to create were committed meanwhile by another one."""


async def _store(
    db: Database,
    items: Sequence[BatchItem],
    times: list[tuple[datetime, datetime]],
    request: idempotency.IdempotentRequest | None,
    now: datetime,
) -> idempotency.Result[BatchOutcome]:
    """The write transaction of ingest_batch (raises _CallsRaced to be run again)."""
    ctx = context.get()
    assert ctx.partner_pk is not None and ctx.tenant_id and ctx.sub_tenant_id
    scope = {"tenant_id": ctx.tenant_id, "sub_tenant_id": ctx.sub_tenant_id}
    async with db.write() as conn:
        if (replayed := await idempotency.claim(conn, request, BatchOutcome.from_json)) is not None:
            return replayed
        catalog = await catalogs.load(conn, **scope)
        catalog.require(
            (f"data[{index}].customer.disposition_status", item.customer.disposition_status)
            for index, item in enumerate(items)
            if item.customer is not None
        )
        duplicates = await calls.existing_call_ids(
            conn, partner_pk=ctx.partner_pk, call_ids=[item.call.id for item in items if item.call]
        )
        fresh = [
            (index, item)
            for index, item in enumerate(items)
            if item.call is not None and item.call.id not in duplicates
        ]
        wanted = [item.customer.id for _, item in fresh if item.customer]
        known = await customers.lock_customers(conn, customer_ids=wanted, **scope)
        profiles: dict[str, tuple[str | None, str | None]] = {}
        for _, item in fresh:  # the latest non-empty name and email win
            assert item.customer is not None
            name, email = profiles.get(item.customer.id, (None, None))
            profiles[item.customer.id] = (item.customer.name or name, item.customer.email or email)
        missing = [(cid, *profile) for cid, profile in profiles.items() if cid not in known]
        created = await customers.insert_customers(conn, customers=missing, now=now, **scope)
        if raced := [cid for cid, _, _ in missing if cid not in created]:
            # Created by a concurrent batch that has committed since: lock and use them.
            known.update(await customers.lock_customers(conn, customer_ids=raced, **scope))
        keys = {cid: state.pk for cid, state in known.items()}
        keys.update(created)
        for cid, (name, email) in profiles.items():
            if cid in known and (name or email):
                await customers.update_profile(
                    conn, customer_pk=keys[cid], name=name, email=email, now=now
                )
        changes = _status_changes(fresh, keys, known)
        inserted = await calls.insert_calls(
            conn,
            rows=[
                _call_row(
                    item,
                    keys,
                    times[index],
                    ctx.partner_pk,
                    ctx.request_id,
                    now,
                    ctx.tenant_id,
                    ctx.sub_tenant_id,
                )
                for index, item in fresh
            ],
        )
        if len(inserted) < len(fresh):
            # A concurrent batch of this partner stored some of these calls and has committed
            # since existing_call_ids: roll back and start over, they are duplicates now.
            raise _CallsRaced
        await customers.apply_status_changes(
            conn,
            changes=changes,
            source=SOURCE_BATCH_CALL,
            partner_pk=ctx.partner_pk,
            request_id=ctx.request_id,
            now=now,
            **scope,
        )
        outcome = _outcome(items, duplicates, set(created))
        await idempotency.record(conn, request, outcome)
    return idempotency.Result(outcome)


def _outcome(
    items: Sequence[BatchItem], duplicates: set[str], created_customers: set[str]
) -> BatchOutcome:
    """Each item's outcome in request order; a new customer counts as created once."""
    outcomes: list[ItemOutcome] = []
    for index, item in enumerate(items):
        assert item.call is not None and item.customer is not None
        is_new = item.call.id not in duplicates
        first_sight = is_new and item.customer.id in created_customers
        if first_sight:
            created_customers.discard(item.customer.id)
        outcomes.append(
            ItemOutcome(
                index=index,
                call_id=item.call.id,
                customer_id=item.customer.id,
                status="created" if is_new else "duplicate",
                customer_created=first_sight,
            )
        )
    return BatchOutcome(outcomes)


def _status_changes(
    fresh: Sequence[tuple[int, BatchItem]],
    keys: dict[str, int],
    known: dict[str, customers.CustomerState],
) -> list[StatusChange]:
    """Apply the items' statuses in order; one change per real transition."""
    current = {cid: state.disposition_status for cid, state in known.items()}
    changes: list[StatusChange] = []
    for _, item in fresh:
        assert item.customer is not None
        wanted = item.customer.disposition_status
        if wanted is None:
            continue
        new_status = wanted or None
        previous = current.get(item.customer.id)
        if new_status != previous:
            changes.append(StatusChange(keys[item.customer.id], previous, new_status))
            current[item.customer.id] = new_status
    return changes


def _call_row(
    item: BatchItem,
    keys: dict[str, int],
    times: tuple[datetime, datetime],
    partner_pk: int,
    request_id: str,
    now: datetime,
    tenant_id: str,
    sub_tenant_id: str,
) -> calls.CallRow:
    call, agent, customer = item.call, item.agent, item.customer
    assert call is not None and agent is not None and customer is not None
    return calls.CallRow(
        partner_pk,
        call.id,
        keys[customer.id],
        tenant_id,
        sub_tenant_id,
        call.recording_url,
        times[0],
        times[1],
        call.contact_number,
        agent.id,
        agent.email or None,
        agent.name or None,
        item.callback_url or None,
        item.metadata,
        [{"internal_name": n, "value": v} for n, v in item.custom_fields]
        if item.custom_fields
        else [],
        request_id,
        now,
    )
