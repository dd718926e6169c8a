"""Engines and units of work.

SQLite (the embedded default) gets one writer connection whose transactions
start with `BEGIN IMMEDIATE`, so concurrent writers queue in the pool instead
of failing with "database is locked" or sleeping in SQLite's busy handler, and
a small pool of read-only connections that never block on the writer (WAL).
PostgreSQL uses one pooled engine for both; writers lock the rows they change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Connection, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from server.models import Base
from server.settings import Settings


class SchemaOutdated(RuntimeError):
    """The database's tables lack columns this version needs."""


def _missing_columns(conn: Connection) -> list[str]:
    inspector = inspect(conn)
    missing: list[str] = []
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in present]
    return missing


class Database:
    """The service's two ways into storage: `read()` and `write()` units of work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.is_sqlite:
            path = settings.sqlite_path()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = create_async_engine(
                settings.database_url, pool_size=1, max_overflow=0, pool_timeout=300
            )
            self.reader = create_async_engine(settings.database_url, pool_size=4, max_overflow=0)
            _sqlite_pragmas(self.writer.sync_engine, settings, begin="BEGIN IMMEDIATE")
            # Readers run each statement in its own implicit transaction (no BEGIN round trip):
            # every hot-path read is a single statement.
            _sqlite_pragmas(self.reader.sync_engine, settings, begin=None)
        else:
            self.writer = create_async_engine(
                settings.database_url, pool_size=10, max_overflow=10, pool_pre_ping=True
            )
            self.reader = self.writer
        self._commit_listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every successful write() commit of this process."""
        self._commit_listeners.append(listener)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on success (before the caller replies) or rolls back."""
        async with self.writer.begin() as conn:
            yield conn
        for listener in self._commit_listeners:
            listener()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Reads. On SQLite each statement sees the latest commit (no multi-statement snapshot)."""
        async with self.reader.begin() as conn:
            yield conn

    async def create_schema(self) -> None:
        """Create missing tables (idempotent); refuse a database whose tables are out of date."""
        async with self.write() as conn:
            await conn.run_sync(Base.metadata.create_all)
            missing = await conn.run_sync(_missing_columns)
        if missing:
            raise SchemaOutdated(
                f"{self.settings.database_url}: the database predates this version "
                f"(missing columns: {', '.join(missing)}); recreate it or migrate it"
            )

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


def _sqlite_pragmas(engine: Engine, settings: Settings, *, begin: str | None) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level; the "begin" event below emits BEGIN where wanted.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    if begin is not None:

        @event.listens_for(engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)
