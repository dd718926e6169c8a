"""Storage functions: keyword-only arguments, Core statements, never commit on their own.

The unit of work (`Database.write()` / `Database.read()`) is owned by the caller.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite


def dialect_insert(dialect: str) -> Any:
    """The engine's INSERT construct, with ON CONFLICT (same syntax on SQLite and PostgreSQL)."""
    return sqlite.insert if dialect == "sqlite" else postgresql.insert


def as_utc(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite returns naive datetimes; they are UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
