"""Group commit of single updates (server/runtime/update_groups.py) with a stand-in for the units
of work: when the next group starts at once and when it lingers until it is full (through a real
server: tests/grpc_api/test_update_groups.py)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from server.runtime import update_groups
from server.settings import Settings


class _GatedUnits:
    """storage.units.Units stand-in: each unit waits for `release`, then changes every update."""

    concurrency = 1

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = asyncio.Event()

    async def run(self, reads: Any, decide: Any) -> list[bool]:
        size = sum(len(ids) for ids in reads.customers.values())
        self.sizes.append(size)
        await self.release.wait()
        return [True] * size


class _Db:
    def __init__(self, linger_seconds: float) -> None:
        self.units = _GatedUnits()
        self.settings = Settings(group_commit_linger_seconds=linger_seconds)


async def _settle() -> None:
    for _ in range(5):  # a few loop turns: whatever was scheduled at once has run
        await asyncio.sleep(0)


def _submit(groups: update_groups.UpdateGroups, *customers: str) -> list[asyncio.Task[bool]]:
    return [
        asyncio.create_task(groups.submit(groups.update(("t", "s"), c, "x", 1, f"r-{c}", "test")))
        for c in customers
    ]


async def test_an_update_that_finds_nothing_in_flight_starts_at_once() -> None:
    db = _Db(linger_seconds=3600)  # a lingering group would wait an hour
    groups = update_groups.UpdateGroups(db)  # type: ignore[arg-type]
    db.units.release.set()
    (first,) = _submit(groups, "a")
    assert await asyncio.wait_for(first, timeout=30) is True
    (second,) = _submit(groups, "b")  # one queued after a commit: below SIBLINGS
    assert await asyncio.wait_for(second, timeout=30) is True
    assert db.units.sizes == [1, 1]


async def test_under_load_the_next_group_lingers_until_it_is_full() -> None:
    db = _Db(linger_seconds=3600)
    groups = update_groups.UpdateGroups(db)  # type: ignore[arg-type]
    first = _submit(groups, "a")
    await _settle()
    assert db.units.sizes == [1]  # in flight, waiting for release
    queued = _submit(groups, *(f"q-{i}" for i in range(update_groups.SIBLINGS)))
    await _settle()
    db.units.release.set()
    await asyncio.wait_for(asyncio.gather(*first), timeout=30)
    await _settle()
    # SIBLINGS were queued at the commit: the next group waits for more instead of starting.
    assert db.units.sizes == [1]
    assert not any(task.done() for task in queued)
    more = _submit(groups, *(f"m-{i}" for i in range(update_groups.MAX_GROUP - len(queued))))
    # A full group's worth is queued: it starts without waiting out the linger.
    assert all(await asyncio.wait_for(asyncio.gather(*queued, *more), timeout=30))
    assert db.units.sizes == [1, update_groups.MAX_GROUP]


async def test_without_a_linger_the_next_group_starts_at_once() -> None:
    db = _Db(linger_seconds=0)
    groups = update_groups.UpdateGroups(db)  # type: ignore[arg-type]
    first = _submit(groups, "a")
    await _settle()
    queued = _submit(groups, "b", "c", "d")
    await _settle()
    db.units.release.set()
    assert all(await asyncio.wait_for(asyncio.gather(*first, *queued), timeout=30))
    assert db.units.sizes == [1, 3]


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request")


class _ContextUnits(_GatedUnits):
    """Also records the request (context variable) each unit runs for."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str | None] = []

    async def run(self, reads: Any, decide: Any) -> list[bool]:
        self.requests.append(REQUEST.get(None))
        return await super().run(reads, decide)


async def test_a_group_runs_in_the_context_of_its_first_update() -> None:
    """Also when the commit of the group before starts it: its statements belong to that
    request (its trace, with tracing on), not to the one that happened to commit last."""
    db = _Db(linger_seconds=0)
    db.units = units = _ContextUnits()
    groups = update_groups.UpdateGroups(db)  # type: ignore[arg-type]

    async def request(customer: str) -> bool:
        REQUEST.set(f"request-{customer}")
        return await groups.submit(groups.update(("t", "s"), customer, "x", 1, customer, "test"))

    first = asyncio.create_task(request("a"))
    await _settle()
    queued = [asyncio.create_task(request(c)) for c in ("b", "c")]
    await _settle()
    units.release.set()  # a's group commits; its end starts the next group (b and c)
    assert all(await asyncio.wait_for(asyncio.gather(first, *queued), timeout=30))
    assert (units.sizes, units.requests) == ([1, 2], ["request-a", "request-b"])
