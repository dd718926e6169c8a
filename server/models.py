"""The schema: SQLAlchemy 2 declarative models (used for DDL and Core statements)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


# Deterministic constraint and index names on every engine, so migrations can name them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Partner(Base):
    """A partner organisation (dialer, CRM, internal service) that calls the API."""

    __tablename__ = "partners"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_id: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Signs the partner's `callback_url` deliveries (call.processed); `whsec_…`.
    webhook_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Credential(Base):
    """An API key and the SHA-256 of its secret; revoked keys are kept for audit."""

    __tablename__ = "partner_credentials"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"), index=True)
    api_key: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TenantGrant(Base):
    """Lets a partner act for a tenant and sub-tenant (`*` stands for every one)."""

    __tablename__ = "tenant_grants"
    __table_args__ = (UniqueConstraint("partner_pk", "tenant_id", "sub_tenant_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Customer(Base):
    """A customer of a tenant's sub-tenant, with its current disposition status.

    A status change rewrites only unindexed columns, and PostgreSQL pages keep a fifth free
    (fillfactor 80), so the new row version fits on its page: a HOT update, no index entries.
    """

    __tablename__ = "customers"
    __table_args__ = (
        UniqueConstraint("tenant_id", "sub_tenant_id", "customer_id"),
        {"postgresql_with": {"fillfactor": 80}},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    customer_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    disposition_status: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Call(Base):
    """A call ingested through the batch-call API; `call_id` is unique per partner."""

    __tablename__ = "calls"
    __table_args__ = (UniqueConstraint("partner_pk", "call_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    call_id: Mapped[str] = mapped_column(String(255))
    customer_pk: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    recording_url: Mapped[str] = mapped_column(Text)
    start_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    contact_number: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[str] = mapped_column(String(255))
    agent_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    agent_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    call_metadata: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    custom_fields: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    request_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DispositionHistory(Base):
    """Append-only: one row per real change of a customer's disposition status.

    `seq` is the change's position in its tenant's change feed (the feed cursor): it is taken
    from FeedSequence in the writing transaction, whose row lock is held until commit, so the
    changes of a tenant become visible in `seq` order on every engine.
    """

    __tablename__ = "disposition_history"
    __table_args__ = (
        Index("ix_history_customer", "customer_pk", "id"),
        UniqueConstraint("tenant_id", "seq", name="uq_history_tenant_seq"),
        Index("ix_history_tenant_changed_at", "tenant_id", "sub_tenant_id", "changed_at"),
        # The feed of one sub-tenant: its changes in cursor order, whatever the statistics say.
        Index("ix_history_tenant_sub_seq", "tenant_id", "sub_tenant_id", "seq"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    customer_pk: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    previous_status: Mapped[str | None] = mapped_column(String(255), nullable=True)
    new_status: Mapped[str | None] = mapped_column(String(255), nullable=True)
    source: Mapped[str] = mapped_column(String(32))
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    request_id: Mapped[str] = mapped_column(String(128))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedSequence(Base):
    """The last change-feed cursor handed out for a tenant."""

    __tablename__ = "feed_sequences"
    __table_args__ = ({"postgresql_with": {"fillfactor": 50}},)

    tenant_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)


class StatusCount(Base):
    """How many customers of a tenant's sub-tenant have each current status ("": none).

    Moved in the same transaction as every change (server/storage/counters.py), so the summary
    report reads a handful of rows instead of grouping all of the tenant's customers. Rows that
    fall to 0 stay (a later change may reuse them); readers skip them.
    """

    __tablename__ = "status_counts"
    __table_args__ = ({"postgresql_with": {"fillfactor": 70}},)

    tenant_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    sub_tenant_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    disposition_status: Mapped[str] = mapped_column(String(255), primary_key=True)
    customers: Mapped[int] = mapped_column(BigInteger)


class StatusChangeHour(Base):
    """How many changes set each status ("": cleared) in each UTC hour, per tenant and sub-tenant.

    Moved in the same transaction as every change; the summary report adds up whole hours here
    and scans only the partial hours at the edges of its window in the history.
    """

    __tablename__ = "status_change_hours"
    __table_args__ = ({"postgresql_with": {"fillfactor": 80}},)

    tenant_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    sub_tenant_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    disposition_status: Mapped[str] = mapped_column(String(255), primary_key=True)
    changes: Mapped[int] = mapped_column(BigInteger)


class AccessVersion(Base):
    """One row whose `version` moves with every change to partners, credentials or grants.

    Servers cache credentials and grants in memory and poll this row: a change made by the admin
    CLI (another process) empties every server's cache within one poll period.
    """

    __tablename__ = "access_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)


class CatalogEntry(Base):
    """One allowed status of a tenant's disposition catalog.

    `sub_tenant_id` is `*` for the tenant-wide catalog; a sub-tenant's own catalog, when it has
    one, replaces the tenant-wide one for that sub-tenant.
    """

    __tablename__ = "disposition_catalog"
    __table_args__ = (
        UniqueConstraint("tenant_id", "sub_tenant_id", "disposition_status", name="uq_catalog"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    position: Mapped[int] = mapped_column(Integer)
    disposition_status: Mapped[str] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(255))
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    do_not_call: Mapped[bool] = mapped_column(Boolean, default=False)
    callback: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyRecord(Base):
    """The first reply to a request sent with an `Idempotency-Key`, per partner."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("partner_pk", "key", name="uq_idempotency_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class WebhookEndpoint(Base):
    """Where a tenant's events are delivered, signed with the endpoint's own secret.

    `sub_tenant_id` is one sub-tenant or `*` (every sub-tenant). `cursor` is the last change-feed
    cursor of the tenant whose `disposition.changed` event this endpoint has been given (sent, or
    scheduled for retry): the history is the outbox, so an endpoint follows its tenant's history
    in cursor order. One server process at a time delivers to an endpoint: the one holding its
    lease (`lease_owner` until `lease_expires_at`).
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant", "tenant_id", "sub_tenant_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(String(64), unique=True)
    partner_pk: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one endpoint: its body (kept for retries and replays) and how its
    attempts went. `status`: pending (an attempt is due at `next_attempt_at`), delivered, or
    failed (retries ran out; a replay makes it pending again)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_pk", "event_id", name="uq_webhook_deliveries_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_pk", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # An endpoint's delivery, or (endpoint_pk None) one to a call's callback_url, signed with
    # the secret of the partner that sent the call.
    endpoint_pk: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_endpoints.id"), nullable=True
    )
    target_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    partner_pk: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    cursor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_attempt_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(255), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claim_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claim_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookOutbox(Base):
    """Events written in the transaction that causes them, for the dispatcher to fan out into
    deliveries (and delete). `disposition.changed` needs no row here: the history is its outbox.
    Today: one `calls` row per ingestion that created calls (`payload`: their call id,
    customer id and callback URL), which becomes `call.processed` deliveries."""

    __tablename__ = "webhook_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str] = mapped_column(String(255))
    sub_tenant_id: Mapped[str] = mapped_column(String(255))
    partner_pk: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
