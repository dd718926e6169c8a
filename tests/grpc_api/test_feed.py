"""The change feed (WatchDispositionChanges) against a real grpc.aio server and database (through
Envoy: tests/rest/test_feed.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from devstack import Credentials, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database, SchemaOutdated
from server.storage.postgres_feed import APPLICATION_NAME
from tests.support.databases import settings_for, sql
from tests.support.grpc_calls import Watcher, details, ingest, update_request, violations


@pytest.fixture
async def watchers(dispositions: Any) -> AsyncIterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.cancel()


def watch(stub: Any, creds: Credentials, started: list[Watcher], **request: Any) -> Watcher:
    watcher = Watcher(stub, creds, **request)
    started.append(watcher)
    return watcher


def summary(change: pb.DispositionChange) -> tuple[int, str, str, str, str]:
    return (
        change.cursor,
        change.customer_id,
        change.previous_status,
        change.disposition_status,
        change.source,
    )


async def test_changes_arrive_in_commit_order_with_consecutive_cursors(
    dispositions: Any, ingestion: Any, partner: Credentials, watchers: list[Watcher]
) -> None:
    await ingest(ingestion, partner, "c1", "c2", status="new")
    watcher = watch(dispositions, partner, watchers)
    assert (await watcher.first()).cursor == 0  # starts before the first change
    first_two = await watcher.changes(2)
    for status in ("interested", "callback_requested", ""):
        await dispositions.UpdateDispositionStatus(
            update_request("c1", status), metadata=partner.metadata(x_request_id=f"r-{status}")
        )
    await dispositions.UpdateDispositionStatus(  # a repeat is not a change
        update_request("c2", "new"), metadata=partner.metadata()
    )
    later = await watcher.changes(3)
    assert [summary(c) for c in first_two + later] == [
        (1, "c1", "", "new", "batch_call"),
        (2, "c2", "", "new", "batch_call"),
        (3, "c1", "new", "interested", "disposition_update"),
        (4, "c1", "interested", "callback_requested", "disposition_update"),
        (5, "c1", "callback_requested", "", "disposition_update"),
    ]
    third = later[0]
    assert (third.partner_id, third.request_id) == ("123", "r-interested")
    assert (third.tenant_id, third.sub_tenant_id) == ("tenant1", "subtenant1")
    assert third.changed_at.ToDatetime().year >= 2026
    # Nothing else arrived in between (the repeat made no change): the next is the next write.
    await dispositions.UpdateDispositionStatus(
        update_request("c2", "end"), metadata=partner.metadata()
    )
    assert [summary(c) for c in await watcher.changes(1)] == [
        (6, "c2", "new", "end", "disposition_update")
    ]


async def test_resume_after_a_cursor_and_start_at_latest(
    dispositions: Any, ingestion: Any, partner: Credentials, watchers: list[Watcher]
) -> None:
    await ingest(ingestion, partner, "c1", "c2", "c3", status="a")
    resumed = watch(dispositions, partner, watchers, after_cursor=2)
    assert (await resumed.first()).cursor == 2
    assert [c.cursor for c in await resumed.changes(1)] == [3]
    latest = watch(dispositions, partner, watchers, start_at_latest=True, after_cursor=1)
    assert (await latest.first()).cursor == 3
    await dispositions.UpdateDispositionStatus(
        update_request("c3", "b"), metadata=partner.metadata()
    )
    assert [c.cursor for c in await latest.changes(1)] == [4]
    assert [c.cursor for c in await resumed.changes(1)] == [4]


async def test_sub_tenant_scope_and_tenant_isolation(
    db: Database, dispositions: Any, ingestion: Any, partner: Credentials, watchers: list[Watcher]
) -> None:
    wildcard = await onboard(db, "internal", grants=[("tenant1", "*")])
    all_subs = wildcard.__class__(**{**wildcard.__dict__, "sub_tenant_id": "*"})
    other_sub = wildcard.__class__(**{**wildcard.__dict__, "sub_tenant_id": "subtenant2"})
    stranger = await onboard(db, "stranger", grants=[("tenant2", "subtenant1")])
    whole = watch(dispositions, all_subs, watchers)
    only_one = watch(dispositions, partner, watchers)
    only_two = watch(dispositions, other_sub, watchers)
    elsewhere = watch(dispositions, stranger, watchers)
    for w in (whole, only_one, only_two, elsewhere):
        assert (await w.first()).cursor == 0

    async def one_change_in_each_scope(tag: str, cursor: int, other_tenant_cursor: int) -> None:
        """A change in subtenant1, subtenant2 and tenant2: each watcher's next changes are
        exactly those of its scope."""
        await ingest(ingestion, partner, f"s1-{tag}", status=tag)
        await ingest(ingestion, other_sub, f"s2-{tag}", status=tag)
        await ingest(ingestion, stranger, f"t2-{tag}", status=tag)
        assert [(c.cursor, c.customer_id, c.sub_tenant_id) for c in await whole.changes(2)] == [
            (cursor, f"s1-{tag}", "subtenant1"),
            (cursor + 1, f"s2-{tag}", "subtenant2"),
        ]
        assert [c.customer_id for c in await only_one.changes(1)] == [f"s1-{tag}"]
        assert [c.customer_id for c in await only_two.changes(1)] == [f"s2-{tag}"]
        # Another tenant has its own cursors and sees nothing of tenant1.
        assert [(c.cursor, c.customer_id) for c in await elsewhere.changes(1)] == [
            (other_tenant_cursor, f"t2-{tag}")
        ]

    await one_change_in_each_scope("x", 1, 1)
    # Nothing else reached any watcher in between: their next changes are the next writes'.
    await one_change_in_each_scope("y", 3, 2)


async def test_whole_tenant_needs_a_wildcard_grant(dispositions: Any, partner: Credentials) -> None:
    call = dispositions.WatchDispositionChanges(
        pb.WatchDispositionChangesRequest(), metadata=partner.metadata(x_sub_tenant_id="*")
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "Forbidden"


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ({"x_api_secret": "ds_wrong"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_tenant_id": None}, grpc.StatusCode.INVALID_ARGUMENT, "Tenant ID is required"),
    ],
)
async def test_refusals_end_the_stream_with_the_documented_status(
    dispositions: Any, partner: Credentials, metadata: dict[str, Any], code: Any, message: str
) -> None:
    call = dispositions.WatchDispositionChanges(
        pb.WatchDispositionChangesRequest(), metadata=partner.metadata(**metadata)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert (raised.value.code(), raised.value.details()) == (code, message)


async def test_negative_cursor_is_a_validation_error(
    dispositions: Any, partner: Credentials
) -> None:
    call = dispositions.WatchDispositionChanges(
        pb.WatchDispositionChangesRequest(after_cursor=-1), metadata=partner.metadata()
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == [("after_cursor", "after_cursor must not be less than 0")]
    assert details(raised.value)["ErrorInfo"].reason == "VALIDATION_FAILED"


async def test_changes_written_by_another_process_are_polled(
    tmp_path: Any, db: Database, partner: Credentials
) -> None:
    """Two servers on one database: a watcher on one sees writes made through the other."""
    url = str(db.settings.database_url)
    servers = [App(settings_for(url), Database(settings_for(url))) for _ in range(2)]
    for server in servers:
        await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as watch_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[1].port}") as write_channel,
        ):
            watcher = Watcher(disposition_grpc.DispositionServiceStub(watch_channel), partner)
            try:
                assert (await watcher.first()).cursor == 0
                writer = ingestion_grpc.CallIngestionServiceStub(write_channel)
                await ingest(writer, partner, "remote", status="written-elsewhere")
                [change] = await watcher.changes(1)
                assert (change.cursor, change.disposition_status) == (1, "written-elsewhere")
            finally:
                watcher.cancel()
    finally:
        for server in servers:
            await server.stop(grace=1)


async def test_heartbeats_while_idle_and_unavailable_on_shutdown(
    db: Database, partner: Credentials
) -> None:
    url = str(db.settings.database_url)
    server = App(settings_for(url, feed_heartbeat_seconds=0.1), Database(settings_for(url)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = disposition_grpc.DispositionServiceStub(channel).WatchDispositionChanges(
                pb.WatchDispositionChangesRequest(after_cursor=7), metadata=partner.metadata()
            )
            replies = [await call.read() for _ in range(4)]  # the start, then 3 heartbeats
            assert [(list(r.changes), r.cursor) for r in replies] == [([], 7)] * 4
            await server.stop(grace=5)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=1)


async def test_a_database_from_before_the_feed_is_refused_clearly(tmp_path: Any) -> None:
    """create_all adds missing tables but never columns: an old file must not half-work."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE disposition_history (id INTEGER PRIMARY KEY, source TEXT)")
    db = Database(settings_for(f"sqlite+aiosqlite:///{path}"))
    try:
        with pytest.raises(SchemaOutdated, match=r"missing columns: disposition_history\.seq"):
            await db.create_schema()
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_pushes_commits_to_the_other_replicas_and_catches_up_after_a_loss(
    postgres_url: str,
) -> None:
    """Polling is off (30 s): a change written through one replica reaches a watcher on the
    other through NOTIFY; after its listener's connection is killed, the listener reconnects
    and the change written meanwhile arrives too."""
    db = Database(settings_for(postgres_url))
    partner = await onboard(db, "123")
    settings = settings_for(postgres_url, feed_poll_seconds=30)
    servers = [App(settings, Database(settings)) for _ in range(2)]
    for server in servers:
        await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as watch_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[1].port}") as write_channel,
        ):
            watcher = Watcher(disposition_grpc.DispositionServiceStub(watch_channel), partner)
            writer = ingestion_grpc.CallIngestionServiceStub(write_channel)
            try:
                assert (await watcher.first()).cursor == 0
                await listening(servers[0])
                await ingest(writer, partner, "pushed", status="a")
                # Well inside the 30 s poll period: pushed, not polled.
                [change] = await asyncio.wait_for(watcher.changes(1), 10)
                assert (change.cursor, change.customer_id) == (1, "pushed")

                sql(
                    postgres_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE application_name = '{APPLICATION_NAME}'",
                )
                await ingest(writer, partner, "while-away", status="b")
                [change] = await asyncio.wait_for(watcher.changes(1), 10)
                assert (change.cursor, change.customer_id) == (2, "while-away")
                await listening(servers[0])
            finally:
                watcher.cancel()
    finally:
        for server in servers:
            await server.stop(grace=1)
        await db.dispose()


async def listening(server: App, timeout: float = 5.0) -> None:
    """Wait until the server's feed has its commit listener connected (PostgreSQL)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not server.feed.pushed:
        assert asyncio.get_running_loop().time() < deadline, "the feed never listened"
        await asyncio.sleep(0.01)
