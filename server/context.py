"""Per-request identity, set by the interceptors and read by handlers."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestContext:
    """Who is calling, for which tenant; filled in as the interceptors pass."""

    request_id: str
    method: str
    partner_pk: int | None = None
    partner_id: str | None = None
    rate_limit_per_minute: int | None = None
    grant: tuple[str, str, bool] | None = None  # read with the credential (access.py)
    tenant_id: str | None = None
    sub_tenant_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    conflicting_headers: frozenset[str] = frozenset()  # identity headers sent twice, differently
    refusal: Exception | None = None  # why a gate refused the call (interceptors._refusal)
    started: float = field(default_factory=time.perf_counter)


current: ContextVar[RequestContext] = ContextVar("disposition_request")


def get() -> RequestContext:
    """The context of the RPC being served (raises LookupError outside one)."""
    return current.get()
