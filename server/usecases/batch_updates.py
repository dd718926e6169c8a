"""A partner updates many customers' disposition statuses: every item judged on its own, one
transaction.

Envelope problems (no items, too many: checked on the request) reject the whole request.
Otherwise each item is `ok`, `not_found` or `invalid` (with its field errors, under `items[i].`:
the declared limits it breaks, then a status its catalog refuses), and the valid items apply
in request order and commit together, one history row per real change, before the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.db import Database
from server.records import Caller, Change, Plan, Reads, Scope, Snapshot
from server.rules import catalogs, validation
from server.usecases import idempotency

SOURCE_BATCH_UPDATE = "batch_update"
METHOD = "disposition.v1.DispositionService/BatchUpdateDispositionStatus"  # idempotency keys
OK, NOT_FOUND, INVALID = "ok", "not_found", "invalid"


# UpdateItem and ItemOutcome are made a thousand per batch: not frozen, because a frozen
# dataclass takes about three times as long to make. Nothing mutates them.
@dataclass(slots=True)
class UpdateItem:
    """One update; the same rules as a single update (None: unchanged, "": cleared)."""

    customer_id: str
    disposition_status: str | None = None


@dataclass(slots=True)
class ItemOutcome:
    index: int
    customer_id: str
    status: str  # OK, NOT_FOUND or INVALID
    changed: bool = False
    errors: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchUpdateOutcome:
    items: list[ItemOutcome]

    def count(self, status: str) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def changed(self) -> int:
        return sum(1 for item in self.items if item.changed)

    @classmethod
    def from_json(cls, data: Any) -> BatchUpdateOutcome:
        """The outcome stored with an idempotency key (idempotency.to_json), rebuilt."""
        return cls(
            [
                ItemOutcome(
                    index=item["index"],
                    customer_id=item["customer_id"],
                    status=item["status"],
                    changed=item["changed"],
                    errors=tuple((field, message) for field, message in item["errors"]),
                )
                for item in data["items"]
            ]
        )


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch whose envelope is valid, with each item's field-rule problems (empty: none)."""

    items: Sequence[UpdateItem]
    problems: list[validation.Violations]


def prepare_batch(
    items: Sequence[UpdateItem], problems: Sequence[validation.Violations]
) -> PreparedBatch:
    """The batch with each item's problems: `problems[i]`, the declared limits item i breaks
    (checked on the request, server/rules/declared.py), whose count must match the items'."""
    if len(problems) != len(items):
        raise ValueError(f"{len(problems)} problem lists for {len(items)} items")
    return PreparedBatch(items, [list(found) for found in problems])


async def batch_update(
    db: Database,
    *,
    caller: Caller,
    items: Sequence[UpdateItem],
    problems: Sequence[validation.Violations],
    idempotency_key: str | None = None,
) -> idempotency.Result[BatchUpdateOutcome]:
    """Apply a batch for the caller's tenant and sub-tenant; committed before this returns.

    With an idempotency key, a retry gets the first outcome back (stored in the same
    transaction as the changes) instead of applying the batch again.
    """
    request = idempotency.prepare(idempotency_key, caller=caller, method=METHOD, payload=items)
    decode = BatchUpdateOutcome.from_json
    if (replayed := await idempotency.replay(db, request, decode)) is not None:
        return replayed
    batch = prepare_batch(items, problems)
    scope = caller.scope
    who = (SOURCE_BATCH_UPDATE, caller.partner_pk, caller.request_id)
    valid = [i for i, found in enumerate(batch.problems) if not found]
    reads = Reads(
        customers={scope: [items[i].customer_id for i in valid]},
        catalogs=[scope] if any(items[i].disposition_status for i in valid) else [],
        key=idempotency.ref(request),
    )

    def decide(snapshot: Snapshot) -> tuple[Plan | None, idempotency.Result[BatchUpdateOutcome]]:
        if (replayed := idempotency.replayed(snapshot.key, request, decode)) is not None:
            return None, replayed
        now = datetime.now(UTC)
        outcome, changes = judge_batch(batch, scope, snapshot, who)
        key = idempotency.record(request, outcome, snapshot.key, now)
        plan = Plan(now, changes, key=key) if changes or key else None
        return plan, idempotency.Result(outcome)

    return await db.units.run(reads, decide)


def judge_batch(
    batch: PreparedBatch, scope: Scope, snapshot: Snapshot, who: tuple[str, int, str]
) -> tuple[BatchUpdateOutcome, list[Change]]:
    """Check the catalog and the customers, then apply the valid items in order (pure).

    `who`: the source, partner and request id that the history rows record.
    """
    items, problems = batch.items, [list(found) for found in batch.problems]
    catalog = catalogs.in_force(snapshot.catalogs[scope]) if scope in snapshot.catalogs else None
    if catalog is not None:
        for index, item in enumerate(items):
            if not problems[index]:
                catalog.check(
                    problems[index], f"items[{index}].disposition_status", item.disposition_status
                )
    known = snapshot.customers.get(scope, {})
    current = {cid: state.disposition_status for cid, state in known.items()}
    changes: list[Change] = []
    outcomes: list[ItemOutcome] = []
    for index, item in enumerate(items):
        cid, wanted = item.customer_id, item.disposition_status
        state = known.get(cid)
        if problems[index]:
            outcome = ItemOutcome(index, cid, INVALID, errors=tuple(problems[index]))
        elif state is None:
            outcome = ItemOutcome(index, cid, NOT_FOUND)
        else:
            previous = current[cid]
            new_status = previous if wanted is None else wanted or None
            changed = new_status != previous
            if changed:
                source, partner_pk, request_id = who
                changes.append(
                    Change(*scope, cid, state.pk, previous, new_status, source, partner_pk,
                           request_id)
                )  # fmt: skip
                current[cid] = new_status
            outcome = ItemOutcome(index, cid, OK, changed=changed)
        outcomes.append(outcome)
    return BatchUpdateOutcome(outcomes), changes
