"""Credentials and grants cached in memory, in a running server: no database read on a warm
request, and every admin change (from another process, the admin CLI) reaches the server
(the cache's own rules, polled by hand: tests/unit/test_access_cache.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import grpc

from devstack import Credentials, ServerProcess
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from tests.support import BIN, REPO
from tests.support.databases import access_reads, settings_for
from tests.support.grpc_calls import fail, ingest, update_request


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
