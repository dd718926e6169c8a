"""Group commit for single status updates: concurrent updates share one write transaction.

Each update used to take the database's write lock for a transaction of its own: seven
statements, each a round trip between the event loop and the database thread, while every
other writer waited. Here updates queue instead; one drain task takes everything queued,
applies it in arrival order inside one transaction (a handful of statements for the whole
group: the catalogs and customers of each tenant scope, the cursors, one UPDATE, one INSERT),
commits, and only then answers each update. While a group commits, the next one gathers.

On a SQLite file the whole transaction is one function run in the database's writer thread
(`_apply_sqlite`, server/storage/sqlite_writer.py): one round trip instead of a few per statement.

Durability is unchanged: nobody is answered before the commit that holds their change. An
update that is wrong on its own (unknown customer, status outside the catalog) fails alone and
the rest of its group applies; when the transaction itself fails, every update in the group
gets that error and none is acknowledged.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from sqlalchemy.ext.asyncio import AsyncConnection

from server.db import Database
from server.domain import catalogs
from server.errors import CustomerNotFound, ServiceError
from server.storage import customers, sqlite_writer
from server.storage.customers import CustomerState, RecordedChange, StatusChange

# At most this many updates per transaction (a lock_customers chunk).
MAX_GROUP = 500


@dataclass(slots=True)
class PendingUpdate:
    """One update waiting for its group's commit; `done` gets True if the status changed."""

    tenant_id: str
    sub_tenant_id: str
    customer_id: str
    new_status: str | None  # None clears the status
    partner_pk: int
    request_id: str
    source: str
    done: asyncio.Future[bool] = field(init=False)
    abandoned: bool = False  # the caller gave up while this was still queued

    def __post_init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()


class UpdateGroups:
    """The queue and its drain task, one per Database (and event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[PendingUpdate] = []
        self._drain: asyncio.Task[None] | None = None
        # Test hook: called with each group before it is applied.
        self.on_group: Callable[[Sequence[PendingUpdate]], None] | None = None

    async def submit(self, update: PendingUpdate) -> bool:
        """Queue the update and wait for the commit of its group; True if the status changed.

        Raises what failed this update alone (CustomerNotFound, ValidationFailed) or what failed
        its whole group.
        """
        self._queue.append(update)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run())
        try:
            # shield: a caller that gives up (deadline, cancelled RPC) must not cancel its group's
            # transaction for everybody else. Still queued, its update is dropped; already in a
            # group, it may commit unanswered (an in-doubt write, like any cut-off request).
            return await asyncio.shield(update.done)
        except asyncio.CancelledError:
            update.abandoned = True
            update.done.add_done_callback(_discard)
            raise

    async def _run(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            for update in group:
                if update.abandoned:
                    update.done.cancel()
            group = [update for update in group if not update.abandoned]
            if not group:
                continue
            try:
                if self.on_group is not None:
                    self.on_group(group)
                if self.db.sqlite_writer is not None:
                    outcomes = await self.db.write_in_thread(partial(_apply_sqlite, group=group))
                else:
                    async with self.db.write() as conn:
                        outcomes = await _apply(conn, group)
            except Exception as exc:  # the transaction failed: nobody in it is acknowledged
                # Each request's interceptor logs it (unexpected errors with its request id).
                for update in group:
                    if not update.done.done():
                        update.done.set_exception(exc)
                continue
            for update, outcome in zip(group, outcomes, strict=True):
                if update.done.done():
                    continue
                if isinstance(outcome, Exception):
                    update.done.set_exception(outcome)
                else:
                    update.done.set_result(outcome)


def _discard(future: asyncio.Future[bool]) -> None:
    """Retrieve an abandoned update's outcome so that asyncio does not report it as lost."""
    if not future.cancelled():
        future.exception()


_GROUPS: weakref.WeakKeyDictionary[Database, UpdateGroups] = weakref.WeakKeyDictionary()


