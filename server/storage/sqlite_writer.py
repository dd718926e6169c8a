"""SQLite's units of work: each one whole in a writer thread with its own sqlite3 connection.

Through aiosqlite each statement is four round trips between the event loop and the database's
thread (cursor, execute, fetch, close), and the loop is busy serving requests. Here a whole unit
(BEGIN IMMEDIATE, the reads, the use case's decision, the writes, COMMIT) is one function run in
this thread: one hop from the loop per unit, there and back. Database runs it under the same
lock as its SQLAlchemy writer, so the two writer connections of a process never wait on SQLite's
file lock; BEGIN IMMEDIATE makes other processes wait in SQLite's busy handler.

The statements are the SQLite forms of the storage module's (the catalog query is compiled from
the very Core statement that storage.catalogs runs); the PostgreSQL engine writes the same rows
(tests run both).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.dialects import sqlite

from server.records import (
    CustomerState,
    Disposition,
    EffectiveCatalog,
    KeyRecord,
    KeyRef,
    Plan,
    Reads,
    Scope,
    Snapshot,
    StoredKey,
)
from server.storage import as_utc, bulk, units
from server.storage import catalogs as catalog_storage

T = TypeVar("T")


def _compiled(statement: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    compiled = statement.compile(dialect=sqlite.dialect())
    return str(compiled), tuple(compiled.positiontup or ()), dict(compiled.params)


# The catalog query is involved (the sub-tenant's own catalog, else the tenant-wide one):
# compiled from the very Core statement that storage.catalogs runs, not written twice.
_EFFECTIVE_SQL, _EFFECTIVE_ORDER, _EFFECTIVE_DEFAULTS = _compiled(catalog_storage.EFFECTIVE_CATALOG)


class SqliteWriter:
    """The writer thread and its connection.

    One thread of its own takes transactions from a queue, one after the other, and hands each
    result back to the event loop that asked for it (`call_soon_threadsafe`): the one thread
    hand-off of each transaction, cheaper than an executor's (no Future and Condition per job).
    Each transaction runs in a copy of its caller's context (contextvars), as
    `asyncio.to_thread` would run it: what the caller's request set (its trace) holds there too.
    """

    def __init__(self, path: Path, *, synchronous: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        # The connection's class, set before the first transaction (tracing: a traced one).
        self.connection_class: type[sqlite3.Connection] = sqlite3.Connection
        self._jobs: queue.SimpleQueue[_Job | None] | None = None  # the thread's, once started
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                factory=self.connection_class,
            )
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

    def _run(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            work, context, future, loop = job
            try:
                outcome: tuple[Any, BaseException | None] = (
                    context.run(self._transaction, work),
                    None,
                )
            except BaseException as exc:  # handed to the waiting coroutine, raised there
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                continue
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(conn)` inside BEGIN IMMEDIATE ... COMMIT in the writer's thread; a raise
        rolls back. Returns only after the commit."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._run, args=(self._jobs,), name="sqlite-writer", daemon=True
            )
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((work, contextvars.copy_context(), future, loop))
        return await future

    async def close(self) -> None:
        """Close the connection and end the thread, once what it was given is done (a later
        transaction starts them again, like a disposed SQLAlchemy engine)."""
        jobs, thread = self._jobs, self._thread
        self._jobs = self._thread = None
        if jobs is None or thread is None:
            return
        jobs.put(None)
        await asyncio.to_thread(thread.join)


_Job = tuple[
    Callable[[sqlite3.Connection], Any],
    contextvars.Context,
    "asyncio.Future[Any]",
    asyncio.AbstractEventLoop,
]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled: the transaction ran (or failed) unanswered
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class SqliteUnits:
    """storage.units.Units on SQLite: each unit one transaction in the writer's thread."""

    concurrency = 1  # one writer

    def __init__(
        self,
        writer: SqliteWriter,
        transaction: Callable[[Callable[[sqlite3.Connection], Any]], Any],
    ) -> None:
        self.writer = writer
        # Database's locked, commit-announcing way into writer.transaction.
        self._transaction = transaction

    async def run(self, reads: Reads, decide: Callable[[Snapshot], tuple[Plan | None, T]]) -> T:
        def unit(conn: sqlite3.Connection) -> T:
            plan, result = decide(read(conn, reads))
            if plan is not None:
                write(conn, plan)
            return result

        result: T = await self._transaction(unit)
        return result

    async def close(self) -> None:
        await self.writer.close()


# -- reads --------------------------------------------------------------------------------------


