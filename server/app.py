"""Assembles the grpc.aio server: interceptors, services, health and reflection."""

from __future__ import annotations

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
from server.db import Database
from server.domain.feed import FeedHub
from server.domain.ratelimit import InProcessRateLimiter, RateLimiter
from server.interceptors import (
    AuthInterceptor,
    RateLimitInterceptor,
    RequestIdInterceptor,
    TenantInterceptor,
)
from server.servicers import CallIngestionService, DispositionService
from server.settings import Settings

SERVICE_NAMES = (
    disposition_pb2.DESCRIPTOR.services_by_name["DispositionService"].full_name,
    ingestion_pb2.DESCRIPTOR.services_by_name["CallIngestionService"].full_name,
)


class App:
    """A built, not yet started, server and what it owns."""

    def __init__(
        self, settings: Settings, db: Database, *, limiter: RateLimiter | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[
                RequestIdInterceptor(),
                AuthInterceptor(db),
                TenantInterceptor(db),
                RateLimitInterceptor(
                    limiter or InProcessRateLimiter(), settings.rate_limit_per_minute
                ),
            ],
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
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        await self.db.create_schema()
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind the gRPC server to {address}")
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within the grace, close the pools."""
        await self.health.enter_graceful_shutdown()
        await self.feed.close()  # watchers get UNAVAILABLE at once instead of holding the drain
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self.db.dispose()
