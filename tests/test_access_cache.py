"""Credentials and grants cached in memory: no database read on a warm request, and every admin
change (from another process, the admin CLI) reaches a running server within a poll period."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack import Credentials, ServerProcess, onboard
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.errors import Forbidden
from server.runtime.access_cache import AccessCache
from server.storage import partners
from server.usecases import access
from tests.grpc_helpers import fail, ingest, update_request
from tests.support import BIN, REPO, settings_for


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


async def test_a_warm_request_reads_no_credentials(
    app: App, dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    assert app.access_cache is not None
    await app.access_cache.poll_once()  # has seen the fixture's onboarding (no poll in flight)
    await ingest(ingestion, partner, "warm")  # the first request of this key and scope reads
    with access_reads(app.db.reader) as seen:
        for status in ("a", "b", "c"):
            reply = await dispositions.UpdateDispositionStatus(
                update_request("warm", status), metadata=partner.metadata()
            )
            assert reply.success
        other_tenant = partner.metadata(x_tenant_id="tenant2")
        for _ in range(2):  # a refused grant is remembered as well
            error = await fail(
                dispositions.UpdateDispositionStatus(
                    update_request("warm", "d"), metadata=other_tenant
                )
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        wrong_secret = Credentials("123", partner.api_key, "not-the-secret").metadata()
        error = await fail(
            dispositions.UpdateDispositionStatus(update_request("warm", "e"), metadata=wrong_secret)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # Only tenant2's grant was unknown: one statement, credential and grant together.
    assert len(seen) == 1, seen
    assert "partner_credentials" in seen[0] and "tenant_grants" in seen[0]


async def test_without_the_cache_each_request_reads_once(
    database_url: str, partner: Credentials
) -> None:
    """ACCESS_CACHE_SECONDS=0: one read of credential and grant per request, not one each."""
    server = App(
        settings_for(database_url, access_cache_seconds=0),
        Database(settings_for(database_url)),
    )
    await server.start()
    try:
        assert server.access_cache is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = disposition_grpc.DispositionServiceStub(channel)
            with access_reads(server.db.reader) as seen:
                error = await fail(
                    stub.UpdateDispositionStatus(
                        update_request("nobody", "x"), metadata=partner.metadata()
                    )
                )
                assert error.code() == grpc.StatusCode.NOT_FOUND
                error = await fail(
                    stub.UpdateDispositionStatus(
                        update_request("nobody", "x"), metadata=partner.metadata(x_tenant_id="t2")
                    )
                )
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(grace=1)
    assert len(seen) == 2, seen
    assert all("tenant_grants" in s and "partner_credentials" in s for s in seen)


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


def _admin(database_url: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [str(BIN / "disposition-admin"), *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_the_admin_cli_reaches_a_running_server(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    """Two processes, as in production: a rotated secret and a disabled partner stop working
    on the running server without a restart, a re-enabled partner works again."""
    issued = _admin(database_url, "partner", "create", "--partner-id", "cli", "--name", "C")
    _admin(database_url, "grant", "--partner-id", "cli", "--tenant-id", "tenant1",
           "--sub-tenant-id", "subtenant1")  # fmt: skip
    old = Credentials("cli", issued["api_key"], issued["api_secret"])
    server = ServerProcess(database_url, tmp_path / "server.log")
    server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = disposition_grpc.DispositionServiceStub(channel)

            async def code(creds: Credentials) -> grpc.StatusCode:
                try:
                    await stub.UpdateDispositionStatus(
                        update_request("nobody", "x"), metadata=creds.metadata()
                    )
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            async def becomes(creds: Credentials, expected: grpc.StatusCode) -> None:
                deadline = asyncio.get_running_loop().time() + 5
                while (found := await code(creds)) != expected:
                    assert asyncio.get_running_loop().time() < deadline, found
                    await asyncio.sleep(0.01)

            assert await code(old) == grpc.StatusCode.NOT_FOUND  # authenticated, cached
            rotated = _admin(database_url, "partner", "rotate-secret", "--partner-id", "cli")
            new = Credentials("cli", rotated["api_key"], rotated["api_secret"])
            await becomes(old, grpc.StatusCode.PERMISSION_DENIED)
            assert await code(new) == grpc.StatusCode.NOT_FOUND
            _admin(database_url, "partner", "disable", "--partner-id", "cli")
            await becomes(new, grpc.StatusCode.PERMISSION_DENIED)
            _admin(database_url, "partner", "enable", "--partner-id", "cli")
            await becomes(new, grpc.StatusCode.NOT_FOUND)
            assert await code(old) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()
