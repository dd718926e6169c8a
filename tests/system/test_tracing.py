"""Tracing (docs/operations.md#tracing): one REST request is one trace, from Envoy's span through
the server's to the database's, received by a real OTLP/gRPC collector running in this process;
and with tracing off, nothing is traced, exported or logged (nor is the tracing code even loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from devstack.envoy import _admin_get
from gateway.envoy_config import TEMPLATE, render
from tests.support import BIN, REPO
from tests.support.rest import Stack, start_stack

UPDATE_METHOD = "/disposition.v1.DispositionService/UpdateDispositionStatus"


@dataclass(frozen=True)
class Received:
    """One span as the collector got it, with the service.name of its resource and the name of
    its instrumentation scope."""

    service: str
    scope: str
    span: Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    def attribute(self, key: str) -> str | None:
        return _string(self.span.attributes, key)


def _string(attributes: Any, key: str) -> str | None:
    values: list[KeyValue] = [kv for kv in attributes if kv.key == key]
    return values[0].value.string_value if values else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (opentelemetry.proto's TraceService) that keeps every span."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._changed = threading.Condition()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._changed:
            for resource_spans in request.resource_spans:
                service = _string(resource_spans.resource.attributes, "service.name") or ""
                for scope_spans in resource_spans.scope_spans:
                    scope = scope_spans.scope.name
                    self.spans.extend(Received(service, scope, span) for span in scope_spans.spans)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(
        self, found: Callable[[list[Received]], bool], timeout: float = 30.0
    ) -> list[Received]:
        """The spans received, once `found` holds for them (exporters send in batches)."""
        with self._changed:
            if not self._changed.wait_for(lambda: found(self.spans), timeout):
                raise AssertionError(f"not received within {timeout} s: {self.spans}")
            return list(self.spans)


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    """A collector on an ephemeral port: (it, its port)."""
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


def envoy_traces(stack: Stack) -> bool:
    """Whether the running Envoy's configuration has an OpenTelemetry tracer."""
    _, dump = _admin_get(stack.envoy.admin_port, "/config_dump")
    return '"type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"' in dump


def rpc_lines(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in stack.server.log_lines()
        if line.get("message") == "rpc" and line.get("request_id") == request_id
    ]


def statement(span: Received) -> str:
    return span.attribute("db.statement") or ""


def ancestors(span: Received, spans: list[Received]) -> list[Received]:
    by_id = {other.span_id: other for other in spans}
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


@pytest.mark.envoy
def test_a_rest_request_is_one_trace_from_envoy_to_the_database(
    tmp_path: Path, database_url: str, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # the server's batches: every 100 ms (5 s by default)
        "ACCESS_CACHE_SECONDS": "0",  # credentials read from the database: a read span too
    }
    # The engine's instrumentation for the reads (the SQLAlchemy engines' statements).
    reads_by = (
        "opentelemetry.instrumentation.sqlalchemy"
        if database_url.startswith("sqlite")
        else "opentelemetry.instrumentation.asyncpg"
    )
    trace_id, caller_span = os.urandom(16).hex(), os.urandom(8).hex()
    request_id = str(uuid.uuid4())
    for stack in start_stack(tmp_path, database_url, env):
        assert envoy_traces(stack)
        reply = stack.put(
            {"customer_id": "customer123", "disposition_status": "interested"},
            traceparent=f"00-{trace_id}-{caller_span}-01",
            x_request_id=request_id,
        )
        assert (reply.status, reply.body) == (200, b'{"success":true}')
        assert reply.header("x-request-id") == request_id  # tracing leaves the request id alone

        def ours(spans: list[Received]) -> list[Received]:
            return [span for span in spans if span.trace_id == trace_id]

        def complete(spans: list[Received]) -> bool:
            found = ours(spans)
            return (
                any(span.service == "disposition-envoy" for span in found)
                and any(span.span.name == UPDATE_METHOD for span in found)
                and any("INSERT INTO disposition_history" in statement(span) for span in found)
                and any(span.scope == reads_by for span in found)
            )

        spans = ours(receiver.wait_for(complete))
        (envoy,) = [span for span in spans if span.service == "disposition-envoy"]
        (server,) = [span for span in spans if span.span.name == UPDATE_METHOD]
        # Envoy's span is the caller's child; the server's is Envoy's (Envoy sent it upstream).
        assert envoy.parent_id == caller_span
        assert (server.service, server.span.kind) == ("disposition-server", Span.SPAN_KIND_SERVER)
        assert server.parent_id == envoy.span_id
        # The database's spans are below the server span: the change's writes (through the
        # group commit and, on SQLite, the writer thread) and the credentials' read.
        writes = [span for span in spans if "INSERT INTO disposition_history" in statement(span)]
        reads = [span for span in spans if span.scope == reads_by and statement(span)]
        for span in (*writes, *reads):
            assert span.span.kind == Span.SPAN_KIND_CLIENT
            assert server in ancestors(span, spans), (span, server)
        # The request's log line names its trace.
        (line,) = rpc_lines(stack, request_id)
        assert (line["code"], line["trace_id"]) == ("OK", trace_id)


@pytest.mark.envoy
def test_with_tracing_off_nothing_is_traced(
    tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    """An endpoint alone does not trace when OTEL_TRACES_EXPORTER=none: Envoy has no tracer, no
    log line names a trace, and once the stack has stopped (a tracing server exports its last
    spans as it stops) the collector has received nothing."""
    receiver, port = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_TRACES_EXPORTER": "none",
    }
    request_id = str(uuid.uuid4())
    for stack in start_stack(tmp_path, None, env):
        assert not envoy_traces(stack)
        reply = stack.put(
            {"customer_id": "customer123", "disposition_status": "interested"},
            traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01",
            x_request_id=request_id,
        )
        assert reply.status == 200
        (line,) = rpc_lines(stack, request_id)
        assert "trace_id" not in line
        assert all("trace_id" not in line for line in stack.server.log_lines())
    assert receiver.spans == []


# What tracing loads. (redis-py imports OpenTelemetry's metrics API when it is installed, for
# metrics of its own that stay off unless an application turns them on.)
TRACING_MODULES = (
    "server.tracing",
    "opentelemetry.sdk.trace",
    "opentelemetry.instrumentation",
    "opentelemetry.exporter",
)


def test_without_an_endpoint_tracing_is_not_even_loaded(tmp_path: Path) -> None:
    """A server built without OTEL_* variables loads none of the tracing code."""
    program = f"""
import json, sys
from server.app import App
from server.db import Database
from server.settings import Settings
settings = Settings.from_env()
app = App(settings, Database(settings))
loaded = sorted(m for m in sys.modules if m.startswith({TRACING_MODULES!r}))
print(json.dumps([app.tracing is None, loaded]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'disposition.db'}"
    out = subprocess.run(
        [str(BIN / "python"), "-c", program], env=env, cwd=REPO, check=True, capture_output=True
    ).stdout
    assert json.loads(out) == [True, []]


def test_envoy_config_traces_only_with_an_endpoint(tmp_path: Path) -> None:
    """The repository's envoy.yaml has no tracer; rendered with an endpoint, its collector is
    that endpoint's host and port (TLS for https); anything else is refused."""
    plain = render(out_path=tmp_path / "plain.yaml").read_text()
    assert "envoy.tracers.opentelemetry" not in TEMPLATE.read_text() + plain
    traced = render(otlp_endpoint="http://collector:4318", out_path=tmp_path / "t.yaml")
    text = traced.read_text()
    assert "name: envoy.tracers.opentelemetry" in text and "pack_trace_reason: false" in text
    assert "socket_address: { address: collector, port_value: 4318 }" in text
    assert "UpstreamTlsContext" not in text
    secure = render(otlp_endpoint="https://otel.example.com", out_path=tmp_path / "s.yaml")
    assert "port_value: 4317 }" in secure.read_text()
    assert "sni: otel.example.com" in secure.read_text()
    with pytest.raises(ValueError, match="http://host:port"):
        render(otlp_endpoint="collector:4317", out_path=tmp_path / "bad.yaml")
