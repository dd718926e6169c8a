"""A SQLite transaction in one step: a thread of its own with its own sqlite3 connection.

Through aiosqlite each statement is four round trips between the event loop and the
database's thread (cursor, execute, fetch, close), and the loop is busy serving requests, so a
group commit of single updates spent most of its time waiting for its turn on the loop. Here
the whole transaction (BEGIN IMMEDIATE, the statements, COMMIT) is one function run in this
thread: one round trip. Database.write_in_thread() runs it under the same lock as
Database.write(), so the two connections of this process never wait on SQLite's file lock.

The statements below are the SQLite forms of the storage functions the group commit needs
(same SQL as the Core statements they stand for; tests/test_update_groups.py runs both paths).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.dialects import sqlite

from server.storage import bulk, customers
from server.storage import catalogs as catalog_storage
from server.storage.catalogs import Disposition, EffectiveCatalog
from server.storage.customers import CustomerState, RecordedChange

T = TypeVar("T")


def _compiled(statement: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    compiled = statement.compile(dialect=sqlite.dialect())
    return str(compiled), tuple(compiled.positiontup or ()), dict(compiled.params)


# The catalog query is involved (the sub-tenant's own catalog, else the tenant-wide one):
# compiled from the very Core statement that storage.catalogs runs, not written twice.
_EFFECTIVE_SQL, _EFFECTIVE_ORDER, _EFFECTIVE_DEFAULTS = _compiled(catalog_storage.EFFECTIVE_CATALOG)


class SqliteWriter:
    def __init__(self, path: Path, *, synchronous: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None  # started by the first transaction
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            self._conn = conn
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # the work or the COMMIT itself failed
                conn.execute("ROLLBACK")
            raise
        return result

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(conn)` inside BEGIN IMMEDIATE ... COMMIT in the writer's thread; a raise
        rolls back. Returns only after the commit."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, work)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection and end the thread (a later transaction starts them again, like
        a disposed SQLAlchemy engine)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._close)
        executor.shutdown(wait=True)


def effective_catalog(
    conn: sqlite3.Connection, *, tenant_id: str, sub_tenant_id: str
) -> EffectiveCatalog:
    """storage.catalogs.effective_catalog on this connection."""
    values = {**_EFFECTIVE_DEFAULTS, "tenant_id": tenant_id, "sub_tenant_id": sub_tenant_id}
    rows = conn.execute(_EFFECTIVE_SQL, [values[name] for name in _EFFECTIVE_ORDER]).fetchall()
    if not rows:
        return EffectiveCatalog(None, [])
    return EffectiveCatalog(
        rows[0][0],
        [Disposition(status, label, bool(final), bool(dnc), bool(cb))
         for _, status, label, final, dnc, cb in rows],
    )  # fmt: skip


def lock_customers(
    conn: sqlite3.Connection, *, tenant_id: str, sub_tenant_id: str, customer_ids: Sequence[str]
) -> dict[str, CustomerState]:
    """storage.customers.lock_customers (BEGIN IMMEDIATE holds the write lock already)."""
    chunks = bulk.in_chunks(
        "SELECT id, customer_id, disposition_status FROM customers"
        " WHERE tenant_id = ? AND sub_tenant_id = ? AND customer_id IN ({in})",
        sorted(set(customer_ids)),
    )
    return {
        customer_id: CustomerState(pk, customer_id, status)
        for text, part in chunks
        for pk, customer_id, status in conn.execute(text, (tenant_id, sub_tenant_id, *part))
    }


def append_changes(
    conn: sqlite3.Connection, changes: Sequence[RecordedChange], *, now: datetime
) -> None:
    """storage.customers.append_changes: statuses, history rows and their feed cursors."""
    if not changes:
        return
    next_seq: dict[str, int] = {}
    for tenant_id, count in customers.changes_per_tenant(changes):
        (last,) = conn.execute(
            "INSERT INTO feed_sequences (tenant_id, last_seq) VALUES (?, ?) ON CONFLICT"
            " (tenant_id) DO UPDATE SET last_seq = feed_sequences.last_seq + excluded.last_seq"
            " RETURNING last_seq",
            (tenant_id, count),
        ).fetchone()
        next_seq[tenant_id] = last - count + 1
    at = now.strftime(bulk.SQLITE_TIME_FORMAT)
    conn.executemany(customers.SET_STATUS_SQL, customers.status_rows(changes, at))
    conn.executemany(customers.INSERT_HISTORY_SQL, customers.history_rows(changes, next_seq, at))
