"""What developers and operators touch: grpcurl through reflection, the admin CLI's contract,
and `make run`'s launcher (real processes, real ports, real database files)."""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import ServerProcess, free_port
from disposition.v1 import disposition_service_pb2 as pb
from disposition.v1 import disposition_service_pb2_grpc as pb_grpc
from server.schema import head_revision
from tests.support import BIN, REPO
from tests.support.admin import admin
from tests.support.databases import PostgresSchemas, sql
from tests.support.http_client import call
from tests.support.payloads import batch_item

UPDATE_PATH = "/api/v1/partner/ingest/disposition-status"


def onboard_via_cli(database_url: str, partner_id: str) -> dict[str, str]:
    """Create a partner granted tenant1/subtenant1 with the CLI; its key and secret."""
    created = admin(database_url, "partner", "create", "--partner-id", partner_id, "--name", "P")
    granted = admin(
        database_url, "grant", "--partner-id", partner_id,
        "--tenant-id", "tenant1", "--sub-tenant-id", "subtenant1",
    )  # fmt: skip
    assert created.returncode == granted.returncode == 0, created.stderr + granted.stderr
    return dict(json.loads(created.stdout))


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60
    )


def test_admin_cli_contract(database_url: str) -> None:
    created = admin(database_url, "partner", "create", "--partner-id", "p1", "--name", "P One")
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    assert set(issued) == {"partner_id", "api_key", "api_secret", "webhook_secret"}
    again = admin(database_url, "partner", "create", "--partner-id", "p1", "--name", "P One")
    assert (again.returncode, again.stdout) == (4, "")
    assert "already exists" in again.stderr
    missing = admin(
        database_url, "grant", "--partner-id", "nope", "--tenant-id", "t", "--sub-tenant-id", "s"
    )
    assert missing.returncode == 3 and "no partner 'nope'" in missing.stderr
    usage = admin(
        database_url,
        "partner",
        "create",
        "--partner-id",
        "p2",
        "--name",
        "x",
        "--rate-limit-per-minute",
        "0",
    )
    assert usage.returncode == 2
    grant = admin(
        database_url, "grant", "--partner-id", "p1", "--tenant-id", "t", "--sub-tenant-id", "*"
    )
    assert grant.returncode == 0 and json.loads(grant.stdout)["changed"] is True
    assert (
        json.loads(
            admin(
                database_url,
                "grant",
                "--partner-id",
                "p1",
                "--tenant-id",
                "t",
                "--sub-tenant-id",
                "*",
            ).stdout
        )["changed"]
        is False
    )
    listed = json.loads(admin(database_url, "list").stdout)
    assert listed == [
        {
            "partner_id": "p1",
            "name": "P One",
            "enabled": True,
            "rate_limit_per_minute": None,
            "grants": [{"tenant_id": "t", "sub_tenant_id": "*"}],
        }
    ]
    assert issued["api_secret"] not in json.dumps(listed)
    assert admin(database_url, "partner", "disable", "--partner-id", "p1").returncode == 0
    assert (
        admin(
            database_url, "revoke", "--partner-id", "p1", "--tenant-id", "t", "--sub-tenant-id", "*"
        ).returncode
        == 0
    )
    assert (
        admin(
            database_url, "revoke", "--partner-id", "p1", "--tenant-id", "t", "--sub-tenant-id", "*"
        ).returncode
        == 3
    )
    rotated = json.loads(
        admin(database_url, "partner", "rotate-secret", "--partner-id", "p1").stdout
    )
    assert rotated["api_secret"] != issued["api_secret"]
    stored = [row[0] for row in sql(database_url, "SELECT secret_sha256 FROM partner_credentials")]
    assert issued["api_secret"] not in stored and rotated["api_secret"] not in stored


