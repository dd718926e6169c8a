"""The summary's maintained counters equal a scan of the customers and the history: random
histories written through units of work at random times (hypothesis), random windows, on both
engines."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from devstack import onboard
from server.db import Database
from server.models import Partner
from server.records import Change, NewCustomer, Plan, Reads, Scope, Snapshot
from server.storage import reports

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "60")) // 2
BASE = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)
SUB_TENANTS = ("s1", "s2")
STATUSES = ("a", "b", "c", "")  # "": clear
# (sub-tenant, customer, status or None to create it without one, minutes after BASE)
WRITES = st.lists(
    st.tuples(
        st.sampled_from(SUB_TENANTS),
        st.integers(0, 5),
        st.sampled_from((*STATUSES, None)),
        st.integers(0, 6 * 60),
    ),
    max_size=25,
)
# Window bounds: open, or any minute (7 s past it) from before the first write to after the last.
BOUND = st.none() | st.integers(-30, 7 * 60).map(lambda m: BASE + timedelta(minutes=m, seconds=7))
WINDOWS = st.lists(st.tuples(BOUND, BOUND), min_size=1, max_size=6)


async def write(db: Database, partner_pk: int, tenant: str, sub: str, customer: str,
                status: str | None, at: datetime) -> None:  # fmt: skip
    """One unit: create the customer (with its status) or change its status, at `at`."""
    scope = Scope(tenant, sub)

    def decide(snapshot: Snapshot) -> tuple[Plan | None, None]:
        plan = Plan(at)
        found = snapshot.customers[scope].get(customer)
        wanted = status or None
        previous = None if found is None else found.disposition_status
        if found is None:
            plan.new_customers.append(NewCustomer(*scope, customer, None, None, wanted))
        elif previous == wanted or status is None:
            return None, None
        if wanted != previous:
            pk = None if found is None else found.pk
            plan.changes.append(
                Change(*scope, customer, pk, previous, wanted, "t", partner_pk, "r")
            )
        return plan, None

    await db.units.run(Reads(customers={scope: [customer]}), decide)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(writes=WRITES, windows=WINDOWS)
async def test_maintained_counts_equal_scanned_ones(
    db: Database, writes: list[tuple[str, int, str | None, int]],
    windows: list[tuple[datetime | None, datetime | None]],
) -> None:  # fmt: skip
    tenant = f"t-{uuid.uuid4().hex[:8]}"  # each example a tenant of its own
    await onboard(db, tenant, grants=[(tenant, "*")])
    async with db.read() as conn:
        found = await conn.execute(select(Partner.id).where(Partner.partner_id == tenant))
        partner_pk = int(found.scalar_one())
    for sub, customer, status, minutes in writes:
        at = BASE + timedelta(minutes=minutes, seconds=minutes % 7)
        await write(db, partner_pk, tenant, sub, f"c{customer}", status, at)
    for sub in SUB_TENANTS:
        for start, end in [(None, None), *windows]:
            if start is not None and end is not None and end <= start:
                continue
            bounds = {"tenant_id": tenant, "sub_tenant_id": sub, "changed_from": start,
                      "changed_before": end}  # fmt: skip
            async with db.read() as conn:
                maintained = await reports.status_counts(conn, **bounds)
                scanned = await reports.scanned_status_counts(conn, **bounds)
            assert maintained == scanned, (sub, start, end)
