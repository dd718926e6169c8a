"""Storage: SQL only. Functions with keyword-only arguments over Core statements, which never
commit on their own, and the engines that run units of work (units.py is their port).

The transaction (`Database.write()` / `Database.read()`, server/db.py) is owned by the caller.
What storage reads and writes are the record types of server/records.py. It may import
server.models and server.records, nothing of rules, use cases, runtime or transport.
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
