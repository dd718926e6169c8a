"""Group commit for single status updates: concurrent updates share one unit of work.

Updates queue; a group takes what is queued (up to MAX_GROUP) and runs as one unit of work
(storage/units.py): one read of its customers and catalogs, each update judged in arrival order,
one write of every change, one commit, and only then is each update answered. Up to
`units.concurrency` groups run at once (SQLite: one; PostgreSQL: several, each committing on its
own); while they run, the next group gathers. A customer is never in two groups at once, so a
process applies the updates of one customer in the order they arrived.

Under load the next group also lingers: when a group commits with SIBLINGS or more updates
already queued (proof that requests arrive faster than units commit), the next one starts
GROUP_COMMIT_LINGER_MS later (2 ms by default) or as soon as MAX_GROUP are queued, so that it
carries more updates for the same round trips and commit: less CPU per update, which a busy
process turns into more updates per second and shorter queues (like PostgreSQL's commit_delay
with commit_siblings). An update that finds nothing in flight starts a group at once, so a
lightly loaded server adds no wait.

A group's unit runs in the context (contextvars) of its first update's request, whatever
started it (a request, or the commit of the group before): its statements belong to that
request (its trace, with tracing on) and to no other.

Durability is unchanged: nobody is answered before the commit that holds their change. An
update that is wrong on its own (unknown customer, status outside the catalog) fails alone and
the rest of its group applies; when the unit itself fails, every update in the group gets that
error and none is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from server.db import Database
from server.errors import CustomerNotFound, ServiceError
from server.records import Change, CustomerState, Plan, Reads, Scope, Snapshot
from server.rules import catalogs

# At most this many updates per unit.
MAX_GROUP = 500
# Queued updates at a commit from which the next group lingers.
SIBLINGS = 2

Outcome = bool | Exception  # True: changed, False: unchanged, else what failed the update alone


class PendingUpdate:
    """One update waiting for its group's commit; `done` gets True if the status changed.
    `context`: its request's (contextvars), in which a group it opens runs."""

    __slots__ = ("context", "customer_id", "done", "new_status", "partner_pk", "request_id",
                 "scope", "source")  # fmt: skip

    def __init__(
        self,
        scope: Scope,
        customer_id: str,
        new_status: str | None,  # None clears the status
        partner_pk: int,
        request_id: str,
        source: str,
        done: asyncio.Future[bool],
    ) -> None:
        self.context = contextvars.copy_context()  # made in its request's task
        self.scope = scope
        self.customer_id = customer_id
        self.new_status = new_status
        self.partner_pk = partner_pk
        self.request_id = request_id
        self.source = source
        self.done = done


