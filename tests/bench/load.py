"""The load suite: the real server against the no-op ceiling, REST and gRPC, on SQLite.

The real side: one disposition-server on a fresh SQLite file with Envoy in front. The ceiling:
tests/bench/noop_server.py (UpdateDispositionStatus answers OK at once: no auth, checks, rate
limit or database; same grpc options) behind its own Envoy rendered from the same envoy.yaml.
Both get the same commands at each connection count:
  rest: wrk -> Envoy (JSON transcoding) -> server, every request a real change (update.lua);
  grpc: h2load -> server directly, bodies rotated so that most requests are a real change
        (grpc_load.py).
Real and ceiling runs alternate (which goes first swaps every repeat). Each run reports the
server's CPU per request (user + system, all threads, from /proc); the target is on what the
real server adds to the transport: (real µs - ceiling µs) / ceiling µs, of the medians.
Each real run is checked: transport errors and non-2xx replies, history rows written vs
requests, and for gRPC one grpcio call whose grpc-status must be OK (h2load sees only HTTP
statuses, not trailers). Server RSS is sampled from /proc while the load runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from tests.bench import grpc_load, rest_load
from tests.bench.stack import (
    STAGE_SERVER,
    RssSampler,
    ceiling_for,
    cpu_seconds,
    ensure_running,
    single_topology,
    total_rss_mb,
)

FIGURES = (
    "requests_per_s",
    "p50_ms",
    "p99_ms",
    "real_change_ratio",
    "server_rss_mb_peak",
    "server_cpu_cores",
    "server_cpu_us_per_request",
)
# Issue 13: the real server's own work per request is at most half the ceiling's (µs of CPU).
OWN_WORK_MAX = 0.5


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Side(NamedTuple):
    """Where one side of the comparison sends its load: the real stack or its no-op ceiling."""

    name: str  # "real" or "ceiling"
    http_port: int  # Envoy's listener (REST load)
    grpc_port: int  # the server, directly
    servers: list[Any]
    envoy_admin_port: int
    history_rows: Callable[[], int] | None  # None: the no-op writes nothing, nothing to check
    what: str  # the servers' name in error messages
    partner: Any  # whose credentials the load sends

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]


def measure(run: Callable[[], dict[str, float]], *, side: Side) -> dict[str, float]:
    """One load run, with the servers' RSS sampled during it, their CPU per request and (real
    side only) the history rows it wrote."""
    pids = side.pids
    before = side.history_rows() if side.history_rows is not None else 0
    cpu_before, started = cpu_seconds(*pids), time.monotonic()
    with RssSampler(*pids) as rss:
        result = run()
    cpu = cpu_seconds(*pids) - cpu_before
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # let requests still in flight when the client stopped commit (both sides)
    if side.history_rows is not None:
        rows = side.history_rows() - before
        result["history_rows"] = rows
        result["real_change_ratio"] = (
            round(rows / result["requests"], 4) if result["requests"] else 0.0
        )
    result["server_rss_mb_peak"] = round(rss.peak, 1)
    result["server_rss_mb_end"] = round(rss.end, 1)
    result["server_cpu_cores"] = round(cpu / elapsed, 2)  # 1.0 = one core busy for the run
    result["server_cpu_us_per_request"] = (
        round(1e6 * cpu / result["requests"], 1) if result["requests"] else 0.0
    )
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats; errors are the total of every run; the raw runs come along."""
    summary: dict[str, Any] = {
        k: round(statistics.median(r[k] for r in runs), 3) for k in FIGURES if k in runs[0]
    }
    summary["errors"] = sum(int(r["errors"]) for r in runs)
    if "sample_call" in runs[0]:
        summary["sample_calls_ok"] = all(r["sample_call"] == "OK" for r in runs)
    summary["runs"] = runs
    return summary


