"""A partner ingests a batch of calls: stores them and creates (or refreshes) their customers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from server.db import Database
from server.errors import ValidationFailed
from server.records import (
    Caller,
    Change,
    CustomerState,
    NewCall,
    NewCustomer,
    Plan,
    Profile,
    Reads,
    Scope,
    Snapshot,
)
from server.rules import catalogs, validation
from server.rules import webhooks as webhook_rules
from server.runtime.webhook_http import DeliveryError, RefusedAddress, resolve
from server.usecases import idempotency
from server.usecases.catalogs import load_catalog

# How long a callback_url's host may take to resolve at ingestion (else: checked at delivery).
RESOLVE_SECONDS = 2.0
SOURCE_BATCH_CALL = "batch_call"
METHOD = "disposition.v1.CallIngestionService/IngestBatchCalls"  # for idempotency keys


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
    items: Sequence[BatchItem],
    problems: Sequence[validation.Violations],
    catalog: catalogs.Catalog = catalogs.UNRESTRICTED,
) -> list[tuple[datetime, datetime]]:
    """The parsed (start, end) times of each item, or ValidationFailed with every problem of
    every item: `problems[i]`, the declared limits item i breaks (checked on the request,
    server/rules/declared.py), then what only the batch tells (a call id used twice, an end
    before its start, a date that does not exist, a status `catalog` refuses) for the fields
    that kept their limits. Statuses are checked against `catalog` too (ingest_batch checks
    them in its transaction)."""
    if len(problems) != len(items):
        raise ValueError(f"{len(problems)} problem lists for {len(items)} items")
    out: validation.Violations = []
    times: list[tuple[datetime, datetime]] = []
    seen_calls: set[str] = set()
    for index, item in enumerate(items):
        found = problems[index]
        out += found
        failed = {field for field, _ in found}
        times.append(_validate_item(out, f"data[{index}]", item, failed, seen_calls, catalog))
    if out:
        raise ValidationFailed(out)
    return times


_NO_TIME = datetime.min.replace(tzinfo=UTC)  # an item without valid times (it fails anyway)


def _validate_item(
    out: validation.Violations,
    at: str,
    item: BatchItem,
    failed: set[str],
    seen_calls: set[str],
    catalog: catalogs.Catalog,
) -> tuple[datetime, datetime]:
    """The rules of one item that its fields' limits do not state, skipping `failed` fields."""
    start = end = _NO_TIME
    if item.call is not None:
        call = item.call
        if f"{at}.call.id" not in failed:
            if call.id in seen_calls:
                out.append((f"{at}.call.id", f"{at}.call.id must be unique within the batch"))
            seen_calls.add(call.id)
        start_field, end_field = f"{at}.call.start_time", f"{at}.call.end_time"
        parsed_start = parsed_end = None
        if start_field not in failed:
            parsed_start = validation.utc_date(out, start_field, call.start_time)
        if end_field not in failed:
            parsed_end = validation.utc_date(out, end_field, call.end_time)
        if parsed_start and parsed_end:
            start, end = parsed_start, parsed_end
            if end <= start:
                out.append((end_field, f"{end_field} must be after {start_field}"))
    if item.customer is not None:
        status_field, status = f"{at}.customer.disposition_status", item.customer.disposition_status
        if status_field not in failed:
            catalog.check(out, status_field, status)
    return start, end


async def check_callbacks(items: Sequence[BatchItem], *, allow_private: bool) -> None:
    """ValidationFailed for each callback_url that may not receive deliveries: not https, or a
    host inside the service's network (literal, or resolving there). A host that cannot be
    resolved now is checked again at delivery."""
    out: list[tuple[int, str, str]] = []
    hosts: dict[str, list[tuple[int, str]]] = {}
    for index, item in enumerate(items):
        if not item.callback_url:
            continue
        at = f"data[{index}].callback_url"
        problem = webhook_rules.url_problem(item.callback_url, allow_private=allow_private)
        if problem is not None:
            out.append((index, at, f"{at} {problem}"))
        elif not allow_private:
            host = urlsplit(item.callback_url).hostname or ""
            hosts.setdefault(host, []).append((index, at))

    async def refused(host: str) -> bool:
        try:
            async with asyncio.timeout(RESOLVE_SECONDS):
                await resolve(host, 443, allow_private=False)
        except RefusedAddress:
            return True
        except (DeliveryError, TimeoutError):
            pass
        return False

    found = await asyncio.gather(*(refused(host) for host in hosts))
    for fields, is_refused in zip(hosts.values(), found, strict=True):
        if is_refused:
            out += [(i, at, f"{at} must not point to a private or internal address")
                    for i, at in fields]  # fmt: skip
    if out:
        raise ValidationFailed([(at, message) for _, at, message in sorted(out)])


