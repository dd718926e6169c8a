"""Credentials and tenant grants cached in memory, dropped as soon as the access version moves.

The credential of an API key and a partner's grant for a tenant are kept after the first read,
so that authentication costs no database read. They are trusted only while:

- the entry is younger than `ttl_seconds` (a safety net; the version poll does the real work);
- this process has read the access version (`access_version`, moved by every partner, credential
  or grant change, see server.usecases.partners) within `stale_after_seconds`. A poller reads it
  every `poll_seconds` and empties the cache when it moved, so a revoked, rotated or disabled
  credential (or a withdrawn grant) stops working everywhere within one poll period. If the
  poll cannot reach the database, the cache stops being trusted and every request reads again.

A read that started before a change and finishes after the poller emptied the cache is not
stored (the generation check), so an entry never outlives the change it predates. Unknown keys are
never cached: a key created a moment ago works at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from server.db import Database
from server.records import CredentialRecord
from server.storage import partners

log = logging.getLogger("disposition.access")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class _Entry:
    value: CredentialRecord | bool
    expires: float


class AccessCache:
    def __init__(
        self,
        db: Database,
        *,
        ttl_seconds: float = 60.0,
        poll_seconds: float = 0.05,
        stale_after_seconds: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.ttl_seconds = ttl_seconds
        self.poll_seconds = poll_seconds
        self.stale_after_seconds = max(stale_after_seconds, 2 * poll_seconds)
        self.max_entries = max_entries
        self.clock = clock
        self.generation = 0  # moves whenever the cache is emptied
        self.hits = 0  # lookups served from memory (tests read it)
        self._version: int | None = None
        self._trusted_until = 0.0
        self._credentials: dict[str, _Entry] = {}
        self._grants: dict[tuple[int, str, str], _Entry] = {}
        self._poller: asyncio.Task[None] | None = None

    # -- lookups --------------------------------------------------------------------------

    def credential(self, api_key: str) -> CredentialRecord | None:
        """The cached credential of this key, if any and still trusted."""
        found = self._get(self._credentials, api_key)
        return found if isinstance(found, CredentialRecord) else None

    def grant(self, partner_pk: int, tenant_id: str, sub_tenant_id: str) -> bool | None:
        """The cached grant decision (True/False), or None when unknown."""
        found = self._get(self._grants, (partner_pk, tenant_id, sub_tenant_id))
        return found if isinstance(found, bool) else None

    def _get(self, entries: dict[K, _Entry], key: K) -> CredentialRecord | bool | None:
        now = self.clock()
        entry = entries.get(key)
        if entry is None or now >= entry.expires or now >= self._trusted_until:
            return None
        self.hits += 1
        return entry.value

    # -- stores ---------------------------------------------------------------------------

    def store_credential(self, generation: int, api_key: str, record: CredentialRecord) -> None:
        """Keep `record`, read while the cache was at `generation` (dropped if it moved since)."""
        self._put(self._credentials, generation, api_key, record)

    def store_grant(
        self, generation: int, partner_pk: int, tenant_id: str, sub_tenant_id: str, granted: bool
    ) -> None:
        self._put(self._grants, generation, (partner_pk, tenant_id, sub_tenant_id), granted)

    def _put(
        self, entries: dict[K, _Entry], generation: int, key: K, value: CredentialRecord | bool
    ) -> None:
        if generation != self.generation or self._version is None:
            return
        if len(entries) >= self.max_entries:  # drop the oldest (dicts keep insertion order)
            entries.pop(next(iter(entries)))
        entries[key] = _Entry(value, self.clock() + self.ttl_seconds)

    def clear(self) -> None:
        self.generation += 1
        self._credentials.clear()
        self._grants.clear()

    # -- the version poll -----------------------------------------------------------------

    async def start(self) -> None:
        """Read the version once (so the cache is usable at once), then poll it."""
        await self.poll_once()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="access-cache-poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self.clear()
        self._trusted_until = 0.0

    async def poll_once(self) -> bool:
        """Read the access version; empty the cache if it moved. False if it could not be read."""
        try:
            async with self.db.read() as conn:
                version = await partners.access_version(conn)
        except Exception:
            if self.clock() < self._trusted_until + self.poll_seconds:  # log once per outage
                log.warning("access cache: cannot read the access version", exc_info=True)
            return False
        if version is None:  # no version row: nothing tells us about changes, never trust
            self.clear()
            self._version = None
            self._trusted_until = 0.0
            return False
        if version != self._version:
            self.clear()
            self._version = version
        self._trusted_until = self.clock() + self.stale_after_seconds
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.poll_once()
