"""`make run`: the whole service on one machine, with a demo partner and customer.

Checks that its ports are free, migrates the database, onboards the demo partner (once; its key
and secret are kept in var/demo-partner.json and, as shell variables, in var/demo.env, both mode
0600, so re-runs reuse them), starts the gRPC server and Envoy (devstack.stack), ingests the demo
customer through the batch-call REST API (idempotent), prints ready-to-paste curl and grpcurl
lines, and on Ctrl-C or SIGTERM drains Envoy, then the server. `serve()` also runs several server
replicas behind the one Envoy (`make run-cluster`, devstack/cluster.py).

The demo's files live in VAR_DIR (default: the project's var/); without DATABASE_URL the SQLite
database is VAR_DIR/disposition.db. Removing VAR_DIR resets the demo.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from devstack.credentials import Credentials
from devstack.envoy import EnvoyStartError
from devstack.ports import PortTaken, check_free
from devstack.server import REPO, ServerProcess, ServerStartError
from devstack.stack import start_stack
from gateway.envoy_config import DEFAULT_HTTP_HOST
from server.db import Database, SchemaOutdated
from server.settings import Settings, SettingsError
from server.usecases import partners

DEMO_PARTNER = "123"
DEMO_TENANT, DEMO_SUB_TENANT, DEMO_CUSTOMER = "tenant1", "subtenant1", "customer123"
DEFAULT_HTTP_PORT, DEFAULT_ADMIN_PORT = 8080, 9901


class LaunchError(RuntimeError):
    """Something the user can fix before the stack starts; the message says what (exit 2)."""


def var_dir(env: Mapping[str, str]) -> Path:
    """Where the demo keeps its files: VAR_DIR, else the project's var/."""
    return Path(env.get("VAR_DIR") or REPO / "var").resolve()


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the stack: `env`, with the demo database in VAR_DIR when DATABASE_URL
    is unset."""
    resolved = dict(env)
    if not resolved.get("DATABASE_URL"):
        resolved["DATABASE_URL"] = f"sqlite+aiosqlite:///{var_dir(env) / 'disposition.db'}"
    return resolved


def port_setting(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        port = int(raw)
    except ValueError:
        raise LaunchError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise LaunchError(f"{name} must be between 1 and 65535, got {port}")
    return port


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


async def demo_credentials(settings: Settings, credentials_file: Path) -> Credentials:
    """Migrate the database (once, before any server starts); the demo partner's credentials:
    issued on the first run, reused after (kept in `credentials_file` and, for shells, in
    demo.env beside it)."""
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
        _write_private(credentials_file, json.dumps(saved, indent=2))
    assert saved is not None
    creds = Credentials(
        DEMO_PARTNER, saved["api_key"], saved["api_secret"], DEMO_TENANT, DEMO_SUB_TENANT
    )
    _write_private(
        credentials_file.parent / "demo.env",
        f"# make run's demo partner {DEMO_PARTNER}: `source` this file, then paste docs/api.md's"
        " examples.\n"
        f"export API_KEY={shlex.quote(creds.api_key)} API_SECRET={shlex.quote(creds.api_secret)}\n",
    )
    return creds


def seed_demo_customer(http_port: int, creds: Credentials) -> dict[str, Any]:
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
        headers={"content-type": "application/json", **creds.headers()},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return dict(json.loads(reply.read()))


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _banner(
    http_port: int, grpc_target: str, creds: Credentials, topology: str, credentials_file: Path
) -> str:
    headers = " ".join(f"-H '{k}: {v}'" for k, v in creds.headers().items())
    update = "/api/v1/partner/ingest/disposition-status"
    body = f'{{"customer_id": "{DEMO_CUSTOMER}", "disposition_status": "interested"}}'
    grpc_body = f'{{"customer_id": "{DEMO_CUSTOMER}", "disposition_status": "callback_requested"}}'
    method = "disposition.v1.DispositionService/UpdateDispositionStatus"
    history = f"/api/v1/partner/customers/{DEMO_CUSTOMER}/disposition-history"
    watch = "disposition.v1.DispositionService/WatchDispositionChanges"
    return f"""
