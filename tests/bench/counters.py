"""The counters suite: what maintaining the summary's counters costs the update load.

Per engine, two stacks side by side: the server as it is, and the same server without the
counters (no_counters_server.py: its units of work move no counter). The same REST update load
(wrk through Envoy, every request a real change) alternates between them, the first swapping
every repeat; the target is on the ratio of the medians (with / without).
"""

from __future__ import annotations

import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import grpc_load, rest_load
from tests.bench.stack import (
    NO_COUNTERS_SERVER,
    SERVER,
    Topology,
    cluster_topology,
    cpu_seconds,
    ensure_running,
    single_topology,
)

RATIO_MIN = 0.95  # issue 13: update throughput with the counters >= 0.95x without


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def counters_suite(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    sides: dict[str, dict[str, Topology]] = {}
    for engine in ("sqlite", "postgres"):
        sides[engine] = {}
        for variant, argv in (("with", SERVER), ("without", NO_COUNTERS_SERVER)):
            folder = workdir / f"counters-{engine}-{variant}"
            folder.mkdir()
            if engine == "sqlite":
                topology = single_topology(folder, stack, argv=argv)
            else:
                topology = cluster_topology(
                    folder, stack, replicas=1, database_url=args.database_url,
                    redis_url=args.redis_url, argv=argv,
                )  # fmt: skip
            grpc_load.ingest(topology.grpc_port, topology.partner, args.customers)
            sides[engine][variant] = topology
    report: dict[str, Any] = {}
    checks = []
    for engine, variants in sides.items():
        runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
        for variant, topology in variants.items():  # warm-up, discarded
            _run(topology, args, f"x{variant[:2]}")
        for rep in range(args.repeats):
            order = ["with", "without"] if rep % 2 == 0 else ["without", "with"]
            for variant in order:
                run = _run(variants[variant], args, f"{rep}{variant[:2]}")
                runs[variant].append(run)
                progress(f"counters {engine} {variant}: {run['requests_per_s']} req/s, "
                         f"{run['server_cpu_us_per_request']} µs/req")  # fmt: skip
        medians = {
            variant: statistics.median(r["requests_per_s"] for r in found)
            for variant, found in runs.items()
        }
        ratio = round(medians["with"] / medians["without"], 3)
        report[engine] = {
            "with_requests_per_s": medians["with"],
            "without_requests_per_s": medians["without"],
            "ratio": ratio,
            "errors": sum(int(r["errors"]) for found in runs.values() for r in found),
            "runs": runs,
        }
        checks.append((
            f"counters {engine}: REST updates with the counters {medians['with']:,.0f} req/s, "
            f"without {medians['without']:,.0f}: ratio {ratio:.3f} (min {RATIO_MIN})",
            ratio >= RATIO_MIN and report[engine]["errors"] == 0,
        ))  # fmt: skip
    report["checks"] = checks
    return report


def _run(topology: Topology, args: Any, tag: str) -> dict[str, Any]:
    ensure_running(topology.servers, topology.envoy.admin_port)
    before = cpu_seconds(*topology.pids)
    run: dict[str, Any] = rest_load.run_wrk(
        http_port=topology.envoy.http_port, partner=topology.partner,
        connections=args.engines_connections, seconds=args.seconds,
        threads=os.cpu_count() or 1, tag=tag, customers=args.customers,
    )  # fmt: skip
    cpu = cpu_seconds(*topology.pids) - before
    run["server_cpu_us_per_request"] = round(1e6 * cpu / run["requests"], 1)
    return run
