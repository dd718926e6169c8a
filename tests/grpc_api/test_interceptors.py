"""The interceptor every RPC passes (server/interceptors.py): a request id first, then the gates
in order (authentication, tenant, rate limit) before the handler, each refusing with its own
status; and the one place where errors become gRPC statuses, an unknown one INTERNAL without its
detail. (Each gate's refusals, one by one: test_access_errors in test_grpc_api.py.)"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.runtime.ratelimit import Quota
from tests.support.databases import settings_for
from tests.support.grpc_calls import details, fail, ingest, trailing, update_request

UPDATE = "/disposition.v1.DispositionService/UpdateDispositionStatus"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


class RecordingLimiter:
    """A rate limiter that records who reached the rate-limit gate, with which limit, and refuses
    whatever passes the limit (42 s to wait; no clock, so no window boundary to cross)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, int]] = []

    async def hit(self, key: str, limit: int) -> int | None:
        self.hits.append((key, limit))
        return None if self.hits.count((key, limit)) <= limit else 42

    def quota(self, key: str, limit: int) -> Quota:
        return Quota(limit, max(0, limit - self.hits.count((key, limit))), 42, 60)

    async def close(self) -> None:
        pass


@pytest.fixture
async def gated(database_url: str, db: Database) -> AsyncIterator[tuple[Any, RecordingLimiter]]:
    """A real server whose rate limiter records its calls; a DispositionService stub to it."""
    limiter = RecordingLimiter()
    server = App(settings_for(database_url), Database(settings_for(database_url)), limiter=limiter)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield disposition_grpc.DispositionServiceStub(channel), limiter
    finally:
        await server.stop(grace=1)


