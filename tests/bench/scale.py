"""The scale suite: the same update load against 10,000 and 1,000,000 customers, alternating.

Two single stacks (SQLite, one server, Envoy) side by side, each on a database seeded before its
server starts: `customers` customers of the bench tenant, each with one history row (its first
status, "new"), and the tenant's feed cursor after them. Seeding writes the rows with sqlite3
directly, because ingesting a million customers through the API would take minutes of the
bench's time and measure nothing new; the rows are what ingestion writes (same columns, same
stored time format), and the first real update of each stack is checked through the API.

Both stacks use the same customer id width, so both sides send bodies of the same length; the
load picks customers at random over all of the stack's customers, so the large side's working
set really is a million rows.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from tests.bench import grpc_load, rest_load
from tests.bench.load import Side, measure, summarize
from tests.bench.stack import Topology, ensure_running, single_topology


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# The large side's figures against the small side's, same run, alternating.
SCALE_TARGETS = {"requests_ratio_min": 0.90, "p99_ratio_max": 1.20, "rss_mb_max": 150.0}

# What SQLAlchemy's SQLite DATETIME stores (the server reads these back as UTC).
SEEDED_AT = "2026-11-26 09:00:00.000000"
SEEDED_HOUR = "2026-11-26 09:00:00.000000"
CHUNK = 50_000


def seed(
    db_path: Path, *, customers: int, digits: int, tenant_id: str, sub_tenant_id: str
) -> float:
    """Add `customers` customers with one history row each; returns the seconds it took."""
    started = time.monotonic()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # bench seeding only; the server uses its own
        (partner_pk,) = conn.execute(
            "SELECT id FROM partners WHERE partner_id = 'bench'"
        ).fetchone()
        for first in range(0, customers, CHUNK):
            conn.executemany(
                "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
                " created_at, updated_at) VALUES (?, ?, ?, 'new', ?, ?)",
                (
                    (tenant_id, sub_tenant_id, f"c{i:0{digits}d}", SEEDED_AT, SEEDED_AT)
                    for i in range(first, min(first + CHUNK, customers))
                ),
            )
        conn.execute(
            "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
            " previous_status, new_status, source, partner_pk, request_id, changed_at)"
            " SELECT row_number() OVER (ORDER BY id), id, tenant_id, sub_tenant_id, NULL, 'new',"
            " 'batch_call', ?, 'seed-' || id, created_at FROM customers WHERE tenant_id = ?",
            (partner_pk, tenant_id),
        )
        conn.execute(
            "INSERT INTO feed_sequences (tenant_id, last_seq) VALUES (?, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET last_seq = excluded.last_seq",
            (tenant_id, customers),
        )
        # The summary's counters, as migration 0003 fills them from existing rows.
        conn.execute(
            "INSERT INTO status_counts VALUES (?, ?, 'new', ?) ON CONFLICT DO UPDATE"
            " SET customers = status_counts.customers + excluded.customers",
            (tenant_id, sub_tenant_id, customers),
        )
        conn.execute(
            "INSERT INTO status_change_hours VALUES (?, ?, ?, 'new', ?) ON CONFLICT DO UPDATE"
            " SET changes = status_change_hours.changes + excluded.changes",
            (tenant_id, sub_tenant_id, SEEDED_HOUR, customers),
        )
        conn.commit()
    finally:
        conn.close()
    return round(time.monotonic() - started, 1)


def scale_suite(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Any]:
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
            seeding[name] = seed(
                db, customers=customers, digits=digits, tenant_id="bench-tenant",
                sub_tenant_id="bench-sub",
            )  # fmt: skip

        topology = single_topology(folder, stack, seed=seeded)
        progress(f"scale {name}: {customers} customers seeded in {seeding[name]} s")
        sides[name] = (
            Side(name, topology.envoy.http_port, topology.grpc_port, topology.servers,
                 topology.envoy.admin_port, topology.history_rows, "disposition-server",
                 topology.partner),
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
    checks = [
        (f"scale {name}: {c['large_requests_per_s']:.1f} req/s at {sizes['large']:,} customers vs "
         f"{c['small_requests_per_s']:.1f} at {sizes['small']:,}: ratio {c['requests_ratio']:.3f} "
         f"(min {SCALE_TARGETS['requests_ratio_min']}), p99 {c['large_p99_ms']:.1f} vs "
         f"{c['small_p99_ms']:.1f} ms: ratio {c['p99_ratio']:.2f} (max "
         f"{SCALE_TARGETS['p99_ratio_max']}), RSS {c['large_rss_mb_peak']:.0f} MB (max "
         f"{SCALE_TARGETS['rss_mb_max']:.0f})", bool(c["pass"]))
        for name, c in comparison.items()
    ]  # fmt: skip
    return {
        "customers": sizes,
        "history_rows_seeded": sizes,
        "seeding_seconds": seeding,
        "targets": SCALE_TARGETS,
        "large_vs_small": comparison,
        **summaries,
        "checks": checks,
    }