def load_suite(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    folder = workdir / "load"
    folder.mkdir()
    topology = single_topology(folder, stack)
    partner = topology.partner
    setup = grpc_load.ingest(topology.grpc_port, partner, args.customers)
    progress(f"load: ingested {args.customers} customers: {setup['calls_per_s']} calls/s")
    idle_rss = total_rss_mb(topology.pids)
    ceiling = ceiling_for(topology, folder, stack)
    (folder / "stage").mkdir()
    stage = single_topology(folder / "stage", stack, argv=STAGE_SERVER)
    sides = [
        Side("real", topology.envoy.http_port, topology.grpc_port, topology.servers,
             topology.envoy.admin_port, topology.history_rows, "disposition-server", partner),
        Side("ceiling", ceiling.envoy.http_port, ceiling.grpc_port, ceiling.servers,
             ceiling.envoy.admin_port, None, "the no-op server", partner),
        Side("before_storage", stage.envoy.http_port, stage.grpc_port, stage.servers,
             stage.envoy.admin_port, None, "the server that stops before storage",
             stage.partner),
    ]  # fmt: skip

    def rest(side: Side, connections: int, seconds: int, tag: str) -> dict[str, float]:
        return rest_load.run_wrk(
            http_port=side.http_port, connections=connections, seconds=seconds,
            threads=args.cpus, tag=tag, partner=side.partner, customers=args.customers,
        )  # fmt: skip

    def grpc(side: Side, connections: int, seconds: int, tag: str) -> dict[str, float]:
        return grpc_load.run_h2load(
            port=side.grpc_port, connections=connections, seconds=seconds, workdir=folder,
            tag=tag, partner=side.partner, customers=args.customers,
        )  # fmt: skip

    def side_tag(side: Side, tag: str) -> str:
        # Same length on every side (same body sizes); distinct file names and statuses.
        return {"real": tag, "ceiling": tag[:-1] + tag[-1].upper()}.get(side.name, tag[:-1] + "s")

    paths = {"rest_via_envoy_wrk": rest, "grpc_direct_h2load": grpc}
    progress("load: warm-up, 2 s per path and side (discarded)")
    for name, run in paths.items():
        for side in sides:
            measure(partial(run, side, args.connections[0], 2, side_tag(side, f"w{name[0]}")),
                    side=side)  # fmt: skip
    results: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {
        side.name: {name: {} for name in paths} for side in sides
    }
    for rep in range(args.repeats):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # a new first every repeat
        for connections in args.connections:
            for name, run in paths.items():
                for side in order:
                    tag = side_tag(side, f"{rep}{connections}{name[0]}")
                    ensure_running(side.servers, side.envoy_admin_port, side.what)
                    result: dict[str, Any] = measure(
                        partial(run, side, connections, args.seconds, tag), side=side
                    )
                    if name.startswith("grpc"):
                        result["sample_call"] = grpc_load.sample_update(
                            side.grpc_port, side.partner, f"s{tag}"
                        )
                    results[side.name][name].setdefault(connections, []).append(result)
                    changes = (
                        f", changes {result['real_change_ratio']}"
                        if "real_change_ratio" in result
                        else ""
                    )
                    progress(
                        f"load {side.name} {name} c={connections} run {rep + 1}/{args.repeats}: "
                        f"{result['requests_per_s']} req/s, p99 {result['p99_ms']} ms, "
                        f"{result['server_cpu_us_per_request']} µs/req, errors "
                        f"{result['errors']}{changes}"
                    )
    summaries = {
        side: {
            name: {str(c): summarize(runs) for c, runs in by_conn.items()}
            for name, by_conn in by_path.items()
        }
        for side, by_path in results.items()
    }
    vs_ceiling = {
        name: {
            conn: compare(summaries["real"][name][conn], summaries["ceiling"][name][conn])
            for conn in summaries["real"][name]
        }
        for name in paths
    }
    stages = {
        name: {
            conn: {
                "transport_us": summaries["ceiling"][name][conn]["server_cpu_us_per_request"],
                "service_us": round(
                    summaries["before_storage"][name][conn]["server_cpu_us_per_request"]
                    - summaries["ceiling"][name][conn]["server_cpu_us_per_request"], 1
                ),
                "write_us": round(
                    summaries["real"][name][conn]["server_cpu_us_per_request"]
                    - summaries["before_storage"][name][conn]["server_cpu_us_per_request"], 1
                ),
            }
            for conn in summaries["real"][name]
        }
        for name in paths
    }  # fmt: skip
    return {
        "stages": {
            "what": "server CPU µs per request, medians: the ceiling's (the transport: grpc.aio, "
            "HTTP/2, protobuf), what the server that stops before storage adds (the interceptor "
            "and its gates, context, servicer, validation, log and metrics), what the group "
            "commit and the write add (tests/bench/stage_server.py)",
            **stages,
        },
        "before_storage": summaries["before_storage"],
        "setup_ingestion": setup,
        "server_rss_mb_after_ingestion": round(idle_rss or 0.0, 1),
        "real": summaries["real"],
        "ceiling": {
            "what": "tests/bench/noop_server.py: UpdateDispositionStatus answers OK at once "
            "(no auth, checks, rate limit or database), same grpc options, one process, "
            "behind its own Envoy rendered from the same envoy.yaml",
            **summaries["ceiling"],
        },
        "vs_ceiling": vs_ceiling,
        "checks": _checks(vs_ceiling),
        "table": ceiling_table(vs_ceiling),
    }


def _checks(vs_ceiling: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, bool]]:
    return [
        (
            f"load {name} c={conn}: own work / ceiling {c['own_work_over_ceiling']} (max "
            f"{OWN_WORK_MAX}): {c['real_cpu_us_per_request']:.0f} vs "
            f"{c['ceiling_cpu_us_per_request']:.0f} µs/req, {c['real_requests_per_s']:,.0f} vs "
            f"{c['ceiling_requests_per_s']:,.0f} req/s, {c['real_errors']} errors",
            bool(c["pass"]),
        )
        for name, by_conn in vs_ceiling.items()
        for conn, c in by_conn.items()
    ]


