"""Prometheus metrics scraped over HTTP from real servers, and what the logs may never contain."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import ServerProcess, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.main import JsonFormatter
from tests.support.databases import settings_for
from tests.support.grpc_calls import ingest, update_request

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
        dispositions = disposition_grpc.DispositionServiceStub(channel)
        await ingest(ingestion_grpc.CallIngestionServiceStub(channel), partner, "c1")
        for status in ("a", "b"):
            await dispositions.UpdateDispositionStatus(
                update_request("c1", status), metadata=partner.metadata()
            )
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
