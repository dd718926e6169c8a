"""The partner's webhook endpoints over gRPC (and REST, through Envoy): protobuf in, use case
calls, protobuf out. No SQL, no rules of their own: each handler first checks the limits
declared on its request's fields (server/rules/declared.py).

The endpoints are the calling partner's, in the tenant and sub-tenant of its request
(usecases/webhooks.py says what it sees). The use cases' own errors, shared with the admin CLI,
become the documented ones here: an invalid URL or event type is ValidationFailed naming its
field, an endpoint or delivery the caller may not see is 404.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from disposition.v1 import webhook_service_pb2 as pb
from disposition.v1 import webhook_service_pb2_grpc as webhook_grpc
from server import context as request_context
from server.db import Database
from server.errors import ValidationFailed, WebhookDeliveryNotFound, WebhookEndpointNotFound
from server.records import WebhookDeliveryRecord, WebhookEndpointRecord
from server.rules import declared
from server.usecases import webhooks

Rpc = grpc.aio.ServicerContext[Any, Any]


class WebhookService(webhook_grpc.WebhookServiceServicer):
    def __init__(self, db: Database, on_change: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.on_change = on_change  # this process's dispatcher: follow a new endpoint now

    async def CreateWebhookEndpoint(
        self, request: pb.CreateWebhookEndpointRequest, context: Rpc
    ) -> pb.CreateWebhookEndpointResponse:
        caller = request_context.caller()
        with _documented_errors():
            created = await webhooks.create_endpoint(
                self.db,
                tenant_id=caller.tenant_id,
                sub_tenant_id=caller.sub_tenant_id,
                url=request.url,
                events=list(request.events),
                allow_private=self.db.settings.webhook_allow_private_urls,
                partner_pk=caller.partner_pk,
                problems=declared.check(request),  # reported with the URL's own problems
            )
        self.on_change()
        return pb.CreateWebhookEndpointResponse(
            success=True, data=endpoint_message(created.endpoint, created.secret)
        )

    async def ListWebhookEndpoints(
        self, request: pb.ListWebhookEndpointsRequest, context: Rpc
    ) -> pb.ListWebhookEndpointsResponse:
        declared.require(request)
        found = await webhooks.list_endpoints(self.db, caller=request_context.caller())
        return pb.ListWebhookEndpointsResponse(
            success=True,
            data=pb.WebhookEndpointList(items=[endpoint_message(e) for e in found]),
        )

    async def DeleteWebhookEndpoint(
        self, request: pb.DeleteWebhookEndpointRequest, context: Rpc
    ) -> pb.DeleteWebhookEndpointResponse:
        declared.require(request)
        with _documented_errors():
            await webhooks.delete_endpoint(
                self.db, endpoint_id=request.endpoint_id, caller=request_context.caller()
            )
        return pb.DeleteWebhookEndpointResponse(success=True)

    async def RotateWebhookEndpointSecret(
        self, request: pb.RotateWebhookEndpointSecretRequest, context: Rpc
    ) -> pb.RotateWebhookEndpointSecretResponse:
        declared.require(request)
        with _documented_errors():
            rotated = await webhooks.rotate_secret(
                self.db, endpoint_id=request.endpoint_id, caller=request_context.caller()
            )
        return pb.RotateWebhookEndpointSecretResponse(
            success=True, data=endpoint_message(rotated.endpoint, rotated.secret)
        )

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Rpc
    ) -> pb.ListWebhookDeliveriesResponse:
        declared.require(request)
        status, limit = webhooks.check_listing(status=request.status, page_size=request.page_size)
        with _documented_errors():
            found = await webhooks.deliveries(
                self.db,
                endpoint_id=request.endpoint_id,
                caller=request_context.caller(),
                status=status,
                limit=limit,
            )
        return pb.ListWebhookDeliveriesResponse(
            success=True,
            data=pb.WebhookDeliveryList(
                endpoint_id=request.endpoint_id, items=[delivery_message(d) for d in found]
            ),
        )

    async def RetryWebhookDelivery(
        self, request: pb.RetryWebhookDeliveryRequest, context: Rpc
    ) -> pb.RetryWebhookDeliveryResponse:
        declared.require(request)
        with _documented_errors():
            retried = await webhooks.retry_delivery(
                self.db,
                endpoint_id=request.endpoint_id,
                delivery_id=request.delivery_id,
                caller=request_context.caller(),
            )
        return pb.RetryWebhookDeliveryResponse(success=True, data=delivery_message(retried))


@contextmanager
def _documented_errors() -> Iterator[None]:
    """The webhook use cases' errors as the API documents them."""
    try:
        yield
    except webhooks.InvalidWebhook as exc:
        raise ValidationFailed(exc.problems) from None
    except webhooks.UnknownEndpoint as exc:
        raise WebhookEndpointNotFound(exc.endpoint_id) from None
    except webhooks.UnknownDelivery as exc:
        raise WebhookDeliveryNotFound(str(exc.delivery_id)) from None


def endpoint_message(
    endpoint: WebhookEndpointRecord, secret: str | None = None
) -> pb.WebhookEndpoint:
    """An endpoint as the API shows it; its secret only when given (at creation and rotation)."""
    return pb.WebhookEndpoint(
        id=endpoint.endpoint_id,
        url=endpoint.url,
        events=endpoint.events,
        tenant_id=endpoint.tenant_id,
        sub_tenant_id=endpoint.sub_tenant_id,
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason or "",
        failing_since=endpoint.failing_since,
        created_at=endpoint.created_at,
        secret=secret,
    )


def delivery_message(delivery: WebhookDeliveryRecord) -> pb.WebhookDelivery:
    """A delivery as the API shows it (times absent when unset)."""
    return pb.WebhookDelivery(
        id=delivery.pk,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        status=delivery.status,
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code or 0,
        last_error=delivery.last_error or "",
        last_attempt_at=delivery.last_attempt_at,
        next_attempt_at=delivery.next_attempt_at,
        delivered_at=delivery.delivered_at,
        created_at=delivery.created_at,
    )
