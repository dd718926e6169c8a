"""A partner's webhook endpoints over gRPC (WebhookService), against a real grpc.aio server and
database on both engines, delivering to a real HTTP receiver (tests/rest/test_webhook_api.py:
the same through Envoy).

Automatic retries wait a minute here (WEBHOOK_RETRY_BASE_SECONDS 60), so that every second
attempt a test sees is the one it asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devstack import Credentials, onboard
from disposition.v1 import webhook_service_pb2 as pb
from disposition.v1 import webhook_service_pb2_grpc as webhook_grpc
from server.app import App
from server.db import Database
from server.models import WebhookDelivery
from server.storage import webhooks as webhook_storage
from server.usecases import partners
from tests.support.databases import settings_for
from tests.support.grpc_calls import details, fail, ingest, update_request, violations
from tests.support.webhooks import Received, Receiver

T = TypeVar("T")
NOT_FOUND = ("Webhook endpoint not found", "WEBHOOK_ENDPOINT_NOT_FOUND")


@pytest.fixture
async def app(database_url: str, db: Database) -> AsyncIterator[App]:
    """The server with private URLs allowed (the receiver is on the loopback) and slow retries."""
    settings = settings_for(
        database_url, webhook_allow_private_urls=True, webhook_retry_base_seconds=60.0
    )
    server = App(settings, Database(settings))
    await server.start()
    yield server
    await server.stop(grace=1)


@pytest.fixture
def webhooks(channel: grpc.aio.Channel) -> webhook_grpc.WebhookServiceStub:
    return webhook_grpc.WebhookServiceStub(channel)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


async def received(receiver: Receiver, count: int) -> list[Received]:
    """The receiver's first `count` requests, once they came (waited for off the event loop,
    which the server shares)."""
    got = await asyncio.to_thread(receiver.wait, lambda got: len(got) >= count, 20)
    return got[:count]


async def eventually(read: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """`read()` once `done` holds of it (within 10 s)."""
    for _ in range(200):
        value = await read()
        if done(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"still {value}")


async def create(
    stub: Any, creds: Credentials, url: str, *events: str, **headers: str
) -> pb.WebhookEndpoint:
    request = pb.CreateWebhookEndpointRequest(url=url, events=events)
    reply = await stub.CreateWebhookEndpoint(request, metadata=creds.metadata(**headers))
    assert reply.success
    return reply.data


async def listed(stub: Any, creds: Credentials, **headers: str) -> list[pb.WebhookEndpoint]:
    reply = await stub.ListWebhookEndpoints(
        pb.ListWebhookEndpointsRequest(), metadata=creds.metadata(**headers)
    )
    return list(reply.data.items)


async def deliveries(
    stub: Any, creds: Credentials, endpoint_id: str, **request: Any
) -> list[pb.WebhookDelivery]:
    reply = await stub.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id, **request),
        metadata=creds.metadata(),
    )
    assert reply.data.endpoint_id == endpoint_id
    return list(reply.data.items)


def every_call(stub: Any, endpoint_id: str, delivery_id: int = 1) -> dict[str, Any]:
    """Each method that names an endpoint, as a function of the metadata."""
    return {
        "delete": lambda md: stub.DeleteWebhookEndpoint(
            pb.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id), metadata=md
        ),
        "rotate": lambda md: stub.RotateWebhookEndpointSecret(
            pb.RotateWebhookEndpointSecretRequest(endpoint_id=endpoint_id), metadata=md
        ),
        "deliveries": lambda md: stub.ListWebhookDeliveries(
            pb.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id), metadata=md
        ),
        "retry": lambda md: stub.RetryWebhookDelivery(
            pb.RetryWebhookDeliveryRequest(endpoint_id=endpoint_id, delivery_id=delivery_id),
            metadata=md,
        ),
    }


async def assert_not_found(call: Any, message: str, reason: str, resource: str) -> None:
    error = await fail(call)
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, message)
    found = details(error)
    assert found["ErrorInfo"].reason == reason
    assert found["ResourceInfo"].resource_name == resource


async def test_a_created_endpoint_gets_signed_events_and_is_listed_without_its_secret(
    webhooks: Any, dispositions: Any, ingestion: Any, partner: Credentials, receiver: Receiver
) -> None:
    await ingest(ingestion, partner, "customer123")
    endpoint = await create(webhooks, partner, receiver.url, "disposition.changed")
    assert endpoint.id.startswith("we_") and endpoint.secret.startswith("whsec_")
    assert (endpoint.url, list(endpoint.events)) == (receiver.url, ["disposition.changed"])
    assert (endpoint.tenant_id, endpoint.sub_tenant_id) == ("tenant1", "subtenant1")
    assert endpoint.enabled and endpoint.disabled_reason == ""
    assert endpoint.HasField("created_at") and not endpoint.HasField("failing_since")

    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "interested"), metadata=partner.metadata()
    )
    (delivery,) = await received(receiver, 1)
    event = Webhook(endpoint.secret).verify(delivery.body, delivery.headers)
    assert (event["type"], event["data"]["disposition_status"]) == (
        "disposition.changed",
        "interested",
    )

    (shown,) = await listed(webhooks, partner)
    assert not shown.HasField("secret")
    without_secret = pb.WebhookEndpoint()
    without_secret.CopyFrom(endpoint)
    without_secret.ClearField("secret")
    assert shown == without_secret

    (attempted,) = await eventually(
        lambda: deliveries(webhooks, partner, endpoint.id), lambda found: len(found) == 1
    )
    assert (attempted.event_id, attempted.event_type) == (
        delivery.headers["webhook-id"],
        "disposition.changed",
    )
    assert (attempted.status, attempted.attempts, attempted.last_status_code) == (
        "delivered",
        1,
        200,
    )
    assert attempted.HasField("delivered_at") and not attempted.HasField("next_attempt_at")


async def test_a_rotated_secret_signs_the_next_events_and_delete_stops_them(
    webhooks: Any, dispositions: Any, ingestion: Any, partner: Credentials, receiver: Receiver
) -> None:
    await ingest(ingestion, partner, "customer123")
    endpoint = await create(webhooks, partner, receiver.url, "disposition.changed")
    reply = await webhooks.RotateWebhookEndpointSecret(
        pb.RotateWebhookEndpointSecretRequest(endpoint_id=endpoint.id), metadata=partner.metadata()
    )
    rotated = reply.data
    assert rotated.id == endpoint.id and rotated.secret.startswith("whsec_")
    assert rotated.secret != endpoint.secret

    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "interested"), metadata=partner.metadata()
    )
    (delivery,) = await received(receiver, 1)
    Webhook(rotated.secret).verify(delivery.body, delivery.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint.secret).verify(delivery.body, delivery.headers)

    deleted = await webhooks.DeleteWebhookEndpoint(
        pb.DeleteWebhookEndpointRequest(endpoint_id=endpoint.id), metadata=partner.metadata()
    )
    assert deleted == pb.DeleteWebhookEndpointResponse(success=True)
    assert await listed(webhooks, partner) == []
    other = Receiver().start()
    try:  # the next change reaches a live endpoint, and only that one
        await create(webhooks, partner, other.url, "disposition.changed")
        await dispositions.UpdateDispositionStatus(
            update_request("customer123", "sold"), metadata=partner.metadata()
        )
        (late,) = await received(other, 1)
        assert late.event["data"]["disposition_status"] == "sold"
        assert len(receiver.received) == 1
    finally:
        other.stop()
    for call in every_call(webhooks, endpoint.id).values():
        await assert_not_found(call(partner.metadata()), *NOT_FOUND, endpoint.id)


async def test_a_failed_delivery_is_sent_again_on_request(
    webhooks: Any,
    dispositions: Any,
    ingestion: Any,
    partner: Credentials,
    receiver: Receiver,
    db: Database,
) -> None:
    healthy = False
    receiver.answer = lambda _request: 200 if healthy else 500
    await ingest(ingestion, partner, "customer123")
    endpoint = await create(webhooks, partner, receiver.url, "disposition.changed")
    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "interested"), metadata=partner.metadata()
    )
    (first,) = await received(receiver, 1)
    (attempted,) = await eventually(
        lambda: deliveries(webhooks, partner, endpoint.id), lambda found: len(found) == 1
    )
    assert (attempted.status, attempted.attempts, attempted.last_status_code) == (
        "pending",
        1,
        500,
    )
    assert attempted.last_error == "HTTP 500" and attempted.HasField("next_attempt_at")
    # As the dispatcher leaves it once its retries ran out (3 days): failed, kept.
    async with db.write() as conn:
        await conn.execute(update(WebhookDelivery).values(status="failed", next_attempt_at=None))
    (failed,) = await deliveries(webhooks, partner, endpoint.id, status="failed")
    assert failed.id == attempted.id and not failed.HasField("next_attempt_at")
    assert await deliveries(webhooks, partner, endpoint.id, status="delivered") == []

    healthy = True
    retry = pb.RetryWebhookDeliveryRequest(endpoint_id=endpoint.id, delivery_id=attempted.id)
    reply = await webhooks.RetryWebhookDelivery(retry, metadata=partner.metadata())
    assert (reply.data.id, reply.data.status, reply.data.attempts) == (attempted.id, "pending", 1)
    assert reply.data.HasField("next_attempt_at")
    _, again = await received(receiver, 2)
    assert again.headers["webhook-id"] == first.headers["webhook-id"] == attempted.event_id
    assert again.body == first.body
    Webhook(endpoint.secret).verify(again.body, again.headers)
    (done,) = await eventually(
        lambda: deliveries(webhooks, partner, endpoint.id),
        lambda found: found[0].status == "delivered",
    )
    assert (done.attempts, done.last_status_code, done.last_error) == (2, 200, "")

    unknown = pb.RetryWebhookDeliveryRequest(endpoint_id=endpoint.id, delivery_id=done.id + 1000)
    await assert_not_found(
        webhooks.RetryWebhookDelivery(unknown, metadata=partner.metadata()),
        "Webhook delivery not found",
        "WEBHOOK_DELIVERY_NOT_FOUND",
        str(done.id + 1000),
    )


async def test_invalid_urls_and_event_types_are_refused_naming_the_fields(
    webhooks: Any, partner: Credentials
) -> None:
    for request, expected in [
        (
            pb.CreateWebhookEndpointRequest(
                url="ftp://hooks.example.com/x", events=["disposition.changed", "nope"]
            ),
            [
                ("url", "url must be an https URL"),
                ("events[1]", "events[1] must be one of: disposition.changed, call.processed"),
            ],
        ),
        (pb.CreateWebhookEndpointRequest(url=""), [("url", "url should not be empty")]),
        (
            pb.CreateWebhookEndpointRequest(url="https://u:p@hooks.example.com/"),
            [("url", "url must not contain credentials")],
        ),
        (
            pb.CreateWebhookEndpointRequest(url="https://" + "a" * 64 + ".example.com/"),
            [("url", "url must be a valid URL")],
        ),
    ]:
        error = await fail(webhooks.CreateWebhookEndpoint(request, metadata=partner.metadata()))
        assert (error.code(), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "Validation failed",
        )
        assert violations(error) == expected
        assert details(error)["ErrorInfo"].reason == "VALIDATION_FAILED"
    assert await listed(webhooks, partner) == []


async def test_a_partner_has_at_most_16_endpoints(
    webhooks: Any, partner: Credentials, receiver: Receiver
) -> None:
    made = [await create(webhooks, partner, f"{receiver.url}/{n}") for n in range(16)]
    request = pb.CreateWebhookEndpointRequest(url=f"{receiver.url}/16")
    error = await fail(webhooks.CreateWebhookEndpoint(request, metadata=partner.metadata()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == [
        ("", "a partner may have at most 16 webhook endpoints; delete one first")
    ]
    assert len(await listed(webhooks, partner)) == 16
    await webhooks.DeleteWebhookEndpoint(
        pb.DeleteWebhookEndpointRequest(endpoint_id=made[0].id), metadata=partner.metadata()
    )
    assert (await create(webhooks, partner, f"{receiver.url}/16")).url.endswith("/16")


async def test_a_deliveries_listing_names_its_wrong_fields(
    webhooks: Any, partner: Credentials, receiver: Receiver
) -> None:
    endpoint = await create(webhooks, partner, receiver.url)
    for request, expected in [
        ({"page_size": 101}, [("page_size", "page_size must not be greater than 100")]),
        ({"page_size": -1}, [("page_size", "page_size must not be less than 0")]),
        (
            {"status": "sent"},
            [("status", "status must be one of: pending, delivered, failed")],
        ),
    ]:
        error = await fail(
            webhooks.ListWebhookDeliveries(
                pb.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id, **request),
                metadata=partner.metadata(),
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(error) == expected


async def test_other_partners_tenants_and_sub_tenants_endpoints_are_not_found(
    webhooks: Any, db: Database, receiver: Receiver
) -> None:
    owner = await onboard(
        db,
        "123",
        grants=[("tenant1", "subtenant1"), ("tenant2", "subtenant1"), ("tenant1", "subtenant2")],
    )
    other = await onboard(db, "456")  # tenant1/subtenant1 too
    endpoint = await create(webhooks, owner, receiver.url)
    strangers = {
        "another partner": other.metadata(),
        "another tenant": owner.metadata(x_tenant_id="tenant2"),
        "another sub-tenant": owner.metadata(x_sub_tenant_id="subtenant2"),
    }
    for who, metadata in strangers.items():
        reply = await webhooks.ListWebhookEndpoints(
            pb.ListWebhookEndpointsRequest(), metadata=metadata
        )
        assert list(reply.data.items) == [], who
        for name, call in every_call(webhooks, endpoint.id).items():
            try:
                await assert_not_found(call(metadata), *NOT_FOUND, endpoint.id)
            except AssertionError as exc:
                raise AssertionError(f"{who}, {name}") from exc
    (still,) = await listed(webhooks, owner)
    assert still.id == endpoint.id and still.enabled


async def test_ungranted_tenants_are_forbidden(
    webhooks: Any, partner: Credentials, receiver: Receiver
) -> None:
    endpoint = await create(webhooks, partner, receiver.url)
    refused = [
        partner.metadata(x_tenant_id="tenant9"),
        partner.metadata(x_sub_tenant_id="*"),  # needs a grant for every sub-tenant
    ]
    for metadata in refused:
        calls = {
            "create": webhooks.CreateWebhookEndpoint(
                pb.CreateWebhookEndpointRequest(url=receiver.url), metadata=metadata
            ),
            "list": webhooks.ListWebhookEndpoints(
                pb.ListWebhookEndpointsRequest(), metadata=metadata
            ),
            **{name: call(metadata) for name, call in every_call(webhooks, endpoint.id).items()},
        }
        for name, call in calls.items():
            error = await fail(call)
            assert (error.code(), error.details()) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "Forbidden",
            ), name
    assert [e.id for e in await listed(webhooks, partner)] == [endpoint.id]


async def test_every_sub_tenant_with_a_grant_for_all_of_them(
    webhooks: Any, dispositions: Any, ingestion: Any, db: Database, receiver: Receiver
) -> None:
    everywhere = await onboard(db, "123", grants=[("tenant1", "*")])  # acts for tenant1/*
    one = await create(webhooks, everywhere, receiver.url, x_sub_tenant_id="subtenant1")
    every = await create(webhooks, everywhere, receiver.url, "disposition.changed")
    assert (one.sub_tenant_id, every.sub_tenant_id) == ("subtenant1", "*")
    assert list(one.events) == ["disposition.changed", "call.processed"]  # none named: all
    assert [e.id for e in await listed(webhooks, everywhere)] == [one.id, every.id]
    assert [e.id for e in await listed(webhooks, everywhere, x_sub_tenant_id="subtenant1")] == [
        one.id
    ]
    await assert_not_found(
        webhooks.DeleteWebhookEndpoint(
            pb.DeleteWebhookEndpointRequest(endpoint_id=every.id),
            metadata=everywhere.metadata(x_sub_tenant_id="subtenant1"),
        ),
        *NOT_FOUND,
        every.id,
    )
    in_two = dataclasses.replace(everywhere, sub_tenant_id="subtenant2")
    await ingest(ingestion, in_two, "customer-2")
    await dispositions.UpdateDispositionStatus(
        update_request("customer-2", "interested"), metadata=in_two.metadata()
    )
    (delivery,) = await received(receiver, 1)  # the "*" endpoint's only
    Webhook(every.secret).verify(delivery.body, delivery.headers)
    assert delivery.event["data"]["sub_tenant_id"] == "subtenant2"


@pytest.mark.parametrize("withdrawn", ["grant revoked", "partner disabled"])
async def test_a_partners_endpoint_stops_when_its_grant_or_partner_goes(
    webhooks: Any,
    dispositions: Any,
    ingestion: Any,
    partner: Credentials,
    receiver: Receiver,
    db: Database,
    withdrawn: str,
) -> None:
    """Events are the tenant's data: once the partner may no longer read the tenant, its
    endpoint gets nothing more and shows why it was disabled."""
    other = await onboard(db, "other")  # keeps changing the tenant
    await ingest(ingestion, partner, "customer123")
    endpoint = await create(webhooks, partner, receiver.url, "disposition.changed")
    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "before"), metadata=other.metadata()
    )
    await received(receiver, 1)
    if withdrawn == "grant revoked":
        await partners.revoke(db, partner_id="123", tenant_id="tenant1", sub_tenant_id="subtenant1")
    else:
        await partners.set_enabled(db, partner_id="123", enabled=False)
    await dispositions.UpdateDispositionStatus(
        update_request("customer123", "after"), metadata=other.metadata()
    )

    async def state() -> tuple[bool, str | None]:
        async with db.read() as conn:
            found = await webhook_storage.get_endpoint(conn, endpoint_id=endpoint.id)
        assert found is not None
        return found.enabled, found.disabled_reason

    reason = "the partner is disabled or no longer granted this tenant"
    assert await eventually(state, lambda s: not s[0]) == (False, reason)
    await asyncio.sleep(0.5)
    assert [r.event["data"]["disposition_status"] for r in receiver.received] == ["before"]