async def ingest_batch(
    db: Database,
    *,
    caller: Caller,
    items: Sequence[BatchItem],
    problems: Sequence[validation.Violations],
    idempotency_key: str | None = None,
) -> idempotency.Result[BatchOutcome]:
    """Validate everything, then store every new call in one unit of work.

    Customer statuses must be in the tenant's catalog (when it has one), read in the unit
    itself; any problem rejects the whole batch. With an idempotency key, a repeated request
    gets the stored outcome of the first one, which commits with the batch.
    """
    scope = caller.scope
    request = idempotency.prepare(idempotency_key, caller=caller, method=METHOD, payload=items)
    decode = BatchOutcome.from_json
    if (replayed := await idempotency.replay(db, request, decode)) is not None:
        return replayed
    try:
        times = validate_batch(items, problems)  # field rules first, without a unit of work
        await check_callbacks(items, allow_private=db.settings.webhook_allow_private_urls)
    except ValidationFailed:
        # Name the statuses the catalog refuses in the same reply (nothing is written here).
        async with db.read() as conn:
            catalog = await load_catalog(conn, tenant_id=scope[0], sub_tenant_id=scope[1])
        if catalog.restricted:
            validate_batch(items, problems, catalog)
        raise
    reads = Reads(
        customers={scope: [item.customer.id for item in items if item.customer is not None]},
        catalogs=[scope],
        calls=(caller.partner_pk, [item.call.id for item in items if item.call is not None]),
        key=idempotency.ref(request),
    )

    def decide(snapshot: Snapshot) -> tuple[Plan | None, idempotency.Result[BatchOutcome]]:
        if (replayed := idempotency.replayed(snapshot.key, request, decode)) is not None:
            return None, replayed
        now = datetime.now(UTC)
        plan, outcome = plan_batch(items, times, scope, snapshot, caller, now)
        plan.key = idempotency.record(request, outcome, snapshot.key, now)
        return plan, idempotency.Result(outcome)

    return await db.units.run(reads, decide)


def plan_batch(
    items: Sequence[BatchItem],
    times: list[tuple[datetime, datetime]],
    scope: Scope,
    snapshot: Snapshot,
    who: Caller,
    now: datetime,
) -> tuple[Plan, BatchOutcome]:
    """What storing a valid batch writes, and its outcome (pure; raises ValidationFailed for a
    status the catalog in force refuses). `who`: whose partner and request id the calls and the
    history rows record."""
    catalogs.in_force(snapshot.catalogs[scope]).require(
        (f"data[{index}].customer.disposition_status", item.customer.disposition_status)
        for index, item in enumerate(items)
        if item.customer is not None
    )
    duplicates = snapshot.existing_calls
    fresh = [
        (index, item)
        for index, item in enumerate(items)
        if item.call is not None and item.call.id not in duplicates
    ]
    known = snapshot.customers[scope]
    profiles: dict[str, tuple[str | None, str | None]] = {}
    for _, item in fresh:  # the latest non-empty name and email win
        assert item.customer is not None
        name, email = profiles.get(item.customer.id, (None, None))
        profiles[item.customer.id] = (item.customer.name or name, item.customer.email or email)
    plan = Plan(now)
    statuses = _status_changes(plan, fresh, known, scope, who)
    for cid, (name, email) in profiles.items():
        state = known.get(cid)
        if state is None:
            plan.new_customers.append(NewCustomer(*scope, cid, name, email, statuses.get(cid)))
        elif name or email:
            plan.profiles.append(Profile(state.pk, name, email))
    plan.calls = [_call_row(item, known, times[index], who, scope) for index, item in fresh]
    created = {new.customer_id for new in plan.new_customers}
    return plan, _outcome(items, duplicates, created)


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
    plan: Plan,
    fresh: Sequence[tuple[int, BatchItem]],
    known: dict[str, CustomerState],
    scope: Scope,
    who: Caller,
) -> dict[str, str | None]:
    """Apply the items' statuses in order, one change per real transition, into `plan`; each
    touched customer's resulting status (a new customer starts without one)."""
    current = {cid: state.disposition_status for cid, state in known.items()}
    for _, item in fresh:
        assert item.customer is not None
        wanted = item.customer.disposition_status
        if wanted is None:
            continue
        cid = item.customer.id
        new_status = wanted or None
        previous = current.get(cid)
        if new_status != previous:
            state = known.get(cid)
            plan.changes.append(
                Change(*scope, cid, None if state is None else state.pk, previous, new_status,
                       SOURCE_BATCH_CALL, who.partner_pk, who.request_id)
            )  # fmt: skip
            current[cid] = new_status
    return current


def _call_row(
    item: BatchItem,
    known: dict[str, CustomerState],
    times: tuple[datetime, datetime],
    who: Caller,
    scope: Scope,
) -> NewCall:
    call, agent, customer = item.call, item.agent, item.customer
    assert call is not None and agent is not None and customer is not None
    state = known.get(customer.id)
    return NewCall(
        who.partner_pk,
        call.id,
        customer.id,
        None if state is None else state.pk,
        *scope,
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
        who.request_id,
    )
