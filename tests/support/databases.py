"""Databases of either engine for tests: settings for a URL, SQL, row counts, the statements a
block reads, the run's PostgreSQL schemas, fault injection, and running a coroutine from
synchronous code."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Executable, Row, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db import Database
from server.models import Base
from server.settings import Settings


def settings_for(database_url: str, **overrides: Any) -> Settings:
    return Settings(database_url=database_url, grpc_port=0, **overrides)


def run(coro: Any) -> Any:
    """Run a coroutine from synchronous test code (its own event loop)."""
    return asyncio.run(coro)


def run_in_thread(coro: Any) -> Any:
    """Run a coroutine to completion on its own loop in a thread (callable from async code too)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def sql(database_url: str, statement: str | Executable, **params: Any) -> list[Row[Any]]:
    """Run one statement on either engine, committed; the rows it returns (if any).

    A string is SQL text with `:name` parameters, portable between SQLite and PostgreSQL.
    """

    async def go() -> list[Row[Any]]:
        db = Database(settings_for(database_url))
        try:
            async with db.write() as conn:
                stmt = text(statement) if isinstance(statement, str) else statement
                result = await conn.execute(stmt, params)
                return list(result.all()) if result.returns_rows else []
        finally:
            await db.dispose()

    return run_in_thread(go())  # type: ignore[no-any-return]


async def count_rows(db: Database, model: Any) -> int:
    """How many rows a model's table holds."""
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


@contextmanager
def access_reads(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements that read credentials or grants on `engine` within the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "partner_credentials" in statement or "tenant_grants" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


class PostgresSchemas:
    """This test run's schemas in TEST_POSTGRES_URL's database: `t_<pid>_<random>_<n>`.

    Each is created and migrated by Database.create_schema (DATABASE_URL's `?search_path=`)
    and dropped by drop_all() at the end of the run; nothing else in the database is touched.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.prefix = f"t_{os.getpid()}_{secrets.token_hex(3)}"
        self.created: list[str] = []

    def url(self, schema: str) -> str:
        url = make_url(self.base_url).update_query_dict({"search_path": schema})
        return url.render_as_string(hide_password=False)

    def new(self) -> str:
        """The URL of a new schema, migrated to head."""
        schema = f"{self.prefix}_{len(self.created)}"
        self.created.append(schema)
        url = self.url(schema)

        async def migrate() -> None:
            db = Database(settings_for(url))
            try:
                await db.create_schema()
            finally:
                await db.dispose()

        run_in_thread(migrate())
        return url

    def empty(self, url: str) -> str:
        """Delete every row of a schema made by new(), restarting its id sequences."""
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        sql(url, f"TRUNCATE {tables} RESTART IDENTITY")
        return url

    def drop_all(self) -> None:
        async def drop() -> None:
            db = Database(settings_for(self.base_url))
            try:
                async with db.write() as conn:
                    for schema in self.created:
                        await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await db.dispose()

        run_in_thread(drop())


class CommitWatch:
    """Whether anybody committed a change to a SQLite file: `PRAGMA data_version`, read on a
    connection of its own, moves whenever another connection commits one."""

    def __init__(self, path: Path, *, drained: bool = True) -> None:
        """`drained`: a dispatcher drains the webhook outbox (False: nothing delivers, so its
        rows stay and nothing writes behind the requests' backs)."""
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._drained = drained

    def version(self) -> int:
        """The version once the server's background writes have settled: an accepted batch
        call's webhook outbox row is fanned out (and deleted) just after the reply, a write the
        next request must not be blamed for."""
        deadline = time.monotonic() + 10
        while (
            self._drained and self._conn.execute("SELECT 1 FROM webhook_outbox LIMIT 1").fetchone()
        ):
            assert time.monotonic() < deadline, "the webhook outbox is never drained"
            time.sleep(0.01)
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])


@asynccontextmanager
async def failing_inserts(
    db: Database, table: str, *, when: str = "true", message: str = "disk full (injected)"
) -> AsyncIterator[None]:
    """INSERTs into `table` whose new row meets `when` (SQL on NEW) fail inside the database (a
    trigger) until the block ends: what a full disk does mid-transaction, on either engine."""
    name = f"fail_{table}"
    async with db.write() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {when}"
                f" BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        else:
            await conn.exec_driver_sql(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN RAISE EXCEPTION '{message}'; END $$"
            )
            await conn.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW"
                f" WHEN ({when}) EXECUTE FUNCTION {name}()"
            )
    try:
        yield
    finally:
        async with db.write() as conn:
            await conn.exec_driver_sql(
                f"DROP TRIGGER {name}" + ("" if conn.dialect.name == "sqlite" else f" ON {table}")
            )
            if conn.dialect.name != "sqlite":
                await conn.exec_driver_sql(f"DROP FUNCTION {name}()")