def test_grpcurl_through_reflection(database_url: str, tmp_path: Path) -> None:
    creds = onboard_via_cli(database_url, "g")
    server = ServerProcess(database_url, tmp_path / "server.log")
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        listed = grpcurl(address, "list")
        assert listed.stdout.split() == [
            "disposition.v1.CallIngestionService",
            "disposition.v1.DispositionService",
            "disposition.v1.WebhookService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        described = grpcurl(address, "describe", "disposition.v1.UpdateDispositionStatusRequest")
        assert "optional string disposition_status = 2 [" in described.stdout  # its options next
        assert "(.disposition.v1.rules)" in described.stdout
        headers = [
            "-H", f"x-api-key: {creds['api_key']}", "-H", f"x-api-secret: {creds['api_secret']}",
            "-H", "x-tenant-id: tenant1", "-H", "x-sub-tenant-id: subtenant1",
        ]  # fmt: skip
        batch = json.dumps({"data": [batch_item("g-call", "customer123")]})
        ingested = grpcurl(
            *headers, "-d", batch, address, "disposition.v1.CallIngestionService/IngestBatchCalls"
        )
        assert ingested.returncode == 0, ingested.stderr
        body = json.dumps({"customer_id": "customer123", "disposition_status": "interested"})
        updated = grpcurl(
            *headers,
            "-d",
            body,
            address,
            "disposition.v1.DispositionService/UpdateDispositionStatus",
        )
        assert (updated.returncode, json.loads(updated.stdout)) == (0, {"success": True})
        missing = grpcurl(
            *headers,
            "-d",
            '{"customer_id": "ghost"}',
            address,
            "disposition.v1.DispositionService/UpdateDispositionStatus",
        )
        assert missing.returncode != 0
        assert (
            "Code: NotFound" in missing.stderr and "Message: Customer not found" in missing.stderr
        )
        assert "CUSTOMER_NOT_FOUND" in missing.stderr
    finally:
        server.stop()


def start_launcher(
    workdir: Path, ports: dict[str, str], module: str = "devstack.run"
) -> tuple[subprocess.Popen[str], list[str]]:
    """`make run`'s launcher (or `module`'s) in a scratch directory (its own VAR_DIR), until it
    prints its banner."""
    env = {
        **os.environ, **ports, "VAR_DIR": str(workdir / "var"), "LOG_LEVEL": "WARNING",
        "SHUTDOWN_GRACE_SECONDS": "3",
    }  # fmt: skip
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", module],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(".venv/bin/grpcurl"):
            return process, lines
    process.kill()
    raise AssertionError("launcher printed no banner:\n" + "\n".join(lines))


@pytest.mark.envoy
def test_make_run_launcher_serves_the_printed_curl_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {
        "HTTP_PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "ENVOY_ADMIN_PORT": str(free_port()),
    }
    (tmp_path / "build").symlink_to(REPO / "build")  # the descriptor set from `make gen`
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    for attempt in range(2):  # a second run on the same database keeps every row
        process, lines = start_launcher(tmp_path, ports)
        try:
            curl = next(line for line in lines if line.startswith("curl "))
            grpc_line = next(line for line in lines if line.startswith(".venv/bin/grpcurl"))
            reply = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
            assert reply.stdout == '{"success":true}'
            via_grpc = subprocess.run(
                shlex.split(grpc_line), cwd=tmp_path, capture_output=True, text=True, timeout=30
            )
            assert json.loads(via_grpc.stdout) == {"success": True}
            docs = next(line.split()[2] for line in lines if line.startswith("  Docs page:"))
            with urllib.request.urlopen(docs, timeout=10) as page:
                assert (page.status, page.headers["content-type"]) == (
                    200,
                    "text/html; charset=utf-8",
                )
            expected = "created" if attempt == 0 else "duplicate"
            assert f"Demo customer customer123: call {expected}." in lines
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        assert re.search(r"dk_[0-9a-f]{32}", curl)
    with sqlite3.connect(tmp_path / "var" / "disposition.db") as conn:
        assert conn.execute("SELECT count(*) FROM partners").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (1,)
        # interested, callback_requested; then interested, callback_requested again.
        assert conn.execute("SELECT count(*) FROM disposition_history").fetchone() == (4,)
    assert oct((tmp_path / "var" / "demo-partner.json").stat().st_mode & 0o777) == "0o600"
    for port in ports.values():  # Envoy and the server are gone, not orphaned
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still open"


def free_port_pairs(count: int) -> list[int]:
    """`count` ports p, each with p and p + 1 free (make run-cluster numbers its replicas' ports).

    Drawn below the kernel's ephemeral range, which the other ports of the run (free_port(),
    outgoing connections) come from, and each one bound while the rest are drawn, so that no
    two pairs overlap and nothing else takes p + 1 between the check and the server's bind.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.Random()
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        for _ in range(200):
            if len(bases) == count:
                return bases
            base = rng.randrange(10_000, ephemeral_low - 1)
            pair = [socket.socket(), socket.socket()]
            try:
                for port, sock in zip((base, base + 1), pair, strict=True):
                    sock.bind(("127.0.0.1", port))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held += pair
            bases.append(base)
    finally:
        for sock in held:
            sock.close()
    raise AssertionError(f"no {count} pairs of consecutive free ports")


@pytest.mark.envoy
@pytest.mark.postgres
def test_make_run_cluster_serves_the_printed_lines_through_both_replicas(
    tmp_path: Path, postgres: PostgresSchemas | None
) -> None:
    """`make run-cluster` on an empty schema: migrates it once, starts 2 replicas and Envoy,
    and the printed curl and grpcurl lines work; SIGTERM stops everything, exit 0."""
    if postgres is None:
        pytest.skip("TEST_POSTGRES_URL is not set (e.g. postgresql+asyncpg://…/test)")
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    schema = f"{postgres.prefix}_launcher"
    postgres.created.append(schema)  # dropped with the run's other schemas
    grpc_port, metrics_port = free_port_pairs(2)
    env = {
        "HTTP_PORT": str(free_port()),
        "GRPC_PORT": str(grpc_port),
        "ENVOY_ADMIN_PORT": str(free_port()),
        "METRICS_PORT": str(metrics_port),
        "DATABASE_URL": postgres.url(schema),
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"test-launcher-{secrets.token_hex(4)}:",
        "REPLICAS": "2",
    }
    (tmp_path / "build").symlink_to(REPO / "build")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    process, lines = start_launcher(tmp_path, env, module="devstack.cluster")
    try:
        assert f"  2 replicas: 127.0.0.1:{grpc_port} (metrics :{metrics_port}), " in "\n".join(
            lines
        )
        curl = next(line for line in lines if line.startswith("curl "))
        grpc_line = next(line for line in lines if line.startswith(".venv/bin/grpcurl"))
        assert f"127.0.0.1:{env['HTTP_PORT']} " in grpc_line  # through Envoy
        for _ in range(6):  # round robin: both replicas serve some
            reply = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
            assert reply.stdout == '{"success":true}'
        via_grpc = subprocess.run(
            shlex.split(grpc_line), cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert json.loads(via_grpc.stdout) == {"success": True}
        served = []
        for port in (metrics_port, metrics_port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                text = page.read().decode()
            served.append(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("disposition_grpc_requests_total{")
                    and "UpdateDispositionStatus" in line
                    and 'code="OK"' in line
                )
            )
        assert all(count > 0 for count in served), served
        assert sum(served) == 7
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    version = sql(env["DATABASE_URL"], "SELECT version_num FROM alembic_version")
    assert version == [(head_revision(),)]
    history = sql(env["DATABASE_URL"], "SELECT count(*) FROM disposition_history")
    assert history == [(2,)]  # interested (the first curl; the others change nothing), callback


@dataclass
class Served:
    server: ServerProcess
    stub: pb_grpc.DispositionServiceStub
    metadata: tuple[tuple[str, str], ...]
    db_file: str

    def update(self, status: str, timeout: float = 30) -> grpc.Future:
        request = pb.UpdateDispositionStatusRequest(
            customer_id="customer123", disposition_status=status
        )
        return self.stub.UpdateDispositionStatus.future(
            request, metadata=self.metadata, timeout=timeout
        )


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    """A server process with partner `d` and customer123 ingested through grpcurl."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only: these tests hold the file's write lock with sqlite3")
    creds = onboard_via_cli(database_url, "d")
    server = ServerProcess(database_url, tmp_path / "server.log", SHUTDOWN_GRACE_SECONDS="20")
    server.start()
    metadata = (
        ("x-api-key", creds["api_key"]), ("x-api-secret", creds["api_secret"]),
        ("x-tenant-id", "tenant1"), ("x-sub-tenant-id", "subtenant1"),
    )  # fmt: skip
    try:
        ingested = grpcurl(
            *[x for k, v in metadata for x in ("-H", f"{k}: {v}")],
            "-d", json.dumps({"data": [batch_item("d-call", "customer123")]}),
            f"127.0.0.1:{server.port}", "disposition.v1.CallIngestionService/IngestBatchCalls",
        )  # fmt: skip
        assert ingested.returncode == 0, ingested.stderr
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.DispositionServiceStub(channel)
            yield Served(server, stub, metadata, database_url.split("///", 1)[1])
    finally:
        server.stop()


