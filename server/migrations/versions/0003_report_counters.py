"""Report counters, HOT status updates, the write conflict function, a feed index.

- `status_counts` and `status_change_hours`: the summary report's counts, kept by every write
  from now on; filled here from the customers and the history as they are. Stop the servers
  that write (or let none run an older version) while this revision runs: a change committed by
  an older server after the backfill would not be counted.
- PostgreSQL: pages keep free space (fillfactor) so that status updates stay on their page (HOT,
  no index entries); it applies to pages written from now on (`VACUUM FULL customers` rewrites
  the old ones, with an exclusive lock).
- `ix_history_tenant_sub_seq`: a sub-tenant's changes in cursor order (the change feed of one
  sub-tenant reads only its own rows, and no planner estimate can make it scan the others').
- PostgreSQL: `disposition_conflict(text)`, which a write statement calls to abort itself
  (SQLSTATE 40001, serialization_failure) when what it read has changed since; the server reads
  again and retries (server/storage/postgres_writer.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_FILLFACTOR = {"customers": 80, "feed_sequences": 50}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "status_counts",
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("sub_tenant_id", sa.String(255), nullable=False),
        sa.Column("disposition_status", sa.String(255), nullable=False),
        sa.Column("customers", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "sub_tenant_id", "disposition_status", name="pk_status_counts"
        ),
        postgresql_with={"fillfactor": 70},
    )
    op.create_table(
        "status_change_hours",
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("sub_tenant_id", sa.String(255), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disposition_status", sa.String(255), nullable=False),
        sa.Column("changes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            *("tenant_id", "sub_tenant_id", "hour", "disposition_status"),
            name="pk_status_change_hours",
        ),
        postgresql_with={"fillfactor": 80},
    )
    op.create_index(
        "ix_history_tenant_sub_seq", "disposition_history", ["tenant_id", "sub_tenant_id", "seq"]
    )
    op.execute(
        "INSERT INTO status_counts (tenant_id, sub_tenant_id, disposition_status, customers)"
        " SELECT tenant_id, sub_tenant_id, coalesce(disposition_status, ''), count(*)"
        " FROM customers GROUP BY tenant_id, sub_tenant_id, coalesce(disposition_status, '')"
    )
    # The hour of each change, in UTC (SQLite stores UTC times as text).
    hour = (
        "date_trunc('hour', changed_at, 'UTC')"
        if postgres
        else "strftime('%Y-%m-%d %H:00:00.000000', changed_at)"
    )
    op.execute(
        "INSERT INTO status_change_hours"
        " (tenant_id, sub_tenant_id, hour, disposition_status, changes)"
        f" SELECT tenant_id, sub_tenant_id, {hour}, coalesce(new_status, ''), count(*)"
        f" FROM disposition_history GROUP BY tenant_id, sub_tenant_id, {hour},"
        " coalesce(new_status, '')"
    )
    if postgres:
        for table, fillfactor in _FILLFACTOR.items():
            op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")
        op.execute(
            "CREATE FUNCTION disposition_conflict(reason text) RETURNS boolean"
            " LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION USING ERRCODE = 'serialization_failure',"
            " MESSAGE = 'disposition: ' || reason || ' changed since it was read';"
            " END $$"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION disposition_conflict(text)")
        for table in _FILLFACTOR:
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    op.drop_index("ix_history_tenant_sub_seq", "disposition_history")
    op.drop_table("status_change_hours")
    op.drop_table("status_counts")
