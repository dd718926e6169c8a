"""Assembles the grpc.aio server: interceptors, services, health and reflection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from disposition.v1 import (
    call_ingestion_service_pb2 as ingestion_pb2,
)
from disposition.v1 import (
    call_ingestion_service_pb2_grpc as ingestion_grpc,
)
from disposition.v1 import (
    disposition_service_pb2 as disposition_pb2,
)
from disposition.v1 import (
    disposition_service_pb2_grpc as disposition_grpc,
)
from disposition.v1 import (
    webhook_service_pb2 as webhook_pb2,
)
from disposition.v1 import (
    webhook_service_pb2_grpc as webhook_grpc,
)
from server.db import Database
from server.interceptors import ServiceInterceptor
from server.metrics import Metrics
from server.runtime.access_cache import AccessCache
from server.runtime.feed import FeedHub
from server.runtime.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from server.runtime.webhooks import WebhookDispatcher
from server.servicers import CallIngestionService, DispositionService
from server.settings import Settings
from server.webhook_servicer import WebhookService

if TYPE_CHECKING:
    from server.tracing import Tracing

SERVICE_NAMES = (
    disposition_pb2.DESCRIPTOR.services_by_name["DispositionService"].full_name,
    ingestion_pb2.DESCRIPTOR.services_by_name["CallIngestionService"].full_name,
    webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
)


class PortUnavailable(OSError):
    """The server cannot bind a configured port (another program holds it, or it is refused)."""

    def __init__(self, variable: str, port: int, cause: Exception | None) -> None:
        super().__init__(
            f"cannot listen on {variable} {port} (in use or not allowed); set {variable}="
            "<a free port>"
        )
        self.cause = cause


class App:
    """A built, not yet started, server and what it owns."""

    def __init__(
        self, settings: Settings, db: Database, *, limiter: RateLimiter | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        # A limiter passed in belongs to the caller; the one built here is closed on stop().
        self._owns_limiter = limiter is None
        self.limiter = limiter or self._build_limiter()
        self.access_cache = (
            AccessCache(
                db,
                ttl_seconds=settings.access_cache_seconds,
                poll_seconds=settings.access_poll_seconds,
            )
            if settings.access_cache_seconds > 0
            else None
        )
        # None with tracing off (no OTLP endpoint): the tracing code is not even loaded then.
        self.tracing = tracing_for(settings)
        self.interceptor = ServiceInterceptor(
            db,
            cache=self.access_cache,
            limiter=self.limiter,
            default_per_minute=settings.rate_limit_per_minute,
            metrics=self.metrics,
            trace_ids=None if self.tracing is None else self.tracing.trace_id,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [self.interceptor]
        if self.tracing is not None:
            # The server span first: the gates, the handler and the log line run inside it.
            interceptors.insert(0, self.tracing.interceptor())
            self.tracing.instrument(db)
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.feed = FeedHub(
            db,
            poll_seconds=settings.feed_poll_seconds,
            heartbeat_seconds=settings.feed_heartbeat_seconds,
        )
        disposition_grpc.add_DispositionServiceServicer_to_server(
            DispositionService(db, self.feed), self.server
        )
        ingestion_grpc.add_CallIngestionServiceServicer_to_server(
            CallIngestionService(db), self.server
        )
        webhook_grpc.add_WebhookServiceServicer_to_server(
            WebhookService(db, self._endpoint_changed), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        # None with WEBHOOK_DELIVERY=worker: disposition-webhooks processes deliver instead.
        self.webhooks: WebhookDispatcher | None = None
        if settings.webhook_delivery == "server":
            webhooks = self.webhooks = webhook_dispatcher(settings, db, self.feed, self.metrics)
            self.metrics.watch_webhook_backlog(lambda: webhooks.backlog)
        self.metrics.watch_state(db, lambda: self.feed.watcher_count)
        self.port = 0
        self.metrics_port: int | None = None

    def _endpoint_changed(self) -> None:
        if self.webhooks is not None:
            self.webhooks.wake()

    def _build_limiter(self) -> RateLimiter:
        if self.settings.redis_url is None:
            return InProcessRateLimiter()
        return RedisRateLimiter.from_url(
            self.settings.redis_url,
            timeout=self.settings.redis_timeout_seconds,
            key_prefix=self.settings.redis_key_prefix,
            on_fail_open=self.metrics.rate_limiter_fail_opens.inc,
        )

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port.

        SQLite is migrated here; PostgreSQL must already be at head (`make migrate`).
        """
        await self.db.prepare_schema()
        if self.access_cache is not None:
            await self.access_cache.start()
        if self.settings.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(
                    self.settings.metrics_host, self.settings.metrics_port
                )
            except OSError as exc:
                raise PortUnavailable("METRICS_PORT", self.settings.metrics_port, exc) from exc
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind to address"
            raise PortUnavailable("GRPC_PORT", self.settings.grpc_port, exc) from exc
        if self.port == 0:
            raise PortUnavailable("GRPC_PORT", self.settings.grpc_port, None)
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.webhooks is not None:
            self.webhooks.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, keep serving for the drain period (load balancers stop routing
        here meanwhile), then stop accepting, let in-flight RPCs finish within the grace and
        close the pools."""
        await self.health.enter_graceful_shutdown()
        if self.webhooks is not None:
            await self.webhooks.close()  # before the feed: its followers are feed watchers
        await self.feed.close()  # watchers get UNAVAILABLE at once and resume on another replica
        if self.settings.shutdown_drain_seconds > 0:
            await asyncio.sleep(self.settings.shutdown_drain_seconds)
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self.access_cache is not None:
            await self.access_cache.close()
        if self._owns_limiter:
            await self.limiter.close()
        # After the drain, so the last RPCs can be scraped meanwhile; shutdown() blocks (polls).
        await asyncio.to_thread(self.metrics.stop)
        await self.db.dispose()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # exports the last spans


def tracing_for(settings: Settings) -> Tracing | None:
    """The server's tracing (server/tracing.py), None when it is off."""
    if settings.otlp_traces_endpoint is None:
        return None
    from server.tracing import Tracing  # imported only when on

    return Tracing(settings)


def webhook_dispatcher(
    settings: Settings, db: Database, feed: FeedHub, metrics: Metrics
) -> WebhookDispatcher:
    """The webhook dispatcher, configured from `settings`, reporting to `metrics` (not started)."""
    return WebhookDispatcher(
        db,
        feed,
        timeout_seconds=settings.webhook_timeout_seconds,
        retry_base_seconds=settings.webhook_retry_base_seconds,
        allow_private=settings.webhook_allow_private_urls,
        max_in_flight=settings.webhook_max_in_flight,
        retry_window_seconds=settings.webhook_retry_window_seconds,
        lease_seconds=settings.webhook_lease_seconds,
        renew_seconds=min(2.0, settings.webhook_lease_seconds / 3),
        observer=metrics.webhooks,
        track_backlog=settings.metrics_port is not None,
    )
