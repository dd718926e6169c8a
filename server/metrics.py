"""Prometheus metrics: one registry per App, served over HTTP by prometheus_client itself.

Counters and histograms are updated on the event loop; gauges of state owned elsewhere
(SQLAlchemy pools, change-feed watchers, the webhook dispatcher's last reading of its backlog)
are read when Prometheus scrapes, on the HTTP thread, from memory: a scrape never reads the
database.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.pool import QueuePool

from server.db import Database
from server.runtime import update_groups
from server.runtime.webhooks import WebhookBacklog
from server.storage.postgres_writer import PostgresUnits

# 1 ms to 10 s: a cached read is ~1 ms, a 1,000-item batch on SQLite can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# 5 ms to 3 days: a healthy receiver gets an event within milliseconds; a retried one after
# minutes or hours, up to the retry window.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0, 6 * 3600.0, 24 * 3600.0, 3 * 24 * 3600.0)  # fmt: skip


class Metrics:
    """The service's metrics and, once `serve()` is called, the endpoint that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = _RpcStats()
        self.registry.register(self.rpcs)
        self.webhooks = _WebhookStats()
        self.registry.register(self.webhooks)
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

    def watch_webhook_backlog(self, backlog: Callable[[], WebhookBacklog | None]) -> None:
        """Report the webhook dispatcher's last reading of its backlog at every scrape."""
        self.webhooks.backlog = backlog

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


class _Histograms:
    """Histograms by label values, kept as plain lists (see _RpcStats for why).

    Each series: [count, sum, per-bucket counts..., beyond the last bucket], moved only on the
    event loop's thread and rendered at scrape time (on the HTTP thread: a scrape may see an
    observation counted in its bucket but not yet in its sum).
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0, 0.0] + [0] * (len(self.buckets) + 1)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(self.buckets, seconds)] += 1

    def family(self, name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        for values, series in list(self.series.items()):
            cumulative, buckets = 0.0, []
            for bound, found in zip((*self.buckets, math.inf), series[2:], strict=True):
                cumulative += found
                buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
            family.add_metric(list(values), buckets, series[1])
        return family


class _RpcStats(Collector):
    """Every RPC's count, duration sum and duration bucket, by method and code.

    prometheus_client's labelled Counter and Histogram take a lock per value and look their
    child up by label per call: a few microseconds per RPC. Here each (method, code) series is
    a list of plain numbers (_Histograms), its count doubling as the counter.
    """

    def __init__(self) -> None:
        self._durations = _Histograms(LATENCY_BUCKETS)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self._durations.observe((method, code), seconds)

    def collect(self) -> Iterable[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "disposition_grpc_requests",
            "RPCs finished, by full gRPC method and status code.",
            labels=["method", "code"],
        )
        for (method, code), series in list(self._durations.series.items()):
            requests.add_metric([method, code], series[0])
        yield requests
        yield self._durations.family(
            "disposition_grpc_request_duration_seconds",
            "Time from the interceptor to the RPC's status, by method and code.",
            ["method", "code"],
        )


class _WebhookStats(Collector):
    """Webhook deliveries (runtime/webhooks.py reports each attempt through `attempted`) and
    the dispatcher's backlog, as it last read it from the database (every few seconds).

    `endpoint_id` is an endpoint's id (`we_…`) or `callback` for every callback_url: operators
    create few endpoints, so the labels stay few.
    """

    def __init__(self) -> None:
        self._outcomes: dict[tuple[str, str], int] = {}
        self._attempts = _Histograms(LATENCY_BUCKETS)
        self._latencies = _Histograms(DELIVERY_BUCKETS)
        self.backlog: Callable[[], WebhookBacklog | None] = lambda: None

    def attempted(
        self, endpoint_id: str, outcome: str, seconds: float | None, latency: float | None
    ) -> None:
        key = (endpoint_id, outcome)
        self._outcomes[key] = self._outcomes.get(key, 0) + 1
        if seconds is not None:
            self._attempts.observe((endpoint_id,), seconds)
        if latency is not None:
            self._latencies.observe((endpoint_id,), max(latency, 0.0))

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        deliveries = CounterMetricFamily(
            "disposition_webhook_deliveries",
            "Webhook delivery attempts by endpoint (or `callback`) and outcome: delivered (2xx), "
            "retry_scheduled (failed, tried again later) or failed (retries ran out).",
            labels=["endpoint_id", "outcome"],
        )
        for labels, count in list(self._outcomes.items()):
            deliveries.add_metric(list(labels), count)
        yield deliveries
        yield self._attempts.family(
            "disposition_webhook_attempt_duration_seconds",
            "One delivery attempt, from its start to the receiver's status (or the failure).",
            ["endpoint_id"],
        )
        yield self._latencies.family(
            "disposition_webhook_delivery_latency_seconds",
            "From the event (the change's commit, the batch's for call.processed) to the 2xx "
            "that delivered it, retries included.",
            ["endpoint_id"],
        )
        backlog = self.backlog()
        if backlog is None:  # not read yet (or metrics are off)
            return
        yield _gauges(
            "disposition_webhook_backlog",
            "Events waiting for delivery, by kind: pending deliveries (first attempts of "
            "call.processed, retries), outbox rows not yet fanned out, and changes past an "
            "enabled endpoint's cursor; each counted up to 10,000.",
            "kind",
            {"deliveries": backlog.pending, "outbox": backlog.outbox, "changes": backlog.changes},
        )
        oldest = backlog.oldest
        yield GaugeMetricFamily(
            "disposition_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest event waiting for delivery (0: none waits).",
            value=0.0 if oldest is None else max(time.time() - oldest.timestamp(), 0.0),
        )
        yield _gauges(
            "disposition_webhook_endpoints",
            "Webhook endpoints by state: enabled and healthy, enabled but failing, disabled.",
            "state",
            {"healthy": backlog.healthy, "failing": backlog.failing, "disabled": backlog.disabled},
        )
        yield GaugeMetricFamily(
            "disposition_webhook_backlog_read_timestamp_seconds",
            "When the backlog above was read from the database (Unix time).",
            value=backlog.read_at.timestamp(),
        )


def _gauges(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    """One gauge per value of `label`."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


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
