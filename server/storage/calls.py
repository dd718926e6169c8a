"""Calls ingested through the batch-call API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

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


_CALL_COLUMNS = (
    "partner_pk", "call_id", "customer_pk", "tenant_id", "sub_tenant_id", "recording_url",
    "start_time", "end_time", "contact_number", "agent_id", "agent_email", "agent_name",
    "callback_url", "metadata", "custom_fields", "request_id", "created_at",
)  # fmt: skip


async def insert_calls(conn: AsyncConnection, *, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert calls; each dict has the columns of `calls` (metadata under `metadata`).

    Returns the call ids inserted here. An id the partner has by now is skipped (ON CONFLICT
    DO NOTHING): on PostgreSQL a concurrent transaction may have stored it since
    existing_call_ids; this insert waits for that one to end. Rows go in id order so that
    two transactions inserting the same ids wait for each other instead of deadlocking.
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
        _CALL_COLUMNS,
        [
            (
                r["partner_pk"],
                r["call_id"],
                r["customer_pk"],
                r["tenant_id"],
                r["sub_tenant_id"],
                r["recording_url"],
                time(r["start_time"]),
                time(r["end_time"]),
                r["contact_number"],
                r["agent_id"],
                r["agent_email"],
                r["agent_name"],
                r["callback_url"],
                bulk.db_json(r["metadata"]),
                bulk.db_json(r["custom_fields"]),
                r["request_id"],
                time(r["created_at"]),
            )
            for r in sorted(rows, key=lambda row: str(row["call_id"]))
        ],
        on_conflict_do_nothing=("partner_pk", "call_id"),
        returning=("call_id",),
    )
    return {call_id for (call_id,) in inserted}
