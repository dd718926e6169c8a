"""`make run`: the whole stack on one machine, with a demo partner and customer.

Starts the gRPC server and Envoy, onboards the demo partner (once; its secret is
kept in var/demo-partner.json, mode 0600, so re-runs reuse it), ingests the demo
customer through the batch-call REST API (idempotent), prints ready-to-paste
curl and grpcurl lines, and on Ctrl-C or SIGTERM drains Envoy, then the server.
`serve()` runs any number of server replicas behind the one Envoy (`make run-cluster`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from gateway.envoy_process import run_envoy
from gateway.processes import die_with_parent, stop_processes
from server.db import Database, SchemaOutdated
from server.domain import partners
from server.settings import Settings

DEMO_PARTNER = "123"
DEMO_TENANT, DEMO_SUB_TENANT, DEMO_CUSTOMER = "tenant1", "subtenant1", "customer123"
CREDENTIALS_FILE = Path("var/demo-partner.json")
BIN = Path(sys.executable).parent


async def demo_credentials(
    settings: Settings, credentials_file: Path = CREDENTIALS_FILE
) -> dict[str, str]:
    """Migrate the database (once, before any server starts); the demo partner's key and
    secret: created on the first run, reused after (kept in `credentials_file`)."""
    db = Database(settings)
    try:
        await db.create_schema()
        known = [p.partner_id for p, _ in await partners.describe(db)]
        saved = json.loads(credentials_file.read_text()) if credentials_file.exists() else None
        if DEMO_PARTNER not in known:
            issued = await partners.create_partner(db, partner_id=DEMO_PARTNER, name="Demo Partner")
        elif saved is None or saved.get("partner_id") != DEMO_PARTNER:
            issued = await partners.rotate_secret(db, partner_id=DEMO_PARTNER)
        else:
            issued = None
        await partners.grant(
            db, partner_id=DEMO_PARTNER, tenant_id=DEMO_TENANT, sub_tenant_id=DEMO_SUB_TENANT
        )
    finally:
        await db.dispose()
    if issued is not None:
        saved = {
            "partner_id": DEMO_PARTNER,
            "api_key": issued.api_key,
            "api_secret": issued.api_secret,
        }
        credentials_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(saved, out, indent=2)
    assert saved is not None
    return saved


def _headers(creds: dict[str, str]) -> dict[str, str]:
    return {
        "x-api-key": creds["api_key"],
        "x-api-secret": creds["api_secret"],
        "x-tenant-id": DEMO_TENANT,
        "x-sub-tenant-id": DEMO_SUB_TENANT,
    }


def seed_demo_customer(http_port: int, creds: dict[str, str]) -> dict[str, Any]:
    """Ingest the demo call and customer through the public batch-call API."""
    body = {
        "data": [
            {
                "call": {
                    "id": "demo-call-1",
                    "recording_url": "https://recordings.example.com/demo-call-1.mp3",
                    "start_time": "2026-01-05T09:30:00Z",
                    "end_time": "2026-01-05T09:34:10Z",
                    "contact_number": "+14155550123",
                },
                "agent": {"id": "agent-1", "name": "Demo Agent"},
                "customer": {"id": DEMO_CUSTOMER, "name": "Demo Customer"},
            }
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/api/v1/partner/ingest/batch-call",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json", **_headers(creds)},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return dict(json.loads(reply.read()))


def wait_serving(process: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    """Block until the server's health service says SERVING; raise if it exits or times out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"disposition-server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"disposition-server not serving on port {port} after {timeout} s")


