"""Calls ingested through the batch-call API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.models import Call


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


async def insert_calls(conn: AsyncConnection, *, rows: Sequence[dict[str, Any]]) -> None:
    """Insert calls; each dict has the columns of `calls` (metadata under `metadata`)."""
    if rows:
        await conn.execute(insert(Call), list(rows))
