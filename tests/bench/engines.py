"""The engines suite: the same load on SQLite and on PostgreSQL + Redis, side by side.

Sides, each a stack of its own started before the first run and loaded one after the other,
in an order that rotates every repeat so that they share the machine's noise:
  sqlite    one server on a fresh SQLite file (the embedded node);
  postgres  one server on a fresh PostgreSQL schema, rate limits in Redis;
  cluster   --replicas servers on another fresh schema behind one Envoy (what a team that has
            outgrown one machine runs);
  ceiling   the no-op server behind its own Envoy (REST only): the transport's own cost.
Per repeat and side: REST updates through Envoy (wrk, every request a real change), then a
batch-call ingestion run (INGEST_CALLS new calls, 1,000 per batch, 2 in flight), and
BATCH_REPEATS consecutive batch-update runs (1,000 items each, 2 clients) whose last / first
shows whether PostgreSQL slows down as the table churns. Every run reports server CPU µs per
request (or call, or item) and is checked against the history rows it wrote.

For context, `pgbench` runs the same per-update SQL (lock a customer, UPDATE it, INSERT its
history row, COMMIT with synchronous_commit=on) on the postgres side's database, with as many
clients as wrk has connections.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import feed_batch, grpc_load, rest_load
from tests.bench.stack import (
    INGEST_SUB_TENANT,
    Topology,
    ceiling_for,
    cluster_topology,
    cpu_seconds,
    ensure_running,
    single_topology,
)

INGEST_CALLS = 20_000
BATCH_REPEATS = 5
# Issue 13's targets (PostgreSQL + Redis against SQLite, same run).
TARGETS = {
    "postgres_rest_ratio_min": 0.90,  # one PostgreSQL server / one SQLite server, REST updates
    "cluster_rest_ratio_min": 0.90,  # the cluster / one SQLite server, REST updates
    "postgres_ingest_ratio_min": 0.50,  # ingestion, PostgreSQL / SQLite
    "postgres_ingest_calls_per_s_min": 10_000.0,
    "postgres_batch_items_per_s_min": 20_000.0,
    "postgres_batch_last_over_first_min": 0.90,
}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Side:
    name: str
    topology: Topology | None  # None: the ceiling
    http_port: int
    pids: list[int]
    envoy_admin_port: int
    servers: list[Any]


def engine_sides(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Side]:
    """The suite's stacks, started and each given --customers customers."""
    made: dict[str, Topology] = {}
    for name in ("sqlite", "postgres", "cluster"):
        folder = workdir / f"engines-{name}"
        folder.mkdir()
        if name == "sqlite":
            made[name] = single_topology(folder, stack)
        else:
            replicas = 1 if name == "postgres" else args.replicas
            made[name] = cluster_topology(
                folder, stack, replicas=replicas, database_url=args.database_url,
                redis_url=args.redis_url,
            )  # fmt: skip
        setup = grpc_load.ingest(made[name].grpc_port, made[name].partner, args.customers)
        progress(f"engines {name}: {made[name].description}; {setup['calls_per_s']} calls/s")
    sides = {
        name: Side(name, t, t.envoy.http_port, t.pids, t.envoy.admin_port, t.servers)
        for name, t in made.items()
    }
    folder = workdir / "engines-ceiling"
    folder.mkdir()
    ceiling = ceiling_for(made["sqlite"], folder, stack)
    sides["ceiling"] = Side(
        "ceiling", None, ceiling.envoy.http_port, ceiling.pids, ceiling.envoy.admin_port,
        ceiling.servers,
    )  # fmt: skip
    return sides


def _rest(side: Side, args: Any, partner: Any, tag: str) -> dict[str, Any]:
    ensure_running(side.servers, side.envoy_admin_port, side.name)
    before = side.topology.history_rows() if side.topology is not None else 0
    cpu_before = cpu_seconds(*side.pids)
    run: dict[str, Any] = rest_load.run_wrk(
        http_port=side.http_port, partner=partner, connections=args.engines_connections,
        seconds=args.seconds, threads=os.cpu_count() or 1, tag=tag, customers=args.customers,
    )  # fmt: skip
    run["server_cpu_us_per_request"] = _us(cpu_seconds(*side.pids) - cpu_before, run["requests"])
    if side.topology is not None:
        run["history_rows_written"] = side.topology.history_rows() - before
    return run


def _ingest(topology: Topology, first: int) -> dict[str, Any]:
    before, cpu_before = topology.history_rows(), cpu_seconds(*topology.pids)
    run: dict[str, Any] = grpc_load.send_batches(
        topology.grpc_port, topology.partner, grpc_load.batches(first, first + INGEST_CALLS),
        sub_tenant_id=INGEST_SUB_TENANT,
    )  # fmt: skip
    run["server_cpu_us_per_call"] = _us(cpu_seconds(*topology.pids) - cpu_before, INGEST_CALLS)
    run["history_rows_match"] = topology.history_rows() - before == INGEST_CALLS
    return run