def _banner(
    http_port: int, grpc_target: str, creds: dict[str, str], topology: str, credentials_file: Path
) -> str:
    headers = " ".join(f"-H '{k}: {v}'" for k, v in _headers(creds).items())
    update = "/api/v1/partner/ingest/disposition-status"
    body = f'{{"customer_id": "{DEMO_CUSTOMER}", "disposition_status": "interested"}}'
    grpc_body = f'{{"customer_id": "{DEMO_CUSTOMER}", "disposition_status": "callback_requested"}}'
    method = "disposition.v1.DispositionService/UpdateDispositionStatus"
    history = f"/api/v1/partner/customers/{DEMO_CUSTOMER}/disposition-history"
    watch = "disposition.v1.DispositionService/WatchDispositionChanges"
    return f"""
Disposition service is up (Ctrl-C stops it).
  REST (Envoy):  http://127.0.0.1:{http_port}
{topology}
  Demo partner {DEMO_PARTNER}, tenant {DEMO_TENANT}/{DEMO_SUB_TENANT}, customer {DEMO_CUSTOMER}
  Credentials: {credentials_file} (created on the first run, mode 0600)

Try it:
curl -sS -X PUT http://127.0.0.1:{http_port}{update} -H 'Content-Type: application/json' \
-H 'x-partner-id: {DEMO_PARTNER}' {headers} -d '{body}'

.venv/bin/grpcurl -plaintext {headers} -d '{grpc_body}' {grpc_target} {method}

The customer's history, newest first:
curl -sS http://127.0.0.1:{http_port}{history} {headers}

Every change as it commits (a gRPC stream; Ctrl-C ends it):
.venv/bin/grpcurl -plaintext {headers} -d '{{}}' {grpc_target} {watch}
"""


def main() -> int:
    settings = Settings.from_env()
    try:
        creds = asyncio.run(demo_credentials(settings))
    except SchemaOutdated as exc:
        raise SystemExit(f"make run: {exc} (a local demo database can simply be deleted)") from None
    grpc_target = f"127.0.0.1:{settings.grpc_port}"
    return serve(
        settings,
        replicas=[{}],
        creds=creds,
        grpc_target=grpc_target,
        topology=f"  gRPC (direct): {grpc_target}  (reflection on)",
    )


def serve(
    settings: Settings,
    *,
    replicas: Sequence[Mapping[str, str]],
    creds: dict[str, str],
    grpc_target: str,
    topology: str,
    credentials_file: Path = CREDENTIALS_FILE,
    command: str = "make run",
) -> int:
    """Start one `disposition-server` per entry of `replicas` (extra environment; GRPC_PORT
    defaults to settings.grpc_port), then Envoy in front of them all; seed the demo customer,
    print the banner and serve until Ctrl-C/SIGTERM or until every server has exited. Stops
    in order: Envoy's listeners drain, then every server drains its in-flight RPCs at once."""
    http_port = int(os.environ.get("HTTP_PORT", "8080"))
    admin_port = int(os.environ.get("ENVOY_ADMIN_PORT", "9901"))
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    envs = [{**os.environ, "GRPC_PORT": str(settings.grpc_port), **extra} for extra in replicas]
    ports = [int(env["GRPC_PORT"]) for env in envs]
    servers = [
        subprocess.Popen(
            [str(BIN / "disposition-server")],
            env=env,
            start_new_session=True,  # Ctrl-C reaches this launcher, which stops children in order
            preexec_fn=die_with_parent,
        )
        for env in envs
    ]
    with ExitStack() as stack:
        stack.callback(
            stop_processes,
            servers,
            grace=settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + 5,
        )
        try:
            for server, port in zip(servers, ports, strict=True):
                wait_serving(server, port)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{command}: {exc}") from None
        envoy = stack.enter_context(
            run_envoy(grpc_port=ports, http_port=http_port, admin_port=admin_port)
        )
        seeded = seed_demo_customer(envoy.http_port, creds)["data"]["items"][0]["status"]
        print(f"Demo customer {DEMO_CUSTOMER}: call {seeded}.", flush=True)
        banner = _banner(envoy.http_port, grpc_target, creds, topology, credentials_file)
        print(banner, flush=True)
        running = set(range(len(servers)))
        while not stop["signal"] and running:
            for index in sorted(running):
                if servers[index].poll() is not None:
                    running.discard(index)
                    print(
                        f"disposition-server on :{ports[index]} exited with "
                        f"{servers[index].returncode}",
                        flush=True,
                    )
            time.sleep(0.2)
        print("Stopping: draining Envoy, then the gRPC servers...", flush=True)
        _drain_envoy(envoy.admin_port)
    ok = all(server.returncode in (0, -signal.SIGTERM) for server in servers)
    return 0 if ok else 1


def _drain_envoy(admin_port: int) -> None:
    """Stop accepting new connections and let open ones finish (bounded)."""
    try:
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{admin_port}/drain_listeners?graceful&inboundonly",
                method="POST",
            ),
            timeout=2,
        ).close()
        time.sleep(1)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