async def refusal(stub: Any, metadata: Any) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, x-request-id trailer) of an UpdateDispositionStatus that is refused."""
    error = await fail(
        stub.UpdateDispositionStatus(update_request("nobody", "x"), metadata=metadata)
    )
    return error.code(), error.details() or "", await trailing(error, "x-request-id")


# --- the order of the gates -----------------------------------------------------------------


async def test_a_call_refused_by_a_gate_never_reaches_the_later_ones(
    gated: tuple[Any, RecordingLimiter], partner: Credentials
) -> None:
    stub, limiter = gated
    refused = [
        # Authentication before the tenant headers: bad credentials and no tenant is Forbidden.
        ({"x_api_secret": "ds_wrong", "x_tenant_id": None}, "PERMISSION_DENIED", "Forbidden"),
        # The tenant before the rate limit.
        ({"x_tenant_id": None}, "INVALID_ARGUMENT", "Tenant ID is required"),
        ({"x_tenant_id": "tenant2"}, "PERMISSION_DENIED", "Forbidden"),
    ]
    for n, (overrides, code, message) in enumerate(refused):
        metadata = partner.metadata(**overrides, x_request_id=f"gate-{n}")
        assert await refusal(stub, metadata) == (grpc.StatusCode[code], message, f"gate-{n}")
    assert limiter.hits == []  # none of them reached the rate limit
    # Through every gate, the handler answers (the customer does not exist), once counted.
    assert await refusal(stub, partner.metadata(x_request_id="through")) == (
        grpc.StatusCode.NOT_FOUND,
        "Customer not found",
        "through",
    )
    assert limiter.hits == [("123", 120)]  # the default limit: partner 123 has none of its own


async def test_the_rate_limit_is_the_last_gate(
    gated: tuple[Any, RecordingLimiter], db: Database
) -> None:
    stub, limiter = gated
    limited = await onboard(db, "limited", rate_limit_per_minute=1)
    assert (await refusal(stub, limited.metadata()))[0] == grpc.StatusCode.NOT_FOUND  # allowed
    error = await fail(
        stub.UpdateDispositionStatus(
            update_request("nobody", "x"), metadata=limited.metadata(x_request_id="over")
        )
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Rate limit exceeded. Try again in 60 seconds.",  # the documented message
    )
    assert details(error)["RetryInfo"].retry_delay.seconds == 42  # the limiter's own wait
    assert await trailing(error, "x-request-id") == "over"
    # Over the limit, the earlier gates still answer first, and what they refuse is not counted.
    assert (await refusal(stub, limited.metadata(x_api_secret="ds_wrong")))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "Forbidden",
    )
    assert (await refusal(stub, limited.metadata(x_sub_tenant_id=None)))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Sub-Tenant ID is required",
    )
    assert limiter.hits == [("limited", 1), ("limited", 1)]  # its own limit


async def quota_trailers(error_or_call: Any) -> dict[str, str | None]:
    names = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")
    return {name: await trailing(error_or_call, name) for name in names}


async def test_replies_after_authentication_carry_the_quota(
    gated: tuple[Any, RecordingLimiter], db: Database
) -> None:
    """(Successful replies too: tests/rest/test_rest_contract.py, through Envoy.)"""
    stub, _ = gated
    limited = await onboard(db, "limited", rate_limit_per_minute=2)
    quota = {"ratelimit-limit": "2", "ratelimit-reset": "42", "ratelimit-policy": "2;w=60"}
    for remaining in ("1", "0"):  # a refusal by the use case (404) counts like a success
        error = await fail(stub.UpdateDispositionStatus(update_request("nobody", "x"),
                                                        metadata=limited.metadata()))  # fmt: skip
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert await quota_trailers(error) == quota | {"ratelimit-remaining": remaining}
    error = await fail(stub.UpdateDispositionStatus(update_request("nobody", "x"),
                                                    metadata=limited.metadata()))  # fmt: skip
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await quota_trailers(error) == quota | {"ratelimit-remaining": "0"}
    # Authenticated, refused before the limit (not counted): the quota as it stands.
    no_sub_tenant = limited.metadata(x_sub_tenant_id=None)
    error = await fail(stub.UpdateDispositionStatus(update_request("nobody", "x"),
                                                    metadata=no_sub_tenant))  # fmt: skip
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await quota_trailers(error))["ratelimit-limit"] == "2"
    # Not authenticated: no quota to tell.
    wrong_secret = limited.metadata(x_api_secret="ds_wrong")
    error = await fail(stub.UpdateDispositionStatus(update_request("nobody", "x"),
                                                    metadata=wrong_secret))  # fmt: skip
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert set((await quota_trailers(error)).values()) == {None}


async def test_a_successful_call_carries_the_quota_as_initial_and_trailing_metadata(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingest(ingestion, partner, "q1")
    call = dispositions.UpdateDispositionStatus(
        update_request("q1", "interested"), metadata=partner.metadata()
    )
    await call
    trailers = await quota_trailers(call)
    initial = dict(await call.initial_metadata())
    assert {name: initial.get(name) for name in trailers} == trailers
    assert (trailers["ratelimit-limit"], trailers["ratelimit-policy"]) == ("120", "120;w=60")
    # The ingestion, then this call (119: a window began between them).
    assert trailers["ratelimit-remaining"] in ("118", "119")
    assert 1 <= int(trailers["ratelimit-reset"] or "0") <= 60


async def test_undecodable_request_bytes_are_refused_before_authentication(
    channel: grpc.aio.Channel,
) -> None:
    """A request that is not a valid message (a string field that is not UTF-8) is a client
    error, whoever sends it: checked before the credentials, never INTERNAL."""
    raw = channel.unary_unary(UPDATE)  # bytes in, bytes out
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\x0a\x02\xff\xfe", metadata=(("x-request-id", "garbage"),))
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid request body",
    )
    assert details(caught.value)["ErrorInfo"].reason == "MALFORMED_REQUEST"
    assert await trailing(caught.value, "x-request-id") == "garbage"


async def test_health_checks_need_no_credentials(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = disposition_grpc.DispositionServiceStub(channel)
    error = await fail(
        stub.GetDispositionStatus(disposition_pb2.GetDispositionStatusRequest(customer_id="c"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# --- request ids ----------------------------------------------------------------------------


async def test_request_id_is_accepted_returned_and_recorded(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "c1")
    call = dispositions.UpdateDispositionStatus(
        update_request("c1", "interested"), metadata=partner.metadata(x_request_id="req-42")
    )
    await call
    assert await trailing(call, "x-request-id") == "req-42"
    generated = dispositions.UpdateDispositionStatus(
        update_request("c1", "x"), metadata=partner.metadata()
    )
    await generated
    assert len(await trailing(generated, "x-request-id") or "") == 32
    error = await fail(
        dispositions.UpdateDispositionStatus(
            update_request("nobody", "x"), metadata=partner.metadata(x_request_id="req-43")
        )
    )
    assert await trailing(error, "x-request-id") == "req-43"


@pytest.mark.parametrize("given", ["has space", "a" * 129, "semi;colon", "quote'd"])
async def test_a_request_id_that_is_not_a_plain_token_is_replaced(
    dispositions: Any, ingestion: Any, partner: Credentials, given: str
) -> None:
    await ingest(ingestion, partner, "c1")
    call = dispositions.UpdateDispositionStatus(
        update_request("c1", "x"), metadata=partner.metadata(x_request_id=given)
    )
    await call
    generated = await trailing(call, "x-request-id")
    assert generated is not None and GENERATED_ID.match(generated), generated
    again = dispositions.UpdateDispositionStatus(
        update_request("c1", "y"), metadata=partner.metadata(x_request_id=given)
    )
    await again
    assert await trailing(again, "x-request-id") != generated  # one per call


# --- errors become statuses -----------------------------------------------------------------


async def test_unexpected_errors_are_internal_and_logged_with_request_id(
    dispositions: Any,
    partner: Credentials,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from server.usecases import dispositions as domain

    async def broken(*_args: Any, **_kwargs: Any) -> bool:
        raise RuntimeError("secret database detail")

    monkeypatch.setattr(domain, "update_disposition_status", broken)
    with caplog.at_level(logging.ERROR, logger="disposition.rpc"):
        error = await fail(
            dispositions.UpdateDispositionStatus(
                update_request("c1", "x"), metadata=partner.metadata(x_request_id="req-500")
            )
        )
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")
    assert "secret database detail" not in str(error.trailing_metadata())
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].request_id == "req-500"  # type: ignore[attr-defined]
    assert "secret database detail" in logged[0].exc_text  # type: ignore[operator]


async def test_an_unexpected_error_in_a_stream_is_internal_too(
    app: App,
    dispositions: Any,
    partner: Credentials,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(**_kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("secret feed detail")
        yield  # an async generator, as the feed's watch is

    monkeypatch.setattr(app.feed, "watch", broken)
    call = dispositions.WatchDispositionChanges(
        disposition_pb2.WatchDispositionChangesRequest(),
        metadata=partner.metadata(x_request_id="req-stream"),
    )
    with (
        caplog.at_level(logging.ERROR, logger="disposition.rpc"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        async for _ in call:
            pass
    error = caught.value
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")
    assert details(error)["ErrorInfo"].reason == "INTERNAL"
    assert await trailing(error, "x-request-id") == "req-stream"
    assert "secret feed detail" not in str(error.trailing_metadata())
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].request_id == "req-stream"  # type: ignore[attr-defined]
