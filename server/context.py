"""Per-request identity, set by the interceptor and read by handlers."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from server.records import Caller


@dataclass(slots=True)
class RequestContext:
    """Who is calling, for which tenant; filled in as the gates pass."""

    request_id: str
    method: str
    headers: dict[str, str] = field(default_factory=dict)
    conflicting_headers: frozenset[str] = frozenset()  # identity headers sent twice, differently
    partner_pk: int | None = None
    partner_id: str | None = None
    tenant_id: str | None = None
    sub_tenant_id: str | None = None
    rate_limit: int | None = None  # the partner's requests per window, once authenticated
    # Initial metadata (HTTP headers) for a successful unary reply, sent by the interceptor.
    reply_headers: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    trace_id: str | None = None  # the request's trace, when tracing is on (logged with it)


current: ContextVar[RequestContext] = ContextVar("disposition_request")


def get() -> RequestContext:
    """The context of the RPC being served (raises LookupError outside one)."""
    return current.get()


def caller() -> Caller:
    """Who the RPC being served acts for, once the interceptor's gates passed."""
    ctx = current.get()
    assert ctx.partner_pk is not None and ctx.partner_id is not None
    assert ctx.tenant_id is not None and ctx.sub_tenant_id is not None
    return Caller(ctx.partner_pk, ctx.partner_id, ctx.tenant_id, ctx.sub_tenant_id, ctx.request_id)
