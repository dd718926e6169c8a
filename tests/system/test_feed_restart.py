"""The change feed survives server crashes: a watcher that resumes from its cursor receives
every committed change exactly once, in order, while two server processes keep writing."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
from pathlib import Path
from typing import Any

import grpc

from devstack import Credentials, ServerProcess, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.db import Database
from tests.support.databases import settings_for
from tests.support.grpc_calls import ingest, update_request

CUSTOMERS = [f"cust-{n}" for n in range(20)]


async def writer(port_of: Any, creds: Credentials, stop: asyncio.Event, name: str) -> int:
    """Update statuses through the server `port_of()` names until stopped; count the 200s."""
    acknowledged = 0
    for n in itertools.count():
        if stop.is_set():
            return acknowledged
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of()}") as channel:
                stub = disposition_grpc.DispositionServiceStub(channel)
                for m in range(20):
                    await stub.UpdateDispositionStatus(
                        update_request(CUSTOMERS[(n + m) % len(CUSTOMERS)], f"{name}-{n}-{m}"),
                        metadata=creds.metadata(),
                        timeout=5,
                    )
                    acknowledged += 1
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)  # the server is down: try again
    return acknowledged


async def follow(port_of: Any, creds: Credentials, received: list[pb.DispositionChange]) -> None:
    """Watch forever; on any stream failure reconnect after the last cursor received."""
    while True:
        cursor = received[-1].cursor if received else 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of()}") as channel:
                call = disposition_grpc.DispositionServiceStub(channel).WatchDispositionChanges(
                    pb.WatchDispositionChangesRequest(after_cursor=cursor),
                    metadata=creds.metadata(),
                )
                async for reply in call:
                    received.extend(reply.changes)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)


async def more_than(received: list[pb.DispositionChange], count: int, timeout: float = 20) -> int:
    """How many changes the watcher has received, once that is more than `count` (and a few
    more have had the time to arrive)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(received) <= count:
        assert asyncio.get_running_loop().time() < deadline, f"no change after {count}"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # let writes run on both servers before the next kill
    return len(received)


def committed(db_path: Path) -> list[tuple[int, str, str | None, str | None]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(
            "SELECT h.seq, c.customer_id, h.previous_status, h.new_status"
            " FROM disposition_history h JOIN customers c ON c.id = h.customer_pk"
            " WHERE h.tenant_id = 'tenant1' ORDER BY h.seq"
        ).fetchall()


async def test_watcher_resumes_exactly_once_across_kills_and_restarts(tmp_path: Path) -> None:
    db_path = tmp_path / "feed.db"
    url = f"sqlite+aiosqlite:///{db_path}"
    db = Database(settings_for(url))
    await db.create_schema()
    creds = await onboard(db, "123")
    await db.dispose()
    watched = ServerProcess(url, tmp_path / "watched.log")
    other = ServerProcess(url, tmp_path / "other.log")
    await asyncio.to_thread(watched.start)
    await asyncio.to_thread(other.start)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
        await ingest(ingestion_grpc.CallIngestionServiceStub(channel), creds, *CUSTOMERS)

    received: list[pb.DispositionChange] = []
    stop = asyncio.Event()
    follower = asyncio.create_task(follow(lambda: watched.port, creds, received))
    writers = [
        asyncio.create_task(writer(lambda: watched.port, creds, stop, "w")),
        asyncio.create_task(writer(lambda: other.port, creds, stop, "o")),
    ]
    try:
        progress = []  # changes received when each kill happened
        for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
            progress.append(await more_than(received, progress[-1] if progress else 0))
            await asyncio.to_thread(watched.stop, sig)
            await asyncio.sleep(0.3)  # the other server keeps committing meanwhile
            await asyncio.to_thread(watched.start)
        progress.append(await more_than(received, progress[-1]))
        stop.set()
        acknowledged = sum(await asyncio.gather(*writers))
        rows = committed(db_path)
        deadline = asyncio.get_running_loop().time() + 15
        while len(received) < len(rows) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        follower.cancel()
        for task in writers:
            task.cancel()
        await asyncio.to_thread(watched.stop)
        await asyncio.to_thread(other.stop)

    print(f"{len(rows)} changes committed, {acknowledged} acknowledged, 4 restarts")
    assert acknowledged > 50, "both servers were writing"
    # The watcher was connected and receiving before every kill and after every restart.
    assert progress == sorted(set(progress)) and progress[0] > 0, progress
    assert [c.cursor for c in received] == list(range(1, len(rows) + 1))  # none twice, none lost
    assert [
        (c.cursor, c.customer_id, c.previous_status or None, c.disposition_status or None)
        for c in received
    ] == rows
