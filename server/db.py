"""Engines and units of work.

SQLite (the embedded default) gets one writer connection whose transactions
start with `BEGIN IMMEDIATE`, so concurrent writers queue in the pool instead
of failing with "database is locked" or sleeping in SQLite's busy handler, and
a small pool of read-only connections that never block on the writer (WAL).
PostgreSQL uses one pooled engine for both; writers lock the rows they change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from server.models import Base
from server.settings import Settings


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

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on success (before the caller replies) or rolls back."""
        async with self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Reads. On SQLite each statement sees the latest commit (no multi-statement snapshot)."""
        async with self.reader.begin() as conn:
            yield conn

    async def create_schema(self) -> None:
        """Create missing tables (idempotent)."""
        async with self.write() as conn:
            await conn.run_sync(Base.metadata.create_all)

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
