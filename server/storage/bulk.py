"""Bulk writes of many rows in one statement, without SQLAlchemy's per-value processing.

Batch ingestion, batch updates and group commits write hundreds of rows per statement. Through
Core statements, each value of each row passes through a bind processor (SQLite's DATETIME one
formats every time in Python), which cost more of the write lock's time than the database did.
These helpers send plain values to the driver instead: the caller passes times through
`db_time` and JSON through `db_json`, which store exactly what the Core types would.

SQL is written once per shape with the driver's placeholders (`?` on SQLite, `$n` with
asyncpg). Only trusted names (table and column names from our models) go into the text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

# Bind parameters per statement: both engines allow 32,766 at least.
MAX_PARAMETERS = 30_000


# SQLAlchemy's SQLite DATETIME text: the wall time as given (UTC throughout this service).
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def db_time(conn: AsyncConnection, value: datetime) -> str | datetime:
    """A time as the driver takes it: SQLite stores SQLAlchemy's DATETIME text; asyncpg takes
    the datetime itself."""
    if conn.dialect.name == "sqlite":
        return value.strftime(SQLITE_TIME_FORMAT)
    return value


def db_json(value: Any) -> str:
    """A JSON column's value as both drivers take it (what SQLAlchemy's JSON type sends)."""
    if not value and isinstance(value, dict | list):  # most calls: no metadata, no fields
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value)


async def insert_rows(
    conn: AsyncConnection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    on_conflict_do_nothing: Sequence[str] = (),
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """INSERT rows (tuples in `columns` order), many per statement; the RETURNING rows of all.

    With `on_conflict_do_nothing` (the unique columns), rows that exist already are skipped
    and return nothing.
    """
    if not rows:
        return []
    width = len(columns)
    per_statement = max(1, MAX_PARAMETERS // width)
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    tail = ""
    if on_conflict_do_nothing:
        tail += f" ON CONFLICT ({', '.join(on_conflict_do_nothing)}) DO NOTHING"
    if returning:
        tail += f" RETURNING {', '.join(returning)}"
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        values = ", ".join([f"({', '.join('?' * width)})"] * len(chunk))
        params = tuple(value for row in chunk for value in row)
        result = await _execute(conn, head + values + tail, params)
        if returning:
            found.extend(tuple(row) for row in result)
    return found


async def select_in(
    conn: AsyncConnection,
    statement: str,
    params: Sequence[Any],
    values: Sequence[Any],
    *,
    suffix: str = "",
    chunk: int = 500,
) -> list[tuple[Any, ...]]:
    """Rows of `statement` (`?` placeholders for `params`, then `IN ({in})` where the text says
    `{in}`), for `values` in chunks of `chunk`, with `suffix` after each chunk's statement."""
    found: list[tuple[Any, ...]] = []
    for text, part in in_chunks(statement, values, chunk):
        found.extend(tuple(row) for row in await _execute(conn, text + suffix, (*params, *part)))
    return found


def in_chunks(
    statement: str, values: Sequence[Any], chunk: int = 500
) -> list[tuple[str, Sequence[Any]]]:
    """`statement` with its `{in}` as `?, ?, ...` for each chunk of `values`, with the chunk."""
    return [
        (statement.replace("{in}", ", ".join("?" * len(part))), part)
        for part in (values[start : start + chunk] for start in range(0, len(values), chunk))
    ]


def _numbered(conn: AsyncConnection, statement: str) -> str:
    """`?` placeholders as the driver wants them ($1, $2, ... with asyncpg)."""
    if conn.dialect.paramstyle == "numeric_dollar":
        parts = statement.split("?")
        return "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]
    return statement


async def _execute(conn: AsyncConnection, statement: str, params: Sequence[Any]) -> Any:
    return await conn.exec_driver_sql(_numbered(conn, statement), tuple(params))


async def execute_many(
    conn: AsyncConnection, statement: str, rows: Sequence[Sequence[Any]]
) -> None:
    """One statement (with `?` placeholders, numbered for asyncpg) run for every row."""
    if not rows:
        return
    await conn.exec_driver_sql(_numbered(conn, statement), list(rows))
