"""Webhooks: endpoints and their deliveries.

- `webhook_endpoints`: where a tenant's events go, the endpoint's signing secret, its lease (the
  server process delivering to it) and its cursor in the tenant's change feed.
- `webhook_deliveries`: one event for one endpoint (or one call's callback_url), its body and
  how its attempts went.
- `webhook_outbox`: events written with the change that causes them, fanned out into deliveries.
- `partners.webhook_secret`: signs the partner's callback_url deliveries; existing partners get
  one here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import base64
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("partner_pk", BigId, nullable=True),
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("sub_tenant_id", sa.String(255), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("disabled_reason", sa.String(255), nullable=True),
        sa.Column("failing_since", When, nullable=True),
        sa.Column("cursor", sa.BigInteger, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", When, nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["partner_pk"], ["partners.id"], name="fk_webhook_endpoints_partner_pk_partners"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoints"),
        sa.UniqueConstraint("endpoint_id", name="uq_webhook_endpoints_endpoint_id"),
    )
    op.create_index(
        "ix_webhook_endpoints_tenant", "webhook_endpoints", ["tenant_id", "sub_tenant_id"]
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("endpoint_pk", BigId, nullable=True),
        sa.Column("target_url", sa.Text, nullable=True),
        sa.Column("partner_pk", BigId, nullable=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("cursor", sa.BigInteger, nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_attempt_at", When, nullable=True),
        sa.Column("next_attempt_at", When, nullable=True),
        sa.Column("last_attempt_at", When, nullable=True),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("delivered_at", When, nullable=True),
        sa.Column("claim_owner", sa.String(64), nullable=True),
        sa.Column("claim_expires_at", When, nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_pk"],
            ["webhook_endpoints.id"],
            name="fk_webhook_deliveries_endpoint_pk_webhook_endpoints",
        ),
        sa.ForeignKeyConstraint(
            ["partner_pk"], ["partners.id"], name="fk_webhook_deliveries_partner_pk_partners"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("endpoint_pk", "event_id", name="uq_webhook_deliveries_event"),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"]
    )
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries", ["endpoint_pk", "id"])
    op.create_table(
        "webhook_outbox",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("sub_tenant_id", sa.String(255), nullable=False),
        sa.Column("partner_pk", BigId, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["partner_pk"], ["partners.id"], name="fk_webhook_outbox_partner_pk_partners"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_outbox"),
    )
    with op.batch_alter_table("partners") as partners:
        partners.add_column(sa.Column("webhook_secret", sa.String(128), nullable=True))
    bind = op.get_bind()
    for (pk,) in bind.execute(sa.text("SELECT id FROM partners")).all():
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        bind.execute(
            sa.text("UPDATE partners SET webhook_secret = :secret WHERE id = :pk"),
            {"secret": secret, "pk": pk},
        )


def downgrade() -> None:
    with op.batch_alter_table("partners") as partners:
        partners.drop_column("webhook_secret")
    op.drop_table("webhook_outbox")
    op.drop_index("ix_webhook_deliveries_endpoint", "webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", "webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhook_endpoints_tenant", "webhook_endpoints")
    op.drop_table("webhook_endpoints")
