"""The webhooks suite: delivery latency and throughput, and what deliveries cost the update load.

One server on a fresh SQLite file (WEBHOOK_ALLOW_PRIVATE_URLS=true, Envoy in front) and a
second one with WEBHOOK_MAX_IN_FLIGHT=8 for the throughput figure; the receiver is
webhook_receiver.py (one asyncio process) on loopback; endpoints are created, enabled and
deleted with the use cases `disposition-admin webhook` runs, on the same database. Figures:

  latency     one endpoint; `updates` single gRPC updates sent one at a time at `rate`/s;
              for each, the event's arrival at the receiver minus (a) the update's OK reply
              (the commit was acknowledged) and (b) the event's `changed_at` (stamped in the
              unit of work, just before its commit). p50 and p99 of each run.
  throughput  one endpoint, disabled while `events` changes are committed (batch updates of
              1,000), then enabled: events/s from the first arrival to the last (the time the
              lease loop takes to pick the endpoint up, at most 2 s, is not counted).
  endpoints   REST update load (wrk through Envoy) with 3 endpoints receiving every change
              against no endpoint, alternating on the same server: requests/s ratio.
  hanging     the same load with one endpoint whose receiver sleeps 30 s per request (each
              attempt times out after WEBHOOK_TIMEOUT_SECONDS, 10 s) against none: p99 ratio.
Every figure is the median of --repeats runs; in the compared pairs, which side goes first
swaps every repeat.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import grpc

from devstack import Credentials
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.db import Database
from server.settings import Settings
from server.usecases import webhooks
from tests.bench import grpc_load, rest_load
from tests.bench.feed_batch import _metadata, _quantiles
from tests.bench.stack import Topology, cpu_seconds, ensure_running, single_topology
from tests.bench.webhook_receiver import ReceiverProcess, receiver_process

# Issue 15's targets.
LATENCY_P50_MAX_MS, LATENCY_P99_MAX_MS = 50.0, 250.0
THROUGHPUT_MIN = 2_000.0  # events/s to one receiver
ENDPOINTS_RATIO_MIN = 0.9  # update throughput with 3 active endpoints / without
HANGING_P99_MAX = 1.10  # update p99 with a hanging receiver / without

LATENCY_UPDATES, LATENCY_RATE = 300, 50.0
THROUGHPUT_EVENTS = 10_000
HANGING_SECONDS = 30
SERVER_ENV = {"WEBHOOK_ALLOW_PRIVATE_URLS": "true"}
WIDE_IN_FLIGHT = 8
DRAIN_MAX_SECONDS = 60.0

T = TypeVar("T")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Endpoints:
    """Webhook endpoints of the bench tenant, managed as `disposition-admin webhook` does."""

    def __init__(self, topology: Topology) -> None:
        self.database_url = topology.env["DATABASE_URL"]
        self.partner = topology.partner

    def _run(self, action: Callable[[Database], Awaitable[T]]) -> T:
        async def go() -> T:
            db = Database(Settings(database_url=self.database_url, grpc_port=0))
            try:
                return await action(db)
            finally:
                await db.dispose()

        return asyncio.run(go())

    def create(self, url: str, *, enabled: bool = True) -> str:
        async def create(db: Database) -> str:
            created = await webhooks.create_endpoint(
                db, tenant_id=self.partner.tenant_id, sub_tenant_id=self.partner.sub_tenant_id,
                url=url, events=["disposition.changed"], allow_private=True,
            )  # fmt: skip
            endpoint_id = created.endpoint.endpoint_id
            if not enabled:
                await webhooks.set_enabled(db, endpoint_id=endpoint_id, enabled=False)
            return endpoint_id

        return self._run(create)

    def enable(self, endpoint_id: str) -> None:
        self._run(lambda db: webhooks.set_enabled(db, endpoint_id=endpoint_id, enabled=True))

    def delete(self, *endpoint_ids: str) -> None:
        async def delete(db: Database) -> None:
            for endpoint_id in endpoint_ids:
                await webhooks.delete_endpoint(db, endpoint_id=endpoint_id)

        self._run(delete)


def _update(customer: str, status: str) -> pb.UpdateDispositionStatusRequest:
    return pb.UpdateDispositionStatusRequest(customer_id=customer, disposition_status=status)


async def _paced_updates(
    port: int, partner: Credentials, customers: int, updates: int, rate: float, tag: str
) -> dict[str, float]:
    """Single updates, one at a time, `rate` per second, each a real change; the wall-clock
    time of each OK reply, by request id."""
    acked: dict[str, float] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = disposition_grpc.DispositionServiceStub(channel)
        for n in range(updates):
            request_id = f"wh-{tag}-{n}"
            await stub.UpdateDispositionStatus(
                _update(grpc_load.customer_id(n % customers), request_id),
                metadata=_metadata(partner, **{"x-request-id": request_id}),
            )
            acked[request_id] = time.time()
            await asyncio.sleep(1 / rate)
    return acked


async def _batch_changes(port: int, partner: Credentials, events: int, tag: str) -> int:
    """`events` changes (batch updates of 1,000 distinct customers, each to a new status);
    how many were real changes."""
    changed = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = disposition_grpc.DispositionServiceStub(channel)
        for first in range(0, events, 1000):
            items = [
                pb.DispositionStatusUpdate(
                    customer_id=grpc_load.customer_id(first + i), disposition_status=f"t{tag}"
                )
                for i in range(min(1000, events - first))
            ]
            reply = await stub.BatchUpdateDispositionStatus(
                pb.BatchUpdateDispositionStatusRequest(items=items), metadata=_metadata(partner)
            )
            changed += reply.data.changed
    return changed


def probe(topology: Topology, receiver: ReceiverProcess, paths: list[str], tag: str) -> None:
    """One change, and wait until it arrived on every path: the endpoints are being followed
    (the lease loop picks a new endpoint up within 2 s)."""
    asyncio.run(_paced_updates(topology.grpc_port, topology.partner, 1, 1, 1000.0, f"p{tag}"))
    for path in paths:
        if receiver.wait_for(path, 1, timeout=15) < 1:
            raise RuntimeError(f"the webhook endpoint for {path} received nothing in 15 s")


def _settle(receiver: ReceiverProcess, paths: list[str]) -> None:
    """Wait until nothing more arrives on `paths` for 0.5 s (deleted endpoints' followers stop
    at their next batch or lease renewal)."""
    counts = [-1]
    while True:
        now = [receiver.count(path) for path in paths]
        if now == counts:
            return
        counts = now
        time.sleep(0.5)


def latency_runs(
    topology: Topology, receiver: ReceiverProcess, endpoints: Endpoints, customers: int,
    repeats: int,
) -> dict[str, Any]:  # fmt: skip
    runs = []
    for rep in range(repeats):
        path = f"/latency/{rep}"
        endpoint_id = endpoints.create(receiver.url(path))
        probe(topology, receiver, [path], f"l{rep}")
        acked = asyncio.run(_paced_updates(
            topology.grpc_port, topology.partner, customers, LATENCY_UPDATES, LATENCY_RATE, str(rep)
        ))  # fmt: skip
        receiver.wait_for(path, len(acked) + 1, timeout=30)
        endpoints.delete(endpoint_id)
        arrived = {request_id: (at, changed_at) for at, request_id, changed_at
                   in receiver.events(path)}  # fmt: skip
        from_reply = [arrived[r][0] - at for r, at in acked.items() if r in arrived]
        from_change = [arrived[r][0] - arrived[r][1].timestamp() for r in acked if r in arrived]
        run = {
            "from_ok_reply": _quantiles(from_reply),
            "from_changed_at": _quantiles(from_change),
            "missing": len(acked) - len(from_reply),
        }
        runs.append(run)
        progress(f"webhooks latency run {rep + 1}/{repeats}: from the OK reply "
                 f"{run['from_ok_reply']}, from changed_at {run['from_changed_at']}, "
                 f"{run['missing']} missing")  # fmt: skip
    return {
        name: {
            key: statistics.median(run[name][key] for run in runs)
            for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms")
        }
        for name in ("from_ok_reply", "from_changed_at")
    } | {"missing": sum(run["missing"] for run in runs), "runs": runs}


def throughput_run(
    topology: Topology, receiver: ReceiverProcess, endpoints: Endpoints, tag: str
) -> dict[str, Any]:
    """THROUGHPUT_EVENTS changes committed while the endpoint is disabled, then delivered."""
    path = f"/throughput/{tag}"
    endpoint_id = endpoints.create(receiver.url(path), enabled=False)
    changed = asyncio.run(_batch_changes(topology.grpc_port, topology.partner,
                                         THROUGHPUT_EVENTS, tag))  # fmt: skip
    delivering = [*topology.pids, *topology.worker_pids]
    cpu = cpu_seconds(*delivering), cpu_seconds(receiver.process.pid)
    enabled_at = time.time()
    endpoints.enable(endpoint_id)
    arrived = receiver.wait_for(path, changed, timeout=120)
    count, first, last = receiver.span(path)
    delivering_cpu = cpu_seconds(*delivering) - cpu[0]
    receiver_cpu = cpu_seconds(receiver.process.pid) - cpu[1]
    endpoints.delete(endpoint_id)
    assert first is not None and last is not None
    return {
        "events": changed,
        "arrived": arrived,
        "events_per_s": round((count - 1) / (last - first), 1) if last > first else 0.0,
        "seconds_from_enable_to_last": round(last - enabled_at, 2),
        "delivering_cpu_us_per_event": round(1e6 * delivering_cpu / max(count, 1), 1),
        "receiver_cpu_us_per_event": round(1e6 * receiver_cpu / max(count, 1), 1),
    }


def _load(topology: Topology, args: Any, tag: str) -> dict[str, Any]:
    ensure_running(topology.servers + topology.workers, topology.envoy.admin_port)
    before = cpu_seconds(*topology.pids), cpu_seconds(*topology.worker_pids)
    run: dict[str, Any] = rest_load.run_wrk(
        http_port=topology.envoy.http_port, partner=topology.partner,
        connections=args.engines_connections, seconds=args.seconds, threads=args.cpus, tag=tag,
        customers=args.customers,
    )  # fmt: skip
    requests = max(run["requests"], 1)
    run["server_cpu_us_per_request"] = round(
        1e6 * (cpu_seconds(*topology.pids) - before[0]) / requests, 1
    )
    run["worker_cpu_us_per_request"] = round(
        1e6 * (cpu_seconds(*topology.worker_pids) - before[1]) / requests, 1
    )
    return run


def compared_runs(
    topology: Topology, receiver: ReceiverProcess, endpoints: Endpoints, args: Any, name: str,
    paths: Callable[[int], list[str]], *, drain: bool = True,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """The REST load with endpoints receiving on `paths(rep)` ("with") and without, alternating;
    for "with": the events that arrived by the end of the load, per change, the seconds from
    then until the last arrived (or DRAIN_MAX_SECONDS), the events that arrived in all, per
    change, and the receiver's CPU per event."""
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    for rep in range(args.repeats):
        for side in ["with", "without"] if rep % 2 == 0 else ["without", "with"]:
            tag = f"{name[0]}{rep}{side[1]}"
            if side == "without":
                run = _load(topology, args, tag)
            else:
                wanted = paths(rep)
                ids = [endpoints.create(receiver.url(path)) for path in wanted]
                probe(topology, receiver, wanted, tag)
                rows, receiver_cpu = topology.history_rows(), cpu_seconds(receiver.process.pid)
                counts = [receiver.count(path) for path in wanted]
                run = _load(topology, args, tag)
                ended, changes = time.time(), topology.history_rows() - rows
                during = _arrived(receiver, wanted, counts)
                expected = changes * len(wanted) if drain else 0
                while (
                    _arrived(receiver, wanted, counts) < expected
                    and time.time() - ended < DRAIN_MAX_SECONDS
                ):
                    time.sleep(0.05)
                last = max((receiver.span(p)[2] or ended) for p in wanted)
                if not drain:
                    time.sleep(0.5)
                total = _arrived(receiver, wanted, counts)
                endpoints.delete(*ids)
                _settle(receiver, wanted)
                run["arrived_during_load_per_change"] = round(during / max(changes, 1), 3)
                run["drain_seconds"] = round(max(last - ended, 0.0), 2) if drain else None
                run["events_arrived_per_change"] = round(total / max(changes, 1), 3)
                run["receiver_cpu_us_per_event"] = round(
                    1e6 * (cpu_seconds(receiver.process.pid) - receiver_cpu) / max(total, 1), 1
                )
            runs[side].append(run)
            progress(f"webhooks {name} {side} run {rep + 1}/{args.repeats}: "
                     f"{run['requests_per_s']} req/s, p99 {run['p99_ms']} ms, "
                     f"{run['server_cpu_us_per_request']} µs/req in the server, "
                     f"{run['worker_cpu_us_per_request']} in workers, errors {run['errors']}"
                     + (f", events/change {run['arrived_during_load_per_change']} by the end, "
                        f"{run['events_arrived_per_change']} after {run['drain_seconds']} s"
                        if side == "with" else ""))  # fmt: skip
    return runs


