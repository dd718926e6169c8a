"""The reports suite: the summary report of a large tenant, through Envoy, on both engines.

Each engine gets a database seeded before its server starts: --report-customers customers of
the bench tenant, with as many history rows (each customer's status set once), spread evenly
over the 30 days before the bench's start, in ten statuses; the counters are filled from those
rows with the same statements as migration 0003's backfill. Then GET
/api/v1/partner/reports/disposition-summary is called one request at a time, without a window
and with one whose edges fall inside hours (so that both the hourly counters and the history's
partial hours are read); the figures are the client's latencies through Envoy. The answer is
checked against the seeded rows; and for comparison, the summary as it used to be computed (a
GROUP BY over all of the tenant's rows, storage.reports.scanned_status_counts) is timed once
per window, straight on the database.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import statistics
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from devstack import Credentials
from server.db import Database
from server.settings import Settings
from server.storage import reports
from tests.bench.stack import Topology, cluster_topology, single_topology
from tests.support.databases import sql

P50_MAX_MS = 20.0  # issue 13
CALLS = 200
STATUSES = 10
DAYS = 30
PATH = "/api/v1/partner/reports/disposition-summary"
_COUNTERS = (
    "INSERT INTO status_counts (tenant_id, sub_tenant_id, disposition_status, customers)"
    " SELECT tenant_id, sub_tenant_id, coalesce(disposition_status, ''), count(*)"
    " FROM customers GROUP BY tenant_id, sub_tenant_id, coalesce(disposition_status, '')",
    "INSERT INTO status_change_hours (tenant_id, sub_tenant_id, hour, disposition_status,"
    " changes) SELECT tenant_id, sub_tenant_id, {hour}, coalesce(new_status, ''), count(*)"
    " FROM disposition_history GROUP BY tenant_id, sub_tenant_id, {hour},"
    " coalesce(new_status, '')",
)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def seed_sqlite(db_path: Path, customers: int, start: datetime, tenant: tuple[str, str]) -> None:
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # bench seeding only; the server uses its own
        (partner_pk,) = conn.execute(
            "SELECT id FROM partners WHERE partner_id = 'bench'"
        ).fetchone()
        step = DAYS * 86400 / customers
        fmt = "%Y-%m-%d %H:%M:%S.%f"
        conn.executemany(
            "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                (*tenant, f"r{i:07d}", f"status-{i % STATUSES}", at, at)
                for i in range(customers)
                for at in [(start + timedelta(seconds=i * step)).strftime(fmt)]
            ),
        )
        conn.execute(
            "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
            " previous_status, new_status, source, partner_pk, request_id, changed_at)"
            " SELECT id, id, tenant_id, sub_tenant_id, NULL, disposition_status, 'batch_call', ?,"
            " 'seed-' || id, created_at FROM customers WHERE tenant_id = ?",
            (partner_pk, tenant[0]),
        )
        conn.execute("INSERT INTO feed_sequences VALUES (?, ?)", (tenant[0], customers))
        for statement in _COUNTERS:
            conn.execute(statement.format(hour="strftime('%Y-%m-%d %H:00:00.000000', changed_at)"))
        conn.commit()
    finally:
        conn.close()


def seed_postgres(url: str, customers: int, start: datetime, tenant: tuple[str, str]) -> None:
    step = DAYS * 86400 / customers
    sql(
        url,
        "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
        " created_at, updated_at) SELECT :t, :s, 'r' || lpad(n::text, 7, '0'),"
        " 'status-' || (n % :statuses), at, at FROM generate_series(0, :last) n,"
        " LATERAL (SELECT CAST(:start AS timestamptz)"
        " + n * make_interval(secs => CAST(:step AS double precision)) AS at) a",
        t=tenant[0], s=tenant[1], statuses=STATUSES, start=start, step=step, last=customers - 1,
    )  # fmt: skip
    sql(
        url,
        "INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id,"
        " previous_status, new_status, source, partner_pk, request_id, changed_at)"
        " SELECT row_number() OVER (ORDER BY c.id), c.id, c.tenant_id, c.sub_tenant_id, NULL,"
        " c.disposition_status, 'batch_call', p.id, 'seed-' || c.id, c.created_at"
        " FROM customers c, partners p WHERE p.partner_id = 'bench' AND c.tenant_id = :t",
        t=tenant[0],
    )
    sql(url, "INSERT INTO feed_sequences VALUES (:t, :n)", t=tenant[0], n=customers)
    for statement in _COUNTERS:
        sql(url, statement.format(hour="date_trunc('hour', changed_at, 'UTC')"))
    sql(url, "ANALYZE")


def _summary(
    port: int, partner: Credentials, window: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        path = PATH + ("?" + urlencode(window) if window else "")
        started = time.perf_counter()
        connection.request("GET", path, headers=partner.headers())
        reply = connection.getresponse()
        body = reply.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    if reply.status != 200:
        raise RuntimeError(f"summary: {reply.status} {body[:300]!r}")
    return elapsed * 1000, json.loads(body)["data"]


def _latencies(port: int, partner: Credentials, window: dict[str, str]) -> dict[str, Any]:
    for _ in range(10):  # warm-up
        _summary(port, partner, window)
    samples = sorted(_summary(port, partner, window)[0] for _ in range(CALLS))
    return {
        "calls": CALLS,
        "p50_ms": round(statistics.median(samples), 2),
        "p90_ms": round(samples[int(0.9 * len(samples))], 2),
        "p99_ms": round(samples[int(0.99 * len(samples))], 2),
    }


def _scanned_ms(url: str, tenant: tuple[str, str], start: datetime | None,
                end: datetime | None) -> float:  # fmt: skip
    async def scan() -> float:
        db = Database(Settings(database_url=url))
        try:
            async with db.read() as conn:
                began = time.perf_counter()
                await reports.scanned_status_counts(
                    conn, tenant_id=tenant[0], sub_tenant_id=tenant[1], changed_from=start,
                    changed_before=end,
                )  # fmt: skip
                return (time.perf_counter() - began) * 1000
        finally:
            await db.dispose()

    return round(asyncio.run(scan()), 1)


def reports_suite(args: Any, workdir: Path, stack: ExitStack) -> dict[str, Any]:
    customers = args.report_customers
    start = (datetime.now(UTC) - timedelta(days=DAYS)).replace(microsecond=0)
    window_from = start + timedelta(days=3, hours=5, minutes=17, seconds=11)
    window_to = start + timedelta(days=20, hours=11, minutes=43, seconds=7)
    window = {"from": _rfc3339(window_from), "to": _rfc3339(window_to)}
    tenant = ("bench-tenant", "bench-sub")
    report: dict[str, Any] = {"customers": customers, "history_rows": customers, "window": window}
    checks = []
    for engine in ("sqlite", "postgres"):
        folder = workdir / f"reports-{engine}"
        folder.mkdir()
        began = time.monotonic()
        topology: Topology
        if engine == "sqlite":
            topology = single_topology(
                folder, stack, seed=lambda db: seed_sqlite(db, customers, start, tenant)
            )
        else:
            topology = cluster_topology(
                folder, stack, replicas=1, database_url=args.database_url,
                redis_url=args.redis_url,
                seed=lambda url: seed_postgres(url, customers, start, tenant),
            )  # fmt: skip
        seeded = round(time.monotonic() - began, 1)
        port, partner = topology.envoy.http_port, topology.partner
        _, whole = _summary(port, partner, {})
        expected_per_status = customers // STATUSES
        if int(whole["total_customers"]) != customers or int(whole["total_changes"]) != customers:
            raise RuntimeError(f"reports {engine}: the summary does not match the seed: {whole}")
        if any(int(s["customers"]) != expected_per_status for s in whole["statuses"]):
            raise RuntimeError(f"reports {engine}: per-status counts do not match: {whole}")
        url = topology.env["DATABASE_URL"]
        result = {
            "seeding_seconds": seeded,
            "no_window": _latencies(port, partner, {}),
            "window": _latencies(port, partner, window),
            "scanned_ms_no_window": _scanned_ms(url, tenant, None, None),
            "scanned_ms_window": _scanned_ms(url, tenant, window_from, window_to),
        }
        report[engine] = result
        progress(f"reports {engine}: {result}")
        for name in ("no_window", "window"):
            p50 = result[name]["p50_ms"]
            checks.append((
                f"reports {engine}: summary of {customers:,} customers and history rows, "
                f"{name.replace('_', ' ')}: p50 {p50:.1f} ms (max {P50_MAX_MS:.0f}); "
                f"a scan took {result['scanned_ms_' + name]:.0f} ms",
                p50 <= P50_MAX_MS,
            ))  # fmt: skip
    report["checks"] = checks
    return report


def _rfc3339(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")
