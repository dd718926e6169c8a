"""Interceptors, outermost first: request id -> authentication -> tenant -> rate limit.

The request-id interceptor also owns the one translation of errors into gRPC
statuses: gates that refuse a call return a handler that raises their error,
and handlers raise domain errors; both surface in `_translate_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from server import context
from server.context import RequestContext
from server.db import Database
from server.domain import access
from server.domain.access_cache import AccessCache
from server.domain.ratelimit import RateLimiter
from server.errors import Forbidden, MalformedRequest, RateLimited, RepeatedHeader, ServiceError
from server.metrics import Metrics

log = logging.getLogger("disposition.rpc")

# Infrastructure services stay reachable without credentials (grpcurl, load balancers).
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
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


def _headers(details: grpc.HandlerCallDetails) -> tuple[dict[str, str], frozenset[str]]:
    """Invocation metadata as a dict (the first of repeated keys wins; binary keys are dropped),
    and the identity headers that were repeated with different values."""
    headers: dict[str, str] = {}
    conflicting = _NONE  # no allocation per request in the usual case
    for key, value in details.invocation_metadata or ():
        # (setdefault first: every key is recorded, repeated or not)
        if (isinstance(value, str) and headers.setdefault(key, value) != value
                and key in IDENTITY_HEADERS):  # fmt: skip
            conflicting = conflicting | {key}
    return headers, conflicting


_NONE: frozenset[str] = frozenset()


def _is_exempt(details: grpc.HandlerCallDetails) -> bool:
    return details.method.startswith(EXEMPT_PREFIXES)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Names every RPC (`x-request-id`, accepted or generated), logs it and maps its errors."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        # The wrapped handler of each method's handler, made once (the wrappers read the
        # request's context from the contextvar, nothing per call is baked into them).
        self._wrapped: dict[Handler, Handler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        headers, conflicting = _headers(handler_call_details)
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        context.current.set(
            RequestContext(
                request_id=request_id,
                method=handler_call_details.method,
                headers=headers,
                conflicting_headers=conflicting,
            )
        )
        handler = await continuation(handler_call_details)
        if handler is None or _is_exempt(handler_call_details):
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = self._wrap(handler)
        return wrapped

    def _wrap(self, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _translate_errors(cast(Behavior, handler.unary_unary), self.metrics),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _translate_stream_errors(cast(StreamBehavior, handler.unary_stream), self.metrics),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


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


def _translate_errors(behavior: Behavior, metrics: Metrics | None) -> Behavior:
    async def wrapper(request: Any, rpc: Rpc) -> Any:
        ctx = context.get()
        try:
            if isinstance(request, _Undecodable):
                raise MalformedRequest()
            response = await behavior(request, rpc)
        except asyncio.CancelledError:
            _log_rpc(ctx, "Cancelled", grpc.StatusCode.CANCELLED, metrics)
            raise
        except Exception as exc:
            await _fail(ctx, rpc, exc, metrics)
        _log_rpc(ctx, "OK", grpc.StatusCode.OK, metrics)
        rpc.set_trailing_metadata((("x-request-id", ctx.request_id),))
        return response

    return wrapper


def _translate_stream_errors(behavior: StreamBehavior, metrics: Metrics | None) -> StreamBehavior:
    async def wrapper(request: Any, rpc: Rpc) -> AsyncGenerator[Any, None]:
        ctx = context.get()
        try:
            if isinstance(request, _Undecodable):
                raise MalformedRequest()
            # aclosing: the handler's stream ends (its finally blocks run) with this one.
            async with contextlib.aclosing(behavior(request, rpc)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (a watcher disconnecting): cancelled while the handler
            # waited, or closed by grpc while this stream waited to send.
            _log_rpc(ctx, "Cancelled", grpc.StatusCode.CANCELLED, metrics)
            raise
        except Exception as exc:
            await _fail(ctx, rpc, exc, metrics)
        _log_rpc(ctx, "OK", grpc.StatusCode.OK, metrics)
        rpc.set_trailing_metadata((("x-request-id", ctx.request_id),))

    return wrapper


async def _fail(ctx: RequestContext, rpc: Rpc, exc: Exception, metrics: Metrics | None) -> NoReturn:
    """End the RPC with the status of a ServiceError; anything else is logged and INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    error = exc if isinstance(exc, ServiceError) else ServiceError()
    if error is not exc:
        log.exception("unhandled error", extra={"request_id": ctx.request_id})
    code = _STATUS_CODES[error.code]
    _log_rpc(ctx, type(error).__name__, code, metrics)
    await rpc.abort(
        code,
        error.message,
        trailing_metadata=(
            ("x-request-id", ctx.request_id),
            ("grpc-status-details-bin", error.to_status().SerializeToString()),
        ),
    )


