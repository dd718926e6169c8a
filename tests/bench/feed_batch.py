"""Change-feed latency and batch-update throughput, driven with grpcio against real servers.

Feed latency: a watcher streams WatchDispositionChanges from one server while a client sends
updates one at a time (at `rate` per second) to a server: the same one (the watcher is woken by
the commit itself) or a second server process on the same database (the watcher's server
finds the change by polling). For each update, latency = when the watcher received the change
minus when the update's OK reply arrived (its commit was acknowledged); both clocks are this
process's monotonic clock.

Batch updates: BatchUpdateDispositionStatus with 1,000 items (a fresh status for each of 1,000
distinct customers, so every item is a real change with a history row), sent back to back by
`clients` concurrent clients; items/s counts only items whose outcome was `ok` and `changed`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import grpc

from devstack import Credentials
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from tests.bench.grpc_load import customer_id


def _metadata(partner: Credentials, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple({**partner.headers(), **extra}.items())


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {
        "samples": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def _feed_latency(
    watch_port: int,
    write_port: int,
    partner: Credentials,
    customers: int,
    updates: int,
    rate: float,
) -> dict[str, float]:
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{watch_port}") as watch_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{write_port}") as write_channel,
    ):
        call = disposition_grpc.DispositionServiceStub(watch_channel).WatchDispositionChanges(
            pb.WatchDispositionChangesRequest(start_at_latest=True), metadata=_metadata(partner)
        )
        await call.read()  # the stream is open: the first reply names the starting cursor

        async def read() -> None:
            while True:  # read(), not `async for`: grpc.aio forbids mixing the two
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return
                now = time.monotonic()
                for change in reply.changes:
                    seen.setdefault(change.request_id, now)

        reader = asyncio.create_task(read())
        stub = disposition_grpc.DispositionServiceStub(write_channel)
        stamp = time.time_ns()
        for n in range(updates):
            request_id = f"feed-{stamp}-{n}"
            await stub.UpdateDispositionStatus(
                pb.UpdateDispositionStatusRequest(
                    customer_id=customer_id(n % customers), disposition_status=request_id
                ),
                metadata=_metadata(partner, **{"x-request-id": request_id}),
            )
            acked[request_id] = time.monotonic()
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 5
        while len(seen) < len(acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        call.cancel()
        reader.cancel()
    missing = [r for r in acked if r not in seen]
    result = _quantiles([seen[r] - acked[r] for r in acked if r in seen])
    result["missing"] = len(missing)
    return result


def feed_latency(
    *, watch_port: int, write_port: int, partner: Credentials, customers: int, updates: int = 300,
    rate: float = 50.0,
) -> dict[str, float]:  # fmt: skip
    return asyncio.run(_feed_latency(watch_port, write_port, partner, customers, updates, rate))


async def _batch_updates(
    port: int, partner: Credentials, customers: int, seconds: float, clients: int
) -> dict[str, float]:
    changed = 0
    batches = 0
    errors = 0
    stamp = time.time_ns()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = disposition_grpc.DispositionServiceStub(channel)
        started = time.monotonic()
        deadline = started + seconds

        async def client(k: int) -> None:
            nonlocal changed, batches, errors
            n = 0
            while time.monotonic() < deadline:
                first = ((k * 1000) + n * clients * 1000) % max(customers - 1000, 1)
                request = pb.BatchUpdateDispositionStatusRequest(
                    items=[
                        pb.DispositionStatusUpdate(
                            customer_id=customer_id(first + i),
                            disposition_status=f"b{stamp}-{k}-{n}",
                        )
                        for i in range(1000)
                    ]
                )
                n += 1
                try:
                    reply = await stub.BatchUpdateDispositionStatus(
                        request, metadata=_metadata(partner)
                    )
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                batches += 1
                changed += reply.data.changed

        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "batches": batches,
        "items_changed": changed,
        "items_per_s": round(changed / elapsed, 1),
        "errors": errors,
    }


def batch_updates(
    *, port: int, partner: Credentials, customers: int, seconds: float = 5.0, clients: int = 2
) -> dict[str, float]:
    return asyncio.run(_batch_updates(port, partner, customers, seconds, clients))


def median_of(runs: list[dict[str, Any]], *keys: str) -> dict[str, Any]:
    return {key: round(statistics.median(float(r[key]) for r in runs), 2) for key in keys}


# Issue 13: a change committed on one replica reaches a watcher on another (PostgreSQL).
FEED_P50_MAX_MS, FEED_P99_MAX_MS = 10.0, 50.0


def feed_suite(
    pairs: dict[str, tuple[int, int]], partner: dict[str, Credentials], customers: int, repeats: int
) -> dict[str, Any]:
    """Commit-acknowledged -> watcher latency for each (watch port, write port) pair, `repeats`
    runs each; checks the cross-replica PostgreSQL pair ("postgres_other_replica")."""
    result: dict[str, Any] = {}
    for name, (watch_port, write_port) in pairs.items():
        runs = [
            feed_latency(watch_port=watch_port, write_port=write_port, partner=partner[name],
                         customers=customers)
            for _ in range(repeats)
        ]  # fmt: skip
        result[name] = {
            **median_of(runs, "p50_ms", "p95_ms", "p99_ms", "max_ms"),
            "missing": sum(int(r["missing"]) for r in runs),
            "runs": runs,
        }
        print(f"[bench] feed latency {name}: {result[name]}", file=sys.stderr, flush=True)
    cross = result.get("postgres_other_replica")
    if cross is not None:
        result["checks"] = [(
            f"feed: PostgreSQL, written on one replica, seen on another: p50 "
            f"{cross['p50_ms']:.1f} ms (max {FEED_P50_MAX_MS:.0f}), p99 {cross['p99_ms']:.1f} ms "
            f"(max {FEED_P99_MAX_MS:.0f}), {cross['missing']} missing",
            cross["p50_ms"] <= FEED_P50_MAX_MS and cross["p99_ms"] <= FEED_P99_MAX_MS
            and cross["missing"] == 0,
        )]  # fmt: skip
    return result
