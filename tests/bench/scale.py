"""The scale suite: the same update load against 10,000 and 1,000,000 customers, alternating.

Two single stacks (SQLite, one server, Envoy) side by side, each on a database seeded before its
server starts: `customers` customers of the bench tenant, each with one history row (its first
status, "new"), and the tenant's feed cursor after them. Seeding writes the rows with sqlite3
directly, because ingesting a million customers through the API would take minutes of the
bench's time and measure nothing new; the rows are what ingestion writes (same columns, same
stored time format), and the first real update of each stack is checked through the API.

Both stacks use the same customer id width, so both sides send bodies of the same length; the
load picks customers at random over all of the stack's customers, so the large side's working
set really is a million rows.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

# What SQLAlchemy's SQLite DATETIME stores (the server reads these back as UTC).
SEEDED_AT = "2026-11-26 09:00:00.000000"
CHUNK = 50_000


def seed(
    db_path: Path, *, customers: int, digits: int, tenant_id: str, sub_tenant_id: str
) -> float:
    """Add `customers` customers with one history row each; returns the seconds it took."""
    started = time.monotonic()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # bench seeding only; the server uses its own
        (partner_pk,) = conn.execute(
            "SELECT id FROM partners WHERE partner_id = 'bench'"
        ).fetchone()
        for first in range(0, customers, CHUNK):
            conn.executemany(
                "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
                " created_at, updated_at) VALUES (?, ?, ?, 'new', ?, ?)",
                (
                    (tenant_id, sub_tenant_id, f"c{i:0{digits}d}", SEEDED_AT, SEEDED_AT)
                    for i in range(first, min(first + CHUNK, customers))
                ),
            )
        conn.execute(
            "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
            " previous_status, new_status, source, partner_pk, request_id, changed_at)"
            " SELECT row_number() OVER (ORDER BY id), id, tenant_id, sub_tenant_id, NULL, 'new',"
            " 'batch_call', ?, 'seed-' || id, created_at FROM customers WHERE tenant_id = ?",
            (partner_pk, tenant_id),
        )
        conn.execute(
            "INSERT INTO feed_sequences (tenant_id, last_seq) VALUES (?, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET last_seq = excluded.last_seq",
            (tenant_id, customers),
        )
        conn.commit()
    finally:
        conn.close()
    return round(time.monotonic() - started, 1)