def _batch(topology: Topology, args: Any) -> dict[str, Any]:
    before, cpu_before = topology.history_rows(), cpu_seconds(*topology.pids)
    run: dict[str, Any] = feed_batch.batch_updates(
        port=topology.grpc_port, partner=topology.partner, customers=args.customers
    )
    run["server_cpu_us_per_item"] = _us(
        cpu_seconds(*topology.pids) - cpu_before, run["items_changed"]
    )
    run["history_rows_match"] = topology.history_rows() - before == run["items_changed"]
    return run


def _us(cpu: float, count: float) -> float:
    return round(1e6 * cpu / count, 1) if count else 0.0


def engines_suite(args: Any, sides: dict[str, Side], workdir: Path) -> dict[str, Any]:
    partner = sides["sqlite"].topology.partner  # type: ignore[union-attr]
    order = list(sides)
    rest: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    ingest: dict[str, list[dict[str, Any]]] = {name: [] for name in sides if name != "ceiling"}
    batch: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in ingest}
    for name, side in sides.items():  # warm-up, discarded
        _rest(side, args, _partner(side, partner), f"e{name[:2]}")
    for rep in range(args.repeats):
        rotated = order[rep % len(order) :] + order[: rep % len(order)]
        for name in rotated:
            side = sides[name]
            run = _rest(side, args, _partner(side, partner), f"{rep}{name[:2]}")
            rest[name].append(run)
            progress(
                f"engines {name} REST c={args.engines_connections} run {rep + 1}: "
                f"{run['requests_per_s']} req/s, p99 {run['p99_ms']} ms, "
                f"{run['server_cpu_us_per_request']} µs/req, errors {run['errors']}"
            )
        for name in (n for n in rotated if n != "ceiling"):
            topology = sides[name].topology
            assert topology is not None
            run = _ingest(topology, (rep + 1) * 1_000_000)
            ingest[name].append(run)
            progress(f"engines {name} ingestion run {rep + 1}: {run['calls_per_s']} calls/s, "
                     f"{run['server_cpu_us_per_call']} µs/call")  # fmt: skip
            runs = [_batch(topology, args) for _ in range(BATCH_REPEATS)]
            batch[name].append(runs)
            progress(f"engines {name} batch updates run {rep + 1}: "
                     f"{[r['items_per_s'] for r in runs]} items/s")  # fmt: skip
    summary = _summarize(rest, ingest, batch)
    summary["pgbench"] = pgbench(sides["postgres"].topology, args, workdir)  # type: ignore[arg-type]
    summary["targets"] = TARGETS
    summary["checks"] = checks(summary)
    return summary


def _partner(side: Side, fallback: Any) -> Any:
    return side.topology.partner if side.topology is not None else fallback


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in runs), 1)


def _summarize(
    rest: dict[str, list[dict[str, Any]]],
    ingest: dict[str, list[dict[str, Any]]],
    batch: dict[str, list[list[dict[str, Any]]]],
) -> dict[str, Any]:
    out: dict[str, Any] = {"rest": {}, "ingestion": {}, "batch_update": {}}
    for name, runs in rest.items():
        out["rest"][name] = {
            "requests_per_s": _median(runs, "requests_per_s"),
            "p99_ms": _median(runs, "p99_ms"),
            "server_cpu_us_per_request": _median(runs, "server_cpu_us_per_request"),
            "errors": sum(int(r["errors"]) for r in runs),
            "history_rows_match": all(
                r.get("history_rows_written", r["requests"]) >= r["requests"] for r in runs
            ),
            "runs": runs,
        }
    for name, runs in ingest.items():
        out["ingestion"][name] = {
            "calls_per_s": _median(runs, "calls_per_s"),
            "server_cpu_us_per_call": _median(runs, "server_cpu_us_per_call"),
            "history_rows_match": all(r["history_rows_match"] for r in runs),
            "runs": runs,
        }
    for name, repeats in batch.items():
        firsts = [runs[0]["items_per_s"] for runs in repeats]
        lasts = [runs[-1]["items_per_s"] for runs in repeats]
        every = [run for runs in repeats for run in runs]
        out["batch_update"][name] = {
            "items_per_s": _median(every, "items_per_s"),
            "server_cpu_us_per_item": _median(every, "server_cpu_us_per_item"),
            "last_over_first": round(statistics.median(lasts) / statistics.median(firsts), 3),
            "errors": sum(int(r["errors"]) for r in every),
            "history_rows_match": all(r["history_rows_match"] for r in every),
            "runs": repeats,
        }
    sqlite_rest = out["rest"]["sqlite"]["requests_per_s"]
    out["ratios"] = {
        "postgres_rest": round(out["rest"]["postgres"]["requests_per_s"] / sqlite_rest, 3),
        "cluster_rest": round(out["rest"]["cluster"]["requests_per_s"] / sqlite_rest, 3),
        "postgres_ingest": round(
            out["ingestion"]["postgres"]["calls_per_s"] / out["ingestion"]["sqlite"]["calls_per_s"],
            3,
        ),
        "postgres_batch": round(
            out["batch_update"]["postgres"]["items_per_s"]
            / out["batch_update"]["sqlite"]["items_per_s"],
            3,
        ),
    }
    return out


