"""Prometheus metrics: one registry per App, served over HTTP by prometheus_client itself.

Counters and histograms are updated on the event loop; gauges of state owned elsewhere
(SQLAlchemy pools, change-feed watchers) are read when Prometheus scrapes, on the HTTP thread.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.pool import QueuePool

from server.db import Database
from server.runtime import update_groups
from server.storage.postgres_writer import PostgresUnits

# 1 ms to 10 s: a cached read is ~1 ms, a 1,000-item batch on SQLite can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics and, once `serve()` is called, the endpoint that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = _RpcStats()
        self.registry.register(self.rpcs)
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
        self.rpcs.observe(method, code, seconds)

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


class _RpcStats(Collector):
    """Every RPC's count, duration sum and duration bucket, by method and code.

    prometheus_client's labelled Counter and Histogram take a lock per value and look their
    child up by label per call: a few microseconds per RPC. Here each (method, code) series is
    a list of plain numbers, moved only on the event loop's thread and rendered at scrape time
    (on the HTTP thread: a scrape may see one RPC counted in its bucket but not yet in its sum).
    """

    def __init__(self) -> None:
        # (method, code) -> [count, sum of seconds, per-bucket counts..., beyond the last bucket]
        self._series: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        series = self._series.get((method, code))
        if series is None:
            series = self._series[method, code] = [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def collect(self) -> Iterable[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "disposition_grpc_requests",
            "RPCs finished, by full gRPC method and status code.",
            labels=["method", "code"],
        )
        seconds = HistogramMetricFamily(
            "disposition_grpc_request_duration_seconds",
            "Time from the interceptor to the RPC's status, by method and code.",
            labels=["method", "code"],
        )
        for (method, code), series in list(self._series.items()):
            requests.add_metric([method, code], series[0])
            cumulative, buckets = 0.0, []
            for bound, found in zip((*LATENCY_BUCKETS, math.inf), series[2:], strict=True):
                cumulative += found
                buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
            seconds.add_metric([method, code], buckets, series[1])
        yield requests
        yield seconds


class _StateCollector(Collector):
    def __init__(self, db: Database, feed_watchers: Callable[[], int]) -> None:
        self.db = db
        self.feed_watchers = feed_watchers

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
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
        groups, updates = update_groups.stats_of(self.db)
        yield CounterMetricFamily(
            "disposition_update_groups",
            "Units of work that committed single status updates together (group commits).",
            value=groups,
        )
        yield CounterMetricFamily(
            "disposition_update_group_updates",
            "Single status updates carried by those units (their ratio: the mean group size).",
            value=updates,
        )
        yield GaugeMetricFamily(
            "disposition_feed_watchers",
            "Change-feed streams connected to this process.",
            value=self.feed_watchers(),
        )