def compare(real: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    """The real medians beside the ceiling's: throughput ratio and own work per request."""
    real_us, ceiling_us = real["server_cpu_us_per_request"], ceiling["server_cpu_us_per_request"]
    own = round((real_us - ceiling_us) / ceiling_us, 3) if ceiling_us else None
    return {
        "real_requests_per_s": real["requests_per_s"],
        "ceiling_requests_per_s": ceiling["requests_per_s"],
        "requests_ratio": round(real["requests_per_s"] / ceiling["requests_per_s"], 3)
        if ceiling["requests_per_s"]
        else 0.0,
        "real_cpu_us_per_request": real_us,
        "ceiling_cpu_us_per_request": ceiling_us,
        "own_work_over_ceiling": own,
        "own_work_max": OWN_WORK_MAX,
        "real_p99_ms": real["p99_ms"],
        "ceiling_p99_ms": ceiling["p99_ms"],
        "real_errors": real["errors"],
        "pass": own is not None and own <= OWN_WORK_MAX and real["errors"] == 0,
    }


def ceiling_table(vs_ceiling: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The comparison as aligned text lines, one per path and connection count."""
    lines = [
        f"{'path':<22}{'conns':>6}{'real req/s':>11}{'ceiling':>9}{'ratio':>7}"
        f"{'real µs':>9}{'ceiling':>9}{'own/ceiling':>12}{'max':>5}  result"
    ]
    for name, by_conn in vs_ceiling.items():
        for conn, c in by_conn.items():
            own = "-" if c["own_work_over_ceiling"] is None else f"{c['own_work_over_ceiling']:.2f}"
            lines.append(
                f"{name:<22}{conn:>6}{c['real_requests_per_s']:>11.1f}"
                f"{c['ceiling_requests_per_s']:>9.1f}{c['requests_ratio']:>7.3f}"
                f"{c['real_cpu_us_per_request']:>9.0f}{c['ceiling_cpu_us_per_request']:>9.0f}"
                f"{own:>12}{c['own_work_max']:>5}  " + ("pass" if c["pass"] else "BELOW TARGET")
            )
    return lines
