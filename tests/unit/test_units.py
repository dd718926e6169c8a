"""Units of work (server/storage/units.py) on both engines: what a plan stores, read back through
SQLAlchemy as Core statements store it; the counters that follow from it; and on PostgreSQL,
the write that finds its read outdated and runs the unit again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert, select

from devstack import onboard
from server.db import Database
from server.models import (
    Call,
    Customer,
    DispositionHistory,
    FeedSequence,
    Partner,
    StatusChangeHour,
    StatusCount,
)
from server.records import Change, NewCall, NewCustomer, Plan, Reads, Scope, Snapshot
from server.storage import as_utc, postgres_writer
from tests.support.databases import settings_for, sql

SCOPE = Scope("t", "s")
AT = datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)


async def partner_pk(db: Database) -> int:
    await onboard(db, "p1", grants=[SCOPE])
    async with db.read() as conn:
        return int((await conn.execute(select(Partner.id))).scalar_one())


def call(call_id: str, customer_id: str, pk: int | None, partner: int) -> NewCall:
    return NewCall(partner, call_id, customer_id, pk, *SCOPE, "https://x/a.mp3", AT, AT,
                   "+14155550123", "agent", None, None, None, {"k": "é"},
                   [{"internal_name": "n", "value": "v"}], "req-1")  # fmt: skip


async def rows(db: Database, *columns: Any) -> list[tuple[Any, ...]]:
    """The columns' rows by the first two (times as aware UTC datetimes: SQLite's are naive)."""
    async with db.read() as conn:
        found = await conn.execute(select(*columns).order_by(*columns[:2]))
        return [tuple(as_utc(v) if isinstance(v, datetime) else v for v in row) for row in found]


async def test_a_plan_is_stored_as_core_statements_store_it(db: Database) -> None:
    partner = await partner_pk(db)
    async with db.write() as conn:
        await conn.execute(
            insert(Customer).values(
                tenant_id="t", sub_tenant_id="s", customer_id="core", disposition_status="new",
                created_at=AT, updated_at=AT,
            )
        )  # fmt: skip
    core_pk = (await rows(db, Customer.id))[0][0]

    def decide(snapshot: Snapshot) -> tuple[Plan, str]:
        known = snapshot.customers[SCOPE]
        assert set(known) == {"core"} and known["core"].disposition_status == "new"
        plan = Plan(
            AT,
            changes=[
                Change(*SCOPE, "core", core_pk, "new", "won", "test", partner, "req-1"),
                Change(*SCOPE, "fresh", None, None, "new", "test", partner, "req-1"),
            ],
            new_customers=[NewCustomer(*SCOPE, "fresh", "Ann", None, "new")],
            calls=[call("c1", "fresh", None, partner), call("c2", "core", core_pk, partner)],
        )
        return plan, "done"

    reads = Reads(customers={SCOPE: ["core", "fresh"]}, catalogs=[SCOPE], calls=(partner, ["c1"]))
    assert await db.units.run(reads, decide) == "done"

    customers = await rows(db, Customer.customer_id, Customer.disposition_status,
                           Customer.name, Customer.created_at, Customer.updated_at)  # fmt: skip
    assert customers == [("core", "won", None, AT, AT), ("fresh", "new", "Ann", AT, AT)]
    calls = await rows(db, Call.call_id, Call.start_time, Call.call_metadata, Call.custom_fields)
    assert calls == [
        ("c1", AT, {"k": "é"}, [{"internal_name": "n", "value": "v"}]),
        ("c2", AT, {"k": "é"}, [{"internal_name": "n", "value": "v"}]),
    ]
    history = await rows(db, DispositionHistory.seq, DispositionHistory.previous_status,
                         DispositionHistory.new_status, DispositionHistory.changed_at)  # fmt: skip
    assert history == [(1, "new", "won", AT), (2, None, "new", AT)]
    assert await rows(db, FeedSequence.tenant_id, FeedSequence.last_seq) == [("t", 2)]
    # Counters: "core" moved from new to won, "fresh" arrived as new (no net change of "new").
    assert await rows(db, StatusCount.disposition_status, StatusCount.customers) == [("won", 1)]
    hour = AT.replace(minute=0, second=0, microsecond=0)
    assert await rows(
        db, StatusChangeHour.hour, StatusChangeHour.disposition_status, StatusChangeHour.changes
    ) == [(hour, "new", 1), (hour, "won", 1)]
    # The Core insert of "core" did not count it (the API creates customers through units):
    # only units move the counters, by exactly what their plans change.


async def test_a_unit_that_raises_writes_nothing(db: Database) -> None:
    partner = await partner_pk(db)

    def decide(snapshot: Snapshot) -> tuple[Plan, None]:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await db.units.run(Reads(calls=(partner, ["c1"])), decide)
    assert await rows(db, Customer.id) == []


@pytest.fixture
async def customer_a(postgres_url: str) -> AsyncIterator[tuple[Database, int, int]]:
    """PostgreSQL: (database, partner pk, pk of customer "c" whose status is "a")."""
    db = Database(settings_for(postgres_url))
    try:
        partner = await partner_pk(db)
        sql(
            postgres_url,
            "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
            " created_at, updated_at) VALUES ('t', 's', 'c', 'a', now(), now())",
        )
        yield db, partner, (await rows(db, Customer.id))[0][0]
    finally:
        await db.dispose()


async def change_to_z(
    db: Database, partner: int, pk: int, *, interfere: Callable[[int], str | None]
) -> list[str | None]:
    """Run a unit that changes "c" to "z"; before its write, `interfere(attempt)` may change
    the status (another writer, committed). The statuses each attempt read."""
    seen: list[str | None] = []

    def decide(snapshot: Snapshot) -> tuple[Plan, None]:
        status = snapshot.customers[SCOPE]["c"].disposition_status
        seen.append(status)
        if (other := interfere(len(seen))) is not None:
            sql(db.settings.database_url, f"UPDATE customers SET disposition_status = '{other}'")
        change = Change(*SCOPE, "c", pk, status, "z", "test", partner, "r")
        return Plan(datetime.now(UTC), [change]), None

    await db.units.run(Reads(customers={SCOPE: ["c"]}), decide)
    return seen


@pytest.mark.postgres
async def test_postgres_write_finds_its_read_outdated_and_runs_again(
    customer_a: tuple[Database, int, int],
) -> None:
    db, partner, pk = customer_a
    seen = await change_to_z(db, partner, pk, interfere=lambda n: "b" if n == 1 else None)
    assert seen == ["a", "b"]
    history = await rows(db, DispositionHistory.previous_status, DispositionHistory.new_status)
    assert history == [("b", "z")]


@pytest.mark.postgres
async def test_postgres_units_fall_back_to_locks_after_repeated_conflicts(
    customer_a: tuple[Database, int, int],
) -> None:
    db, partner, pk = customer_a
    optimistic = postgres_writer.OPTIMISTIC_ATTEMPTS
    seen = await change_to_z(
        db, partner, pk, interfere=lambda n: f"x{n}" if n <= optimistic else None
    )
    # Each optimistic attempt lost its race; the next one read with the customer locked.
    assert seen == ["a", *(f"x{n}" for n in range(1, optimistic + 1))]
    history = await rows(db, DispositionHistory.previous_status, DispositionHistory.new_status)
    assert history == [(f"x{optimistic}", "z")]