class UpdateGroups:
    """The queue and its groups in flight, one per Database (and event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.loop = asyncio.get_running_loop()
        self._queue: list[PendingUpdate] = []
        self._in_flight = 0
        self._busy: set[tuple[Scope, str]] = set()  # customers of the groups in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = False  # a _start_groups is scheduled
        self._linger = db.settings.group_commit_linger_seconds
        self._lingering: asyncio.TimerHandle | None = None  # the next group's delayed start
        self.groups_run = 0  # units run, and the updates they carried (metrics)
        self.updates_run = 0
        # Test hook: called with each group before it is applied.
        self.on_group: Callable[[Sequence[PendingUpdate]], None] | None = None

    async def submit(self, update: PendingUpdate) -> bool:
        """Queue the update and wait for the commit of its group; True if the status changed.

        Raises what failed this update alone (CustomerNotFound, ValidationFailed) or what failed
        its whole group. A caller that gives up (deadline, cancelled RPC) cancels `done`: still
        queued, its update is dropped; already in a group, it may commit unanswered (an in-doubt
        write, like any cut-off request), and its group goes on for everybody else.
        """
        self._queue.append(update)
        if self._in_flight < self.db.units.concurrency and not self._starting:
            # After what is ready to run now: requests on their way here join this group.
            self._starting = True
            self.loop.call_soon(self._start_groups)
        elif self._lingering is not None and len(self._queue) >= MAX_GROUP:
            self._lingering.cancel()  # a full group is waiting: no reason to wait for more
            self._lingering = None
            self.loop.call_soon(self._start_groups)
        return await update.done

    def update(
        self,
        scope: Scope,
        customer_id: str,
        new_status: str | None,
        partner_pk: int,
        request_id: str,
        source: str,
    ) -> PendingUpdate:
        """A PendingUpdate on this queue's loop."""
        done: asyncio.Future[bool] = self.loop.create_future()
        return PendingUpdate(scope, customer_id, new_status, partner_pk, request_id, source, done)

    def _start_groups(self) -> None:
        self._starting = False
        self._lingering = None
        while self._queue and self._in_flight < self.db.units.concurrency:
            group: list[PendingUpdate] = []
            waiting: list[PendingUpdate] = []
            held: set[tuple[Scope, str]] = set()  # customers left waiting: keep their order
            for update in self._queue:
                if update.done.done():  # abandoned while queued
                    continue
                key = (update.scope, update.customer_id)
                if len(group) >= MAX_GROUP or key in self._busy or key in held:
                    held.add(key)
                    waiting.append(update)
                else:
                    group.append(update)
            self._queue = waiting
            if not group:
                return
            customers = {(update.scope, update.customer_id) for update in group}
            self._busy |= customers
            self._in_flight += 1
            self.groups_run += 1
            self.updates_run += len(group)
            task = asyncio.create_task(self._apply(group, customers), context=group[0].context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _apply(self, group: list[PendingUpdate], customers: set[tuple[Scope, str]]) -> None:
        try:
            if self.on_group is not None:
                self.on_group(group)
            outcomes = await self.db.units.run(_reads(group), lambda s: _decide(group, s))
        except Exception as exc:  # the unit failed: nobody in it is acknowledged
            # Each request's interceptor logs it (unexpected errors with its request id).
            for update in group:
                if not update.done.done():
                    update.done.set_exception(exc)
        else:
            for update, outcome in zip(group, outcomes, strict=True):
                if update.done.done():
                    continue
                if isinstance(outcome, Exception):
                    update.done.set_exception(outcome)
                else:
                    update.done.set_result(outcome)
        finally:
            self._busy -= customers
            self._in_flight -= 1
            if self._queue and not self._starting:
                self._starting = True
                if self._linger and len(self._queue) >= SIBLINGS:
                    self._lingering = self.loop.call_later(self._linger, self._start_groups)
                else:
                    self.loop.call_soon(self._start_groups)


_GROUPS: weakref.WeakKeyDictionary[Database, UpdateGroups] = weakref.WeakKeyDictionary()


def groups_of(db: Database) -> UpdateGroups:
    """The database's update queue (made on first use, inside the running event loop)."""
    found = _GROUPS.get(db)
    if found is None:
        found = _GROUPS[db] = UpdateGroups(db)
    return found


def stats_of(db: Database) -> tuple[int, int]:
    """(groups run, updates they carried) by the database's queue so far."""
    found = _GROUPS.get(db)
    return (0, 0) if found is None else (found.groups_run, found.updates_run)


def _reads(group: Sequence[PendingUpdate]) -> Reads:
    """The group's customers by scope, and the catalogs of the scopes that set a status."""
    customers: dict[Scope, list[str]] = {}
    for update in group:
        customers.setdefault(update.scope, []).append(update.customer_id)
    return Reads(
        customers=customers,
        catalogs=sorted({u.scope for u in group if u.new_status is not None}),
    )


def _decide(
    group: Sequence[PendingUpdate], snapshot: Snapshot
) -> tuple[Plan | None, list[Outcome]]:
    """Each update's outcome in arrival order, and the changes to write (None: none)."""
    allowed = {scope: catalogs.in_force(found) for scope, found in snapshot.catalogs.items()}
    known: dict[Scope, dict[str, CustomerState]] = snapshot.customers
    current: dict[tuple[Scope, str], str | None] = {}
    changes: list[Change] = []
    outcomes: list[Outcome] = []
    for update in group:
        scope = update.scope
        try:
            if update.new_status is not None:
                allowed[scope].require([("disposition_status", update.new_status)])
            state = known[scope].get(update.customer_id)
            if state is None:
                raise CustomerNotFound(update.customer_id)
        except ServiceError as exc:
            outcomes.append(exc)
            continue
        key = (scope, update.customer_id)
        previous = current.get(key, state.disposition_status)
        if previous == update.new_status:
            outcomes.append(False)
            continue
        current[key] = update.new_status
        changes.append(
            Change(*scope, update.customer_id, state.pk, previous, update.new_status,
                   update.source, update.partner_pk, update.request_id)
        )  # fmt: skip
        outcomes.append(True)
    if not changes:
        return None, outcomes
    return Plan(datetime.now(UTC), changes), outcomes
