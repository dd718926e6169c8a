"""The domain's record types: the values that use cases, runtime machinery and storage trade.

Plain data: dataclasses, and NamedTuples for what a batch makes by the thousand (a frozen
dataclass takes about three times as long to make). No I/O and no rules; this module imports
nothing else of the service, so every layer may import it.

- Who acts: `Caller`, and the `Scope` (tenant, sub-tenant) it acts in.
- What is stored: customers (`CustomerState`, `CustomerStatusRecord`), history rows
  (`ChangeRecord`), catalogs (`Disposition`, `EffectiveCatalog`), partners (`PartnerRecord`,
  `CredentialRecord`), idempotency keys (`StoredKey`), report counts (`StatusCounts`),
  webhook endpoints and deliveries (`WebhookEndpointRecord`, `WebhookDeliveryRecord`).
- A unit of work's data (the port is storage.units.Units): what it reads (`Reads`, `KeyRef`),
  what it read (`Snapshot`), and what it writes (`Plan` of `Change`, `NewCustomer`, `Profile`,
  `NewCall` and `KeyRecord`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

# The sub-tenant of a tenant-wide catalog (it applies to every sub-tenant without its own).
TENANT_WIDE = "*"


class Scope(NamedTuple):
    tenant_id: str
    sub_tenant_id: str


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated partner a use case acts for, in the tenant and sub-tenant it was
    granted, and the request it serves (recorded with the changes it makes)."""

    partner_pk: int
    partner_id: str
    tenant_id: str
    sub_tenant_id: str
    request_id: str

    @property
    def scope(self) -> Scope:
        return Scope(self.tenant_id, self.sub_tenant_id)


# -- stored records ------------------------------------------------------------------------------


class CustomerState(NamedTuple):
    """A customer's row as a unit of work reads it."""

    pk: int
    customer_id: str
    disposition_status: str | None


@dataclass(frozen=True, slots=True)
class CustomerStatusRecord:
    """A customer's current status and when it last changed (UTC times)."""

    customer_id: str
    disposition_status: str | None
    created_at: datetime
    last_changed_at: datetime | None  # None: the status never changed


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One history row with the public ids it refers to."""

    seq: int
    id: int
    customer_id: str
    tenant_id: str
    sub_tenant_id: str
    previous_status: str | None
    new_status: str | None
    changed_at: datetime
    source: str
    partner_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Disposition:
    """One allowed status of a catalog, with its label and flags."""

    disposition_status: str
    label: str
    final: bool = False
    do_not_call: bool = False
    callback: bool = False


@dataclass(frozen=True, slots=True)
class EffectiveCatalog:
    """The catalog that applies; `sub_tenant_id` is where it is defined (None: no catalog)."""

    sub_tenant_id: str | None
    dispositions: list[Disposition]


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """An active credential with what authentication needs of its partner."""

    partner_pk: int
    partner_id: str
    enabled: bool
    rate_limit_per_minute: int | None
    secret_sha256: str


@dataclass(frozen=True, slots=True)
class PartnerRecord:
    pk: int
    partner_id: str
    name: str
    enabled: bool
    rate_limit_per_minute: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WebhookEndpointRecord:
    """Where a tenant's events go (`sub_tenant_id` "*": every sub-tenant) and how it is doing."""

    pk: int
    endpoint_id: str
    partner_pk: int | None
    tenant_id: str
    sub_tenant_id: str
    url: str
    events: tuple[str, ...]
    secret: str
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None
    cursor: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WebhookDeliveryRecord:
    """One event for one endpoint (or, without one, for a call's `target_url`, signed with the
    secret of `partner_pk`) and how its attempts went."""

    pk: int
    endpoint_pk: int | None
    target_url: str | None
    partner_pk: int | None
    event_id: str
    event_type: str
    cursor: int | None
    body: str
    status: str
    attempts: int
    first_attempt_at: datetime | None
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An idempotency key as stored, with the reply of the request that used it first."""

    method: str
    fingerprint: str
    response: str  # the reply, as JSON
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Per status ("" for none): customers whose current status it is, changes that set it."""

    customers: dict[str, int]
    changes: dict[str, int]


# -- units of work -------------------------------------------------------------------------------


class KeyRef(NamedTuple):
    """A partner's idempotency key."""

    partner_pk: int
    key: str


@dataclass(slots=True)
class Reads:
    """What a unit reads before it decides."""

    customers: Mapping[Scope, Sequence[str]] = field(default_factory=dict)  # ids per scope
    catalogs: Sequence[Scope] = ()  # scopes whose catalog in force is needed
    calls: tuple[int, Sequence[str]] | None = None  # (partner_pk, call ids): which exist
    key: KeyRef | None = None


@dataclass(slots=True)
class Snapshot:
    """What the engine read: missing customers are absent, unread catalogs too."""

    customers: dict[Scope, dict[str, CustomerState]]
    catalogs: dict[Scope, EffectiveCatalog]
    existing_calls: set[str]
    key: StoredKey | None


class Change(NamedTuple):
    """One status change, a history row; `customer_pk` is None for a customer the plan creates."""

    tenant_id: str
    sub_tenant_id: str
    customer_id: str
    customer_pk: int | None
    previous_status: str | None
    new_status: str | None
    source: str
    partner_pk: int
    request_id: str


class NewCustomer(NamedTuple):
    """A customer to create, with its status after the plan's changes."""

    tenant_id: str
    sub_tenant_id: str
    customer_id: str
    name: str | None
    email: str | None
    disposition_status: str | None


class Profile(NamedTuple):
    """Name and email of an existing customer to refresh (None leaves one as it is)."""

    customer_pk: int
    name: str | None
    email: str | None


class NewCall(NamedTuple):
    """A row of `calls`; `customer_pk` is None for a customer the plan creates."""

    partner_pk: int
    call_id: str
    customer_id: str
    customer_pk: int | None
    tenant_id: str
    sub_tenant_id: str
    recording_url: str
    start_time: datetime
    end_time: datetime
    contact_number: str
    agent_id: str
    agent_email: str | None
    agent_name: str | None
    callback_url: str | None
    metadata: dict[str, str]
    custom_fields: list[dict[str, str]]
    request_id: str


class KeyRecord(NamedTuple):
    """An idempotency key stored with the reply of the request that used it first."""

    partner_pk: int
    key: str
    method: str
    fingerprint: str
    response: str
    replaces: datetime | None  # created_at of the expired record it takes over; None: new
    prune_before: datetime  # expired keys older than this are deleted (a few per record)


@dataclass(slots=True)
class Plan:
    """What a unit writes, decided from a Snapshot; written whole or not at all."""

    now: datetime
    changes: list[Change] = field(default_factory=list)  # in order
    new_customers: list[NewCustomer] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    calls: list[NewCall] = field(default_factory=list)
    key: KeyRecord | None = None