def checks(summary: dict[str, Any]) -> list[tuple[str, bool]]:
    """(line, met) for each target, in order."""
    ratios, postgres = summary["ratios"], "postgres"
    ingest, batch = summary["ingestion"][postgres], summary["batch_update"][postgres]
    rows_ok = all(
        side["history_rows_match"]
        for part in ("rest", "ingestion", "batch_update")
        for name, side in summary[part].items()
        if name != "ceiling"
    )
    errors = sum(
        side.get("errors", 0)
        for part in ("rest", "batch_update")
        for side in summary[part].values()
    )
    return [
        (f"engines: REST PostgreSQL / SQLite {ratios['postgres_rest']:.3f} "
         f"(min {TARGETS['postgres_rest_ratio_min']})",
         ratios["postgres_rest"] >= TARGETS["postgres_rest_ratio_min"]),
        (f"engines: REST cluster / one SQLite server {ratios['cluster_rest']:.3f} "
         f"(min {TARGETS['cluster_rest_ratio_min']})",
         ratios["cluster_rest"] >= TARGETS["cluster_rest_ratio_min"]),
        (f"engines: ingestion PostgreSQL / SQLite {ratios['postgres_ingest']:.3f} "
         f"(min {TARGETS['postgres_ingest_ratio_min']}), {ingest['calls_per_s']:,.0f} calls/s "
         f"(min {TARGETS['postgres_ingest_calls_per_s_min']:,.0f})",
         ratios["postgres_ingest"] >= TARGETS["postgres_ingest_ratio_min"]
         and ingest["calls_per_s"] >= TARGETS["postgres_ingest_calls_per_s_min"]),
        (f"engines: batch updates on PostgreSQL {batch['items_per_s']:,.0f} items/s "
         f"(min {TARGETS['postgres_batch_items_per_s_min']:,.0f}), last / first repeat "
         f"{batch['last_over_first']:.2f} (min {TARGETS['postgres_batch_last_over_first_min']})",
         batch["items_per_s"] >= TARGETS["postgres_batch_items_per_s_min"]
         and batch["last_over_first"] >= TARGETS["postgres_batch_last_over_first_min"]),
        (f"engines: every run's history rows match its changes, {errors} errors",
         rows_ok and errors == 0),
    ]  # fmt: skip


PGBENCH_SCRIPT = """\\set n random(0, {last})
BEGIN;
SELECT id FROM customers WHERE tenant_id = 'pgbench' AND sub_tenant_id = 's'
  AND customer_id = 'p' || :n FOR UPDATE;
UPDATE customers SET disposition_status = 'p' || :client_id || '-' || random(),
  updated_at = now()
  WHERE tenant_id = 'pgbench' AND sub_tenant_id = 's' AND customer_id = 'p' || :n;
INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id, previous_status,
  new_status, source, partner_pk, request_id, changed_at)
  SELECT nextval('pgbench_seq'), id, 'pgbench', 's', NULL, 'x', 'pgbench', 1, 'pgbench', now()
  FROM customers WHERE tenant_id = 'pgbench' AND sub_tenant_id = 's' AND customer_id = 'p' || :n;
COMMIT;
"""


def pgbench(topology: Topology, args: Any, workdir: Path) -> dict[str, Any]:
    """pgbench's commits/s of the per-update SQL on the postgres side's schema, for context: a
    tenant of its own (pgbench's customers and history rows; its sequence for the cursors)."""
    if shutil.which("pgbench") is None:
        return {"skipped": "pgbench not found (Debian: postgresql-client)"}
    from sqlalchemy.engine import make_url

    from tests.support.databases import sql

    url = topology.env["DATABASE_URL"]
    schema = make_url(url).query["search_path"]
    customers = args.customers
    sql(url, "CREATE SEQUENCE IF NOT EXISTS pgbench_seq")
    sql(url, "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, created_at,"
             f" updated_at) SELECT 'pgbench', 's', 'p' || n, now(), now()"
             f" FROM generate_series(0, {customers - 1}) n ON CONFLICT DO NOTHING")  # fmt: skip
    script = workdir / "pgbench.sql"
    script.write_text(PGBENCH_SCRIPT.format(last=customers - 1))
    base = make_url(args.database_url)
    argv = ["pgbench", "-n", "-c", str(args.engines_connections), "-j", "2", "-T",
            str(args.seconds), "-f", str(script), "-h", base.host or "127.0.0.1",
            "-p", str(base.port or 5432), "-U", base.username or "postgres",
            base.database or "postgres"]  # fmt: skip
    env = {**os.environ, "PGOPTIONS": f"-c search_path={schema} -c synchronous_commit=on"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    found = [line for line in done.stdout.splitlines() if line.startswith("tps = ")]
    if done.returncode != 0 or not found:
        return {"error": (done.stdout + done.stderr)[-1000:]}
    tps = float(found[0].split()[2])
    progress(f"pgbench, the same per-update SQL: {tps:,.0f} commits/s")
    return {
        "clients": args.engines_connections,
        "seconds": args.seconds,
        "commits_per_s": round(tps, 1),
        "what": "per commit: SELECT ... FOR UPDATE of a random customer, UPDATE its status, "
        "INSERT one history row; synchronous_commit=on",
    }
