"""The dev stack (devstack/): ports checked before anything starts, readiness by a server's own
"serving" line, Envoy on loopback unless HTTP_HOST says otherwise, and the launchers' refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devstack import PortTaken, ServerProcess, ServerStartError, check_free, free_port, run_envoy
from devstack.server import serving_port
from tests.support import BIN, REPO
from tests.support.databases import sql


@contextmanager
def held_port() -> Iterator[int]:
    """A port another program is listening on, for the length of the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@contextmanager
def held_pair() -> Iterator[tuple[int, int]]:
    """Ports p and p + 1: p free, p + 1 held by a listener, for the length of the block."""
    for _ in range(100):
        with socket.socket() as base, socket.socket() as next_one:
            base.bind(("127.0.0.1", 0))
            port = int(base.getsockname()[1])
            try:
                next_one.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            next_one.listen()
            base.close()
            yield port, port + 1
            return
    raise AssertionError("no two consecutive ports")


def test_check_free_names_the_variable_of_a_taken_port() -> None:
    with held_port() as taken:
        with pytest.raises(PortTaken) as refused:
            check_free([("HTTP_PORT", free_port()), ("GRPC_PORT", taken)])
        assert str(refused.value) == f"GRPC_PORT {taken} is in use; set GRPC_PORT=<a free port>"
    # Replicas number their ports from one variable: the message says which one is taken.
    with held_pair() as (base, taken):
        with pytest.raises(PortTaken) as refused:
            check_free([("GRPC_PORT", base), ("GRPC_PORT", taken)])
        assert str(refused.value).startswith(f"GRPC_PORT+1 {taken} is in use; set GRPC_PORT=")
    check_free([("HTTP_PORT", 0), ("GRPC_PORT", free_port())])  # 0 and free ports pass


def test_serving_port_reads_only_a_serving_line() -> None:
    assert serving_port(b'{"message": "serving", "port": 50051}\n') == 50051
    assert serving_port(b'{"message": "rpc", "method": "serving"}\n') is None
    assert serving_port(b'not json but says "serving"\n') is None


def test_a_server_that_cannot_bind_its_port_is_never_ready(
    database_url: str, tmp_path: Path
) -> None:
    """The trap of a taken GRPC_PORT: a health check on the port would be answered by whichever
    server holds it. Readiness is this process's own "serving" line, so a server that cannot
    bind is reported as exited, with its log, and the other server is untouched."""
    other = ServerProcess(database_url, tmp_path / "other.log")
    port = other.start()
    try:
        second = ServerProcess(database_url, tmp_path / "second.log", GRPC_PORT=str(port))
        with pytest.raises(ServerStartError, match="exited with"):
            second.start(timeout=30)
        assert second.process is not None and second.process.returncode == 2
        log = (tmp_path / "second.log").read_text()
        assert f"disposition-server: cannot listen on GRPC_PORT {port} " in log
        assert "Traceback" not in log
        assert other.process is not None and other.process.poll() is None
    finally:
        other.stop()


def _listener_address(admin_port: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{admin_port}/listeners?format=json", timeout=5
    ) as reply:
        (listener,) = json.loads(reply.read())["listener_statuses"]
    return str(listener["local_address"]["socket_address"]["address"])


@pytest.mark.envoy
def test_envoy_listens_on_loopback_unless_http_host_says_otherwise(tmp_path: Path) -> None:
    with run_envoy(grpc_port=free_port(), log_path=tmp_path / "envoy.log") as envoy:
        assert _listener_address(envoy.admin_port) == "127.0.0.1"
    with run_envoy(
        grpc_port=free_port(), http_host="0.0.0.0", log_path=tmp_path / "envoy.log"
    ) as envoy:
        assert _listener_address(envoy.admin_port) == "0.0.0.0"
    assert "address: 127.0.0.1, port_value: 8080" in (REPO / "envoy.yaml").read_text()


def _launch(module: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "python"), "-m", module],
        env={**os.environ, "VAR_DIR": str(tmp_path / "var"), **env},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("variable", ["GRPC_PORT", "HTTP_PORT", "ENVOY_ADMIN_PORT"])
def test_make_run_refuses_a_taken_port_in_one_line_before_starting_anything(
    tmp_path: Path, variable: str
) -> None:
    ports = {name: str(free_port()) for name in ("GRPC_PORT", "HTTP_PORT", "ENVOY_ADMIN_PORT")}
    with held_port() as taken:
        done = _launch("devstack.run", tmp_path, **{**ports, variable: str(taken)})
    assert done.returncode == 2
    assert done.stderr == f"make run: {variable} {taken} is in use; set {variable}=<a free port>\n"
    assert "is up" not in done.stdout
    assert not (tmp_path / "var").exists()  # no database, no credentials


def test_make_run_beside_another_stack_seeds_nothing_into_it(
    tmp_path: Path, database_url: str
) -> None:
    """The trap as a user met it: `make run` with GRPC_PORT held by another server."""
    other = ServerProcess(database_url, tmp_path / "other.log")
    port = other.start()
    try:
        done = _launch(
            "devstack.run", tmp_path, GRPC_PORT=str(port), HTTP_PORT=str(free_port()),
            ENVOY_ADMIN_PORT=str(free_port()),
        )  # fmt: skip
    finally:
        other.stop()
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"make run: GRPC_PORT {port} is in use; set GRPC_PORT=<a free port>"
    ]
    assert "Disposition service is up" not in done.stdout
    assert sql(database_url, "SELECT count(*) FROM partners")[0][0] == 0


def test_make_run_cluster_refuses_a_taken_replica_port(tmp_path: Path) -> None:
    """Checked before PostgreSQL or Redis are asked anything (so this runs without them)."""
    with held_pair() as (base, taken):
        done = _launch(
            "devstack.cluster", tmp_path, GRPC_PORT=str(base), REPLICAS="2",
            HTTP_PORT=str(free_port()), ENVOY_ADMIN_PORT=str(free_port()),
            METRICS_PORT=str(free_port()),
            DATABASE_URL="postgresql+asyncpg://nobody@127.0.0.1:1/none",
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"make run-cluster: GRPC_PORT+1 {taken} is in use; set GRPC_PORT=<a free port>"
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HTTP_PORT": "abc"}, "make run: HTTP_PORT must be a port number, got 'abc'"),
        ({"ENVOY_ADMIN_PORT": "70000"}, "make run: ENVOY_ADMIN_PORT must be between 1 and 65535"),
        ({"SHUTDOWN_GRACE_SECONDS": "abc"}, "make run: SHUTDOWN_GRACE_SECONDS must be"),
    ],
)
def test_make_run_refuses_bad_settings_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    done = _launch("devstack.run", tmp_path, **env)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr
