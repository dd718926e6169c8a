"""Tracing with OpenTelemetry: one trace per request, from Envoy's span to the database's.

Built only when Settings.otlp_traces_endpoint is set (server/app.py imports this module only
then, so with tracing off neither it nor the SDK's tracing and the instrumentations are loaded,
let alone run per request).

- The server span: the grpc.aio instrumentation's interceptor, first in the chain (so it covers
  the gates and the handler, and the request's log line can name its trace), the child of the
  `traceparent` the caller (Envoy) sent. Health checks and reflection are not traced.
- Database spans, children of the span current where the statement runs: the SQLAlchemy
  instrumentation on SQLite's engines; a span per statement of the SQLite writer thread's own
  connection (the partner API's writes), which runs each unit in the context of whoever
  submitted it (storage/sqlite_writer.py; a group commit runs in its first update's context,
  runtime/update_groups.py); on PostgreSQL the asyncpg instrumentation, which sees both the
  SQLAlchemy engines' statements and the units of work's.
- Spans export in batches by OTLP over gRPC. A trace is started by a request only: a span with
  no parent that is not a server span (a background poll's statement) is not sampled.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.util.types import Attributes

from server.db import Database
from server.interceptors import EXEMPT_PREFIXES
from server.settings import Settings


class Tracing:
    """The server's tracer provider, its exporter, and what it instruments."""

    def __init__(self, settings: Settings) -> None:
        assert settings.otlp_traces_endpoint is not None, "tracing is off"
        ratio = settings.trace_sampling_ratio
        root: Sampler = (
            ALWAYS_ON if ratio >= 1 else ALWAYS_OFF if ratio <= 0 else TraceIdRatioBased(ratio)
        )
        self.provider = TracerProvider(
            sampler=RequestsOnly(ParentBased(root) if settings.trace_follows_parent else root),
            resource=Resource.create({SERVICE_NAME: settings.service_name}),
            shutdown_on_exit=False,  # App.stop shuts it down, exporting what is left
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_traces_endpoint))
        )
        self.tracer = self.provider.get_tracer(__name__)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The server span's interceptor: it goes first, before the service's own."""
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(
            tracer_provider=self.provider,
            filter_=lambda details: not details.method.startswith(EXEMPT_PREFIXES),
        )
        return interceptor

    def instrument(self, db: Database) -> None:
        """Database spans for `db`'s statements (before it connects)."""
        if db.sqlite_writer is None:
            AsyncPGInstrumentor().instrument(tracer_provider=self.provider)
            return
        # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1; the events it listens
        # to are the same in 2.1 (tests/system/test_tracing.py sees its spans).
        SQLAlchemyInstrumentor().instrument(
            engines=[db.writer.sync_engine, db.reader.sync_engine],
            tracer_provider=self.provider,
            skip_dep_check=True,
        )
        db.sqlite_writer.connection_class = traced_sqlite(self.tracer, db.sqlite_writer.path)

    @staticmethod
    def trace_id() -> str | None:
        """The trace id of the current span (32 hex digits); None outside any trace."""
        span_context = trace.get_current_span().get_span_context()
        return format(span_context.trace_id, "032x") if span_context.is_valid else None

    def shutdown(self) -> None:
        """Export the spans still buffered and stop (blocks: run it off the event loop)."""
        self.provider.shutdown()


class RequestsOnly(Sampler):
    """`sampler`'s decision, except that only a server span may start a trace: a span with no
    parent of another kind (a statement of a background poll or of the webhook dispatcher) is
    dropped, and so are its children."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is not SpanKind.SERVER and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self.sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RequestsOnly{{{self.sampler.get_description()}}}"


def traced_sqlite(tracer: Tracer, path: Path) -> type[sqlite3.Connection]:
    """A sqlite3 connection class whose statements are spans (children of the current span),
    with the attributes the SQLAlchemy instrumentation gives its own."""

    class TracedConnection(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            with _statement_span(tracer, sql, path):
                return super().execute(sql, parameters)

        def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
            with _statement_span(tracer, sql, path):
                return super().executemany(sql, parameters)

    return TracedConnection


def _statement_span(tracer: Tracer, sql: str, path: Path) -> AbstractContextManager[trace.Span]:
    operation = sql.split(None, 1)[0] if sql.strip() else "sqlite"
    return tracer.start_as_current_span(
        f"{operation} {path}",  # as the SQLAlchemy instrumentation names SQLite's statements
        kind=SpanKind.CLIENT,
        attributes={"db.system": "sqlite", "db.name": str(path), "db.statement": sql},
    )