def busy_loop_runs(topology: Topology, args: Any) -> dict[str, list[dict[str, Any]]]:
    """The control: the REST load beside one busy loop at the lowest CPU priority
    (SCHED_IDLE: it runs only on a core nothing else wants) against alone, alternating. What
    any concurrent work costs the API on this machine, however little it is allowed."""
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    for rep in range(args.repeats):
        for side in ["with", "without"] if rep % 2 == 0 else ["without", "with"]:
            burner = None
            if side == "with":
                burner = subprocess.Popen(["chrt", "--idle", "0", sys.executable, "-c",
                                           "while True: pass"])  # fmt: skip
            try:
                run = _load(topology, args, f"b{rep}{side[1]}")
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            runs[side].append(run)
            progress(f"webhooks busy loop {side} run {rep + 1}/{args.repeats}: "
                     f"{run['requests_per_s']} req/s, p99 {run['p99_ms']} ms")  # fmt: skip
    return runs


def _arrived(receiver: ReceiverProcess, paths: list[str], before: list[int]) -> int:
    """Events that arrived on `paths` since their counts were `before`."""
    return sum(receiver.count(path) - count for path, count in zip(paths, before, strict=True))


def _medians(runs: list[dict[str, Any]], *keys: str) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in keys}


def webhooks_suite(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    folder = workdir / "webhooks"
    folder.mkdir()
    receiver = stack.enter_context(receiver_process(folder / "receiver.log"))
    # As `make run` starts it: one server, one disposition-webhooks worker.
    topology = single_topology(folder, stack, server_env=SERVER_ENV, webhook_workers=1)
    (folder / "wide").mkdir()
    wide = single_topology(folder / "wide", stack, server_env={
        **SERVER_ENV, "WEBHOOK_MAX_IN_FLIGHT": str(WIDE_IN_FLIGHT)}, webhook_workers=1)  # fmt: skip
    (folder / "in_server").mkdir()  # the server delivers (WEBHOOK_DELIVERY=server), no worker
    in_server = single_topology(folder / "in_server", stack, server_env=SERVER_ENV)
    for running in (topology, wide, in_server):
        grpc_load.ingest(running.grpc_port, running.partner, args.customers)
    endpoints, wide_endpoints = Endpoints(topology), Endpoints(wide)

    progress("webhooks: commit -> receiver latency, one endpoint")
    latency = latency_runs(topology, receiver, endpoints, args.customers, args.repeats)

    progress(f"webhooks: delivery throughput, {THROUGHPUT_EVENTS} events to one receiver")
    throughput: dict[str, list[dict[str, Any]]] = {"in_flight_1": [], "in_flight_8": []}
    for rep in range(args.repeats):
        sides = [("in_flight_1", topology, endpoints), ("in_flight_8", wide, wide_endpoints)]
        for name, running, managed in sides if rep % 2 == 0 else sides[::-1]:
            run = throughput_run(running, receiver, managed, f"{rep}{name[-1]}")
            throughput[name].append(run)
            progress(f"webhooks throughput {name} run {rep + 1}/{args.repeats}: {run}")

    progress("webhooks: REST updates with 3 endpoints vs none")
    three = compared_runs(topology, receiver, endpoints, args, "endpoints",
                          lambda rep: [f"/three/{rep}/{k}" for k in range(3)])  # fmt: skip
    progress("webhooks: the same, delivered by the server itself (WEBHOOK_DELIVERY=server)")
    three_in_server = compared_runs(
        in_server, receiver, Endpoints(in_server), args, "server",
        lambda rep: [f"/inline/{rep}/{k}" for k in range(3)])  # fmt: skip
    progress("webhooks: control: REST updates beside an idle-priority busy loop vs alone")
    busy = busy_loop_runs(topology, args)
    progress(f"webhooks: REST updates with a receiver that sleeps {HANGING_SECONDS} s vs none")
    hanging = compared_runs(
        topology, receiver, endpoints, args, "hanging",
        lambda rep: [f"/sleep/{HANGING_SECONDS}/{rep}"], drain=False)  # fmt: skip

    load_keys = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request",
                 "worker_cpu_us_per_request")  # fmt: skip
    throughput_keys = ("events_per_s", "seconds_from_enable_to_last",
                       "delivering_cpu_us_per_event", "receiver_cpu_us_per_event")  # fmt: skip
    report: dict[str, Any] = {
        "latency": latency,
        "throughput": {
            name: _medians(runs, *throughput_keys) | {"runs": runs}
            for name, runs in throughput.items()
        },
    }
    compared = (("three_endpoints", three), ("three_endpoints_in_server", three_in_server),
                ("hanging_receiver", hanging), ("busy_loop_control", busy))  # fmt: skip
    for name, runs in compared:
        with_, without = _medians(runs["with"], *load_keys), _medians(runs["without"], *load_keys)
        drained = [r["drain_seconds"] for r in runs["with"] if r.get("drain_seconds") is not None]
        report[name] = {
            "with": with_ | (_medians(runs["with"], "arrived_during_load_per_change",
                                      "events_arrived_per_change", "receiver_cpu_us_per_event")
                             if name != "busy_loop_control" else {})
            | ({"drain_seconds": statistics.median(drained)} if drained else {}),
            "without": without,
            "throughput_ratio": round(with_["requests_per_s"] / without["requests_per_s"], 3),
            "p99_ratio": round(with_["p99_ms"] / without["p99_ms"], 3),
            "errors": sum(int(r["errors"]) for side in runs.values() for r in side),
            "runs": runs,
        }  # fmt: skip

    lat, fastest = latency["from_changed_at"], report["throughput"]["in_flight_1"]
    wider = report["throughput"]["in_flight_8"]
    ratio, p99_ratio = report["three_endpoints"]["throughput_ratio"], \
        report["hanging_receiver"]["p99_ratio"]  # fmt: skip
    three_report, in_server_ratio = report["three_endpoints"], \
        report["three_endpoints_in_server"]["throughput_ratio"]  # fmt: skip
    report["checks"] = [
        (f"webhooks: changed_at -> receiver p50 {lat['p50_ms']:.1f} ms (max "
         f"{LATENCY_P50_MAX_MS:.0f}), p99 {lat['p99_ms']:.1f} ms (max {LATENCY_P99_MAX_MS:.0f}), "
         f"{latency['missing']} missing",
         lat["p50_ms"] <= LATENCY_P50_MAX_MS and lat["p99_ms"] <= LATENCY_P99_MAX_MS
         and latency["missing"] == 0),
        (f"webhooks: delivery throughput to one receiver {fastest['events_per_s']:,.0f} events/s "
         f"(WEBHOOK_MAX_IN_FLIGHT=1; {wider['events_per_s']:,.0f} with {WIDE_IN_FLIGHT}) "
         f"(min {THROUGHPUT_MIN:,.0f})",
         fastest["events_per_s"] >= THROUGHPUT_MIN),
        (f"webhooks: REST updates with 3 endpoints / without: {ratio:.3f} (min "
         f"{ENDPOINTS_RATIO_MIN}; one worker; every event delivered "
         f"{three_report['with']['drain_seconds']} s after the load, "
         f"{three_report['with']['arrived_during_load_per_change']} of 3 per change during it; "
         f"delivered by the server itself: {in_server_ratio:.3f}; control, an idle-priority "
         f"busy loop beside the API: {report['busy_loop_control']['throughput_ratio']:.3f})",
         ratio >= ENDPOINTS_RATIO_MIN and three_report["errors"] == 0
         and three_report["with"]["events_arrived_per_change"] >= 3),
        (f"webhooks: REST update p99 with a receiver sleeping {HANGING_SECONDS} s / without: "
         f"{p99_ratio:.3f} (max {HANGING_P99_MAX})",
         p99_ratio <= HANGING_P99_MAX and report["hanging_receiver"]["errors"] == 0),
    ]  # fmt: skip
    return report