def read(conn: sqlite3.Connection, reads: Reads) -> Snapshot:
    """What `reads` asks for, inside the unit's transaction (which holds the write lock)."""
    existing_calls: set[str] = set()
    if reads.calls is not None:
        partner_pk, call_ids = reads.calls
        for text, part in bulk.in_chunks(
            "SELECT call_id FROM calls WHERE partner_pk = ? AND call_id IN ({in})",
            sorted(set(call_ids)),
        ):
            existing_calls.update(row[0] for row in conn.execute(text, (partner_pk, *part)))
    return Snapshot(
        customers={
            scope: find_customers(conn, scope=scope, customer_ids=ids)
            for scope, ids in reads.customers.items()
        },
        catalogs={scope: effective_catalog(conn, scope=scope) for scope in reads.catalogs},
        existing_calls=existing_calls,
        key=None if reads.key is None else find_key(conn, reads.key),
    )


def effective_catalog(conn: sqlite3.Connection, *, scope: Scope) -> EffectiveCatalog:
    """storage.catalogs.effective_catalog on this connection."""
    values = {**_EFFECTIVE_DEFAULTS, "tenant_id": scope[0], "sub_tenant_id": scope[1]}
    rows = conn.execute(_EFFECTIVE_SQL, [values[name] for name in _EFFECTIVE_ORDER]).fetchall()
    if not rows:
        return EffectiveCatalog(None, [])
    return EffectiveCatalog(
        rows[0][0],
        [Disposition(status, label, bool(final), bool(dnc), bool(cb))
         for _, status, label, final, dnc, cb in rows],
    )  # fmt: skip


def find_customers(
    conn: sqlite3.Connection, *, scope: Scope, customer_ids: Sequence[str]
) -> dict[str, CustomerState]:
    """The scope's customers among `customer_ids` (missing ones are absent)."""
    chunks = bulk.in_chunks(
        "SELECT id, customer_id, disposition_status FROM customers"
        " WHERE tenant_id = ? AND sub_tenant_id = ? AND customer_id IN ({in})",
        sorted(set(customer_ids)),
    )
    return {
        customer_id: CustomerState(pk, customer_id, status)
        for text, part in chunks
        for pk, customer_id, status in conn.execute(text, (*scope, *part))
    }


def find_key(conn: sqlite3.Connection, ref: KeyRef) -> StoredKey | None:
    row = conn.execute(
        "SELECT method, fingerprint, response, created_at FROM idempotency_keys"
        " WHERE partner_pk = ? AND key = ?",
        ref,
    ).fetchone()
    if row is None:
        return None
    method, fingerprint, response, created_at = row
    return StoredKey(method, fingerprint, response, as_utc(datetime.fromisoformat(created_at)))


# -- writes -------------------------------------------------------------------------------------

SET_STATUS_SQL = "UPDATE customers SET disposition_status = ?, updated_at = ? WHERE id = ?"
UPDATE_CUSTOMER_SQL = (
    "UPDATE customers SET disposition_status = CASE WHEN ? THEN ? ELSE disposition_status END,"
    " name = coalesce(?, name), email = coalesce(?, email), updated_at = ? WHERE id = ?"
)
INSERT_HISTORY_SQL = (
    "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
    " previous_status, new_status, source, partner_pk, request_id, changed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ADVANCE_CURSOR_SQL = (
    "INSERT INTO feed_sequences (tenant_id, last_seq) VALUES (?, ?) ON CONFLICT (tenant_id)"
    " DO UPDATE SET last_seq = feed_sequences.last_seq + excluded.last_seq RETURNING last_seq"
)
COUNT_STATUS_SQL = (
    "INSERT INTO status_counts (tenant_id, sub_tenant_id, disposition_status, customers)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, sub_tenant_id, disposition_status)"
    " DO UPDATE SET customers = status_counts.customers + excluded.customers"
)
COUNT_HOUR_SQL = (
    "INSERT INTO status_change_hours (tenant_id, sub_tenant_id, hour, disposition_status,"
    " changes) VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant_id, sub_tenant_id, hour,"
    " disposition_status) DO UPDATE SET changes = status_change_hours.changes + excluded.changes"
)
_CALL_COLUMNS = (
    "partner_pk", "call_id", "customer_pk", "tenant_id", "sub_tenant_id", "recording_url",
    "start_time", "end_time", "contact_number", "agent_id", "agent_email", "agent_name",
    "callback_url", "metadata", "custom_fields", "request_id", "created_at",
)  # fmt: skip
INSERT_CALL_SQL = (
    f"INSERT INTO calls ({', '.join(_CALL_COLUMNS)}) VALUES ({', '.join('?' * len(_CALL_COLUMNS))})"
)
INSERT_OUTBOX_SQL = (
    "INSERT INTO webhook_outbox (kind, tenant_id, sub_tenant_id, partner_pk, payload, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_NEW_CUSTOMER_COLUMNS = (
    "tenant_id", "sub_tenant_id", "customer_id", "name", "email", "disposition_status",
    "created_at", "updated_at",
)  # fmt: skip


