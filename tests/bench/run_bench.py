"""`make bench`: the real stack under bounded load on loopback; one JSON document on stdout.

    .venv/bin/python -m tests.bench.run_bench [--seconds 10] [--connections 16 64] [--repeats 3]
    .venv/bin/python -m tests.bench.run_bench --topology cluster --replicas 2 [--database-url …]

A fresh SQLite database in a temporary folder, `disposition-server` and Envoy as child processes,
a bench partner with a huge rate limit, 10,000 customers ingested with IngestBatchCalls. Then, for
each repeat and connection count, interleaved so that both paths see the same machine noise:
  rest: wrk -> Envoy (JSON transcoding) -> server, every request a real change (update.lua);
  grpc: h2load -> server directly, bodies rotated so that almost every request is a real change
        (see grpc_load.py).
Each run is checked: transport errors and non-2xx replies, history rows written vs requests (an
OK update of a new status writes exactly one row), and for gRPC one grpcio call whose grpc-status
must be OK (h2load sees only HTTP statuses, not trailers). Server RSS is sampled from /proc while
the load runs. Figures are medians over the repeats; progress goes to stderr.

The ceiling (load suite; `--no-ceiling` skips it): as many no-op servers (noop_server.py:
UpdateDispositionStatus answers OK at once, no auth, checks or database) as the topology has
servers, behind their own Envoy rendered from the same envoy.yaml, loaded with the same wrk and
h2load commands and connection counts. Real and ceiling runs alternate (real first in even
repeats, ceiling first in odd ones); the no-op runs skip the history-row check. The report adds
`ceiling` (its medians) and `vs_ceiling` (real / ceiling ratios of the medians, the targets and
pass/fail), and a table on stderr. Targets (issue 5): REST via Envoy req/s >= 0.90 of the
ceiling's and p99 <= 1.25x; gRPC req/s >= 0.85 (cluster: the gRPC path goes through Envoy, on
both sides, with the same target). Exit status 3 when any figure is below its target.

`--topology cluster`: N servers on PostgreSQL (a schema of this run in --database-url's
database, dropped afterwards) with Redis rate limits (a key prefix of this run), Envoy balancing
over them; the gRPC load goes through Envoy too (h2load -> Envoy -> replicas), the feed suite
watches one replica and writes through another, RSS and CPU are the replicas' totals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from tests.bench import feed_batch, grpc_load, rest_load, scale
from tests.bench.stack import (
    RssSampler,
    Topology,
    ceiling_for,
    cluster_topology,
    cpu_seconds,
    ensure_running,
    grpc_server,
    single_topology,
    total_rss_mb,
)

INSTALL_HINT = "apt-get install -y wrk nghttp2-client"
SUITES = ("load", "ingest", "feed", "batch", "scale")
# Calls per run of the ingestion suite (1,000 per batch).
INGEST_RUN_CALLS = 20_000
FIGURES = (
    "requests_per_s",
    "p50_ms",
    "p99_ms",
    "real_change_ratio",
    "server_rss_mb_peak",
    "server_cpu_cores",
)
# Issue 5's targets: the real figure as a share of the no-op ceiling measured in the same run.
# "requests_ratio_min": real req/s / ceiling req/s must be at least this;
# "p99_ratio_max": real p99 / ceiling p99 must be at most this (None: no p99 target).
TARGETS: dict[str, dict[str, float | None]] = {
    "rest": {"requests_ratio_min": 0.90, "p99_ratio_max": 1.25},
    "grpc": {"requests_ratio_min": 0.85, "p99_ratio_max": None},
}
# Scale (issue 5): the large side's figures against the small side's, same run, alternating.
SCALE_TARGETS = {"requests_ratio_min": 0.90, "p99_ratio_max": 1.20, "rss_mb_max": 150.0}
# Absolute throughput targets on this machine (1,000-item batches, history rows written).
THROUGHPUT_TARGETS = {"ingestion_calls_per_s": 20_000.0, "batch_update_items_per_s": 20_000.0}
EXIT_BELOW_TARGET = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each run")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="runs per path and connection count")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=SUITES,
        default=list(SUITES),
        help="load: REST and gRPC updates; ingest: batch-call ingestion; "
        "feed: change-feed latency; batch: batch updates; "
        "scale: the update load at --customers and at --scale-customers customers",
    )
    parser.add_argument(
        "--scale-customers",
        type=int,
        default=1_000_000,
        help="scale: customers (and history rows) of the large side",
    )
    parser.add_argument(
        "--topology",
        choices=("single", "cluster"),
        default="single",
        help="single: one server on SQLite; cluster: --replicas servers on PostgreSQL + Redis",
    )
    parser.add_argument("--replicas", type=int, default=2, help="servers of the cluster topology")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TEST_POSTGRES_URL")
        or "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        help="cluster: the PostgreSQL database to make this run's schema in",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="cluster: the Redis of the rate limits (keys under a prefix of this run)",
    )
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="load: skip the no-op ceiling runs (and the ratios and the exit status they decide)",
    )
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_facts() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_mb": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": tool_version(["wrk", "--version"]),
        "h2load": tool_version(["h2load", "--version"]),
    }


class Side(NamedTuple):
    """Where one side of the comparison sends its load: the real stack or its no-op ceiling."""

    name: str  # "real" or "ceiling"
    http_port: int  # Envoy's listener (REST load)
    grpc_port: int  # the gRPC load's target: a server directly (single) or Envoy (cluster)
    servers: list[subprocess.Popen[bytes]]
    envoy_admin_port: int
    history_rows: Callable[[], int] | None  # None: the no-op writes nothing, nothing to check
    what: str  # the servers' name in error messages

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]


def measure(run: Callable[[], dict[str, float]], *, side: Side) -> dict[str, float]:
    """One load run, with the servers' RSS sampled during it and (real side only) the history
    rows it wrote."""
    pids = side.pids
    before = side.history_rows() if side.history_rows is not None else 0
    cpu_before, started = cpu_seconds(*pids), time.monotonic()
    with RssSampler(*pids) as rss:
        result = run()
    cpu = (cpu_seconds(*pids) - cpu_before) / (time.monotonic() - started)
    time.sleep(0.5)  # let requests still in flight when the client stopped commit (both sides)
    if side.history_rows is not None:
        rows = side.history_rows() - before
        result["history_rows"] = rows
        result["real_change_ratio"] = (
            round(rows / result["requests"], 4) if result["requests"] else 0.0
        )
    result["server_rss_mb_peak"] = round(rss.peak, 1)
    result["server_rss_mb_end"] = round(rss.end, 1)
    result["server_cpu_cores"] = round(cpu, 2)  # 1.0 = one core busy for the whole run
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats; errors are the total of every run; the raw runs come along."""
    summary: dict[str, Any] = {
        k: round(statistics.median(r[k] for r in runs), 3) for k in FIGURES if k in runs[0]
    }
    summary["errors"] = sum(int(r["errors"]) for r in runs)
    summary["server_rss_mb"] = summary["server_rss_mb_peak"]
    if "sample_call" in runs[0]:
        summary["sample_calls_ok"] = all(r["sample_call"] == "OK" for r in runs)
    summary["runs"] = runs
    return summary


def bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    facts = machine_facts()
    if args.topology == "cluster":
        topology = cluster_topology(
            workdir, stack, replicas=args.replicas, database_url=args.database_url,
            redis_url=args.redis_url,
        )  # fmt: skip
    else:
        topology = single_topology(workdir, stack)
    partner, envoy, grpc_port = topology.partner, topology.envoy, topology.grpc_port
    watch_port, other_port = topology.server_ports[0], topology.server_ports[-1]
    if "feed" in args.suites and len(topology.server_ports) == 1:
        # Started now: under the load below its start-up could not write (SQLite).
        _, other_port = stack.enter_context(grpc_server(topology.env, workdir / "server2.log"))
    progress(
        f"{topology.name}: server pids {topology.pids} gRPC {topology.server_ports}, "
        f"Envoy HTTP :{envoy.http_port}, gRPC load to :{grpc_port}"
    )

    setup = grpc_load.ingest(grpc_port, partner, args.customers)
    progress(f"ingested {args.customers} customers: {setup['calls_per_s']} calls/s")
    idle_rss = total_rss_mb(topology.pids)
    common = {"partner": partner, "customers": args.customers}

    real = Side("real", envoy.http_port, grpc_port, topology.servers, envoy.admin_port,
                topology.history_rows, "disposition-server")  # fmt: skip
    sides = [real]
    if "load" in args.suites and not args.no_ceiling:
        if args.repeats < 3:
            progress(f"note: ratios from {args.repeats} run(s) each; issue 5 asks for >= 3")
        ceiling = ceiling_for(topology, workdir, stack)
        sides.append(
            Side("ceiling", ceiling.envoy.http_port, ceiling.grpc_port, ceiling.servers,
                 ceiling.envoy.admin_port, None, "the no-op server")
        )  # fmt: skip
        progress(
            f"ceiling: no-op server pids {ceiling.pids} gRPC {ceiling.server_ports}, "
            f"its Envoy HTTP :{ceiling.envoy.http_port}, gRPC load to :{ceiling.grpc_port}"
        )

    def rest(side: Side, connections: int, seconds: int, tag: str) -> dict[str, float]:
        return rest_load.run_wrk(
            http_port=side.http_port, connections=connections, seconds=seconds,
            threads=facts["cpus_usable"], tag=tag, **common,
        )  # fmt: skip

    def grpc(side: Side, connections: int, seconds: int, tag: str) -> dict[str, float]:
        return grpc_load.run_h2load(
            port=side.grpc_port, connections=connections, seconds=seconds, workdir=workdir,
            tag=tag, **common,
        )  # fmt: skip

    def side_tag(side: Side, tag: str) -> str:
        # Same length on both sides (same body sizes); distinct file names and statuses.
        return tag if side.name == "real" else tag[:-1] + tag[-1].upper()

    grpc_path = "grpc_direct_h2load" if topology.name == "single" else "grpc_via_envoy_h2load"
    paths = {"rest_via_envoy_wrk": rest, grpc_path: grpc}
    if "load" not in args.suites:
        paths = {}
    else:
        progress("warm-up: 2 s per path and side (discarded)")
        for name, run in paths.items():
            for side in sides:
                tag = side_tag(side, f"w{name[0]}")
                measure(partial(run, side, args.connections[0], 2, tag), side=side)

    results: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {
        side.name: {name: {} for name in paths} for side in sides
    }
    for rep in range(args.repeats):
        # Real and ceiling alternate run by run; which goes first swaps every repeat.
        order = sides if rep % 2 == 0 else sides[::-1]
        for connections in args.connections:
            for name, run in paths.items():
                for side in order:
                    tag = side_tag(side, f"{rep}{connections}{name[0]}")
                    ensure_running(side.servers, side.envoy_admin_port, side.what)
                    load = partial(run, side, connections, args.seconds, tag)
                    result: dict[str, Any] = measure(load, side=side)
                    if name.startswith("grpc"):
                        result["sample_call"] = grpc_load.sample_update(
                            side.grpc_port, partner, f"s{tag}"
                        )
                    results[side.name][name].setdefault(connections, []).append(result)
                    changes = (
                        f", changes {result['real_change_ratio']}"
                        if "real_change_ratio" in result
                        else ""
                    )
                    progress(
                        f"{side.name} {name} c={connections} run {rep + 1}/{args.repeats}: "
                        f"{result['requests_per_s']} req/s, p99 {result['p99_ms']} ms, "
                        f"errors {result['errors']}{changes}"
                    )

    summaries = {
        side: {
            name: {str(c): summarize(runs) for c, runs in by_conn.items()}
            for name, by_conn in by_path.items()
        }
        for side, by_path in results.items()
    }
    ceiling_report: dict[str, Any] = {}
    if "ceiling" in summaries:
        ceiling_report = {
            "ceiling": {
                "what": "tests/bench/noop_server.py: UpdateDispositionStatus answers OK at once "
                "(no auth, checks, rate limit or database), same grpc options, same process "
                "count, behind its own Envoy rendered from the same envoy.yaml",
                **summaries["ceiling"],
            },
            "vs_ceiling": {
                name: {
                    conn: compare(
                        summaries["real"][name][conn],
                        summaries["ceiling"][name][conn],
                        TARGETS[name.split("_")[0]],
                    )
                    for conn in summaries["real"][name]
                }
                for name in paths
            },
        }

    extra: dict[str, Any] = {}
    if "ingest" in args.suites:
        extra["ingestion"] = ingest_suite(args, topology)
    if "feed" in args.suites:
        extra["feed_latency"] = feed_suite(args, partner, watch_port, other_port)
    if "batch" in args.suites:
        extra["batch_update"] = batch_suite(args, topology)
    if "scale" in args.suites:
        extra["scale"] = scale_suite(args, workdir, stack)
    return {
        "machine": facts,
        "config": {
            "customers": args.customers,
            "seconds_per_run": args.seconds,
            "repeats": args.repeats,
            "connections": args.connections,
            "topology": topology.name,
            "database": topology.description,
            "server_log_level": "WARNING",
            "rest": "wrk -t<cpus> keep-alive HTTP/1.1 -> Envoy (--concurrency 2) -> server",
            "grpc": "h2load -t1 -m1 (one stream in flight per connection) -> "
            + ("server, no Envoy" if topology.name == "single" else "Envoy -> replicas"),
            "ceiling": "off (--no-ceiling)"
            if len(sides) == 1
            else f"{len(topology.servers)} no-op server process(es), alternating with the real "
            "runs (the first swaps every repeat); ratios are of the medians",
        },
        "setup_ingestion": setup,
        "server_rss_mb_after_ingestion": round(idle_rss or 0.0, 1),
        **summaries["real"],
        **ceiling_report,
        **extra,
        "server_rss_mb_at_end": round(total_rss_mb(topology.pids) or 0.0, 1),
    }


