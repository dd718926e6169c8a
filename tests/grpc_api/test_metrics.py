"""Prometheus metrics scraped over HTTP from real servers, and what the logs may never contain."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import Credentials, ServerProcess, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.main import JsonFormatter
from server.usecases import webhooks
from tests.support.databases import settings_for
from tests.support.grpc_calls import history, ingest, update_request
from tests.support.webhooks import Received, Receiver

UPDATE = "/disposition.v1.DispositionService/UpdateDispositionStatus"
INGEST = "/disposition.v1.CallIngestionService/IngestBatchCalls"
WATCH = "/disposition.v1.DispositionService/WatchDispositionChanges"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


async def scrape(port: int) -> tuple[str, Samples]:
    """The exposition text and its samples, keyed by (name, labels)."""
    text = await asyncio.to_thread(scrape_text, port)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def two_changes(channel: grpc.aio.Channel, partner: Credentials) -> Any:
    """Customer c1 ingested, then moved to "a" and to "b"; the disposition service's stub."""
    dispositions = disposition_grpc.DispositionServiceStub(channel)
    await ingest(ingestion_grpc.CallIngestionServiceStub(channel), partner, "c1")
    for status in ("a", "b"):
        await dispositions.UpdateDispositionStatus(
            update_request("c1", status), metadata=partner.metadata()
        )
    return dispositions


@pytest.fixture
async def metered(database_url: str, db: Database) -> AsyncIterator[App]:
    """A real server with its metrics endpoint on an ephemeral loopback port."""
    settings = settings_for(database_url, metrics_port=0)
    server = App(settings, Database(settings))
    await server.start()
    yield server
    await server.stop(grace=1)


