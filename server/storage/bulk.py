"""Helpers for statements over many values, as the SQLite writer sends them to sqlite3.

Units of work write hundreds of rows at a time; SQLAlchemy's per-value processing (SQLite's
DATETIME bind processor formats every time in Python) would cost more than the database.
The writer sends plain values instead, exactly what the Core types would store: times in
SQLITE_TIME_FORMAT, JSON through `db_json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# Bind parameters per statement: SQLite allows 32,766 at least.
MAX_PARAMETERS = 30_000


# SQLAlchemy's SQLite DATETIME text: the wall time as given (UTC throughout this service).
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def db_json(value: Any) -> str:
    """A JSON column's value as SQLAlchemy's JSON type would send it."""
    if not value and isinstance(value, dict | list):  # most calls: no metadata, no fields
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value)


def in_chunks(
    statement: str, values: Sequence[Any], chunk: int = 500
) -> list[tuple[str, Sequence[Any]]]:
    """`statement` with its `{in}` as `?, ?, ...` for each chunk of `values`, with the chunk."""
    return [
        (statement.replace("{in}", ", ".join("?" * len(part))), part)
        for part in (values[start : start + chunk] for start in range(0, len(values), chunk))
    ]