def compare(
    real: dict[str, Any], ceiling: dict[str, Any], target: dict[str, float | None]
) -> dict[str, Any]:
    """The real medians as shares of the ceiling's, against the targets."""
    requests_ratio = (
        round(real["requests_per_s"] / ceiling["requests_per_s"], 3)
        if ceiling["requests_per_s"]
        else 0.0
    )
    p99_ratio = round(real["p99_ms"] / ceiling["p99_ms"], 3) if ceiling["p99_ms"] else None
    requests_min, p99_max = target["requests_ratio_min"], target["p99_ratio_max"]
    requests_ok = requests_min is None or requests_ratio >= requests_min
    p99_ok = p99_max is None or (p99_ratio is not None and p99_ratio <= p99_max)
    return {
        "real_requests_per_s": real["requests_per_s"],
        "ceiling_requests_per_s": ceiling["requests_per_s"],
        "requests_ratio": requests_ratio,
        "requests_ratio_min": requests_min,
        "real_p99_ms": real["p99_ms"],
        "ceiling_p99_ms": ceiling["p99_ms"],
        "p99_ratio": p99_ratio,
        "p99_ratio_max": p99_max,
        "real_errors": real["errors"],
        "ceiling_errors": ceiling["errors"],
        "pass": requests_ok and p99_ok,
    }


