"""The gRPC API against a real grpc.aio server on an ephemeral port and a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from devstack import Credentials, onboard
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from server.app import App
from server.db import Database
from server.usecases import partners
from tests.support.grpc_calls import (
    access_change_seen,
    details,
    fail,
    history,
    ingest,
    stored_status,
    update_request,
    violations,
)

UPDATE = "/disposition.v1.DispositionService/UpdateDispositionStatus"


async def test_update_sets_changes_and_clears_with_history(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "customer123")
    md = partner.metadata()
    reply = await dispositions.UpdateDispositionStatus(
        update_request("customer123", "interested"), metadata=md
    )
    assert reply == disposition_pb2.UpdateDispositionStatusResponse(success=True)
    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "interested"), metadata=md
    )
    await dispositions.UpdateDispositionStatus(update_request("customer123"), metadata=md)
    assert await stored_status(db, "customer123") == "interested"
    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "do_not_call"), metadata=md
    )
    await dispositions.UpdateDispositionStatus(update_request("customer123", ""), metadata=md)
    await dispositions.UpdateDispositionStatus(update_request("customer123", ""), metadata=md)
    assert await stored_status(db, "customer123") is None
    assert await history(db, "customer123") == [
        (None, "interested", "disposition_update"),
        ("interested", "do_not_call", "disposition_update"),
        ("do_not_call", None, "disposition_update"),
    ]


@pytest.mark.parametrize(
    ("overrides", "code", "message"),
    [
        ({"x_api_key": None}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_api_secret": None}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_api_secret": "ds_wrong"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_api_key": "dk_unknown"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_partner_id": "456"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_tenant_id": None}, grpc.StatusCode.INVALID_ARGUMENT, "Tenant ID is required"),
        ({"x_tenant_id": "  "}, grpc.StatusCode.INVALID_ARGUMENT, "Tenant ID is required"),
        ({"x_sub_tenant_id": None}, grpc.StatusCode.INVALID_ARGUMENT, "Sub-Tenant ID is required"),
        ({"x_sub_tenant_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "Sub-Tenant ID is required"),
        ({"x_tenant_id": "tenant2"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        ({"x_sub_tenant_id": "other"}, grpc.StatusCode.PERMISSION_DENIED, "Forbidden"),
        # Credentials are checked before the tenant headers.
        (
            {"x_api_secret": "ds_wrong", "x_tenant_id": None},
            grpc.StatusCode.PERMISSION_DENIED,
            "Forbidden",
        ),
        (
            {"x_tenant_id": None, "x_sub_tenant_id": None},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Tenant ID is required",
        ),
    ],
)
async def test_access_errors(
    dispositions: Any,
    partner: Credentials,
    overrides: dict[str, str | None],
    code: grpc.StatusCode,
    message: str,
) -> None:
    error = await fail(
        dispositions.UpdateDispositionStatus(
            update_request("customer123", "x"), metadata=partner.metadata(**overrides)
        )
    )
    assert (error.code(), error.details()) == (code, message)
    assert "BadRequest" not in details(error)


async def test_matching_partner_id_header_is_accepted(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingest(ingestion, partner, "c1")
    reply = await dispositions.UpdateDispositionStatus(
        update_request("c1", "interested"), metadata=partner.metadata(x_partner_id="123")
    )
    assert reply.success


@pytest.mark.parametrize(
    ("customer_id", "status", "expected"),
    [
        ("", "x", [("customer_id", "customer_id should not be empty")]),
        ("   ", None, [("customer_id", "customer_id should not be empty")]),
        (
            "c" * 256,
            "x",
            [("customer_id", "customer_id must be shorter than or equal to 255 characters")],
        ),
        (
            "c1",
            "s" * 256,
            [
                (
                    "disposition_status",
                    "disposition_status must be shorter than or equal to 255 characters",
                )
            ],
        ),
        (
            "",
            "s" * 300,
            [
                ("customer_id", "customer_id should not be empty"),
                (
                    "disposition_status",
                    "disposition_status must be shorter than or equal to 255 characters",
                ),
            ],
        ),
        ("c\n1", "x", [("customer_id", "customer_id must not contain control characters")]),
    ],
)
async def test_validation_errors_carry_bad_request(
    dispositions: Any,
    partner: Credentials,
    customer_id: str,
    status: str | None,
    expected: list[tuple[str, str]],
) -> None:
    error = await fail(
        dispositions.UpdateDispositionStatus(
            update_request(customer_id, status), metadata=partner.metadata()
        )
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Validation failed",
    )
    assert violations(error) == expected
    assert details(error)["ErrorInfo"].reason == "VALIDATION_FAILED"


async def test_255_characters_are_accepted(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    long_id = "é" * 255
    await ingest(ingestion, partner, long_id)
    await dispositions.UpdateDispositionStatus(
        update_request(long_id, "s" * 255), metadata=partner.metadata()
    )
    assert await stored_status(db, long_id) == "s" * 255


async def test_unknown_customer_and_other_tenants_customer_are_not_found(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    other = await onboard(db, "999", grants=[("tenant2", "subtenant1")])
    await ingest(ingestion, other, "theirs", status="interested")
    for customer_id in ("nobody", "theirs"):
        error = await fail(
            dispositions.UpdateDispositionStatus(
                update_request(customer_id, "x"), metadata=partner.metadata()
            )
        )
        assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "Customer not found")
        assert details(error)["ErrorInfo"].reason == "CUSTOMER_NOT_FOUND"
    assert await stored_status(db, "theirs", tenant_id="tenant2") == "interested"


async def test_validation_comes_before_existence(dispositions: Any, partner: Credentials) -> None:
    error = await fail(
        dispositions.UpdateDispositionStatus(
            update_request("nobody", "s" * 256), metadata=partner.metadata()
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rate_limit_per_partner_with_retry_info(
    dispositions: Any, ingestion: Any, db: Database, partner: Credentials
) -> None:
    limited = await onboard(db, "limited", rate_limit_per_minute=3)
    await ingest(ingestion, limited, "c1")  # request 1
    for _ in range(2):  # requests 2 and 3
        await dispositions.UpdateDispositionStatus(
            update_request("c1", "x"), metadata=limited.metadata()
        )
    error = await fail(
        dispositions.UpdateDispositionStatus(update_request("c1", "x"), metadata=limited.metadata())
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Rate limit exceeded. Try again in 60 seconds.",
    )
    retry = details(error)["RetryInfo"].retry_delay.seconds
    assert 1 <= retry <= 60
    # Another partner is not affected; rate limiting comes after authentication.
    await ingest(ingestion, partner, "c2")
    bad = await fail(
        dispositions.UpdateDispositionStatus(
            update_request("c1", "x"), metadata=limited.metadata(x_api_secret="nope")
        )
    )
    assert bad.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_changes_apply_without_restart(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database, app: App
) -> None:
    """Changes made through another Database (as the admin CLI's process would) reach the
    server's cached credentials and grants through its access-version poller."""
    assert app.access_cache is not None
    await app.access_cache.poll_once()  # has seen the fixture's onboarding (no poll in flight)
    await ingest(ingestion, partner, "c1")
    md = partner.metadata()

    async def change(admin_change: Awaitable[Any]) -> Any:
        before = app.access_cache.generation if app.access_cache else 0
        result = await admin_change
        await access_change_seen(app, before)
        return result

    assert (
        await dispositions.UpdateDispositionStatus(update_request("c1", "z"), metadata=md)
    ).success
    hits = app.access_cache.hits
    assert (
        await dispositions.UpdateDispositionStatus(update_request("c1", "y"), metadata=md)
    ).success
    assert app.access_cache.hits > hits  # served from the cache, not the database
    await change(
        partners.revoke(db, partner_id="123", tenant_id="tenant1", sub_tenant_id="subtenant1")
    )
    assert (
        await fail(dispositions.UpdateDispositionStatus(update_request("c1", "a"), metadata=md))
    ).code() == grpc.StatusCode.PERMISSION_DENIED
    await change(partners.grant(db, partner_id="123", tenant_id="tenant1", sub_tenant_id="*"))
    assert (
        await dispositions.UpdateDispositionStatus(update_request("c1", "a"), metadata=md)
    ).success
    await change(partners.set_enabled(db, partner_id="123", enabled=False))
    assert (
        await fail(dispositions.UpdateDispositionStatus(update_request("c1", "b"), metadata=md))
    ).code() == grpc.StatusCode.PERMISSION_DENIED
    await change(partners.set_enabled(db, partner_id="123", enabled=True))
    rotated = await change(partners.rotate_secret(db, partner_id="123"))
    assert (
        await fail(dispositions.UpdateDispositionStatus(update_request("c1", "b"), metadata=md))
    ).code() == grpc.StatusCode.PERMISSION_DENIED
    fresh = Credentials("123", rotated.api_key, rotated.api_secret)
    assert (
        await dispositions.UpdateDispositionStatus(
            update_request("c1", "b"), metadata=fresh.metadata()
        )
    ).success


async def test_wildcard_tenant_grant_for_internal_services(
    dispositions: Any, ingestion: Any, db: Database
) -> None:
    internal = await onboard(db, "internal", grants=[("*", "*")])
    for tenant in ("tenant1", "tenant9"):
        creds = Credentials("internal", internal.api_key, internal.api_secret, tenant, "any")
        await ingest(ingestion, creds, f"cust-{tenant}")
        assert (
            await dispositions.UpdateDispositionStatus(
                update_request(f"cust-{tenant}", "x"), metadata=creds.metadata()
            )
        ).success


async def test_concurrent_updates_keep_an_unbroken_history(
    dispositions: Any, ingestion: Any, partner: Credentials, db: Database
) -> None:
    await ingest(ingestion, partner, "busy", status="new")
    statuses = [f"status-{i % 7}" for i in range(50)]
    replies = await asyncio.gather(
        *(
            dispositions.UpdateDispositionStatus(
                update_request("busy", s), metadata=partner.metadata()
            )
            for s in statuses
        )
    )
    assert all(r.success for r in replies)
    rows = await history(db, "busy")
    assert rows[0] == (None, "new", "batch_call")
    for before, after in itertools.pairwise(rows):
        assert after[0] == before[1], "each change starts where the previous one ended"
        assert after[0] != after[1], "no row records a non-change"
    assert rows[-1][1] == await stored_status(db, "busy")
    assert len(rows) >= 2


async def test_health_and_reflection_need_no_credentials(channel: grpc.aio.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "disposition.v1.DispositionService", "disposition.v1.CallIngestionService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_method_is_unimplemented(
    channel: grpc.aio.Channel, partner: Credentials
) -> None:
    call = channel.unary_unary("/disposition.v1.DispositionService/Nope")
    error = await fail(call(b"", metadata=partner.metadata()))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_undecodable_request_is_a_client_error(
    channel: grpc.aio.Channel, partner: Credentials
) -> None:
    call = channel.unary_unary(UPDATE)  # raw bytes: customer_id (field 1) is not UTF-8
    error = await fail(call(b"\x0a\x02\xff\xfe", metadata=partner.metadata()))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid request body",
    )
    assert details(error)["ErrorInfo"].reason == "MALFORMED_REQUEST"


