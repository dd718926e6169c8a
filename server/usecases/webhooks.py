"""Webhook endpoints: an operator (the admin CLI) creates, lists, disables, enables, deletes them,
rotates their secrets, reads their deliveries and replays failed ones; a partner (the
WebhookService API) does the same with its own endpoints, but for disabling and enabling them.

An operator sees every endpoint. A partner (`caller`) sees only the endpoints it created in
the tenant of its request, and in its sub-tenant unless it acts for all of them (`*`): any
other endpoint is unknown to it (UnknownEndpoint).

A new endpoint starts at its tenant's current change-feed cursor: it receives the changes made
after it was created (as Stripe's do), never the tenant's past. Its secret (`whsec_…`) is shown
at creation and at rotation only; it is kept to sign deliveries. The URL is checked when the
endpoint is created and again before each delivery (runtime/webhook_http.py).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from server.db import Database
from server.records import Caller, WebhookDeliveryRecord, WebhookEndpointRecord
from server.rules import validation
from server.rules import webhooks as rules
from server.runtime.webhook_http import DeliveryError, resolve
from server.storage import history
from server.storage import webhooks as storage

ALL_SUB_TENANTS = "*"
DELIVERIES_LIMIT = 100  # the operator's listing by default
DEFAULT_PAGE_SIZE = 50  # a partner's listing (its range is declared on the request)
DELIVERY_STATUSES = (storage.PENDING, storage.DELIVERED, storage.FAILED)
RESOLVE_SECONDS = 5.0  # a URL's host must resolve this fast at creation


class InvalidWebhook(ValueError):
    """The endpoint cannot be created as asked: `problems` holds (field, message) pairs, each
    message naming its field (`url`, `events[1]`); the exception's text joins the messages."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(message for _, message in self.problems))


class UnknownEndpoint(LookupError):
    """No such webhook endpoint (or not one the caller may see)."""

    def __init__(self, endpoint_id: str) -> None:
        super().__init__(f"no webhook endpoint {endpoint_id!r}")
        self.endpoint_id = endpoint_id


class UnknownDelivery(LookupError):
    """No such delivery of the webhook endpoint."""

    def __init__(self, endpoint_id: str, delivery_id: int) -> None:
        super().__init__(f"webhook endpoint {endpoint_id!r} has no delivery {delivery_id}")
        self.delivery_id = delivery_id


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    endpoint: WebhookEndpointRecord
    secret: str


async def check_endpoint(
    url: str,
    events: Sequence[str],
    *,
    allow_private: bool,
    problems: Sequence[tuple[str, str]] = (),
) -> tuple[str, ...]:
    """The event types an endpoint with this URL takes (every type when `events` is empty);
    InvalidWebhook with every problem of the URL (its host resolved and checked) and events.

    `problems`: the declared limits the request broke (checked on it, server/rules/declared.py),
    reported first; the fields they name are not checked again."""
    out: validation.Violations = list(problems)
    failed = {field for field, _ in problems}
    if "url" not in failed and validation.required_text(out, "url", url, max_length=rules.MAX_URL):
        problem = rules.url_problem(url, allow_private=allow_private)
        if problem is not None:
            out.append(("url", f"url {problem}"))
        elif not allow_private:
            parts = urlsplit(url)
            assert parts.hostname is not None
            try:
                async with asyncio.timeout(RESOLVE_SECONDS):
                    await resolve(parts.hostname, parts.port or 443, allow_private=False)
            except DeliveryError as exc:
                out.append(("url", f"url {exc}"))
            except TimeoutError:
                problem = f"no answer within {RESOLVE_SECONDS:g} s"
                out.append(("url", f"url cannot resolve {parts.hostname}: {problem}"))
    for index, event in enumerate(events):
        if f"events[{index}]" not in failed:
            validation.one_of(out, f"events[{index}]", event, rules.EVENT_TYPES)
    if out:
        raise InvalidWebhook(out)
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
    problems: Sequence[tuple[str, str]] = (),
) -> CreatedEndpoint:
    chosen = await check_endpoint(url, events, allow_private=allow_private, problems=problems)
    secret = rules.new_secret()
    async with db.write() as conn:
        if partner_pk is not None:
            count = await storage.count_partner_endpoints(conn, partner_pk=partner_pk)
            if count >= rules.MAX_ENDPOINTS_PER_PARTNER:
                limit = rules.MAX_ENDPOINTS_PER_PARTNER
                raise InvalidWebhook([("", f"a partner may have at most {limit} webhook "
                                           "endpoints; delete one first")])  # fmt: skip
        cursors = await history.last_cursors(conn, tenant_ids=[tenant_id])
        endpoint = await storage.insert_endpoint(
            conn,
            endpoint_id="we_" + secrets.token_hex(12),
            partner_pk=partner_pk,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            url=url,
            events=chosen,
            secret=secret,
            cursor=cursors.get(tenant_id, 0),
            now=datetime.now(UTC),
        )
    return CreatedEndpoint(endpoint, secret)


def _visible_to(caller: Caller | None) -> dict[str, Any]:
    """The storage filters of the endpoints `caller` may see (None, an operator: all)."""
    if caller is None:
        return {}
    sub_tenant_id = None if caller.sub_tenant_id == ALL_SUB_TENANTS else caller.sub_tenant_id
    return {
        "partner_pk": caller.partner_pk,
        "tenant_id": caller.tenant_id,
        "sub_tenant_id": sub_tenant_id,
    }


async def list_endpoints(
    db: Database, *, tenant_id: str | None = None, caller: Caller | None = None
) -> list[WebhookEndpointRecord]:
    """The endpoints, oldest first: an operator's (of `tenant_id` when given) or a caller's."""
    scope = _visible_to(caller) if caller is not None else {"tenant_id": tenant_id}
    async with db.read() as conn:
        return await storage.list_endpoints(conn, **scope)


async def _find(conn: Any, endpoint_id: str, caller: Caller | None) -> WebhookEndpointRecord:
    found = await storage.get_endpoint(conn, endpoint_id=endpoint_id, **_visible_to(caller))
    if found is None:
        raise UnknownEndpoint(endpoint_id)
    return found


async def set_enabled(
    db: Database, *, endpoint_id: str, enabled: bool, caller: Caller | None = None
) -> WebhookEndpointRecord:
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        reason = None if enabled else "disabled by an operator"
        await storage.set_enabled(conn, endpoint_pk=endpoint.pk, enabled=enabled, reason=reason)
        return await _find(conn, endpoint_id, caller)


async def delete_endpoint(db: Database, *, endpoint_id: str, caller: Caller | None = None) -> None:
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        await storage.delete_endpoint(conn, endpoint_pk=endpoint.pk)


async def rotate_secret(
    db: Database, *, endpoint_id: str, caller: Caller | None = None
) -> CreatedEndpoint:
    """A new secret; deliveries are signed with it from the next attempt on."""
    secret = rules.new_secret()
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        await storage.set_secret(conn, endpoint_pk=endpoint.pk, secret=secret)
        return CreatedEndpoint(await _find(conn, endpoint_id, caller), secret)


def check_listing(*, status: str, page_size: int) -> tuple[str | None, int]:
    """A partner's deliveries listing: the status to keep (None: all) and how many, from the
    request's `status` ("" for all) and `page_size` (0 for the default), whose declared limits
    were checked on the request."""
    return status or None, page_size or DEFAULT_PAGE_SIZE


async def deliveries(
    db: Database,
    *,
    endpoint_id: str,
    caller: Caller | None = None,
    status: str | None = None,
    limit: int = DELIVERIES_LIMIT,
) -> list[WebhookDeliveryRecord]:
    """The endpoint's deliveries, newest first."""
    async with db.read() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        return await storage.list_deliveries(
            conn, endpoint_pk=endpoint.pk, limit=limit, status=status
        )


async def replay(
    db: Database,
    *,
    endpoint_id: str,
    delivery_ids: Sequence[int] | None,
    caller: Caller | None = None,
) -> int:
    """Send deliveries again, now (None: every failed one of the endpoint); how many."""
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        return await storage.replay(
            conn, endpoint_pk=endpoint.pk, delivery_pks=delivery_ids, now=datetime.now(UTC)
        )


async def retry_delivery(
    db: Database, *, endpoint_id: str, delivery_id: int, caller: Caller | None = None
) -> WebhookDeliveryRecord:
    """Send one of the endpoint's deliveries again, now, whatever its status (its retries start
    over); the delivery as it is then."""
    async with db.write() as conn:
        endpoint = await _find(conn, endpoint_id, caller)
        found = await storage.get_delivery(conn, endpoint_pk=endpoint.pk, delivery_pk=delivery_id)
        if found is None:
            raise UnknownDelivery(endpoint_id, delivery_id)
        await storage.replay(
            conn, endpoint_pk=endpoint.pk, delivery_pks=[found.pk], now=datetime.now(UTC)
        )
        retried = await storage.get_delivery(conn, endpoint_pk=endpoint.pk, delivery_pk=found.pk)
    assert retried is not None
    return retried