def ceiling_table(vs_ceiling: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The comparison as aligned text lines, one per path and connection count."""
    lines = [
        f"{'path':<24}{'conns':>6}{'real req/s':>12}{'ceiling':>10}{'ratio':>7}{'min':>6}"
        f"{'real p99':>10}{'ceiling':>9}{'ratio':>7}{'max':>6}  result"
    ]
    for name, by_conn in vs_ceiling.items():
        for conn, c in by_conn.items():
            p99_ratio = "-" if c["p99_ratio"] is None else f"{c['p99_ratio']:.2f}"
            p99_max = "-" if c["p99_ratio_max"] is None else f"{c['p99_ratio_max']:.2f}"
            lines.append(
                f"{name:<24}{conn:>6}{c['real_requests_per_s']:>12.1f}"
                f"{c['ceiling_requests_per_s']:>10.1f}{c['requests_ratio']:>7.3f}"
                f"{c['requests_ratio_min']:>6.2f}{c['real_p99_ms']:>10.1f}"
                f"{c['ceiling_p99_ms']:>9.1f}{p99_ratio:>7}{p99_max:>6}  "
                + ("pass" if c["pass"] else "BELOW TARGET")
            )
    return lines


def feed_suite(
    args: argparse.Namespace, partner: Any, grpc_port: int, other_port: int
) -> dict[str, Any]:
    """Commit-acknowledged -> watcher latency; writes through the watcher's server or another."""
    result: dict[str, Any] = {}
    for name, write_port in (("same_process", grpc_port), ("other_process", other_port)):
        runs = [
            feed_batch.feed_latency(
                watch_port=grpc_port,
                write_port=write_port,
                partner=partner,
                customers=args.customers,
            )
            for _ in range(args.repeats)
        ]
        result[name] = {
            **feed_batch.median_of(runs, "p50_ms", "p95_ms", "p99_ms", "max_ms"),
            "missing": sum(int(r["missing"]) for r in runs),
            "runs": runs,
        }
        progress(f"feed latency {name}: {result[name]}")
    return result


def ingest_suite(args: argparse.Namespace, topology: Topology) -> dict[str, Any]:
    """Batch-call ingestion at steady state: --repeats runs of INGEST_RUN_CALLS calls (1,000 per
    batch, 2 in flight), each call creating a customer with a status (one history row), in a
    sub-tenant of their own so that the update load's 10,000 customers stay as they are."""
    runs = []
    for repeat in range(args.repeats):
        first = (repeat + 1) * 1_000_000  # fresh call and customer ids every run
        requests = grpc_load.batches(first, first + INGEST_RUN_CALLS)
        before, cpu_before = topology.history_rows(), cpu_seconds(*topology.pids)
        run = grpc_load.send_batches(
            topology.grpc_port, topology.partner, requests,
            sub_tenant_id=topology.partner.ingest_sub_tenant_id,
        )  # fmt: skip
        run["server_cpu_us_per_call"] = _cpu_us(
            cpu_seconds(*topology.pids) - cpu_before, INGEST_RUN_CALLS
        )
        run["history_rows_written"] = topology.history_rows() - before
        runs.append(run)
        progress(f"ingestion: {run}")
    return {
        **feed_batch.median_of(runs, "calls_per_s", "server_cpu_us_per_call"),
        "history_rows_match": all(r["history_rows_written"] == r["customers"] for r in runs),
        "runs": runs,
    }


def _cpu_us(cpu_seconds: float, count: float) -> float:
    """Server CPU microseconds per item (what the servers used, user + system)."""
    return round(1e6 * cpu_seconds / count, 1) if count else 0.0


def batch_suite(args: argparse.Namespace, topology: Topology) -> dict[str, Any]:
    """1,000-item batch updates; every item a real change, checked against history rows."""
    runs = []
    for _ in range(args.repeats):
        before, cpu_before = topology.history_rows(), cpu_seconds(*topology.pids)
        run = feed_batch.batch_updates(
            port=topology.grpc_port, partner=topology.partner, customers=args.customers
        )
        cpu = cpu_seconds(*topology.pids) - cpu_before
        run["server_cpu_us_per_item"] = _cpu_us(cpu, run["items_changed"])
        run["history_rows_written"] = topology.history_rows() - before
        runs.append(run)
        progress(f"batch update: {run}")
    return {
        **feed_batch.median_of(runs, "items_per_s", "server_cpu_us_per_item"),
        "errors": sum(int(r["errors"]) for r in runs),
        "history_rows_match": all(r["history_rows_written"] == r["items_changed"] for r in runs),
        "runs": runs,
    }


def scale_suite(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    """The update load at --customers and at --scale-customers customers (seeded, see scale.py),
    two stacks side by side, alternating run by run; the large side as a share of the small."""
    sizes = {"small": args.customers, "large": args.scale_customers}
    digits = len(str(max(sizes.values()) - 1))
    connections = max(args.connections)
    sides: dict[str, tuple[Side, Topology]] = {}
    seeding: dict[str, float] = {}
    for name, customers in sizes.items():
        folder = workdir / f"scale-{name}"
        folder.mkdir()

        def seeded(db: Path, customers: int = customers, name: str = name) -> None:
            seeding[name] = scale.seed(
                db, customers=customers, digits=digits, tenant_id="bench-tenant",
                sub_tenant_id="bench-sub",
            )  # fmt: skip

        topology = single_topology(folder, stack, seed=seeded)
        progress(f"scale {name}: {customers} customers seeded in {seeding[name]} s")
        sides[name] = (
            Side(name, topology.envoy.http_port, topology.grpc_port, topology.servers,
                 topology.envoy.admin_port, topology.history_rows, "disposition-server"),
            topology,
        )  # fmt: skip

    def rest(side: Side, topology: Topology, seconds: int, tag: str) -> dict[str, float]:
        return rest_load.run_wrk(
            http_port=side.http_port, partner=topology.partner, connections=connections,
            seconds=seconds, threads=os.cpu_count() or 1, tag=tag,
            customers=sizes[side.name], id_digits=digits,
        )  # fmt: skip

    def grpc(side: Side, topology: Topology, seconds: int, tag: str) -> dict[str, float]:
        return grpc_load.run_h2load(
            port=side.grpc_port, partner=topology.partner, connections=connections,
            seconds=seconds, workdir=workdir, tag=tag, customers=sizes[side.name],
            id_digits=digits,
        )  # fmt: skip

    paths = {"rest_via_envoy_wrk": rest, "grpc_direct_h2load": grpc}
    for name, run in paths.items():  # warm-up, discarded
        for side, topology in sides.values():
            measure(partial(run, side, topology, 2, f"x{name[0]}{side.name[0]}"), side=side)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {p: [] for p in paths} for n in sizes}
    for rep in range(args.repeats):
        order = list(sides.values()) if rep % 2 == 0 else list(sides.values())[::-1]
        for name, run in paths.items():
            for side, topology in order:
                tag = f"z{rep}{name[0]}{side.name[0]}"
                ensure_running(side.servers, side.envoy_admin_port, side.what)
                result: dict[str, Any] = measure(
                    partial(run, side, topology, args.seconds, tag), side=side
                )
                if name.startswith("grpc"):
                    result["sample_call"] = grpc_load.sample_update(
                        side.grpc_port, topology.partner, f"s{tag}", id_digits=digits
                    )
                runs[side.name][name].append(result)
                progress(
                    f"scale {side.name} {name} c={connections} run {rep + 1}/{args.repeats}: "
                    f"{result['requests_per_s']} req/s, p99 {result['p99_ms']} ms, "
                    f"RSS {result['server_rss_mb_peak']} MB, errors {result['errors']}"
                )
    summaries = {n: {p: summarize(r) for p, r in by_path.items()} for n, by_path in runs.items()}
    comparison = {}
    for name in paths:
        small, large = summaries["small"][name], summaries["large"][name]
        requests_ratio = round(large["requests_per_s"] / small["requests_per_s"], 3)
        p99_ratio = round(large["p99_ms"] / small["p99_ms"], 3)
        comparison[name] = {
            "connections": connections,
            "small_requests_per_s": small["requests_per_s"],
            "large_requests_per_s": large["requests_per_s"],
            "requests_ratio": requests_ratio,
            "small_p99_ms": small["p99_ms"],
            "large_p99_ms": large["p99_ms"],
            "p99_ratio": p99_ratio,
            "large_rss_mb_peak": large["server_rss_mb_peak"],
            "errors": small["errors"] + large["errors"],
            "pass": requests_ratio >= SCALE_TARGETS["requests_ratio_min"]
            and p99_ratio <= SCALE_TARGETS["p99_ratio_max"]
            and large["server_rss_mb_peak"] <= SCALE_TARGETS["rss_mb_max"]
            and small["errors"] + large["errors"] == 0,
        }
    return {
        "customers": sizes,
        "history_rows_seeded": sizes,
        "seeding_seconds": seeding,
        "targets": SCALE_TARGETS,
        "large_vs_small": comparison,
        **summaries,
    }


def target_checks(report: dict[str, Any]) -> list[str]:
    """Aligned lines for the scale and throughput targets (those measured in this run)."""
    lines = []
    scale_report = report.get("scale")
    if scale_report:
        for name, c in scale_report["large_vs_small"].items():
            lines.append(
                f"scale {name}: {c['large_requests_per_s']:.1f} req/s at "
                f"{scale_report['customers']['large']:,} customers vs "
                f"{c['small_requests_per_s']:.1f} at {scale_report['customers']['small']:,}: "
                f"ratio {c['requests_ratio']:.3f} (min {SCALE_TARGETS['requests_ratio_min']}), "
                f"p99 {c['large_p99_ms']:.1f} vs {c['small_p99_ms']:.1f} ms: ratio "
                f"{c['p99_ratio']:.2f} (max {SCALE_TARGETS['p99_ratio_max']}), RSS "
                f"{c['large_rss_mb_peak']:.0f} MB (max {SCALE_TARGETS['rss_mb_max']:.0f})  "
                + ("pass" if c["pass"] else "BELOW TARGET")
            )
    measured = {
        "ingestion_calls_per_s": report.get("ingestion"),
        "batch_update_items_per_s": report.get("batch_update"),
    }
    for name, suite in measured.items():
        if suite is None:
            continue
        value = suite["calls_per_s" if name.startswith("ingestion") else "items_per_s"]
        target = THROUGHPUT_TARGETS[name]
        rows_ok = suite["history_rows_match"]
        lines.append(
            f"{name}: {value:,.0f} (min {target:,.0f})"
            + ("" if rows_ok else ", history rows do not match the changes")
            + ("  pass" if value >= target and rows_ok else "  BELOW TARGET")
        )
    return lines


ACCESS_LOG_LINE = re.compile(r'^\[\S+Z\] "')  # Envoy's per-request lines: no help here


def show_logs(workdir: Path, lines: int = 25) -> None:
    """The end of each child's log, before the temporary folder goes away."""
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        tail = [line for line in text if not ACCESS_LOG_LINE.match(line)][-lines:]
        progress(f"--- last {len(tail)} lines of {log.name} ---\n" + "\n".join(tail))


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: every child is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(
            f"run_bench: {', '.join(missing)} not found; install with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    with tempfile.TemporaryDirectory(prefix="disposition-bench-") as tmp:
        try:
            with ExitStack() as stack:
                report = bench(args, Path(tmp), stack)
        except KeyboardInterrupt:
            progress("interrupted: every child process has been stopped")
            return 130
        except Exception:
            show_logs(Path(tmp))
            raise
    print(json.dumps(report, indent=2))
    checks: list[str] = []
    vs_ceiling = report.get("vs_ceiling")
    if vs_ceiling:
        table = ceiling_table(vs_ceiling)
        progress(
            "real figures beside their no-op ceilings (medians; ratio = real / ceiling):\n"
            + "\n".join(table)
        )
        checks += table[1:]
    absolute = target_checks(report)
    if absolute:
        progress("scale and throughput targets:\n" + "\n".join(absolute))
        checks += absolute
    if not checks:
        return 0
    misses = [line for line in checks if line.endswith("BELOW TARGET")]
    if misses:
        progress(f"{len(misses)} of {len(checks)} figures below target: exit {EXIT_BELOW_TARGET}")
        return EXIT_BELOW_TARGET
    progress("every figure meets its target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