def groups_of(db: Database) -> UpdateGroups:
    """The database's update queue (made on first use, inside the running event loop)."""
    found = _GROUPS.get(db)
    if found is None:
        found = _GROUPS[db] = UpdateGroups(db)
    return found


def _scopes(group: Sequence[PendingUpdate]) -> list[tuple[tuple[str, str], list[str], bool]]:
    """Each tenant scope of the group in one order for every writer (PostgreSQL row locks: no
    lock cycles), with its customer ids and whether it needs its catalog."""
    found: list[tuple[tuple[str, str], list[str], bool]] = []
    for scope in sorted({(u.tenant_id, u.sub_tenant_id) for u in group}):
        members = [u for u in group if (u.tenant_id, u.sub_tenant_id) == scope]
        found.append(
            (
                scope,
                [u.customer_id for u in members],
                any(u.new_status is not None for u in members),
            )
        )
    return found


async def _apply(conn: AsyncConnection, group: Sequence[PendingUpdate]) -> list[bool | Exception]:
    """Judge and apply the group in arrival order on `conn` (inside its transaction)."""
    known: dict[tuple[str, str], dict[str, CustomerState]] = {}
    allowed: dict[tuple[str, str], catalogs.Catalog] = {}
    for scope, customer_ids, needs_catalog in _scopes(group):
        tenant_id, sub_tenant_id = scope
        if needs_catalog:
            allowed[scope] = await catalogs.load(
                conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
            )
        known[scope] = await customers.lock_customers(
            conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, customer_ids=customer_ids
        )
    outcomes, changes = _judge(group, allowed, known)
    await customers.append_changes(conn, changes, now=datetime.now(UTC))
    return outcomes


def _apply_sqlite(
    conn: sqlite3.Connection, group: Sequence[PendingUpdate]
) -> list[bool | Exception]:
    """_apply, as one function run in the SQLite writer's thread (server.storage.sqlite_writer)."""
    known: dict[tuple[str, str], dict[str, CustomerState]] = {}
    allowed: dict[tuple[str, str], catalogs.Catalog] = {}
    for scope, customer_ids, needs_catalog in _scopes(group):
        tenant_id, sub_tenant_id = scope
        if needs_catalog:
            allowed[scope] = catalogs.in_force(
                sqlite_writer.effective_catalog(
                    conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id
                )
            )
        known[scope] = sqlite_writer.lock_customers(
            conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id, customer_ids=customer_ids
        )
    outcomes, changes = _judge(group, allowed, known)
    sqlite_writer.append_changes(conn, changes, now=datetime.now(UTC))
    return outcomes


def _judge(
    group: Sequence[PendingUpdate],
    allowed: dict[tuple[str, str], catalogs.Catalog],
    known: dict[tuple[str, str], dict[str, CustomerState]],
) -> tuple[list[bool | Exception], list[RecordedChange]]:
    """Each update's outcome in arrival order, and the changes to record."""
    current: dict[tuple[str, str, str], str | None] = {}
    changes: list[RecordedChange] = []
    outcomes: list[bool | Exception] = []
    for update in group:
        scope = (update.tenant_id, update.sub_tenant_id)
        try:
            if update.new_status is not None:
                allowed[scope].require([("disposition_status", update.new_status)])
            state = known[scope].get(update.customer_id)
            if state is None:
                raise CustomerNotFound(update.customer_id)
        except ServiceError as exc:
            outcomes.append(exc)
            continue
        key = (*scope, update.customer_id)
        previous = current.get(key, state.disposition_status)
        if previous == update.new_status:
            outcomes.append(False)
            continue
        current[key] = update.new_status
        changes.append(
            RecordedChange(
                StatusChange(state.pk, previous, update.new_status),
                update.tenant_id,
                update.sub_tenant_id,
                update.source,
                update.partner_pk,
                update.request_id,
            )
        )
        outcomes.append(True)
    return outcomes, changes
