"""`make bench`: real stacks under bounded load on loopback; one JSON document on stdout.

    .venv/bin/python -m tests.bench.run_bench [--suites load engines ...] [--seconds 5]
        [--repeats 3] [--connections 16 64] [--replicas 2] [--database-url …] [--redis-url …]

Suites (all by default), each on stacks of its own, every figure a median of --repeats runs
that alternate between the sides they compare, so that both see the same machine noise:
  load      the real server on SQLite against the no-op ceiling, REST and gRPC (load.py);
  engines   SQLite, PostgreSQL + Redis and the cluster (--replicas on PostgreSQL + Redis)
            under the same REST load, ingestion and batch updates; pgbench for context
            (engines.py);
  feed      commit-to-watcher latency: on PostgreSQL across two replicas, on SQLite across two
            processes (feed_batch.py);
  counters  the REST load with and without the summary's counters, per engine (counters.py);
  reports   the summary of a tenant with --report-customers customers and history rows,
            through Envoy, per engine (reports.py);
  scale     the update load at --customers and at --scale-customers customers (scale.py);
  webhooks  commit -> receiver latency, delivery throughput, and the update load with 3
            endpoints and with a hanging receiver against none, on SQLite (webhooks.py).
PostgreSQL and Redis are those of --database-url (a schema per stack, dropped afterwards) and
--redis-url (a key prefix per stack). Each suite checks its figures against issue 13's targets
(webhooks: issue 15's); the lines are printed at the end, and the exit status is 3 when any is
below its target.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import counters, engines, feed_batch, load, reports, scale, webhooks
from tests.bench.stack import grpc_server

INSTALL_HINT = "apt-get install -y wrk nghttp2-client"
SUITES = ("load", "engines", "feed", "counters", "reports", "scale", "webhooks")
EXIT_BELOW_TARGET = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="duration of each load run")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[16, 64], help="load: connection counts"
    )
    parser.add_argument(
        "--engines-connections", type=int, default=32,
        help="engines, counters: wrk connections (and pgbench clients)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and figure")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument(
        "--scale-customers", type=int, default=1_000_000,
        help="scale: customers (and history rows) of the large side",
    )  # fmt: skip
    parser.add_argument(
        "--report-customers", type=int, default=1_000_000,
        help="reports: customers (and history rows) of the tenant summarized",
    )  # fmt: skip
    parser.add_argument("--replicas", type=int, default=2, help="engines: the cluster's servers")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TEST_POSTGRES_URL")
        or "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        help="the PostgreSQL database to make this run's schemas in",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="the Redis of the rate limits (keys under a prefix of this run)",
    )
    args = parser.parse_args(argv)
    args.cpus = len(os.sched_getaffinity(0))
    return args


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
        "pgbench": tool_version(["pgbench", "--version"]) if shutil.which("pgbench") else None,
    }


def bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "config": {
            "seconds_per_run": args.seconds,
            "repeats": args.repeats,
            "customers": args.customers,
            "server_log_level": "WARNING",
            "rest": "wrk -t<cpus> keep-alive HTTP/1.1 -> Envoy (--concurrency 2) -> server(s)",
            "grpc": "h2load -t1 -m1 (one stream in flight per connection) -> server",
            "sqlite": "fresh file (WAL), SQLITE_SYNCHRONOUS=FULL (the server's default), "
            "in-process rate limits",
            "postgres": f"{args.database_url.split('@')[-1]} (a schema per stack, "
            "synchronous_commit=on), rate limits in Redis",
        },
    }
    suites: dict[str, Callable[[], dict[str, Any]]] = {
        "load": lambda: load.load_suite(args, workdir, stack),
        "counters": lambda: counters.counters_suite(args, workdir, stack),
        "reports": lambda: reports.reports_suite(args, workdir, stack),
        "scale": lambda: scale.scale_suite(args, workdir, stack),
        "webhooks": lambda: webhooks.webhooks_suite(args, workdir, stack),
    }
    sides: dict[str, engines.Side] | None = None
    if {"engines", "feed"} & set(args.suites):
        sides = engines.engine_sides(args, workdir, stack)
    for name in SUITES:
        if name not in args.suites:
            continue
        progress(f"--- suite {name}")
        if name == "engines":
            assert sides is not None
            report[name] = engines.engines_suite(args, sides, workdir)
        elif name == "feed":
            assert sides is not None
            report[name] = feed(args, sides, workdir, stack)
        else:
            report[name] = suites[name]()
    return report


def feed(
    args: argparse.Namespace, sides: dict[str, engines.Side], workdir: Path, stack: ExitStack
) -> dict[str, Any]:
    """Latencies from the engines' stacks: PostgreSQL across the cluster's first two replicas
    (pushed), SQLite across two processes on one file (polled)."""
    cluster, sqlite = sides["cluster"].topology, sides["sqlite"].topology
    assert cluster is not None and sqlite is not None
    _, second = stack.enter_context(grpc_server(sqlite.env, workdir / "sqlite-feed-2.log"))
    pairs = {
        "postgres_same_replica": (cluster.server_ports[0], cluster.server_ports[0]),
        "postgres_other_replica": (cluster.server_ports[0], cluster.server_ports[1]),
        "sqlite_same_process": (sqlite.server_ports[0], sqlite.server_ports[0]),
        "sqlite_other_process": (sqlite.server_ports[0], second),
    }
    partners = {name: (cluster if name.startswith("postgres") else sqlite).partner
                for name in pairs}  # fmt: skip
    return feed_batch.feed_suite(pairs, partners, args.customers, args.repeats)


ACCESS_LOG_LINE = re.compile(r'^\[\S+Z\] "')  # Envoy's per-request lines: no help here


def show_logs(workdir: Path, lines: int = 25) -> None:
    """The end of each child's log, before the temporary folder goes away."""
    for log in sorted(workdir.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        tail = [line for line in text if not ACCESS_LOG_LINE.match(line)][-lines:]
        progress(
            f"--- last {len(tail)} lines of {log.relative_to(workdir)} ---\n" + "\n".join(tail)
        )


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
    checks = [
        (line, met)
        for name in SUITES
        if name in report
        for line, met in report[name].get("checks", [])
    ]
    print(json.dumps(report, indent=2))
    if "load" in report:
        progress("real figures beside the no-op ceiling (medians; own = real µs - ceiling µs):\n"
                 + "\n".join(report["load"]["table"]))  # fmt: skip
    progress("targets:\n" + "\n".join(
        f"{line}  {'pass' if met else 'BELOW TARGET'}" for line, met in checks
    ))  # fmt: skip
    misses = [line for line, met in checks if not met]
    if misses:
        progress(f"{len(misses)} of {len(checks)} figures below target: exit {EXIT_BELOW_TARGET}")
        return EXIT_BELOW_TARGET
    progress("every figure meets its target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
