"""The change feed: every disposition change of a tenant, in commit order, resumable by cursor.

Cursors come from the history rows themselves (`seq`, one per change of a tenant, taken under
the tenant's FeedSequence row lock), so the feed is exactly what was committed: a watcher that
resumes after cursor N gets N+1, N+2, ... whichever process wrote them and whenever it restarted.

One FeedHub per process tracks the last cursor of every watched tenant and wakes the watchers
whose tenant moved. It learns of commits:
- PostgreSQL: pushed by every replica's writes (NOTIFY, storage/postgres_feed.py), as they
  commit. The cursors are also read when the listener (re)connects, since notifications sent
  while it was away are lost, and every `safety_poll_seconds` (a catch-up read).
- SQLite: this process's own commits wake it at once; other processes' commits are found by
  reading the cursors every `poll_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.db import Database
from server.errors import ServiceUnavailable, ValidationFailed
from server.records import Caller, ChangeRecord
from server.storage import history

log = logging.getLogger("disposition.feed")

ALL_SUB_TENANTS = "*"
PAGE = 500


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` pass. (asyncio.timeout, not wait_for: on Python 3.11,
    wait_for can swallow a cancellation that arrives as the event is set, and a task being
    stopped would then run on.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Changes in cursor order (empty for a heartbeat) and the cursor to resume from."""

    changes: list[ChangeRecord]
    cursor: int


class FeedHub:
    def __init__(
        self,
        db: Database,
        *,
        poll_seconds: float = 0.05,
        heartbeat_seconds: float = 15.0,
        safety_poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.safety_poll_seconds = max(poll_seconds, safety_poll_seconds)
        self._watchers: Counter[str] = Counter()
        self._connected = 0  # sum of _watchers, readable from another thread (metrics)
        self._last: dict[str, int] = {}
        self._moved = asyncio.Event()  # set and replaced whenever a watched tenant moves
        self._read_now = asyncio.Event()  # a commit of this process, or the listener is back
        self._poller: asyncio.Task[None] | None = None
        self._closed = False
        self._listener = db.cursor_listener(self._announced, self._listening)
        db.on_commit(self._committed_here)

    @property
    def watcher_count(self) -> int:
        """Watch streams currently connected to this process (all tenants)."""
        return self._connected

    @property
    def pushed(self) -> bool:
        """Whether commits are pushed to this process now (PostgreSQL's listener connected)."""
        return self._listener is not None and self._listener.listening

    async def close(self) -> None:
        """End every watch (with UNAVAILABLE, so clients reconnect) and stop listening."""
        self._closed = True
        self._wake()
        if self._poller is not None:
            self._poller.cancel()
        if self._listener is not None:
            await self._listener.close()

    async def watch(
        self, *, caller: Caller, after_cursor: int, start_at_latest: bool
    ) -> AsyncIterator[FeedBatch]:
        """The caller's tenant's changes after `after_cursor`, forever; heartbeats when idle.

        Sub-tenant `*` (`x-sub-tenant-id: *`) watches every sub-tenant of the tenant, else only
        the caller's sub-tenant. A heartbeat follows `heartbeat_seconds` after the last batch
        sent, also while other sub-tenants' changes keep the tenant moving.
        """
        if after_cursor < 0:
            raise ValidationFailed([("after_cursor", "after_cursor must not be less than 0")])
        tenant_id, sub_tenant_id = caller.scope
        only = None if sub_tenant_id == ALL_SUB_TENANTS else sub_tenant_id
        self._watchers[tenant_id] += 1
        self._connected += 1
        clock = asyncio.get_running_loop()
        try:
            self._start()
            known = await self._refresh(tenant_id)
            scanned = known if start_at_latest else after_cursor
            yield FeedBatch([], scanned)  # tells the client where it starts
            heartbeat_at = clock.time() + self.heartbeat_seconds
            while True:
                if known > scanned:
                    async with self.db.read() as conn:
                        rows = await history.changes_after(
                            conn, tenant_id=tenant_id, sub_tenant_id=only, after=scanned, limit=PAGE
                        )
                    rows = [row for row in rows if row.seq <= known]
                    # With a sub-tenant filter, an empty or short page means everything up to
                    # `known` was scanned; a full page resumes after its last row.
                    scanned = rows[-1].seq if len(rows) == PAGE else known
                    if rows:
                        yield FeedBatch(rows, scanned)
                        heartbeat_at = clock.time() + self.heartbeat_seconds
                    continue
                if not await self._wait_beyond(tenant_id, scanned, heartbeat_at):
                    yield FeedBatch([], scanned)
                    heartbeat_at = clock.time() + self.heartbeat_seconds
                known = self._last.get(tenant_id, 0)
        finally:
            self._connected -= 1
            self._watchers[tenant_id] -= 1
            if self._watchers[tenant_id] <= 0:
                del self._watchers[tenant_id]

    async def _refresh(self, tenant_id: str) -> int:
        async with self.db.read() as conn:
            found = await history.last_cursors(conn, tenant_ids=[tenant_id])
        self._advance(tenant_id, found.get(tenant_id, 0))
        return self._last.get(tenant_id, 0)

    async def _wait_beyond(self, tenant_id: str, cursor: int, deadline: float) -> bool:
        """Wait until the tenant's last cursor passes `cursor`; False at `deadline` (loop time)."""
        while not self._closed and self._last.get(tenant_id, 0) <= cursor:
            moved = self._moved  # taken before the check above holds: no wake-up is missed
            try:
                async with asyncio.timeout_at(deadline):
                    await moved.wait()
            except TimeoutError:
                return False
        if self._closed:
            raise ServiceUnavailable("The server is shutting down; reconnect with your cursor")
        return True

    def _advance(self, tenant_id: str, cursor: int) -> None:
        if cursor > self._last.get(tenant_id, 0):
            self._last[tenant_id] = cursor
            self._wake()

    def _wake(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    # -- how commits are learnt of ----------------------------------------------------------

    def _announced(self, tenant_id: str, cursor: int) -> None:
        """A commit of any replica (PostgreSQL's NOTIFY)."""
        if tenant_id in self._watchers:
            self._advance(tenant_id, cursor)

    def _committed_here(self) -> None:
        """A commit of this process: read the cursors now, unless commits are pushed (this one's
        notification is on its way too)."""
        if not self.pushed:
            self._read_now.set()

    def _listening(self, listening: bool) -> None:
        if listening:  # notifications may have been lost while it was away: read the cursors
            self._read_now.set()

    def _start(self) -> None:
        if self._listener is not None:
            self._listener.start()
        if self._poller is None or self._poller.done():
            # In a context of its own: the poller serves every watcher, not the request of the
            # first one (nor its trace).
            self._poller = asyncio.create_task(
                self._poll(), name="feed-poller", context=contextvars.Context()
            )

    async def _poll(self) -> None:
        failing = False
        while self._watchers and not self._closed:
            # With commits pushed, these reads are only a safety net.
            period = self.safety_poll_seconds if self.pushed else self.poll_seconds
            await wait_or_timeout(self._read_now, period)
            self._read_now.clear()
            try:
                async with self.db.read() as conn:
                    found = await history.last_cursors(conn, tenant_ids=list(self._watchers))
                failing = False
            except Exception:
                if not failing:  # once per outage
                    log.exception("change feed: cannot read the tenants' cursors")
                failing = True
                continue
            for tenant_id, cursor in found.items():
                self._advance(tenant_id, cursor)