Disposition service is up (Ctrl-C stops it).
  REST (Envoy):  http://127.0.0.1:{http_port}
  Docs page:     http://127.0.0.1:{http_port}/docs  (Swagger UI; Authorize with the demo key)
{topology}
  Demo partner {DEMO_PARTNER}, tenant {DEMO_TENANT}/{DEMO_SUB_TENANT}, customer {DEMO_CUSTOMER}
  Credentials: {_shown(credentials_file)} (created on the first run, mode 0600)
  For docs/api.md's examples: source {_shown(credentials_file.parent / "demo.env")}
  Webhooks: delivered by a disposition-webhooks worker; WEBHOOK_ALLOW_PRIVATE_URLS=true
    (http and local receivers allowed; development only)

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
    command = "make run"
    try:
        env = launch_env(os.environ)
        settings = Settings.from_env(env)
        http_port = port_setting(env, "HTTP_PORT", DEFAULT_HTTP_PORT)
        admin_port = port_setting(env, "ENVOY_ADMIN_PORT", DEFAULT_ADMIN_PORT)
        ports = [("HTTP_PORT", http_port), ("ENVOY_ADMIN_PORT", admin_port),
                 ("GRPC_PORT", settings.grpc_port)]  # fmt: skip
        worker: dict[str, str] = {}
        if settings.metrics_port:
            ports.append(("METRICS_PORT", settings.metrics_port))
            # The webhook worker's metrics: the next port.
            ports.append(("METRICS_PORT", settings.metrics_port + 1))
            worker["METRICS_PORT"] = str(settings.metrics_port + 1)
        check_free(ports)
        credentials_file = var_dir(env) / "demo-partner.json"
        creds = asyncio.run(demo_credentials(settings, credentials_file))
    except (LaunchError, PortTaken, SettingsError, SchemaOutdated) as exc:
        outdated = isinstance(exc, SchemaOutdated)
        hint = " (a local demo database can simply be deleted)" if outdated else ""
        print(f"{command}: {exc}{hint}", file=sys.stderr)
        return 2
    grpc_target = f"127.0.0.1:{settings.grpc_port}"
    return serve(
        settings,
        env=env,
        replicas=[{"GRPC_PORT": str(settings.grpc_port)}],
        workers=[worker],
        creds=creds,
        http_port=http_port,
        admin_port=admin_port,
        grpc_target=grpc_target,
        topology=f"  gRPC (direct): {grpc_target}  (reflection on)",
        credentials_file=credentials_file,
        command=command,
    )


def serve(
    settings: Settings,
    *,
    env: Mapping[str, str],
    replicas: Sequence[Mapping[str, str]],
    workers: Sequence[Mapping[str, str]],
    creds: Credentials,
    http_port: int,
    admin_port: int,
    grpc_target: str,
    topology: str,
    credentials_file: Path,
    command: str,
) -> int:
    """Start one `disposition-server` per entry of `replicas` and one `disposition-webhooks`
    worker per entry of `workers` (their extra environment), then Envoy in front of the
    servers; seed the demo customer, print the banner and serve until Ctrl-C/SIGTERM or until
    every server has exited. Stops in order: Envoy's listeners drain, then every server drains
    its in-flight RPCs at once (and the workers store what they sent)."""
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server_env = {
        "DATABASE_URL": settings.database_url,
        "SHUTDOWN_GRACE_SECONDS": str(settings.shutdown_grace_seconds),
        # A laptop's webhook receiver is http://127.0.0.1:…: allowed here, refused in production.
        "WEBHOOK_ALLOW_PRIVATE_URLS": env.get("WEBHOOK_ALLOW_PRIVATE_URLS") or "true",
    }
    with ExitStack() as exits:
        try:
            stack = exits.enter_context(
                start_stack(
                    settings.database_url,
                    replicas=replicas,
                    webhook_workers=workers,
                    server_env={**env, **server_env},
                    http_host=env.get("HTTP_HOST") or DEFAULT_HTTP_HOST,
                    http_port=http_port,
                    admin_port=admin_port,
                    drain_seconds=(
                        settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + 5
                    ),
                )
            )
        except (ServerStartError, EnvoyStartError) as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return 1
        seeded = seed_demo_customer(stack.http_port, creds)["data"]["items"][0]["status"]
        print(f"Demo customer {DEMO_CUSTOMER}: call {seeded}.", flush=True)
        print(_banner(stack.http_port, grpc_target, creds, topology, credentials_file), flush=True)
        running, delivering = list(stack.servers), list(stack.workers)
        while not stop["signal"] and running:
            for server, code in _exited(running):
                print(f"disposition-server on :{server.port} exited with {code}", flush=True)
            for _, code in _exited(delivering):
                print(f"disposition-webhooks exited with {code}: webhooks are not delivered "
                      "until it runs again", flush=True)  # fmt: skip
            time.sleep(0.2)
        print("Stopping: draining Envoy, then the gRPC servers...", flush=True)
        _drain_envoy(stack.envoy.admin_port)
    codes = [server.process.returncode for server in stack.servers if server.process is not None]
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1


def _exited(watched: list[ServerProcess]) -> list[tuple[ServerProcess, int]]:
    """The processes of `watched` that have exited since the last look, with their exit codes
    (taken out of `watched`)."""
    gone = [(p, code) for p in watched if p.process and (code := p.process.poll()) is not None]
    for process, _ in gone:
        watched.remove(process)
    return gone


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