async def test_rpc_counts_latency_rejections_pools_and_watchers(metered: App, db: Database) -> None:
    assert metered.metrics_port
    partner = await onboard(db, "123")
    limited = await onboard(db, "limited", rate_limit_per_minute=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        dispositions = await two_changes(channel, partner)
        failures = [
            (update_request("nobody", "x"), partner.metadata()),  # NOT_FOUND
            (update_request("c1", "x"), partner.metadata(x_api_secret="wrong")),  # refused
            (update_request("nobody", "x"), limited.metadata()),  # NOT_FOUND, the 1 allowed
            (update_request("nobody", "x"), limited.metadata()),  # RESOURCE_EXHAUSTED
        ]
        codes = []
        for request, metadata in failures:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await dispositions.UpdateDispositionStatus(request, metadata=metadata)
            codes.append(caught.value.code().name)

        watch = dispositions.WatchDispositionChanges(
            pb.WatchDispositionChangesRequest(), metadata=partner.metadata()
        )
        await watch.read()  # the starting cursor: the stream is connected
        _, watching = await scrape(metered.metrics_port)
        watch.cancel()
        for _ in range(100):  # the server sees the cancellation (and its poller stops) shortly
            text, samples = await scrape(metered.metrics_port)
            in_use = [v for (n, _), v in samples.items() if n == "disposition_db_pool_checked_out"]
            idle = in_use and not any(in_use)
            if idle and value(samples, "disposition_feed_watchers") == 0:
                break
            await asyncio.sleep(0.05)

    assert codes == ["NOT_FOUND", "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED"]
    assert value(watching, "disposition_feed_watchers") == 1
    assert value(samples, "disposition_feed_watchers") == 0
    requests = {
        (dict(labels)["method"], dict(labels)["code"]): count
        for (name, labels), count in samples.items()
        if name == "disposition_grpc_requests_total"
    }
    assert requests == {
        (INGEST, "OK"): 1,
        (UPDATE, "OK"): 2,
        (UPDATE, "NOT_FOUND"): 2,
        (UPDATE, "PERMISSION_DENIED"): 1,
        (UPDATE, "RESOURCE_EXHAUSTED"): 1,
        (WATCH, "CANCELLED"): 1,
    }
    latency = "disposition_grpc_request_duration_seconds"
    assert value(samples, f"{latency}_count", method=UPDATE, code="OK") == 2
    assert value(samples, f"{latency}_bucket", method=UPDATE, code="OK", le="10.0") == 2
    assert value(samples, f"{latency}_bucket", method=UPDATE, code="OK", le="+Inf") == 2
    assert 0 < (value(samples, f"{latency}_sum", method=UPDATE, code="OK") or 0) < 20
    assert value(samples, "disposition_rate_limit_rejections_total", partner_id="limited") == 1
    assert value(samples, "disposition_rate_limit_rejections_total", partner_id="123") is None
    assert value(samples, "disposition_rate_limiter_fail_opens_total") == 0
    # The 2 updates that found their customer and the 2 that did not, one after the other: 4
    # group commits of one update each.
    assert value(samples, "disposition_update_groups_total") == 4
    assert value(samples, "disposition_update_group_updates_total") == 4
    # Nothing is in use between requests. SQLite: one writer connection and four readers.
    pools = {"writer": metered.db.writer, "reader": metered.db.reader}
    if metered.settings.is_sqlite:
        assert value(samples, "disposition_db_pool_size", pool="writer") == 1
        assert value(samples, "disposition_db_pool_size", pool="reader") == 4
        assert value(samples, "disposition_db_pool_size", pool="units") is None
    else:  # the units of work's own pool (asyncpg), opened by the first write
        assert (value(samples, "disposition_db_pool_size", pool="units") or 0) >= 1
        assert value(samples, "disposition_db_pool_checked_out", pool="units") == 0
    for pool, engine in pools.items():
        size = engine.sync_engine.pool.size()  # type: ignore[attr-defined]
        assert value(samples, "disposition_db_pool_size", pool=pool) == size
        assert value(samples, "disposition_db_pool_checked_out", pool=pool) == 0
    assert partner.api_secret not in text and "wrong" not in text


async def test_two_apps_in_one_process_have_their_own_metrics(
    metered: App, database_url: str, db: Database
) -> None:
    settings = settings_for(database_url, metrics_port=0)
    other = App(settings, Database(settings))
    await other.start()
    try:
        partner = await onboard(db, "123")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            await ingest(ingestion_grpc.CallIngestionServiceStub(channel), partner, "c1")
        assert other.metrics_port not in (None, metered.metrics_port)
        assert other.metrics_port is not None and metered.metrics_port is not None
        _, mine = await scrape(other.metrics_port)
        _, theirs = await scrape(metered.metrics_port)
    finally:
        await other.stop(grace=1)
    assert value(mine, "disposition_grpc_requests_total", method=INGEST, code="OK") == 1
    assert value(theirs, "disposition_grpc_requests_total", method=INGEST, code="OK") is None
    with pytest.raises(OSError):  # stopped with its App
        await asyncio.to_thread(scrape_text, other.metrics_port)


async def test_rpc_log_lines_carry_the_status_code_and_never_the_secret(
    app: App, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    partner = await onboard(db, "123")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        dispositions = disposition_grpc.DispositionServiceStub(channel)
        with caplog.at_level(logging.DEBUG):
            await ingest(ingestion_grpc.CallIngestionServiceStub(channel), partner, "c1")
            await dispositions.UpdateDispositionStatus(
                update_request("c1", "a"), metadata=partner.metadata(x_request_id="req-1")
            )
            for metadata in (
                partner.metadata(x_api_secret=partner.api_secret + "x", x_request_id="req-2"),
                partner.metadata(x_tenant_id=None, x_request_id="req-3"),
            ):
                with pytest.raises(grpc.aio.AioRpcError):
                    await dispositions.UpdateDispositionStatus(
                        update_request("c1", "b"), metadata=metadata
                    )
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert lines
    assert all(partner.api_secret not in line for line in lines)
    rpcs = {
        entry["request_id"]: entry
        for entry in map(json.loads, lines)
        if entry["message"] == "rpc" and entry["request_id"].startswith("req-")
    }
    assert {k: (v["outcome"], v["code"]) for k, v in rpcs.items()} == {
        "req-1": ("OK", "OK"),
        "req-2": ("Forbidden", "PERMISSION_DENIED"),
        "req-3": ("TenantIdRequired", "INVALID_ARGUMENT"),
    }
    assert rpcs["req-1"]["method"] == UPDATE and rpcs["req-1"]["partner_id"] == "123"


def test_serving_line_reports_the_metrics_port_and_stops_cleanly(
    tmp_path: Path, database_url: str
) -> None:
    server = ServerProcess(
        database_url, tmp_path / "server.log", METRICS_PORT="0", REDIS_URL="", LOG_LEVEL="INFO"
    )
    server.start()
    try:
        serving = next(e for e in server.log_lines() if e["message"] == "serving")
        port = int(serving["metrics_port"])
        assert serving["rate_limits"] == "in-process"
        text = scrape_text(port)
        assert "# TYPE disposition_db_pool_size gauge" in text
    finally:
        assert server.stop() == 0
    with pytest.raises(OSError):
        scrape_text(port)


def at(received: list[Received], path: str) -> list[Received]:
    """The requests that arrived on `path`."""
    return [request for request in received if request.headers["x-target"] == path]


async def scraped_until(port: int, done: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    """Scrape until `done` holds (the backlog is read every 2 s); the last samples."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = await scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def test_webhook_deliveries_latency_backlog_and_oldest_age(
    database_url: str, db: Database
) -> None:
    """Three endpoints of one tenant: a healthy receiver, one that answers 503 (retried in a
    minute) and one that holds its first request until released."""
    partner = await onboard(db, "123")
    tenant, sub_tenant = partner.tenant_id, partner.sub_tenant_id
    release = threading.Event()

    def answer(request: Received) -> int:
        if request.headers["x-target"] == "/held":
            release.wait(60)
        return 503 if request.headers["x-target"] == "/fail" else 200

    receiver = Receiver(answer).start()

    def arrived(*paths: str) -> Callable[[list[Received]], bool]:
        return lambda got: all(len(at(got, path)) == changes for path in paths)

    try:
        ids = {}
        for path in ("/ok", "/fail", "/held"):
            created = await webhooks.create_endpoint(
                db, tenant_id=tenant, sub_tenant_id=sub_tenant,
                url=f"http://127.0.0.1:{receiver.port}{path}", events=["disposition.changed"],
                allow_private=True,
            )  # fmt: skip
            ids[path] = created.endpoint.endpoint_id
        settings = settings_for(
            database_url, metrics_port=0, webhook_allow_private_urls=True,
            webhook_retry_base_seconds=60, webhook_timeout_seconds=60,
        )  # fmt: skip
        server = App(settings, Database(settings))
        await server.start()
        try:
            assert server.metrics_port is not None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await two_changes(channel, partner)
            changes = len(await history(db, "c1"))
            assert changes >= 2
            await asyncio.to_thread(receiver.wait, arrived("/ok", "/fail"))

            def held(samples: Samples) -> bool:
                return value(samples, BACKLOG, kind="changes") == changes and (
                    value(samples, BACKLOG, kind="deliveries") == changes
                )

            waiting = await scraped_until(server.metrics_port, held)
            release.set()
            await asyncio.to_thread(receiver.wait, arrived("/held"))
            done = await scraped_until(
                server.metrics_port,
                lambda s: (
                    value(s, BACKLOG, kind="changes") == 0
                    and value(s, DELIVERIES, endpoint_id=ids["/held"], outcome="delivered")
                    == changes
                ),
            )
        finally:
            await server.stop(grace=1)
    finally:
        release.set()
        receiver.stop()

    ok, fail, slow = ids["/ok"], ids["/fail"], ids["/held"]
    # While one endpoint held its first event: every change waits for it (its cursor has not
    # moved), and each change's delivery to the failing endpoint waits for its retry.
    assert value(waiting, BACKLOG, kind="changes") == changes
    assert value(waiting, BACKLOG, kind="deliveries") == changes
    assert value(waiting, BACKLOG, kind="outbox") == 0
    assert 0 < (value(waiting, OLDEST) or 0) < 60
    assert value(waiting, ENDPOINTS, state="healthy") == 2
    assert value(waiting, ENDPOINTS, state="failing") == 1
    assert value(waiting, ENDPOINTS, state="disabled") == 0
    assert value(waiting, DELIVERIES, endpoint_id=ok, outcome="delivered") == changes
    assert value(waiting, DELIVERIES, endpoint_id=fail, outcome="retry_scheduled") == changes
    assert value(waiting, DELIVERIES, endpoint_id=slow, outcome="delivered") is None
    # Released: delivered, late; the failing endpoint's deliveries still wait for their retry.
    assert value(done, DELIVERIES, endpoint_id=slow, outcome="delivered") == changes
    assert value(done, BACKLOG, kind="deliveries") == changes
    assert (value(done, OLDEST) or 0) > 0
    for endpoint_id in (ok, slow):
        assert value(done, f"{LATENCY}_count", endpoint_id=endpoint_id) == changes
        assert value(done, f"{ATTEMPT}_count", endpoint_id=endpoint_id) == changes
    assert value(done, f"{ATTEMPT}_count", endpoint_id=fail) == changes
    assert value(done, f"{LATENCY}_count", endpoint_id=fail) is None
    # The held events waited at least for the two backlog readings above; the healthy
    # receiver's arrived within a second.
    slow_sum = value(done, f"{LATENCY}_sum", endpoint_id=slow) or 0
    assert slow_sum / changes > 1.0
    assert value(done, f"{LATENCY}_bucket", endpoint_id=ok, le="1.0") == changes
    assert value(done, f"{LATENCY}_bucket", endpoint_id=slow, le="1.0") == 0


BACKLOG = "disposition_webhook_backlog"
OLDEST = "disposition_webhook_oldest_undelivered_age_seconds"
ENDPOINTS = "disposition_webhook_endpoints"
DELIVERIES = "disposition_webhook_deliveries_total"
LATENCY = "disposition_webhook_delivery_latency_seconds"
ATTEMPT = "disposition_webhook_attempt_duration_seconds"
