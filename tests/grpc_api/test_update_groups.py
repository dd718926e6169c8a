"""Group commit of single updates (server/runtime/update_groups.py), through a real server:
concurrent updates share transactions, each is judged on its own, and a failed transaction
acknowledges none of its group. (When the next group starts: tests/unit/test_update_groups.py.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import grpc
from sqlalchemy import select

from devstack import Credentials
from server.app import App
from server.db import Database
from server.models import Customer, DispositionHistory
from server.records import Disposition
from server.runtime import update_groups
from server.usecases import catalogs
from tests.support.databases import failing_inserts
from tests.support.grpc_calls import ingest, update_request

WRITERS = 24


async def outcome(call: Any) -> str:
    """The gRPC status name of a unary call."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def rows_by_request(db: Database) -> dict[str, tuple[str, str | None, str | None]]:
    """request_id -> (customer_id, previous_status, new_status) of every history row."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                DispositionHistory.request_id,
                Customer.customer_id,
                DispositionHistory.previous_status,
                DispositionHistory.new_status,
            ).join(Customer, Customer.id == DispositionHistory.customer_pk)
        )
        return {row[0]: (row[1], row[2], row[3]) for row in rows}


def record_groups(app: App) -> list[list[str]]:
    """The request ids of every group the app's server applies from now on."""
    seen: list[list[str]] = []

    def hook(group: Sequence[update_groups.PendingUpdate]) -> None:
        seen.append([update.request_id for update in group])

    update_groups.groups_of(app.db).on_group = hook
    return seen


async def test_concurrent_updates_share_groups_each_judged_on_its_own(
    app: App, dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, *(f"g-{i}" for i in range(4)), status="new")
    groups = record_groups(app)
    plan = []  # (request id, customer, status, expected gRPC status)
    for i in range(WRITERS):
        if i % 6 == 5:
            plan.append((f"gr-{i}", f"missing-{i}", "interested", "NOT_FOUND"))
        else:
            plan.append((f"gr-{i}", f"g-{i % 4}", f"status-{i}", "OK"))
    results = await asyncio.gather(
        *(
            outcome(
                dispositions.UpdateDispositionStatus(
                    update_request(customer, status),
                    metadata=partner.metadata(x_request_id=request_id),
                )
            )
            for request_id, customer, status, _ in plan
        )
    )

    assert results == [expected for *_, expected in plan]
    assert max(len(group) for group in groups) >= 2, f"no group formed: {groups}"
    assert sorted(rid for group in groups for rid in group) == sorted(rid for rid, *_ in plan)
    rows = await rows_by_request(db)
    applied = [
        (rid, customer, status) for rid, customer, status, expected in plan if expected == "OK"
    ]
    assert {rid for rid, *_ in applied} == set(rows) - {r for r in rows if not r.startswith("gr-")}
    for rid, customer, status in applied:
        assert rows[rid][0] == customer and rows[rid][2] == status
    # Each customer's chain follows the order the groups applied its updates in.
    order = [rid for group in groups for rid in group]
    for customer in (f"g-{i}" for i in range(4)):
        chain = [rows[rid] for rid in order if rid in rows and rows[rid][0] == customer]
        assert chain[0][1] == "new"
        for before, after in itertools.pairwise(chain):
            assert after[1] == before[2], f"{customer}: broken chain {chain}"


async def test_a_status_outside_the_catalog_fails_alone(
    app: App, dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "cat-1", "cat-2")
    await catalogs.set_catalog(
        db,
        tenant_id="tenant1",
        sub_tenant_id="*",
        dispositions=[Disposition("interested", "Interested")],
    )
    results = await asyncio.gather(
        *(
            outcome(
                dispositions.UpdateDispositionStatus(
                    update_request(customer, status), metadata=partner.metadata()
                )
            )
            for customer, status in [("cat-1", "interested"), ("cat-2", "bogus")] * 6
        )
    )
    assert results == ["OK", "INVALID_ARGUMENT"] * 6


async def test_a_failed_group_commit_fails_every_update_in_it_and_acknowledges_none(
    app: App, dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    customers_ = [f"f-{i}" for i in range(WRITERS)]
    await ingest(ingestion, partner, *customers_)
    request_ids = [f"fr-doom-{i}" if i % 5 == 0 else f"fr-{i}" for i in range(WRITERS)]
    groups = record_groups(app)
    # The database refuses the history rows of the "doom" requests, after the group's other
    # writes: the whole unit fails.
    async with failing_inserts(db, "disposition_history", when="NEW.request_id LIKE 'fr-doom%'"):
        results = await asyncio.gather(
            *(
                outcome(
                    dispositions.UpdateDispositionStatus(
                        update_request(customer, "interested"),
                        metadata=partner.metadata(x_request_id=request_id),
                    )
                )
                for request_id, customer in zip(request_ids, customers_, strict=True)
            )
        )

    failed = [group for group in groups if any("doom" in rid for rid in group)]
    assert any(len(group) >= 2 for group in failed), f"no doomed group of 2 or more: {groups}"
    doomed = {rid for group in failed for rid in group}
    by_request = dict(zip(request_ids, results, strict=True))
    assert {rid for rid, code in by_request.items() if code != "OK"} == doomed
    assert {by_request[rid] for rid in doomed} == {"INTERNAL"}
    rows = await rows_by_request(db)
    assert doomed.isdisjoint(rows), "a failed group left history behind"
    assert {rid for rid in rows if rid.startswith("fr-")} == set(by_request) - doomed
    async with db.read() as conn:
        statuses = dict(
            (await conn.execute(select(Customer.customer_id, Customer.disposition_status))).all()
        )
    for request_id, customer in zip(request_ids, customers_, strict=True):
        expected = None if request_id in doomed else "interested"
        assert statuses[customer] == expected, customer