def write(conn: sqlite3.Connection, plan: Plan) -> None:
    """Everything the plan says, and what follows from it (history, cursors, counters)."""
    at = plan.now.strftime(bulk.SQLITE_TIME_FORMAT)
    created = _insert_customers(conn, plan, at)
    updates = units.customer_updates(plan)
    if all(not (u.name or u.email) for u in updates):  # status changes only: the common case
        conn.executemany(SET_STATUS_SQL, [(u.status, at, u.customer_pk) for u in updates])
    else:
        conn.executemany(
            UPDATE_CUSTOMER_SQL,
            [(u.set_status, u.status, u.name, u.email, at, u.customer_pk) for u in updates],
        )
    if plan.changes:
        _append_history(conn, plan, created, at)
    if plan.calls:
        times: dict[datetime, str] = {}  # the calls of a batch share times

        def time(value: datetime) -> str:
            found = times.get(value)
            if found is None:
                found = times[value] = value.strftime(bulk.SQLITE_TIME_FORMAT)
            return found

        rows = []
        for c in plan.calls:
            pk = c.customer_pk
            if pk is None:
                pk = created[c.tenant_id, c.sub_tenant_id, c.customer_id]
            rows.append(
                (c.partner_pk, c.call_id, pk, c.tenant_id, c.sub_tenant_id, c.recording_url,
                 time(c.start_time), time(c.end_time), c.contact_number, c.agent_id,
                 c.agent_email, c.agent_name, c.callback_url, bulk.db_json(c.metadata),
                 bulk.db_json(c.custom_fields), c.request_id, at)
            )  # fmt: skip
        conn.executemany(INSERT_CALL_SQL, rows)
        conn.executemany(INSERT_OUTBOX_SQL, [(*row, at) for row in units.outbox_rows(plan)])
    conn.executemany(COUNT_STATUS_SQL, units.status_deltas(plan))
    hour = units.hour_of(plan.now).strftime(bulk.SQLITE_TIME_FORMAT)
    conn.executemany(
        COUNT_HOUR_SQL, [(t, s, hour, status, n) for t, s, status, n in units.hour_deltas(plan)]
    )
    if plan.key is not None:
        _store_key(conn, plan.key, at)


def _insert_customers(
    conn: sqlite3.Connection, plan: Plan, at: str
) -> dict[tuple[str, str, str], int]:
    """Insert the plan's new customers; their primary keys by (tenant, sub-tenant, id)."""
    created: dict[tuple[str, str, str], int] = {}
    rows = [(*new, at, at) for new in plan.new_customers]
    width = len(_NEW_CUSTOMER_COLUMNS)
    per_statement = bulk.MAX_PARAMETERS // width
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        values = ", ".join([f"({', '.join('?' * width)})"] * len(chunk))
        for tenant_id, sub_tenant_id, customer_id, pk in conn.execute(
            f"INSERT INTO customers ({', '.join(_NEW_CUSTOMER_COLUMNS)}) VALUES {values}"
            " RETURNING tenant_id, sub_tenant_id, customer_id, id",
            [value for row in chunk for value in row],
        ):
            created[tenant_id, sub_tenant_id, customer_id] = pk
    return created


def _append_history(
    conn: sqlite3.Connection, plan: Plan, created: dict[tuple[str, str, str], int], at: str
) -> None:
    """History rows with their feed cursors (taken from each tenant's feed_sequences row)."""
    next_seq: dict[str, int] = {}
    for tenant_id, count in units.tenant_counts(plan.changes):
        (last,) = conn.execute(ADVANCE_CURSOR_SQL, (tenant_id, count)).fetchone()
        next_seq[tenant_id] = last - count + 1
    rows = []
    for c in plan.changes:
        seq = next_seq[c.tenant_id]
        next_seq[c.tenant_id] = seq + 1
        pk = c.customer_pk
        if pk is None:
            pk = created[c.tenant_id, c.sub_tenant_id, c.customer_id]
        rows.append((seq, pk, c.tenant_id, c.sub_tenant_id, c.previous_status, c.new_status,
                     c.source, c.partner_pk, c.request_id, at))  # fmt: skip
    conn.executemany(INSERT_HISTORY_SQL, rows)


def _store_key(conn: sqlite3.Connection, key: KeyRecord, at: str) -> None:
    """Store the key with its reply (taking over the expired record it replaces), then delete a
    few expired keys."""
    if key.replaces is None:
        conn.execute(
            "INSERT INTO idempotency_keys (partner_pk, key, method, fingerprint, response,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key.partner_pk, key.key, key.method, key.fingerprint, key.response, at),
        )
    else:
        conn.execute(
            "UPDATE idempotency_keys SET method = ?, fingerprint = ?, response = ?,"
            " created_at = ? WHERE partner_pk = ? AND key = ?",
            (key.method, key.fingerprint, key.response, at, key.partner_pk, key.key),
        )
    conn.execute(
        "DELETE FROM idempotency_keys WHERE id IN (SELECT id FROM idempotency_keys"
        " WHERE created_at < ? ORDER BY created_at LIMIT ?)",
        (key.prune_before.strftime(bulk.SQLITE_TIME_FORMAT), units.PRUNE_KEYS),
    )
