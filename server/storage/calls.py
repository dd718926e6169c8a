"""Calls ingested through the batch-call API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Call
from server.storage import dialect_insert


async def existing_call_ids(
    conn: AsyncConnection, *, partner_pk: int, call_ids: Sequence[str]
) -> set[str]:
    """The ids among call_ids that this partner has already ingested."""
    found: set[str] = set()
    unique = sorted(set(call_ids))
    for start in range(0, len(unique), 500):
        rows = await conn.execute(
            select(Call.call_id).where(
                Call.partner_pk == partner_pk, Call.call_id.in_(unique[start : start + 500])
            )
        )
        found.update(rows.scalars())
    return found


async def insert_calls(conn: AsyncConnection, *, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert calls; each dict has the columns of `calls` (metadata under `metadata`).

    Returns the call ids inserted here. An id the partner has by now is skipped (ON CONFLICT
    DO NOTHING): on PostgreSQL a concurrent transaction may have stored it since
    existing_call_ids; this insert waits for that one to end. Rows go in id order so that
    two transactions inserting the same ids wait for each other instead of deadlocking.
    """
    if not rows:
        return set()
    stmt = (
        dialect_insert(conn.dialect.name)(Call)
        .on_conflict_do_nothing(index_elements=[Call.partner_pk, Call.call_id])
        .returning(Call.call_id)
    )
    result = await conn.execute(stmt, sorted(rows, key=lambda row: str(row["call_id"])))
    return set(result.scalars())
