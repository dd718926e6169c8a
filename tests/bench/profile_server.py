"""Where a server's time goes under update load: py-spy against the running process.

    .venv/bin/python -m tests.bench.profile_server [--seconds 15] [--connections 64] [--rest]
        [--gil] [--native] [--postgres] [--noop] [--ingest N] [--webhooks N]

Starts the single topology (fresh SQLite, one disposition-server, Envoy; `--postgres`: one
server on PostgreSQL + Redis), ingests the bench customers, then samples the server with
`py-spy record --format raw` (installed into the venv on first use) while h2load (gRPC direct)
or wrk (`--rest`, through Envoy) drives updates (`--noop`: the ceiling's no-op server instead,
for comparison; `--webhooks N`: with N webhook endpoints receiving every change, on
webhook_receiver.py). Prints the samples by stage (each stack counted once, in the innermost stage
it reaches; with `--gil`, as µs of the GIL per request), the busiest functions by own and by
inclusive samples, and where the raw folded stacks are (feed them to any flame graph renderer).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from tests.bench import grpc_load, rest_load
from tests.bench.stack import BIN, ceiling_for, cluster_topology, single_topology
from tests.bench.webhook_receiver import receiver_process
from tests.bench.webhooks import SERVER_ENV, Endpoints, probe


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(BIN))
    if found is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        found = str(BIN / "py-spy")
    return found


# Stages of a request, checked from the innermost frame outwards; the first that matches wins.
STAGES = (
    ("write: unit of work (engine, SQL, decide)", ("storage/", "_decide", "asyncpg", "sqlalchemy",
                                                   "aiosqlite", "sqlite3")),
    ("webhooks: HTTP client", ("webhook_http.py",)),
    ("webhooks: dispatcher (reads, signing, records)", ("webhooks.py",)),
    ("write: group commit queue", ("update_groups.py",)),
    ("log + metrics", ("metrics.py", "prometheus_client", "_log_rpc", "logging/")),
    ("gates: authentication, tenant, rate limit", ("access.py", "access_cache.py",
                                                   "credentials.py", "ratelimit.py", "_admit",
                                                   "redis/")),
    ("request context: id, headers", ("_begin", "_headers", "_request_id", "context.py")),
    ("use case: validation", ("dispositions.py", "validation.py")),
    ("servicer: protobuf <-> domain", ("servicers.py",)),
    ("interceptor: wrapper, error translation", ("interceptors.py",)),
)  # fmt: skip
TRANSPORT = "transport + event loop (grpc.aio, asyncio)"
RATE = 250  # samples per second


def stages(folded: Path, *, rate: float, requests: int) -> str:
    """Samples per stage; µs per request assuming one sample is 1/rate seconds (--gil)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in _samples(folded):
        total += count
        counts[_stage(frames)] += count
    lines = [f"-- by stage ({total} samples; µs/req if every sample held the GIL)"]
    for name, count in counts.most_common():
        us = 1e6 * count / rate / requests if requests else 0.0
        lines.append(f"{100 * count / total:6.1f}%  {us:7.1f} µs/req  {name}")
    return "\n".join(lines)


def _samples(folded: Path) -> Iterator[tuple[list[str], int]]:
    """(frames, outermost first; sample count) of each line of py-spy's raw folded output."""
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack:
            yield stack.split(";"), int(count_text)


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return name
    return TRANSPORT


def summarize(folded: Path, top: int) -> str:
    """Own and inclusive sample shares per function (`name (file:line)` frames)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in _samples(folded):
        frames = [_short(frame) for frame in stack]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    for title, counter in (("own", own), ("inclusive", inclusive)):
        lines.append(f"-- top {top} by {title} samples")
        for frame, count in counter.most_common(top):
            lines.append(f"{100 * count / total:6.1f}%  {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`fn (path/to/file.py:12)` -> `fn (file.py)`: lines differ within one function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--rest", action="store_true", help="wrk through Envoy, not gRPC direct")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--native", action="store_true", help="C and Cython frames too")
    parser.add_argument("--noop", action="store_true", help="profile the ceiling's no-op server")
    parser.add_argument(
        "--ingest", type=int, default=0, metavar="N",
        help="profile IngestBatchCalls of N more customers instead of update load",
    )  # fmt: skip
    parser.add_argument(
        "--webhooks", type=int, default=0, metavar="N",
        help="N webhook endpoints receive every change (a local receiver; SQLite only)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres", action="store_true",
        help="one server on PostgreSQL + Redis (TEST_POSTGRES_URL, TEST_REDIS_URL), not SQLite",
    )  # fmt: skip
    args = parser.parse_args(argv)
    py_spy = _py_spy()
    workdir = Path(tempfile.mkdtemp(prefix="profile-"))
    with ExitStack() as stack:
        if args.postgres:
            topology = cluster_topology(
                workdir, stack, replicas=1,
                database_url=os.environ.get("TEST_POSTGRES_URL")
                or "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
                redis_url=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
            )  # fmt: skip
        else:
            topology = single_topology(workdir, stack, server_env=SERVER_ENV)
        grpc_load.ingest(topology.grpc_port, topology.partner, args.customers)
        if args.webhooks:
            receiver = stack.enter_context(receiver_process(workdir / "receiver.log"))
            paths = [f"/profile/{k}" for k in range(args.webhooks)]
            for path in paths:
                Endpoints(topology).create(receiver.url(path))
            probe(topology, receiver, paths, "prof")
        pid, grpc_port, http_port = topology.pids[0], topology.grpc_port, topology.envoy.http_port
        if args.noop:
            ceiling = ceiling_for(topology, workdir, stack)
            pid, grpc_port, http_port = ceiling.pids[0], ceiling.grpc_port, ceiling.envoy.http_port
        folded = workdir / "server.folded"
        record = [py_spy, "record", "-p", str(pid), "-d", str(args.seconds + 1),
                  "-r", str(RATE), "--format", "raw", "-o", str(folded)]  # fmt: skip
        if args.gil:
            record.append("--gil")
        # C and Cython frames need the process paused for each sample; else it runs on.
        record.append("--native" if args.native else "--nonblocking")
        # Built before sampling starts: the client's protobuf work is not the server's.
        batches = grpc_load.batches(args.customers, args.customers + args.ingest)
        spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        common = {"partner": topology.partner, "customers": args.customers,
                  "connections": args.connections, "seconds": args.seconds}  # fmt: skip
        if args.ingest:
            result = grpc_load.send_batches(grpc_port, topology.partner, batches)
        elif args.rest:
            result = rest_load.run_wrk(
                http_port=http_port, threads=os.cpu_count() or 1, tag="p", **common
            )
        else:
            result = grpc_load.run_h2load(port=grpc_port, workdir=workdir, tag="p",
                                          **common)  # fmt: skip
        _, err = spy.communicate(timeout=120)
        if spy.returncode != 0:
            print(err.decode(errors="replace"), file=sys.stderr)
            return 1
    if args.ingest:
        print(f"ingestion: {result['calls_per_s']} calls/s in {result['seconds']} s")
        requests = int(result["customers"])
    else:
        print(f"load: {result['requests_per_s']} req/s, p99 {result['p99_ms']} ms, "
              f"errors {result['errors']}")  # fmt: skip
        requests = int(result["requests"])
    print(stages(folded, rate=RATE, requests=requests))
    print(summarize(folded, args.top))
    print(f"folded stacks: {folded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
