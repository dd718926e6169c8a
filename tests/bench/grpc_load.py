"""The gRPC half: batch ingestion, and h2load driving UpdateDispositionStatus on the server.

h2load sends the same body file for every request, and an update that repeats a customer's
current status is the idempotent no-op path (no history row). `BodyRotator` rewrites that file
in place, a few thousand times a second, with a new random customer and the next of ten statuses
of the same length, but h2load 1.52 does not read it again for every request: only about a
quarter of its requests are real changes (`real_change_ratio`, from the history rows written);
the rest are same-status repeats, which take the write path but write nothing. The REST load's
requests are all real changes (update.lua).
h2load cannot see grpc-status (it is a trailer), so each run also ends with one grpcio call.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from devstack import Credentials
from disposition.v1 import call_ingestion_service_pb2 as ingestion_pb2
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc

UPDATE_PATH = "/disposition.v1.DispositionService/UpdateDispositionStatus"
BATCH_SIZE = 1000


def customer_id(index: int, digits: int = 5) -> str:
    """Fixed width (all bodies of a run are the same length, see BodyRotator)."""
    return f"c{index:0{digits}d}"


def _batch(start: int, count: int) -> ingestion_pb2.IngestBatchCallsRequest:
    return ingestion_pb2.IngestBatchCallsRequest(
        data=[
            ingestion_pb2.BatchCallItem(
                call=ingestion_pb2.Call(
                    id=f"bench-call-{i:05d}",
                    recording_url="https://x/a.mp3",
                    start_time="2026-11-26T09:00:00Z",
                    end_time="2026-11-26T09:05:00Z",
                    contact_number="+14155550123",
                ),
                agent=ingestion_pb2.Agent(id="bench-agent"),
                customer=ingestion_pb2.Customer(id=customer_id(i), disposition_status="new"),
            )
            for i in range(start, start + count)
        ]
    )


def batches(start: int, stop: int) -> list[ingestion_pb2.IngestBatchCallsRequest]:
    """IngestBatchCalls requests creating customers start..stop-1, 1,000 per request."""
    return [
        _batch(first, min(BATCH_SIZE, stop - first)) for first in range(start, stop, BATCH_SIZE)
    ]


def ingest(port: int, partner: Credentials, customers: int, clients: int = 2) -> dict[str, float]:
    """Create `customers` customers through IngestBatchCalls, 1,000 per request, `clients`
    requests in flight (built beforehand, so that the client's own protobuf work is not timed
    as the server's); calls/s counts replies, each sent after its batch committed."""
    return send_batches(port, partner, batches(0, customers), clients)


def send_batches(
    port: int,
    partner: Credentials,
    requests: list[ingestion_pb2.IngestBatchCallsRequest],
    clients: int = 2,
    *,
    sub_tenant_id: str | None = None,
) -> dict[str, float]:
    """Send IngestBatchCalls requests, `clients` in flight (as the partner's sub-tenant, or
    `sub_tenant_id`); each must create all its customers."""
    headers = partner.headers()
    if sub_tenant_id is not None:
        headers["x-sub-tenant-id"] = sub_tenant_id
    metadata = tuple(headers.items())
    customers = sum(len(request.data) for request in requests)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingestion_grpc.CallIngestionServiceStub(channel)

        def send(request: ingestion_pb2.IngestBatchCallsRequest) -> int:
            reply = stub.IngestBatchCalls(request, metadata=metadata, timeout=120)
            return int(reply.data.created_customers)

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            created = sum(pool.map(send, requests))
        elapsed = time.perf_counter() - started
    if created != customers:
        raise RuntimeError(f"ingestion created {created} customers, expected {customers}")
    return {
        "customers": customers,
        "requests": len(requests),
        "batch_size": BATCH_SIZE,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "calls_per_s": round(customers / elapsed, 1),
    }


def sample_update(port: int, partner: Credentials, status: str, id_digits: int = 5) -> str:
    """One real UpdateDispositionStatus with grpcio: "OK", or the gRPC code and message."""
    request = disposition_pb2.UpdateDispositionStatusRequest(
        customer_id=customer_id(0, id_digits), disposition_status=status
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = disposition_grpc.DispositionServiceStub(channel)
        try:
            reply = stub.UpdateDispositionStatus(
                request, metadata=tuple(partner.headers().items()), timeout=10
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "OK" if reply.success else "OK but success=false"


def grpc_frame(customer: str, status: str) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    message = disposition_pb2.UpdateDispositionStatusRequest(
        customer_id=customer, disposition_status=status
    ).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


class BodyRotator:
    """Rewrites h2load's body file in place with fresh same-length bodies until stopped."""

    def __init__(
        self, path: Path, customers: int, tag: str, interval: float = 0.0002, digits: int = 5
    ) -> None:
        self.path, self.customers, self.tag, self.interval = path, customers, tag, interval
        self.digits = digits
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        path.write_bytes(self._next())

    def _next(self) -> bytes:
        self.written += 1
        customer = customer_id(random.randrange(self.customers), self.digits)
        return grpc_frame(customer, f"g{self.tag}-{self.written % 10}")  # ten statuses in turn

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self._stop.is_set():
                os.pwrite(fd, self._next(), 0)
                time.sleep(self.interval)
        finally:
            os.close(fd)

    def __enter__(self) -> BodyRotator:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")


def run_h2load(
    *,
    port: int,
    partner: Credentials,
    connections: int,
    seconds: int,
    workdir: Path,
    tag: str,
    customers: int,
    id_digits: int = 5,
) -> dict[str, float]:
    """One h2load run of `seconds` with `connections` clients, one stream in flight each."""
    body, log_file = workdir / f"body-{tag}.bin", workdir / f"h2load-{tag}.tsv"
    headers = {"content-type": "application/grpc", "te": "trailers", **partner.headers()}
    argv = ["h2load", "-c", str(connections), "-m", "1", "-t", "1", "-D", str(seconds)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv += ["-d", str(body), "--log-file", str(log_file), f"http://127.0.0.1:{port}{UPDATE_PATH}"]
    with BodyRotator(body, customers, tag, digits=id_digits) as rotator:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    out = done.stdout
    requests, codes, finished = _REQUESTS.search(out), _CODES.search(out), _FINISHED.search(out)
    if done.returncode != 0 or not (requests and codes and finished):
        raise RuntimeError(
            f"h2load failed ({done.returncode}): {out[-2000:]} {done.stderr[-2000:]}"
        )
    _total, _started, completed, _ok, failed, errored, timeouts = map(int, requests.groups())
    not_2xx = sum(int(n) for n in codes.groups()[1:])
    latencies_ms = sorted(
        int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line
    )
    return {
        "requests": completed,
        "requests_per_s": float(finished.group(3)),
        "p50_ms": round(statistics.median(latencies_ms), 3) if latencies_ms else 0.0,
        "p99_ms": round(_percentile(latencies_ms, 99), 3),
        "errors": failed + errored + timeouts + not_2xx,
        "bodies_written": rotator.written,
    }


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