async def test_empty_partner_id_header_counts_as_absent(
    dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    await ingest(ingestion, partner, "c1")
    reply = await dispositions.UpdateDispositionStatus(
        update_request("c1", "x"), metadata=partner.metadata(x_partner_id="")
    )
    assert reply.success


async def test_refusals_do_not_grow_the_wrapped_handler_cache(
    app: App, dispositions: Any, ingestion: Any, partner: Credentials
) -> None:
    """Refusals make no handler of their own: the interceptor keeps one wrapped handler per
    method."""
    await ingest(ingestion, partner, "c1")
    wrong = Credentials("123", partner.api_key, "wrong-secret").metadata()
    other_tenant = partner.metadata(x_tenant_id="tenant9")
    for metadata in [wrong, other_tenant] * 20:
        error = await fail(
            dispositions.UpdateDispositionStatus(update_request("c1", "x"), metadata=metadata)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    for status in ("a", "b"):
        await dispositions.UpdateDispositionStatus(
            update_request("c1", status), metadata=partner.metadata()
        )
    # IngestBatchCalls and UpdateDispositionStatus.
    assert sorted(app.interceptor._wrapped) == [
        "/disposition.v1.CallIngestionService/IngestBatchCalls",
        "/disposition.v1.DispositionService/UpdateDispositionStatus",
    ]
