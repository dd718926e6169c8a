"""The Redis rate limiter: real Redis (TEST_REDIS_URL), real servers, real outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from devstack import free_port, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.runtime.ratelimit import Quota, RedisRateLimiter
from tests.support.databases import settings_for
from tests.support.grpc_calls import details, ingest, update_request

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
requires_redis = pytest.mark.skipif(
    not REDIS_URL, reason="TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)"
)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    value = f"test-{uuid.uuid4().hex}:"
    yield value
    if REDIS_URL:
        async with redis.Redis.from_url(REDIS_URL) as client:
            keys = [key async for key in client.scan_iter(match=f"{value}*")]
            if keys:
                await client.delete(*keys)


def limiter(prefix: str, **options: object) -> RedisRateLimiter:
    return RedisRateLimiter.from_url(REDIS_URL, key_prefix=prefix, **options)  # type: ignore[arg-type]


async def fresh_window(margin: float = 3.0) -> None:
    """Wait, if need be, so that the next `margin` seconds stay in one 60-second window."""
    into = time.time() % 60
    if into > 60 - margin:
        await asyncio.sleep(60 - into + 0.05)


@requires_redis
async def test_fixed_window_like_the_in_process_limiter(prefix: str) -> None:
    now = [1_800_000_000 + 23.2]  # 23.2 s into a window (1_800_000_000 is a multiple of 60)
    limits = limiter(prefix, clock=lambda: now[0])
    try:
        assert [await limits.hit("p", 3) for _ in range(3)] == [None, None, None]
        # The window ends 36.8 s later: the wait is rounded up to whole seconds.
        assert [await limits.hit("p", 3) for _ in range(2)] == [37, 37]
        assert await limits.hit("q", 3) is None  # per partner
        key = f"{prefix}ratelimit:p:{1_800_000_000 // 60}"
        assert await limits.client.get(key) == b"3"  # what was granted, never above the limit
        assert 35_000 < await limits.client.pttl(key) <= 36_800  # gone when the window ends
        now[0] += 37  # the next window
        assert await limits.hit("p", 3) is None
        now[0] += 59.6  # 0.2 s before the end of that window: a wait is at least 1 second
        assert [await limits.hit("r", 1) for _ in range(2)] == [None, 1]
    finally:
        await limits.close()


@requires_redis
async def test_the_quota_comes_from_the_lease_without_a_round_trip(prefix: str) -> None:
    now = [1_800_000_000 + 23.2]  # 36.8 s before the window ends
    one, other = limiter(prefix, clock=lambda: now[0]), limiter(prefix, clock=lambda: now[0])
    key = f"{prefix}ratelimit:p:{1_800_000_000 // 60}"
    try:
        assert one.quota("p", 10) == Quota(10, 10, 37, 60)  # nothing asked of Redis yet
        assert await other.hit("p", 10) is None  # another replica's request
        assert await one.hit("p", 10) is None
        granted = int(await one.client.get(key))  # both replicas' leases, as Redis counts them
        unused = one._leases["p"].left  # this replica's, still its own to allow
        one._script = None  # type: ignore[assignment]  # a round trip now would fail
        assert one.quota("p", 10) == Quota(10, 10 - granted + unused, 37, 60)
        assert granted - unused >= 2  # the other replica's request is counted
    finally:
        await one.close()
        await other.close()


@requires_redis
async def test_real_clock_allows_exactly_the_limit(prefix: str) -> None:
    await fresh_window()
    limits = limiter(prefix)
    try:
        results = [await limits.hit("partner", 5) for _ in range(8)]
    finally:
        await limits.close()
    assert results[:5] == [None] * 5
    refused = results[5:]
    assert all(isinstance(wait, int) and 1 <= wait <= 60 for wait in refused), refused
    assert refused == sorted(refused, reverse=True)  # the same window end, counted down


@requires_redis
async def test_replicas_lease_requests_and_allow_exactly_the_limit_together(prefix: str) -> None:
    """Two limiters (two replicas) under a burst: far fewer round trips than requests, and
    exactly the limit allowed in all."""
    await fresh_window(margin=10)
    replicas = [
        limiter(prefix, timeout=5),
        limiter(prefix, timeout=5),
    ]  # a busy machine: no fail-open
    calls = [0, 0]
    for n, replica in enumerate(replicas):
        script = replica._script

        async def counted(*args: object, n: int = n, script: Any = script, **kw: object) -> Any:
            calls[n] += 1
            return await script(*args, **kw)

        replica._script = counted  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(replicas[i % 2].hit("p", 500) for i in range(2000)))
    finally:
        for replica in replicas:
            await replica.close()
    assert sum(result is None for result in results) == 500
    assert all(result is None or 1 <= result <= 60 for result in results)
    assert sum(calls) < 500 / 2, calls  # leases of several requests each


@requires_redis
async def test_a_full_window_opens_again_when_the_limit_is_raised(prefix: str) -> None:
    await fresh_window()
    limits = limiter(prefix)
    try:
        assert [await limits.hit("p", 2) for _ in range(3)][2] is not None  # full at 2
        assert await limits.hit("p", 2) is not None  # refused without asking Redis
        assert [await limits.hit("p", 4) for _ in range(3)][:2] == [None, None]  # raised to 4
        assert await limits.hit("p", 4) is not None
    finally:
        await limits.close()


@requires_redis
async def test_key_prefixes_isolate_counts(prefix: str) -> None:
    await fresh_window()
    first, second = limiter(prefix + "a:"), limiter(prefix + "b:")
    try:
        assert [await first.hit("p", 2) for _ in range(2)] == [None, None]
        assert await first.hit("p", 2) is not None
        assert [await second.hit("p", 2) for _ in range(2)] == [None, None]
    finally:
        await first.close()
        await second.close()


@requires_redis
async def test_two_servers_share_one_limit(database_url: str, prefix: str, db: Database) -> None:
    """Two Apps (two limiters, one SQLite file): partner limited to 4/min gets 4 OKs in all."""
    setup = await onboard(db, "setup")
    limited = await onboard(db, "limited", rate_limit_per_minute=4)
    settings = settings_for(database_url, redis_url=REDIS_URL, redis_key_prefix=prefix)
    apps = [App(settings, Database(settings)) for _ in range(2)]
    for app in apps:
        await app.start()
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for app in apps]
        await ingest(ingestion_grpc.CallIngestionServiceStub(channels[0]), setup, "c1")
        stubs = [disposition_grpc.DispositionServiceStub(channel) for channel in channels]
        await fresh_window()
        codes: list[grpc.StatusCode] = []
        waits: list[int] = []
        for i in range(10):
            try:
                await stubs[i % 2].UpdateDispositionStatus(
                    update_request("c1", f"s{i}"), metadata=limited.metadata()
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                waits.append(details(error)["RetryInfo"].retry_delay.seconds)
        for channel in channels:
            await channel.close()
    finally:
        for app in apps:
            await app.stop(grace=1)
    assert codes == [grpc.StatusCode.OK] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 6
    assert all(1 <= wait <= 60 for wait in waits), waits
    rejections = [
        app.metrics.registry.get_sample_value(
            "disposition_rate_limit_rejections_total", {"partner_id": "limited"}
        )
        for app in apps
    ]
    assert rejections == [3, 3]


async def test_unreachable_redis_fails_open(
    database_url: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """REDIS_URL on a closed port: every call is served, counted as a fail-open, warned once."""
    limited = await onboard(db, "limited", rate_limit_per_minute=2)
    settings = settings_for(database_url, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = App(settings, Database(settings))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = disposition_grpc.DispositionServiceStub(channel)
            with caplog.at_level(logging.WARNING, logger="disposition.ratelimit"):
                for _ in range(6):  # the limit is 2: the limiter is really not counting
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.UpdateDispositionStatus(
                            update_request("nobody", "x"), metadata=limited.metadata()
                        )
                    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # past the limit
    finally:
        await app.stop(grace=1)
    assert app.metrics.registry.get_sample_value("disposition_rate_limiter_fail_opens_total") == 6
    warnings = [r for r in caplog.records if r.name == "disposition.ratelimit"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "fail open" in warnings[0].getMessage()


class Outage:
    """A TCP proxy to Redis that can be taken down and brought back on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            self.tasks.discard(task)
            for w in (writer, upstream_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@requires_redis
async def test_fails_open_during_an_outage_and_counts_again_after(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    target = client.connection_pool.connection_kwargs
    await client.aclose()
    proxy = Outage(target["host"], int(target["port"]))
    await proxy.up()
    fail_opens: list[int] = []
    limits = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        key_prefix=prefix,
        on_fail_open=lambda: fail_opens.append(1),
        retry_after_failure=0.2,
    )
    await fresh_window(margin=5)
    try:
        assert [await limits.hit("p", 3) for _ in range(2)] == [None, None]
        await proxy.down()
        assert [await limits.hit("p", 3) for _ in range(3)] == [None, None, None]
        assert len(fail_opens) == 3
        await proxy.up()
        await asyncio.sleep(0.25)  # past retry_after_failure: the next hit reconnects
        # The count survived in Redis (2): one more is allowed, then the window is full.
        assert await limits.hit("p", 3) is None
        wait = await limits.hit("p", 3)
        assert wait is not None and 1 <= wait <= 60
        assert len(fail_opens) == 3
    finally:
        await limits.close()
        with contextlib.suppress(Exception):
            await proxy.down()
