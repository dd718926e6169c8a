"""Engines and units of work.

Writes of the partner API are units of work (storage/units.py), run by an engine of their own:
- SQLite (the embedded default): each unit whole in a writer thread on its own sqlite3
  connection (storage/sqlite_writer.py);
- PostgreSQL: two statements through an asyncpg pool of its own (storage/postgres_writer.py).

Everything else goes through SQLAlchemy: `read()` (autocommit: each statement its own snapshot)
and `write()` (a transaction, for the admin's writes and migrations). On SQLite the SQLAlchemy
writer is one connection whose transactions start with `BEGIN IMMEDIATE`, and one lock covers
it and the writer thread, so the two writer connections of a process queue here instead of in
SQLite's busy handler; readers never block on the writer (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from server import schema
from server.schema import SchemaOutdated
from server.settings import Settings
from server.storage.postgres_feed import CursorListener
from server.storage.postgres_writer import PostgresUnits
from server.storage.sqlite_writer import SqliteUnits, SqliteWriter
from server.storage.units import Units

__all__ = ["Database", "SchemaOutdated"]

T = TypeVar("T")


class Database:
    """The service's two ways into storage: `read()` and `write()` units of work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._commit_listeners: list[Callable[[], None]] = []
        # SQLite: one writer at a time in this process, whichever connection it uses.
        self._write_lock: asyncio.Lock | None = None
        self.units: Units
        if settings.is_sqlite:
            path = settings.sqlite_path()
            assert path is not None  # Settings.check refuses in-memory databases
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = create_async_engine(
                settings.database_url, pool_size=1, max_overflow=0, pool_timeout=300
            )
            # Reads are autocommit at the driver (below): no COMMIT or ROLLBACK round trips.
            self.reader = create_async_engine(
                settings.database_url,
                pool_size=4,
                max_overflow=0,
                isolation_level="AUTOCOMMIT",
                skip_autocommit_rollback=True,
            )
            _sqlite_pragmas(self.writer.sync_engine, settings, begin="BEGIN IMMEDIATE")
            # Readers run each statement in its own implicit transaction (no BEGIN round trip):
            # every hot-path read is a single statement.
            _sqlite_pragmas(self.reader.sync_engine, settings, begin=None)
            self.sqlite_writer: SqliteWriter | None = SqliteWriter(
                path, synchronous=settings.sqlite_synchronous
            )
            self.units = SqliteUnits(self.sqlite_writer, self.write_in_thread)
        else:
            # `?search_path=<schema>` is ours, not asyncpg's: it becomes a server setting.
            url = make_url(settings.database_url).difference_update_query(["search_path"])
            server_settings = {}
            if settings.database_schema is not None:
                server_settings["search_path"] = settings.database_schema
            connect_args = {"server_settings": server_settings}
            # The admin's writes and migrations: rare, so each checkout checks its connection.
            self.writer = create_async_engine(
                url, pool_size=2, max_overflow=8, pool_pre_ping=True, connect_args=connect_args
            )
            # Reads: autocommit (no BEGIN and COMMIT round trips) and no ping per checkout; a
            # connection the server dropped fails its statement once and the pool starts over.
            self.reader = create_async_engine(
                url,
                pool_size=settings.database_pool_size,
                max_overflow=0,
                isolation_level="AUTOCOMMIT",
                skip_autocommit_rollback=True,
                connect_args=connect_args,
            )
            self.sqlite_writer = None
            self.units = PostgresUnits(
                url.set(drivername="postgresql").render_as_string(hide_password=False),
                schema=settings.database_schema,
                pool_size=settings.database_pool_size,
                on_commit=self._committed,
            )

    def cursor_listener(
        self, on_cursor: Callable[[str, int], None], on_state: Callable[[bool], None]
    ) -> CursorListener | None:
        """PostgreSQL: a listener for every replica's commits (storage/postgres_feed.py), not yet
        started; None on SQLite, where other processes' commits are found by polling."""
        if not isinstance(self.units, PostgresUnits):
            return None
        return CursorListener(
            self.units.dsn,
            schema=self.settings.database_schema,
            on_cursor=on_cursor,
            on_state=on_state,
        )

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every successful write() commit of this process."""
        self._commit_listeners.append(listener)

    def _lock(self) -> contextlib.AbstractAsyncContextManager[Any]:
        if self.sqlite_writer is None:
            return contextlib.nullcontext()
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        return self._write_lock

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on success (before the caller replies) or rolls back."""
        async with self._lock(), self.writer.begin() as conn:
            yield conn
        self._committed()

    async def write_in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite: `work(conn)` as one transaction in the writer's thread (sqlite_writer.py),
        committed before this returns."""
        assert self.sqlite_writer is not None
        async with self._lock():
            result = await self.sqlite_writer.transaction(work)
        self._committed()
        return result

    def _committed(self) -> None:
        for listener in self._commit_listeners:
            listener()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Reads; each statement sees the latest commit (no multi-statement snapshot)."""
        async with self.reader.connect() as conn:  # autocommit: each statement its own snapshot
            yield conn

    async def create_schema(self) -> str:
        """Migrate the database to the current schema (Alembic head; idempotent).

        Returns the head revision. A database created before migrations existed is stamped
        when complete, else refused with SchemaOutdated naming what it lacks.
        """
        url, search_path = self._public_url(), self.settings.database_schema

        def upgrade(conn: Connection) -> str:
            return schema.upgrade(conn, url=url, schema=search_path)

        async with self.write() as conn:
            return await conn.run_sync(upgrade)

    async def check_schema(self) -> None:
        """Refuse (SchemaOutdated) a database that is not at the current schema."""
        url = self._public_url()
        async with self.read() as conn:
            await conn.run_sync(lambda sync: schema.check_head(sync, url=url))

    async def prepare_schema(self) -> None:
        """At a server's start: SQLite (embedded, one node) migrates itself; PostgreSQL is
        migrated by the operator (`make migrate`) and only checked, so replicas never race."""
        if self.settings.is_sqlite:
            await self.create_schema()
        else:
            await self.check_schema()

    def _public_url(self) -> str:
        return make_url(self.settings.database_url).render_as_string(hide_password=True)

    async def dispose(self) -> None:
        await self.units.close()
        await self.writer.dispose()
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
