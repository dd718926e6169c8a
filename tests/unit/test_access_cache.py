"""The access cache (server/runtime/access_cache.py) polled by hand with a stand-in clock: entries
expire, need a recent poll, never keep a read that straddles a change, and unknown keys are not
cached (in a running server: tests/grpc_api/test_access_cache.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from devstack import Credentials, onboard
from server.db import Database
from server.errors import Forbidden
from server.runtime.access_cache import AccessCache
from server.storage import partners
from server.usecases import access
from tests.support.databases import access_reads


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def cache(db: Database, partner: Credentials) -> AsyncIterator[tuple[AccessCache, Clock]]:
    """A cache polled by hand, made after the partner (whose onboarding moved the version)."""
    clock = Clock()
    made = AccessCache(db, ttl_seconds=30, poll_seconds=0.05, stale_after_seconds=1, clock=clock)
    assert await made.poll_once()
    yield made, clock
    await made.close()


async def login(db: Database, cache: AccessCache, creds: Credentials) -> access.Principal:
    return await access.authenticate(
        db,
        api_key=creds.api_key,
        api_secret=creds.api_secret,
        partner_id=None,
        tenant=("tenant1", "subtenant1"),
        cache=cache,
    )


async def test_entries_expire_and_need_a_recent_poll(
    db: Database, cache: tuple[AccessCache, Clock], partner: Credentials
) -> None:
    cached, clock = cache
    with access_reads(db.reader) as seen:
        await login(db, cached, partner)
        await login(db, cached, partner)
        assert len(seen) == 1
        clock.now += 1.5  # no successful poll for longer than stale_after: not trusted
        await login(db, cached, partner)
        assert len(seen) == 2
        assert await cached.poll_once()
        await login(db, cached, partner)
        assert len(seen) == 2
        clock.now += 31  # older than the TTL: read again, even with fresh polls
        assert await cached.poll_once()
        await login(db, cached, partner)
        assert len(seen) == 3


async def test_a_read_that_straddles_a_change_is_not_kept(
    db: Database, cache: tuple[AccessCache, Clock], partner: Credentials
) -> None:
    cached, _ = cache
    async with db.read() as conn:
        found = await partners.find_active_credential(conn, api_key=partner.api_key)
    assert found is not None
    generation = cached.generation
    # Meanwhile the admin changed something and the poller emptied the cache:
    async with db.write() as conn:
        await partners.bump_access_version(conn)
    assert await cached.poll_once()
    cached.store_credential(generation, partner.api_key, found)
    assert cached.credential(partner.api_key) is None


async def test_an_unreadable_version_stops_the_cache(
    db: Database, cache: tuple[AccessCache, Clock], partner: Credentials
) -> None:
    cached, clock = cache
    await login(db, cached, partner)
    assert cached.credential(partner.api_key) is not None
    async with db.write() as conn:
        await conn.execute(text("DELETE FROM access_version"))
    assert not await cached.poll_once()  # no row: changes cannot be seen, so trust nothing
    assert cached.credential(partner.api_key) is None
    await login(db, cached, partner)
    assert cached.credential(partner.api_key) is None
    async with db.write() as conn:
        await partners.bump_access_version(conn)  # recreates the row
    assert await cached.poll_once()
    await login(db, cached, partner)
    assert cached.credential(partner.api_key) is not None
    await db.dispose()  # the database goes away: the cache is trusted for stale_after, no more
    clock.now += 0.5
    assert cached.credential(partner.api_key) is not None
    clock.now += 1
    assert cached.credential(partner.api_key) is None


async def test_unknown_keys_are_not_cached(db: Database, cache: tuple[AccessCache, Clock]) -> None:
    cached, _ = cache
    ghost = Credentials("ghost", "k-ghost", "s-ghost")
    with pytest.raises(Forbidden):
        await login(db, cached, ghost)
    issued = await onboard(db, "late")  # the key now exists: it works at once
    principal = await login(db, cached, Credentials("late", issued.api_key, issued.api_secret))
    assert principal.partner_id == "late"
