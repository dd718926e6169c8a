"""Prometheus metrics: one registry per App, served over HTTP by prometheus_client itself.

Counters and histograms are updated on the event loop; gauges of state owned elsewhere
(SQLAlchemy pools, change-feed watchers) are read when Prometheus scrapes, on the HTTP thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.pool import QueuePool

from server.db import Database
from server.storage.postgres_writer import PostgresUnits

# 1 ms to 10 s: a cached read is ~1 ms, a 1,000-item batch on SQLite can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics and, once `serve()` is called, the endpoint that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = Counter(
            "disposition_grpc_requests",
            "RPCs finished, by full gRPC method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "disposition_grpc_request_duration_seconds",
            "Time from the first interceptor to the RPC's status, by method and code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "disposition_rate_limit_rejections",
            "Requests refused with RESOURCE_EXHAUSTED by the per-partner rate limit.",
            ["partner_id"],
            registry=self.registry,
        )
        self.rate_limiter_fail_opens = Counter(
            "disposition_rate_limiter_fail_opens",
            "Requests allowed without counting because the rate limiter's Redis did not answer.",
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method, code).observe(seconds)

    def watch_state(self, db: Database, feed_watchers: Callable[[], int]) -> None:
        """Report the database pools and the change-feed watchers at every scrape."""
        self.registry.register(_StateCollector(db, feed_watchers))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (`/metrics`, any path) on a daemon thread; the bound port."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None


class _StateCollector(Collector):
    def __init__(self, db: Database, feed_watchers: Callable[[], int]) -> None:
        self.db = db
        self.feed_watchers = feed_watchers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        checked_out = GaugeMetricFamily(
            "disposition_db_pool_checked_out",
            "Database connections in use, by pool (writer, reader; PostgreSQL: units too).",
            labels=["pool"],
        )
        size = GaugeMetricFamily(
            "disposition_db_pool_size",
            "Connections the pool keeps open (pool_size, without overflow), by pool.",
            labels=["pool"],
        )
        overflow = GaugeMetricFamily(
            "disposition_db_pool_overflow",
            "Connections opened beyond the pool size (negative: not yet opened), by pool.",
            labels=["pool"],
        )
        for name, engine in (("writer", self.db.writer), ("reader", self.db.reader)):
            pool = engine.sync_engine.pool
            if isinstance(pool, QueuePool):
                checked_out.add_metric([name], pool.checkedout())
                size.add_metric([name], pool.size())
                overflow.add_metric([name], pool.overflow())
        units = self.db.units
        if isinstance(units, PostgresUnits) and (state := units.pool_state()) is not None:
            opened, in_use = state
            checked_out.add_metric(["units"], in_use)
            size.add_metric(["units"], opened)
        yield checked_out
        yield size
        yield overflow
        yield GaugeMetricFamily(
            "disposition_feed_watchers",
            "Change-feed streams connected to this process.",
            value=self.feed_watchers(),
        )