def wait_for_log(server: ServerProcess, message: str, timeout: float = 30) -> None:
    """Until the server has logged a line with `message`."""
    deadline = time.monotonic() + timeout
    while not any(line.get("message") == message for line in server.log_lines()):
        assert time.monotonic() < deadline, f"the server never logged {message!r}"
        time.sleep(0.02)


def stored(db_file: str) -> tuple[str | None, list[tuple[str | None, str | None]]]:
    with sqlite3.connect(db_file) as conn:
        status = conn.execute("SELECT disposition_status FROM customers").fetchone()[0]
        rows = conn.execute(
            "SELECT previous_status, new_status FROM disposition_history ORDER BY id"
        ).fetchall()
    return status, rows


def test_sigterm_drains_in_flight_requests(served: Served) -> None:
    """An update blocked on the database when SIGTERM arrives still completes and commits."""
    blocker = sqlite3.connect(served.db_file, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the update must wait
    future = served.update("interested")
    time.sleep(0.5)  # for the update to reach the server: nothing outside it shows that
    assert not future.done()
    served.server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for_log(served.server, "draining")  # the drain has begun with the update in flight
    assert not future.done()
    blocker.execute("COMMIT")
    blocker.close()
    assert future.result().success is True
    assert served.server.process.wait(30) == 0  # type: ignore[union-attr]
    assert stored(served.db_file) == ("interested", [(None, "interested")])
    # The update finished after the drain began, before the server stopped.
    assert [e["message"] for e in served.server.log_lines()][-3:] == ["draining", "rpc", "stopped"]


def test_sigterm_with_a_drain_period_keeps_serving_while_reporting_not_serving(
    served: Served,
) -> None:
    """SHUTDOWN_DRAIN_SECONDS: after SIGTERM the health check says NOT_SERVING at once (so a
    load balancer stops routing here), and RPCs that still arrive meanwhile are served."""
    server = served.server
    server.stop()
    server.env["SHUTDOWN_DRAIN_SECONDS"] = "5"
    server.start()
    assert server.process is not None
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        # NOT_SERVING before the drain ends (after it, the server stops and Check fails).
        deadline = time.monotonic() + 30
        while health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "still SERVING after SIGTERM"
            time.sleep(0.05)
        stub = pb_grpc.DispositionServiceStub(channel)
        request = pb.UpdateDispositionStatusRequest(
            customer_id="customer123", disposition_status="during-drain"
        )
        assert stub.UpdateDispositionStatus(request, metadata=served.metadata, timeout=5).success
    assert server.process.wait(30) == 0
    assert stored(served.db_file) == ("during-drain", [(None, "during-drain")])
    assert [e["message"] for e in server.log_lines()][-3:] == ["draining", "rpc", "stopped"]


def test_abandoned_requests_never_wedge_the_writer(served: Served) -> None:
    """Clients that give up while their update waits for the database leave no open
    transaction behind: later updates commit, and the history stays one unbroken chain."""
    blocker = sqlite3.connect(served.db_file, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    abandoned = [served.update(f"gave-up-{i}", timeout=0.3) for i in range(3)]
    for future in abandoned:
        with pytest.raises(grpc.RpcError) as caught:
            future.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.execute("COMMIT")
    blocker.close()
    assert served.update("after", timeout=20).result().success is True
    status, rows = stored(served.db_file)
    assert status == "after"
    chain = [None] + [new for _, new in rows]
    assert [previous for previous, _ in rows] == chain[:-1]


def test_server_start_freezes_start_up_objects_and_raises_the_young_gc_threshold() -> None:
    # In a process of its own: pytest's collector must keep its own settings.
    probe = (
        "import gc, json; from server.main import tune_gc; before = gc.get_threshold(); "
        "tune_gc(); print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    before, after, frozen = json.loads(done.stdout)
    assert after == [10_000, before[1], before[2]]
    assert frozen > 10_000  # the modules' objects at least


@pytest.mark.envoy
def test_restarting_the_make_run_stack_under_writes_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM to the whole `make run` stack while writers are busy: every write it
    acknowledged is there after the restart, and nothing else came back but the envelope."""
    ports = {
        "HTTP_PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "ENVOY_ADMIN_PORT": str(free_port()),
        "RATE_LIMIT_PER_MINUTE": "1000000",  # the demo partner has the default limit
    }
    (tmp_path / "build").symlink_to(REPO / "build")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    process, _ = start_launcher(tmp_path, ports)
    creds = json.loads((tmp_path / "var" / "demo-partner.json").read_text())
    headers = {"x-api-key": creds["api_key"], "x-api-secret": creds["api_secret"],
               "x-tenant-id": "tenant1", "x-sub-tenant-id": "subtenant1"}  # fmt: skip
    acked: list[str] = []
    other: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        n = 0
        while not stop.is_set():
            status = f"w{k}-{n}"
            n += 1
            try:
                reply = call(int(ports["HTTP_PORT"]), "PUT", UPDATE_PATH,
                             json.dumps({"customer_id": "customer123",
                                         "disposition_status": status}), headers)  # fmt: skip
            except OSError:
                return  # Envoy has gone: the stack is down
            if reply.status == 200:
                acked.append(status)
            else:
                other.append((reply.status, reply.body))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acked) <= 10:  # the writers have got going
        assert time.monotonic() < deadline, f"only {len(acked)} writes acknowledged: {other[:3]}"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    for status, body in other:  # refused while stopping: the envelope, never a 500
        assert status == 503 and json.loads(body)["success"] is False, (status, body)
    process, _ = start_launcher(tmp_path, ports)
    try:
        with sqlite3.connect(tmp_path / "var" / "disposition.db") as conn:
            stored = {row[0] for row in conn.execute("SELECT new_status FROM disposition_history")}
        assert set(acked) <= stored, sorted(set(acked) - stored)[:5]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
