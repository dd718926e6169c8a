"""What developers and operators touch: grpcurl through reflection, the admin CLI's contract,
and `make run`'s launcher (real processes, real ports, real database files)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import BIN, REPO, ServerProcess, batch_item


def admin(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "disposition-admin"), *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    assert set(issued) == {"partner_id", "api_key", "api_secret"}
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
    db_file = database_url.split("///", 1)[1]
    with sqlite3.connect(db_file) as conn:
        stored = [row[0] for row in conn.execute("SELECT secret_sha256 FROM partner_credentials")]
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
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        described = grpcurl(address, "describe", "disposition.v1.UpdateDispositionStatusRequest")
        assert "optional string disposition_status = 2;" in described.stdout
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_launcher(workdir: Path, ports: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """`make run`'s launcher in a scratch directory (its own var/), until it prints its banner."""
    env = {**os.environ, **ports, "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_SECONDS": "3"}
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "gateway.stack"],
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


def test_sigterm_drains_in_flight_requests(database_url: str, tmp_path: Path) -> None:
    """An update blocked on the database when SIGTERM arrives still completes and commits."""
    import grpc

    from disposition.v1 import disposition_service_pb2 as pb
    from disposition.v1 import disposition_service_pb2_grpc as pb_grpc

    creds = onboard_via_cli(database_url, "d")
    server = ServerProcess(database_url, tmp_path / "server.log", SHUTDOWN_GRACE_SECONDS="20")
    server.start()
    metadata = (
        ("x-api-key", creds["api_key"]), ("x-api-secret", creds["api_secret"]),
        ("x-tenant-id", "tenant1"), ("x-sub-tenant-id", "subtenant1"),
    )  # fmt: skip
    db_file = database_url.split("///", 1)[1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            grpcurl_batch = json.dumps({"data": [batch_item("d-call", "customer123")]})
            ingested = grpcurl(
                *[x for k, v in metadata for x in ("-H", f"{k}: {v}")],
                "-d",
                grpcurl_batch,
                f"127.0.0.1:{server.port}",
                "disposition.v1.CallIngestionService/IngestBatchCalls",
            )
            assert ingested.returncode == 0, ingested.stderr
            stub = pb_grpc.DispositionServiceStub(channel)
            blocker = sqlite3.connect(db_file, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the update must wait
            future = stub.UpdateDispositionStatus.future(
                pb.UpdateDispositionStatusRequest(
                    customer_id="customer123", disposition_status="interested"
                ),
                metadata=metadata,
                timeout=30,
            )
            time.sleep(0.5)
            assert not future.done()
            server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            time.sleep(0.5)
            blocker.execute("COMMIT")
            blocker.close()
            assert future.result().success is True
        assert server.process.wait(30) == 0  # type: ignore[union-attr]
        with sqlite3.connect(db_file) as conn:
            assert conn.execute("SELECT disposition_status FROM customers").fetchone() == (
                "interested",
            )
        # The update finished after the drain began, before the server stopped.
        assert [e["message"] for e in server.log_lines()][-3:] == ["draining", "rpc", "stopped"]
    finally:
        server.stop()
