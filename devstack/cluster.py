"""`make run-cluster`: several server replicas behind one Envoy, on PostgreSQL and Redis.

    REPLICAS=3 DATABASE_URL=postgresql+asyncpg://user:pw@db:5432/disposition \\
    REDIS_URL=redis://cache:6379/0 make run-cluster

Checks that PostgreSQL and Redis answer (and says which does not), creates the database when it
is missing, migrates it once (before any replica starts: replicas on PostgreSQL only check that
the schema is at head), then runs REPLICAS `disposition-server` processes on GRPC_PORT,
GRPC_PORT+1, ... (Prometheus metrics on METRICS_PORT, METRICS_PORT+1, ...) and one Envoy
that balances over them, with the demo partner and customer of `make run` (devstack/run.py).
Every port is checked before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import asyncpg
import redis.asyncio as redis
from sqlalchemy.engine import make_url

from devstack.credentials import Credentials
from devstack.ports import PortTaken, check_free
from devstack.run import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_HTTP_PORT,
    LaunchError,
    demo_credentials,
    port_setting,
    serve,
    var_dir,
)
from server.db import SchemaOutdated
from server.settings import Settings, SettingsError

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/disposition_cluster"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REPLICAS = 2
DEFAULT_METRICS_PORT = 9464
DEFAULT_DRAIN_SECONDS = "2"
CREDENTIALS_FILE = "demo-partner-cluster.json"  # in VAR_DIR
COMMAND = "make run-cluster"


class ClusterError(RuntimeError):
    """A backing service is missing or unusable; the message says what to do."""


async def ensure_database(database_url: str) -> bool:
    """Create the PostgreSQL database of `database_url` when it does not exist; True if created.

    Connects to the server's `postgres` maintenance database with the same credentials.
    """
    url = make_url(database_url)
    name = url.database
    if not name:
        raise ClusterError("DATABASE_URL names no database")
    where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}"
    try:
        conn = await asyncpg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            database="postgres",
            timeout=5,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ClusterError(f"{where} is unreachable ({exc}); start it or set DATABASE_URL") from exc
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    except asyncpg.PostgresError as exc:
        raise ClusterError(f"{where}: cannot create database {name!r}: {exc}") from exc
    finally:
        await conn.close()


async def check_redis(redis_url: str) -> None:
    """Raise ClusterError unless Redis answers PING."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as exc:
        where = redis_url.rsplit("@", 1)[-1]
        message = f"Redis at {where} is unreachable ({exc}); start it or set REDIS_URL"
        raise ClusterError(message) from exc
    finally:
        await client.aclose()


def cluster_settings(env: Mapping[str, str]) -> tuple[Settings, int, int]:
    """The replicas' common settings, the replica count and the first metrics port."""
    env = {
        **env,
        "DATABASE_URL": env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        "REDIS_URL": env.get("REDIS_URL") or DEFAULT_REDIS_URL,
    }
    settings = Settings.from_env(env)
    if settings.is_sqlite:
        raise SettingsError(
            "make run-cluster needs PostgreSQL: DATABASE_URL=postgresql+asyncpg://…"
        )
    replicas = int(env.get("REPLICAS") or DEFAULT_REPLICAS)
    metrics_port = int(env.get("METRICS_PORT") or DEFAULT_METRICS_PORT)
    if replicas < 1:
        raise SettingsError(f"REPLICAS must be at least 1, got {replicas}")
    return settings, replicas, metrics_port


async def prepare(settings: Settings, credentials_file: Path) -> Credentials:
    """Everything before the first replica starts: backing services, database, migrations."""
    assert settings.redis_url is not None
    await check_redis(settings.redis_url)
    if await ensure_database(settings.database_url):
        print(f"Created database {make_url(settings.database_url).database}.", flush=True)
    return await demo_credentials(settings, credentials_file)  # migrates to head, once


def main() -> int:
    try:
        settings, replicas, metrics_port = cluster_settings(os.environ)
        http_port = port_setting(os.environ, "HTTP_PORT", DEFAULT_HTTP_PORT)
        admin_port = port_setting(os.environ, "ENVOY_ADMIN_PORT", DEFAULT_ADMIN_PORT)
        ports = [settings.grpc_port + i for i in range(replicas)]
        metrics = [metrics_port + i for i in range(replicas)]
        check_free(
            [("HTTP_PORT", http_port), ("ENVOY_ADMIN_PORT", admin_port)]
            + [("GRPC_PORT", port) for port in ports]
            + [("METRICS_PORT", port) for port in metrics]
            + [("METRICS_PORT", metrics_port + replicas)]  # the webhook worker's
        )
        credentials_file = var_dir(os.environ) / CREDENTIALS_FILE
        creds = asyncio.run(prepare(settings, credentials_file))
    except (ClusterError, LaunchError, PortTaken, SchemaOutdated, SettingsError, ValueError) as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 2
    shared = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url or "",
        # A stopping replica keeps serving until Envoy's 1 s health checks have taken it out.
        "SHUTDOWN_DRAIN_SECONDS": os.environ.get("SHUTDOWN_DRAIN_SECONDS") or DEFAULT_DRAIN_SECONDS,
    }
    listing = ", ".join(
        f"127.0.0.1:{port} (metrics :{metric})" for port, metric in zip(ports, metrics, strict=True)
    )
    topology = (
        f"  gRPC (Envoy):  127.0.0.1:{http_port}  (load balanced; reflection on)\n"
        f"  {replicas} replicas: {listing}\n"
        f"  webhooks: one disposition-webhooks worker (metrics :{metrics_port + replicas})\n"
        f"  PostgreSQL: {make_url(settings.database_url).render_as_string(hide_password=True)}\n"
        f"  Redis: {(settings.redis_url or '').rsplit('@', 1)[-1]}"
    )
    return serve(
        settings,
        env={**os.environ, **shared},
        replicas=[
            {"GRPC_PORT": str(port), "METRICS_PORT": str(metric)}
            for port, metric in zip(ports, metrics, strict=True)
        ],
        workers=[{"METRICS_PORT": str(metrics_port + replicas)}],
        creds=creds,
        http_port=http_port,
        admin_port=admin_port,
        grpc_target=f"127.0.0.1:{http_port}",
        topology=topology,
        credentials_file=credentials_file,
        command=COMMAND,
    )


if __name__ == "__main__":
    sys.exit(main())
