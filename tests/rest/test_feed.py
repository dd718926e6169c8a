"""The change feed through Envoy's native gRPC route, as internal services may watch it."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from devstack import Credentials, run_envoy
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from tests.support.grpc_calls import Watcher, ingest


@pytest.mark.envoy
async def test_the_feed_streams_through_envoy(
    app: App, ingestion: Any, partner: Credentials, tmp_path: Any
) -> None:
    """Internal services may watch through the same Envoy (its native gRPC route)."""
    with run_envoy(grpc_port=app.port, log_path=tmp_path / "envoy.log") as envoy:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.http_port}") as channel:
            watcher = Watcher(disposition_grpc.DispositionServiceStub(channel), partner)
            try:
                assert (await watcher.first()).cursor == 0
                await ingest(ingestion, partner, "via-envoy", status="seen")
                [change] = await watcher.changes(1)
                assert (change.cursor, change.customer_id) == (1, "via-envoy")
            finally:
                watcher.cancel()
