"""Webhook endpoints: an operator (the admin CLI) creates, lists, disables, enables, deletes them,
rotates their secrets, reads their deliveries and replays failed ones.

A new endpoint starts at its tenant's current change-feed cursor: it receives the changes made
after it was created (as Stripe's do), never the tenant's past. Its secret (`whsec_…`) is shown
at creation and at rotation only; it is kept to sign deliveries. The URL is checked when the
endpoint is created and again before each delivery (runtime/webhook_http.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from server.db import Database
from server.records import WebhookDeliveryRecord, WebhookEndpointRecord
from server.rules import webhooks as rules
from server.runtime.webhook_http import DeliveryError, resolve
from server.storage import webhooks as storage

ALL_SUB_TENANTS = "*"
DELIVERIES_LIMIT = 100


class InvalidWebhook(ValueError):
    """The endpoint cannot be created as asked; the message says why."""


class UnknownEndpoint(LookupError):
    """No such webhook endpoint (or not one of the caller's)."""

    def __init__(self, endpoint_id: str) -> None:
        super().__init__(f"no webhook endpoint {endpoint_id!r}")


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    endpoint: WebhookEndpointRecord
    secret: str


async def check_url(url: str, *, allow_private: bool) -> None:
    """InvalidWebhook unless `url` may receive deliveries (its host resolved and checked)."""
    problem = rules.url_problem(url, allow_private=allow_private)
    if problem is not None:
        raise InvalidWebhook(f"url {problem}")
    if allow_private:
        return
    parts = urlsplit(url)
    assert parts.hostname is not None
    try:
        await resolve(parts.hostname, parts.port or 443, allow_private=False)
    except DeliveryError as exc:
        raise InvalidWebhook(f"url {exc}") from None


def check_events(events: Sequence[str]) -> tuple[str, ...]:
    unknown = [event for event in events if event not in rules.EVENT_TYPES]
    if unknown:
        raise InvalidWebhook(
            f"unknown event type {unknown[0]!r} (known: {', '.join(rules.EVENT_TYPES)})"
        )
    return tuple(dict.fromkeys(events)) or rules.EVENT_TYPES


async def create_endpoint(
    db: Database,
    *,
    tenant_id: str,
    sub_tenant_id: str,
    url: str,
    events: Sequence[str],
    allow_private: bool,
    partner_pk: int | None = None,
) -> CreatedEndpoint:
    chosen = check_events(events)
    await check_url(url, allow_private=allow_private)
    secret = rules.new_secret()
    async with db.write() as conn:
        cursor = await storage.tenant_cursor(conn, tenant_id=tenant_id)
        endpoint = await storage.insert_endpoint(
            conn,
            endpoint_id="we_" + secrets.token_hex(12),
            partner_pk=partner_pk,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            url=url,
            events=chosen,
            secret=secret,
            cursor=cursor,
            now=datetime.now(UTC),
        )
    return CreatedEndpoint(endpoint, secret)


async def list_endpoints(
    db: Database, *, tenant_id: str | None = None, partner_pk: int | None = None
) -> list[WebhookEndpointRecord]:
    async with db.read() as conn:
        return await storage.list_endpoints(conn, tenant_id=tenant_id, partner_pk=partner_pk)


async def _find(conn: Any, endpoint_id: str, partner_pk: int | None) -> WebhookEndpointRecord:
    found = await storage.get_endpoint(conn, endpoint_id=endpoint_id, partner_pk=partner_pk)
    if found is None:
        raise UnknownEndpoint(endpoint_id)
    return found


async def set_enabled(
    db: Database, *, endpoint_id: str, enabled: bool, partner_pk: int | None = None
) -> WebhookEndpointRecord:
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, partner_pk)
        reason = None if enabled else "disabled by an operator"
        await storage.set_enabled(conn, endpoint_pk=endpoint.pk, enabled=enabled, reason=reason)
        return await _find(conn, endpoint_id, partner_pk)


async def delete_endpoint(db: Database, *, endpoint_id: str, partner_pk: int | None = None) -> None:
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, partner_pk)
        await storage.delete_endpoint(conn, endpoint_pk=endpoint.pk)


async def rotate_secret(
    db: Database, *, endpoint_id: str, partner_pk: int | None = None
) -> CreatedEndpoint:
    """A new secret; deliveries are signed with it from the next attempt on."""
    secret = rules.new_secret()
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, partner_pk)
        await storage.set_secret(conn, endpoint_pk=endpoint.pk, secret=secret)
        return CreatedEndpoint(await _find(conn, endpoint_id, partner_pk), secret)


async def deliveries(
    db: Database,
    *,
    endpoint_id: str,
    partner_pk: int | None = None,
    status: str | None = None,
    limit: int = DELIVERIES_LIMIT,
) -> list[WebhookDeliveryRecord]:
    """The endpoint's deliveries, newest first."""
    async with db.read() as conn:
        endpoint = await _find(conn, endpoint_id, partner_pk)
        return await storage.list_deliveries(
            conn, endpoint_pk=endpoint.pk, limit=limit, status=status
        )


async def replay(
    db: Database,
    *,
    endpoint_id: str,
    delivery_ids: Sequence[int] | None,
    partner_pk: int | None = None,
) -> int:
    """Send deliveries again, now (None: every failed one of the endpoint); how many."""
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, partner_pk)
        return await storage.replay(
            conn, endpoint_pk=endpoint.pk, delivery_pks=delivery_ids, now=datetime.now(UTC)
        )
