"""Baseline: the whole schema as it was when Alembic took it over.

A frozen copy of server/models.py at that time (never import the models here: they move on,
this revision does not). `server.schema` also reads `metadata` to recognise a database made
by create_all before migrations existed, and stamps it with this revision.

Revision ID: 0001
Revises:
Create Date: 2026-01-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT (BIGSERIAL).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", BigId, primary_key=True, autoincrement=True)


def _text(name: str, length: int = 255, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.String(length), nullable=nullable)


sa.Table(
    "partners",
    metadata,
    _id(),
    _text("partner_id"),
    _text("name"),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("rate_limit_per_minute", sa.Integer, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.UniqueConstraint("partner_id"),
)
sa.Table(
    "partner_credentials",
    metadata,
    _id(),
    sa.Column("partner_pk", BigId, sa.ForeignKey("partners.id"), nullable=False, index=True),
    _text("api_key", 64),
    _text("secret_sha256", 64),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time, nullable=True),
    sa.UniqueConstraint("api_key"),
)
sa.Table(
    "tenant_grants",
    metadata,
    _id(),
    sa.Column("partner_pk", BigId, sa.ForeignKey("partners.id"), nullable=False),
    _text("tenant_id"),
    _text("sub_tenant_id"),
    sa.Column("created_at", Time, nullable=False),
    sa.UniqueConstraint("partner_pk", "tenant_id", "sub_tenant_id"),
)
sa.Table(
    "customers",
    metadata,
    _id(),
    _text("tenant_id"),
    _text("sub_tenant_id"),
    _text("customer_id"),
    _text("name", nullable=True),
    _text("email", 320, nullable=True),
    _text("disposition_status", nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.UniqueConstraint("tenant_id", "sub_tenant_id", "customer_id"),
)
sa.Table(
    "calls",
    metadata,
    _id(),
    sa.Column("partner_pk", BigId, sa.ForeignKey("partners.id"), nullable=False),
    _text("call_id"),
    sa.Column("customer_pk", BigId, sa.ForeignKey("customers.id"), nullable=False, index=True),
    _text("tenant_id"),
    _text("sub_tenant_id"),
    sa.Column("recording_url", sa.Text, nullable=False),
    sa.Column("start_time", Time, nullable=False),
    sa.Column("end_time", Time, nullable=False),
    _text("contact_number", 16),
    _text("agent_id"),
    _text("agent_email", 320, nullable=True),
    _text("agent_name", nullable=True),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("custom_fields", sa.JSON, nullable=False),
    _text("request_id", 128),
    sa.Column("created_at", Time, nullable=False),
    sa.UniqueConstraint("partner_pk", "call_id"),
)
sa.Table(
    "disposition_history",
    metadata,
    _id(),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("customer_pk", BigId, sa.ForeignKey("customers.id"), nullable=False),
    _text("tenant_id"),
    _text("sub_tenant_id"),
    _text("previous_status", nullable=True),
    _text("new_status", nullable=True),
    _text("source", 32),
    sa.Column("partner_pk", BigId, sa.ForeignKey("partners.id"), nullable=False),
    _text("request_id", 128),
    sa.Column("changed_at", Time, nullable=False),
    sa.Index("ix_history_customer", "customer_pk", "id"),
    sa.UniqueConstraint("tenant_id", "seq", name="uq_history_tenant_seq"),
    sa.Index("ix_history_tenant_changed_at", "tenant_id", "sub_tenant_id", "changed_at"),
)
sa.Table(
    "feed_sequences",
    metadata,
    sa.Column("tenant_id", sa.String(255), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)
sa.Table(
    "disposition_catalog",
    metadata,
    _id(),
    _text("tenant_id"),
    _text("sub_tenant_id"),
    sa.Column("position", sa.Integer, nullable=False),
    _text("disposition_status"),
    _text("label"),
    sa.Column("final", sa.Boolean, nullable=False),
    sa.Column("do_not_call", sa.Boolean, nullable=False),
    sa.Column("callback", sa.Boolean, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.UniqueConstraint("tenant_id", "sub_tenant_id", "disposition_status", name="uq_catalog"),
)
sa.Table(
    "idempotency_keys",
    metadata,
    _id(),
    sa.Column("partner_pk", BigId, sa.ForeignKey("partners.id"), nullable=False),
    _text("key"),
    _text("method"),
    _text("fingerprint", 64),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False, index=True),
    sa.UniqueConstraint("partner_pk", "key", name="uq_idempotency_key"),
)


def upgrade() -> None:
    metadata.create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    metadata.drop_all(op.get_bind(), checkfirst=False)
