"""Calls ingested through the batch-call API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection

from server.storage import bulk


async def existing_call_ids(
    conn: AsyncConnection, *, partner_pk: int, call_ids: Sequence[str]
) -> set[str]:
    """The ids among call_ids that this partner has already ingested."""
    rows = await bulk.select_in(
        conn,
        "SELECT call_id FROM calls WHERE partner_pk = ? AND call_id IN ({in})",
        (partner_pk,),
        sorted(set(call_ids)),
    )
    return {call_id for (call_id,) in rows}


class CallRow(NamedTuple):
    """A row of `calls`, fields in column order (times as datetimes, JSON as Python values)."""

    partner_pk: int
    call_id: str
    customer_pk: int
    tenant_id: str
    sub_tenant_id: str
    recording_url: str
    start_time: datetime
    end_time: datetime
    contact_number: str
    agent_id: str
    agent_email: str | None
    agent_name: str | None
    callback_url: str | None
    metadata: dict[str, str]
    custom_fields: list[dict[str, str]]
    request_id: str
    created_at: datetime


async def insert_calls(conn: AsyncConnection, *, rows: Sequence[CallRow]) -> set[str]:
    """Insert calls; returns the call ids inserted here.

    An id the partner has by now is skipped (ON CONFLICT DO NOTHING): on PostgreSQL a
    concurrent transaction may have stored it since existing_call_ids; this insert waits for
    that one to end. Rows go in id order so that two transactions inserting the same ids wait
    for each other instead of deadlocking.
    """
    if not rows:
        return set()
    times: dict[datetime, Any] = {}  # the rows of a batch share times (created_at at least)

    def time(value: datetime) -> Any:
        found = times.get(value)
        if found is None:
            found = times[value] = bulk.db_time(conn, value)
        return found

    inserted = await bulk.insert_rows(
        conn,
        "calls",
        CallRow._fields,
        [
            (*r[:6], time(r.start_time), time(r.end_time), *r[8:13], bulk.db_json(r.metadata),
             bulk.db_json(r.custom_fields), r.request_id, time(r.created_at))
            for r in sorted(rows, key=_call_id)
        ],
        on_conflict_do_nothing=("partner_pk", "call_id"),
        returning=("call_id",),
    )  # fmt: skip
    return {call_id for (call_id,) in inserted}


_call_id = attrgetter("call_id")
