"""The REST half: wrk driving PUT /api/v1/partner/ingest/disposition-status through Envoy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from devstack import Credentials

SCRIPT = Path(__file__).with_name("update.lua")
REST_PATH = "/api/v1/partner/ingest/disposition-status"


def run_wrk(
    *,
    http_port: int,
    partner: Credentials,
    connections: int,
    seconds: int,
    threads: int,
    tag: str,
    customers: int,
    id_digits: int = 5,
) -> dict[str, float]:
    """One wrk run; every request is a real change to a random customer (see update.lua)."""
    threads = min(threads, connections)
    argv = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
        "--timeout", "10s", "-s", str(SCRIPT), f"http://127.0.0.1:{http_port}{REST_PATH}",
        "--", partner.api_key, partner.api_secret, partner.tenant_id, partner.sub_tenant_id,
        str(customers), tag, str(id_digits), str(threads),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}"
        )
    stats = json.loads(line.removeprefix("BENCH_JSON "))
    socket_errors = stats["connect"] + stats["read"] + stats["write"] + stats["timeout"]
    return {
        "requests": stats["requests"],
        "requests_per_s": round(stats["requests"] / (stats["duration_us"] / 1e6), 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "errors": stats["non_2xx"] + socket_errors,
    }