def _log_rpc(
    ctx: RequestContext, outcome: str, code: grpc.StatusCode, metrics: Metrics | None
) -> None:
    """One line and one metrics sample per RPC; the duration counts from the first interceptor."""
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
            },
        )


async def _refuse(_request: Any, _rpc: Rpc) -> Any:
    raise _refusal_of(context.get())


async def _refuse_stream(_request: Any, _rpc: Rpc) -> AsyncIterator[Any]:
    raise _refusal_of(context.get())
    yield  # a generator, like the handler it stands in for


def _refusal_of(ctx: RequestContext) -> Exception:
    assert ctx.refusal is not None
    return ctx.refusal


# One handler of each kind for every refusal (the error travels in the request's context), so
# that RequestIdInterceptor's cache of wrapped handlers stays one entry per method.
_REFUSE: Handler = grpc.unary_unary_rpc_method_handler(_refuse)
_REFUSE_STREAM: Handler = grpc.unary_stream_rpc_method_handler(_refuse_stream)


def _refusal(error: ServiceError, method: str) -> Handler:
    """A handler of the method's kind that fails with `error` (surfaced by _translate_errors)."""
    context.get().refusal = error
    return _REFUSE_STREAM if _is_server_streaming(method) else _REFUSE


@functools.cache
def _is_server_streaming(method: str) -> bool:
    """Whether `/package.Service/Method` streams its responses (by its proto descriptor)."""
    service, _, name = method.strip("/").rpartition("/")
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return False
    found = descriptor.methods_by_name.get(name)
    return found is not None and found.server_streaming


class _Gate(grpc.aio.ServerInterceptor):
    """An interceptor that lets a call pass or refuses it with a ServiceError."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        if _is_exempt(handler_call_details):
            return await continuation(handler_call_details)
        try:
            await self.check(context.get())
        except ServiceError as error:
            return _refusal(error, handler_call_details.method)
        return await continuation(handler_call_details)

    async def check(self, ctx: RequestContext) -> None:
        raise NotImplementedError


class AuthInterceptor(_Gate):
    """`x-api-key` + `x-api-secret` (and `x-partner-id` when sent) must be a live credential."""

    def __init__(self, db: Database, cache: AccessCache | None = None) -> None:
        self.db = db
        self.cache = cache

    async def check(self, ctx: RequestContext) -> None:
        if ctx.conflicting_headers & {"x-api-key", "x-api-secret", "x-partner-id"}:
            raise Forbidden()
        principal = await access.authenticate(
            self.db,
            api_key=ctx.headers.get("x-api-key"),
            api_secret=ctx.headers.get("x-api-secret"),
            partner_id=ctx.headers.get("x-partner-id"),
            tenant=(ctx.headers.get("x-tenant-id"), ctx.headers.get("x-sub-tenant-id")),
            cache=self.cache,
        )
        ctx.grant = principal.grant
        ctx.partner_pk = principal.partner_pk
        ctx.partner_id = principal.partner_id
        ctx.rate_limit_per_minute = principal.rate_limit_per_minute


class TenantInterceptor(_Gate):
    """Both tenant headers are required, and the partner must be granted them."""

    def __init__(self, db: Database, cache: AccessCache | None = None) -> None:
        self.db = db
        self.cache = cache

    async def check(self, ctx: RequestContext) -> None:
        for name in ("x-tenant-id", "x-sub-tenant-id"):
            if name in ctx.conflicting_headers:
                raise RepeatedHeader(name)
        tenant_id, sub_tenant_id = access.require_tenant(
            ctx.headers.get("x-tenant-id"), ctx.headers.get("x-sub-tenant-id")
        )
        assert ctx.partner_pk is not None
        await access.authorize_tenant(
            self.db,
            partner_pk=ctx.partner_pk,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            known=ctx.grant,
            cache=self.cache,
        )
        ctx.tenant_id, ctx.sub_tenant_id = tenant_id, sub_tenant_id


class RateLimitInterceptor(_Gate):
    """Per partner: its own limit if set, else the default, per 60-second window."""

    def __init__(
        self, limiter: RateLimiter, default_per_minute: int, metrics: Metrics | None = None
    ) -> None:
        self.limiter = limiter
        self.default_per_minute = default_per_minute
        self.metrics = metrics

    async def check(self, ctx: RequestContext) -> None:
        assert ctx.partner_id is not None
        limit = ctx.rate_limit_per_minute or self.default_per_minute
        retry_after = await self.limiter.hit(ctx.partner_id, limit)
        if retry_after is not None:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(ctx.partner_id).inc()
            raise RateLimited(retry_after)
