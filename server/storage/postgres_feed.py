"""PostgreSQL: each tenant's new last feed cursor, pushed to every replica as it commits.

Every unit of work that writes history rows announces, in the same statement, each tenant's new
last cursor with NOTIFY (postgres_writer.FEED_CHANNEL), which PostgreSQL delivers at commit to
every session that LISTENs. A CursorListener is one such session per process, on a connection
of its own: it passes `(tenant, last cursor)` on, for the schema of this database only (several
schemas may share a database and its channels).

Notifications sent while the listener is not connected are lost; the listener says so
(`on_state(False)`), reconnects with a growing pause, and says when it listens again
(`on_state(True)`), so that its user reads the cursors then (the catch-up read).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from server.storage.postgres_writer import FEED_CHANNEL

log = logging.getLogger("disposition.feed")

APPLICATION_NAME = "disposition-feed"  # the listener's sessions, as pg_stat_activity shows them


class CursorListener:
    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None,
        on_cursor: Callable[[str, int], None],
        on_state: Callable[[bool], None],
        max_pause: float = 2.0,
        check_seconds: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.on_cursor = on_cursor
        self.on_state = on_state
        self.max_pause = max_pause
        self.check_seconds = check_seconds
        self.listening = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            # In a context of its own, not the request's that started it (nor its trace).
            self._task = asyncio.create_task(
                self._run(), name="feed-listener", context=contextvars.Context()
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        pause = 0.05
        failing = False
        while True:
            settings = {"application_name": APPLICATION_NAME}
            if self.schema is not None:
                settings["search_path"] = self.schema
            try:
                conn = await asyncpg.connect(self.dsn, server_settings=settings)
            except (OSError, asyncpg.PostgresError) as exc:
                if not failing:
                    log.warning("change feed: cannot listen for commits: %r", exc)
                failing = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.max_pause)
                continue
            if failing:
                log.info("change feed: listening for commits again")
            failing, pause = False, 0.05
            try:
                await self._listen(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("change feed: lost the commit listener: %r", exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1)

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Pass on this schema's notifications until the connection is lost (a query every
        `check_seconds` finds a connection that went away silently)."""
        schema = await conn.fetchval("SELECT current_schema()")
        lost = asyncio.get_running_loop().create_future()

        def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            found, tenant_id, last_seq = json.loads(payload)
            if found == schema:
                self.on_cursor(tenant_id, int(last_seq))

        conn.add_termination_listener(lambda _conn: _settle(lost))
        await conn.add_listener(FEED_CHANNEL, notified)
        self.listening = True
        self.on_state(True)
        try:
            while not lost.done():
                done, _ = await asyncio.wait([lost], timeout=self.check_seconds)
                if not done:
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self.check_seconds)
        finally:
            self.listening = False
            self.on_state(False)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
