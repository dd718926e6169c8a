"""The interceptor: request id -> authentication -> tenant -> rate limit, then the handler.

One grpc.aio interceptor runs the gates in that order, as plain calls inside the handler it
returns for each method (made once per method and kept): no coroutine layer per gate, and a
gate that finds what it needs in memory (credentials, grants, a rate-limit lease) does not
suspend at all. Each gate refuses a call by raising its ServiceError.

The same wrapper owns the one translation of errors into gRPC statuses: what a gate or a
handler raises becomes its status (`_fail`); unknown exceptions become INTERNAL "Internal
server error", logged with the request id. It also writes the per-RPC log line and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from itertools import count
from typing import Any, NoReturn, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError

from server import context
from server.context import RequestContext
from server.db import Database
from server.errors import Forbidden, MalformedRequest, RateLimited, RepeatedHeader, ServiceError
from server.metrics import Metrics
from server.runtime.access_cache import AccessCache
from server.runtime.ratelimit import RateLimiter
from server.usecases import access

log = logging.getLogger("disposition.rpc")

# Infrastructure services stay reachable without credentials (grpcurl, load balancers).
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Metadata: TypeAlias = tuple[tuple[str, str], ...]
Rpc: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]
Behavior: TypeAlias = Callable[[Any, "Rpc"], Awaitable[Any]]
StreamBehavior: TypeAlias = Callable[[Any, "Rpc"], AsyncGenerator[Any, None]]

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


# Headers that say who is calling for whom: sent twice with different values, the request is
# ambiguous and refused (403 for credentials, 400 for the tenant headers), never read either way.
IDENTITY_HEADERS = frozenset(
    {"x-api-key", "x-api-secret", "x-partner-id", "x-tenant-id", "x-sub-tenant-id"}
)
_CREDENTIAL_HEADERS = frozenset({"x-api-key", "x-api-secret", "x-partner-id"})


def _headers(metadata: Any) -> tuple[dict[str, str], frozenset[str]]:
    """Invocation metadata as a dict (the first of repeated keys wins; binary keys are dropped),
    and the identity headers that were repeated with different values."""
    headers: dict[str, str] = {}
    conflicting = _NONE  # no allocation per request in the usual case
    for key, value in metadata or ():
        # (setdefault first: every key is recorded, repeated or not)
        if (isinstance(value, str) and headers.setdefault(key, value) != value
                and key in IDENTITY_HEADERS):  # fmt: skip
            conflicting = conflicting | {key}
    return headers, conflicting


_NONE: frozenset[str] = frozenset()

# Generated request ids: 32 hex digits, this process's random half and a counter (as unique as
# a UUID4 across processes, without a system call per request).
_ID_PREFIX = os.urandom(8).hex()
_next_id = count(int.from_bytes(os.urandom(4))).__next__


def _request_id(given: str | None) -> str:
    if given is not None and _REQUEST_ID.match(given):
        return given
    return f"{_ID_PREFIX}{_next_id() & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _is_exempt(method: str) -> bool:
    return method.startswith(EXEMPT_PREFIXES)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Names every RPC (`x-request-id`, accepted or generated), lets it through the gates,
    logs it and maps its errors."""

    def __init__(
        self,
        db: Database,
        *,
        cache: AccessCache | None,
        limiter: RateLimiter,
        default_per_minute: int,
        metrics: Metrics | None = None,
        trace_ids: Callable[[], str | None] | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.limiter = limiter
        self.default_per_minute = default_per_minute
        self.metrics = metrics
        # With tracing on: the current trace's id, read once the server span has started (the
        # tracing interceptor runs before this one), for the request's log line.
        self.trace_ids = trace_ids
        # The wrapped handler of each method, made on its first call (only for methods that
        # exist: unknown names are not kept).
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None or _is_exempt(method):
                return handler
            wrapped = self._wrapped[method] = self._wrap(handler)
        # The request's context, from the metadata grpc already converted for this call (the
        # handler runs in this task: it reads the contextvar).
        _begin(method, handler_call_details.invocation_metadata)
        return wrapped

    def _wrap(self, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(cast(Behavior, handler.unary_unary)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(cast(StreamBehavior, handler.unary_stream)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, behavior: Behavior) -> Behavior:
        metrics, trace_ids = self.metrics, self.trace_ids

        async def wrapper(request: Any, rpc: Rpc) -> Any:
            ctx = context.get()
            if trace_ids is not None:
                ctx.trace_id = trace_ids()
            try:
                await self._admit(ctx, request)
                response = await behavior(request, rpc)
            except asyncio.CancelledError:
                _log_rpc(ctx, "Cancelled", grpc.StatusCode.CANCELLED, metrics)
                raise
            except Exception as exc:
                await _fail(ctx, rpc, exc, metrics, self._quota(ctx))
            quota = self._quota(ctx)
            # The reply's HTTP headers through Envoy are its initial metadata (a unary reply's
            # trailing metadata does not reach REST clients): the quota goes in both.
            await rpc.send_initial_metadata((*ctx.reply_headers, *quota))
            _succeed(ctx, rpc, metrics, quota)
            return response

        return wrapper

    def _stream(self, behavior: StreamBehavior) -> StreamBehavior:
        metrics, trace_ids = self.metrics, self.trace_ids

        async def wrapper(request: Any, rpc: Rpc) -> AsyncGenerator[Any, None]:
            ctx = context.get()
            if trace_ids is not None:
                ctx.trace_id = trace_ids()
            try:
                await self._admit(ctx, request)
                # aclosing: the handler's stream ends (its finally blocks run) with this one.
                async with contextlib.aclosing(behavior(request, rpc)) as responses:
                    started = False
                    async for response in responses:
                        if not started:
                            # A stream's HTTP headers (SSE) are its initial metadata: they carry
                            # the quota too. Sent with the first message, so that a refusal
                            # before it is still a whole error reply.
                            started = True
                            await rpc.send_initial_metadata(self._quota(ctx))
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                # The client went away (a watcher disconnecting): cancelled while the handler
                # waited, or closed by grpc while this stream waited to send.
                _log_rpc(ctx, "Cancelled", grpc.StatusCode.CANCELLED, metrics)
                raise
            except Exception as exc:
                await _fail(ctx, rpc, exc, metrics, self._quota(ctx))
            _succeed(ctx, rpc, metrics, ())

        return wrapper

    def _quota(self, ctx: RequestContext) -> Metadata:
        """The rate-limit headers of an authenticated call's reply (IETF httpapi ratelimit
        headers, draft 7: limit, remaining and seconds to the reset of the current window, and
        the policy), from the limiter's memory; none before authentication."""
        if ctx.rate_limit is None or ctx.partner_id is None:
            return ()
        quota = self.limiter.quota(ctx.partner_id, ctx.rate_limit)
        return (
            ("ratelimit-limit", str(quota.limit)),
            ("ratelimit-remaining", str(quota.remaining)),
            ("ratelimit-reset", str(quota.reset_seconds)),
            ("ratelimit-policy", f"{quota.limit};w={quota.window_seconds}"),
        )

    async def _admit(self, ctx: RequestContext, request: Any) -> None:
        """The request must be a message, then the gates, in order; each raises what refuses
        the call. What the cache and the limiter's lease hold is checked without suspending."""
        if isinstance(request, _Undecodable):
            raise MalformedRequest()
        headers, cache = ctx.headers, self.cache
        # Authentication: `x-api-key` + `x-api-secret` (and `x-partner-id` when sent) must be a
        # live credential.
        if ctx.conflicting_headers & _CREDENTIAL_HEADERS:
            raise Forbidden()
        api_key, api_secret = headers.get("x-api-key"), headers.get("x-api-secret")
        partner_id = headers.get("x-partner-id")
        tenant = (headers.get("x-tenant-id"), headers.get("x-sub-tenant-id"))
        principal = access.authenticate_cached(
            cache, api_key=api_key, api_secret=api_secret, partner_id=partner_id, tenant=tenant
        ) or await access.authenticate(
            self.db, api_key=api_key, api_secret=api_secret, partner_id=partner_id,
            tenant=tenant, cache=cache,
        )  # fmt: skip
        ctx.partner_pk = principal.partner_pk
        ctx.partner_id = principal.partner_id
        # Rate limit, per partner: its own limit if set, else the default, per 60-second window.
        # Known from here on: every later reply carries the quota.
        ctx.rate_limit = principal.rate_limit_per_minute or self.default_per_minute
        # Tenant: both tenant headers are required, and the partner must be granted them.
        for name in ("x-tenant-id", "x-sub-tenant-id"):
            if name in ctx.conflicting_headers:
                raise RepeatedHeader(name)
        tenant_id, sub_tenant_id = access.require_tenant(*tenant)
        granted = access.granted_cached(
            principal.partner_pk, tenant_id, sub_tenant_id, principal.grant, cache
        )
        if granted is None:
            await access.authorize_tenant(
                self.db, partner_pk=principal.partner_pk, tenant_id=tenant_id,
                sub_tenant_id=sub_tenant_id, cache=cache,
            )  # fmt: skip
        elif not granted:
            raise Forbidden()
        ctx.tenant_id, ctx.sub_tenant_id = tenant_id, sub_tenant_id
        retry_after = await self.limiter.hit(principal.partner_id, ctx.rate_limit)
        if retry_after is not None:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(principal.partner_id).inc()
            raise RateLimited(retry_after)


def _begin(method: str, metadata: Any) -> RequestContext:
    """The RPC's context, from its metadata, as the request's contextvar."""
    headers, conflicting = _headers(metadata)
    ctx = RequestContext(_request_id(headers.get("x-request-id")), method, headers, conflicting)
    context.current.set(ctx)
    return ctx


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8)."""


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that reports garbage as a client error instead of an INTERNAL status."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable()

    return parse


async def _fail(
    ctx: RequestContext, rpc: Rpc, exc: Exception, metrics: Metrics | None, quota: Metadata
) -> NoReturn:
    """End the RPC with the status of a ServiceError; anything else is logged and INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    error = exc if isinstance(exc, ServiceError) else ServiceError()
    if error is not exc:
        log.exception("unhandled error", extra={"request_id": ctx.request_id, **_trace_of(ctx)})
    code = _STATUS_CODES[error.code]
    _log_rpc(ctx, type(error).__name__, code, metrics)
    await rpc.abort(
        code,
        error.message,
        trailing_metadata=(
            ("x-request-id", ctx.request_id),
            *quota,
            ("grpc-status-details-bin", error.to_status().SerializeToString()),
        ),
    )


def _succeed(ctx: RequestContext, rpc: Rpc, metrics: Metrics | None, quota: Metadata) -> None:
    _log_rpc(ctx, "OK", grpc.StatusCode.OK, metrics)
    rpc.set_trailing_metadata((("x-request-id", ctx.request_id), *quota))


def _log_rpc(
    ctx: RequestContext, outcome: str, code: grpc.StatusCode, metrics: Metrics | None
) -> None:
    """One line and one metrics sample per RPC; the duration counts from the interceptor."""
    seconds = time.perf_counter() - ctx.started
    if metrics is not None:
        metrics.observe_rpc(ctx.method, code.name, seconds)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "rpc",
            extra={
                "request_id": ctx.request_id,
                "method": ctx.method,
                "partner_id": ctx.partner_id,
                "tenant_id": ctx.tenant_id,
                "sub_tenant_id": ctx.sub_tenant_id,
                "outcome": outcome,
                "code": code.name,
                "duration_ms": round(seconds * 1000, 3),
                **_trace_of(ctx),
            },
        )


def _trace_of(ctx: RequestContext) -> dict[str, str]:
    """The log fields that name the request's trace (none with tracing off)."""
    return {} if ctx.trace_id is None else {"trace_id": ctx.trace_id}
