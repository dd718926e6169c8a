"""Typed configuration, built once at start-up from the environment."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

PROJECT_NAME = "disposition-service"  # [project] name in the checkout's pyproject.toml
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class SettingsError(ValueError):
    """A configuration value is missing, malformed or unsafe."""


def project_root() -> Path | None:
    """The checkout this package runs from: the directory holding its pyproject.toml (None when
    the package is installed from a wheel, outside any checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        with (root / "pyproject.toml").open("rb") as file:
            name = tomllib.load(file).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if name == PROJECT_NAME else None


def default_database_url() -> str:
    """The checkout's var/disposition.db, wherever the process runs from (outside a checkout:
    var/disposition.db in the working directory)."""
    root = project_root()
    path = root / "var" / "disposition.db" if root is not None else Path("var", "disposition.db")
    return f"sqlite+aiosqlite:///{path}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server reads from its environment."""

    database_url: str = field(default_factory=default_database_url)
    # PostgreSQL: connections of each pool (the units of work's, and the readers').
    database_pool_size: int = 10
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    rate_limit_per_minute: int = 120
    sqlite_synchronous: str = "FULL"
    shutdown_grace_seconds: float = 10.0
    # After SIGTERM, how long the server keeps serving while it reports NOT_SERVING, so that a
    # load balancer's health checks take it out of rotation before it refuses new RPCs.
    shutdown_drain_seconds: float = 0.0
    max_message_bytes: int = 8 * 1024 * 1024
    # RPCs in progress at once (change-feed streams included); more are refused at once with
    # RESOURCE_EXHAUSTED (REST: 503 + Retry-After) instead of queueing without bound.
    max_concurrent_rpcs: int = 1000
    log_level: str = "INFO"
    environment: str = "development"
    # The change feed: how often a watched tenant's cursor is polled for other processes'
    # commits (this process's own commits wake watchers at once), and the heartbeat period.
    feed_poll_seconds: float = 0.05
    feed_heartbeat_seconds: float = 15.0
    # Group commit under load: when a group commits with update_groups.SIBLINGS (2) or more updates
    # already queued, the next group waits this long for more (runtime/update_groups.py).
    group_commit_linger_seconds: float = 0.002
    # Credentials and grants cached in memory for this long (0: read on every request), trusted
    # only while the access version is polled every access_poll_seconds (runtime/access_cache.py).
    access_cache_seconds: float = 60.0
    access_poll_seconds: float = 0.05
    # Rate limits shared by every replica through Redis (None: counted in this process only).
    redis_url: str | None = None
    redis_key_prefix: str = "disposition:"
    redis_timeout_seconds: float = 0.25
    # Prometheus metrics over HTTP (None: off; 0: an ephemeral port, reported when serving).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # Webhooks (runtime/webhooks.py): a delivery attempt's timeout, the first retry's delay
    # (doubling after each failure, with jitter), and whether URLs may be http or resolve to
    # private addresses (local development and tests only; refused in production).
    webhook_timeout_seconds: float = 10.0
    webhook_retry_base_seconds: float = 5.0
    webhook_allow_private_urls: bool = False
    # How long a failing delivery is retried (then marked failed), and how long an endpoint may
    # fail before it is disabled.
    webhook_retry_window_seconds: float = 3 * 24 * 3600.0
    # How many deliveries one endpoint has in flight at once. 1: one after another, so that a
    # healthy receiver gets its events in cursor order; more: faster, in an order that may vary
    # within that window.
    webhook_max_in_flight: int = 1
    # Who delivers: "server" (each disposition-server, beside its API) or "worker" (only
    # `disposition-webhooks` processes: deliveries then take no CPU from the API's event loop).
    webhook_delivery: str = "server"
    # How long a process's hold on an endpoint lasts unless renewed (renewed every third of it,
    # at most every 2 s): after a crash, another process takes its endpoints over this late.
    webhook_lease_seconds: float = 10.0
    # disposition-webhooks lowers its CPU priority by this much (0-19; 0: not at all), so that
    # a host short of CPU gives it to the API's requests first.
    webhook_worker_nice: int = 10
    # Tracing with OpenTelemetry (server/tracing.py): where spans go, OTLP over gRPC (None: off,
    # and the tracing code is not even imported; see otlp_traces_endpoint), and the service.name
    # of the server's spans. The SDK reads the other OTEL_* variables itself (sampler, headers,
    # timeouts, batching, resource attributes).
    otlp_traces_endpoint: str | None = None
    service_name: str = "disposition-server"
    # OTEL_TRACES_SAMPLER (and _ARG): the share of new traces that are sampled, and whether a
    # span with a parent follows the parent's decision instead (parentbased_*, the default).
    trace_sampling_ratio: float = 1.0
    trace_follows_parent: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        endpoint = otlp_traces_endpoint(env)
        # The sampler is read only when tracing is on.
        sampling_ratio, follows_parent = (1.0, True) if endpoint is None else trace_sampler(env)
        settings = cls(
            database_url=env.get("DATABASE_URL") or default_database_url(),
            database_pool_size=_int(env, "DATABASE_POOL_SIZE", 10, minimum=2),
            grpc_host=env.get("GRPC_HOST", "127.0.0.1"),
            grpc_port=_int(env, "GRPC_PORT", 50051, minimum=0),
            rate_limit_per_minute=_int(env, "RATE_LIMIT_PER_MINUTE", 120, minimum=1),
            sqlite_synchronous=env.get("SQLITE_SYNCHRONOUS", "FULL").upper(),
            shutdown_grace_seconds=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0),
            shutdown_drain_seconds=_float(env, "SHUTDOWN_DRAIN_SECONDS", 0.0, minimum=0.0),
            max_concurrent_rpcs=_int(env, "MAX_CONCURRENT_RPCS", 1000, minimum=1),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            environment=env.get("DISPOSITION_ENV", "development"),
            feed_poll_seconds=_float(env, "FEED_POLL_SECONDS", 0.05, minimum=0.001),
            feed_heartbeat_seconds=_float(env, "FEED_HEARTBEAT_SECONDS", 15.0, minimum=0.01),
            group_commit_linger_seconds=_float(env, "GROUP_COMMIT_LINGER_MS", 2.0, minimum=0.0)
            / 1000,
            access_cache_seconds=_float(env, "ACCESS_CACHE_SECONDS", 60.0, minimum=0.0),
            access_poll_seconds=_float(env, "ACCESS_POLL_SECONDS", 0.05, minimum=0.001),
            redis_url=env.get("REDIS_URL") or None,
            redis_key_prefix=env.get("REDIS_KEY_PREFIX", "disposition:"),
            redis_timeout_seconds=_float(env, "REDIS_TIMEOUT_SECONDS", 0.25, minimum=0.001),
            metrics_host=env.get("METRICS_HOST", "127.0.0.1"),
            metrics_port=(
                _int(env, "METRICS_PORT", 0, minimum=0) if env.get("METRICS_PORT") else None
            ),
            webhook_timeout_seconds=_float(env, "WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.01),
            webhook_retry_base_seconds=_float(
                env, "WEBHOOK_RETRY_BASE_SECONDS", 5.0, minimum=0.001
            ),
            webhook_allow_private_urls=_bool(env, "WEBHOOK_ALLOW_PRIVATE_URLS", False),
            webhook_max_in_flight=_int(env, "WEBHOOK_MAX_IN_FLIGHT", 1, minimum=1),
            webhook_retry_window_seconds=_float(
                env, "WEBHOOK_RETRY_WINDOW_SECONDS", 3 * 24 * 3600.0, minimum=1.0
            ),
            webhook_delivery=env.get("WEBHOOK_DELIVERY", "server").strip().lower(),
            webhook_lease_seconds=_float(env, "WEBHOOK_LEASE_SECONDS", 10.0, minimum=1.0),
            webhook_worker_nice=_int(env, "WEBHOOK_WORKER_NICE", 10, minimum=0),
            otlp_traces_endpoint=endpoint,
            service_name=env.get("OTEL_SERVICE_NAME") or "disposition-server",
            trace_sampling_ratio=sampling_ratio,
            trace_follows_parent=follows_parent,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values that would make the service unsafe or unusable."""
        if self.group_commit_linger_seconds > 1.0:  # every update under load would wait that long
            raise SettingsError("GROUP_COMMIT_LINGER_MS must be at most 1000")
        if self.sqlite_synchronous not in {"FULL", "EXTRA", "NORMAL"}:
            raise SettingsError(
                "SQLITE_SYNCHRONOUS must be FULL, EXTRA or NORMAL "
                "(OFF could lose acknowledged writes)"
            )
        if self.environment == "production" and self.sqlite_synchronous == "NORMAL":
            raise SettingsError("SQLITE_SYNCHRONOUS=NORMAL is not allowed in production")
        if not self.database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise SettingsError(
                "DATABASE_URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        if self.is_sqlite and self.sqlite_path() is None:
            raise SettingsError("DATABASE_URL must name a SQLite file (not an in-memory database)")
        try:
            schema = self.database_schema
        except ValueError as exc:  # sqlalchemy's ArgumentError is one too
            raise SettingsError(f"DATABASE_URL is not a valid database URL ({exc})") from None
        if schema is not None and (self.is_sqlite or not _SCHEMA_NAME.fullmatch(schema)):
            raise SettingsError(
                "DATABASE_URL's search_path must be one PostgreSQL schema name "
                "(letters, digits, underscores), on postgresql+asyncpg:// only"
            )
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")
        if self.environment == "production" and self.webhook_allow_private_urls:
            raise SettingsError(
                "WEBHOOK_ALLOW_PRIVATE_URLS=true is not allowed in production (it lets webhook "
                "URLs reach the service's own network)"
            )
        if self.webhook_delivery not in {"server", "worker"}:
            raise SettingsError(
                f"WEBHOOK_DELIVERY must be server or worker, got {self.webhook_delivery!r}"
            )
        if self.webhook_worker_nice > 19:
            raise SettingsError("WEBHOOK_WORKER_NICE must be between 0 and 19")
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise SettingsError(f"METRICS_PORT must be at most 65535, got {self.metrics_port}")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def database_schema(self) -> str | None:
        """PostgreSQL: the schema named by DATABASE_URL's `?search_path=` (None: the default)."""
        value = make_url(self.database_url).query.get("search_path")
        return value if isinstance(value, str) or value is None else ",".join(value)

    def sqlite_path(self) -> Path | None:
        """The database file of a SQLite URL (None for PostgreSQL or in-memory)."""
        if not self.is_sqlite:
            return None
        path = self.database_url.split(":///", 1)[1]
        return None if path in ("", ":memory:") else Path(path)


def otlp_traces_endpoint(env: Mapping[str, str]) -> str | None:
    """The collector that spans go to, from the standard OTEL_* variables; None: tracing is off.

    On only when an endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    OTEL_EXPORTER_OTLP_ENDPOINT: http://host:port, or https:// for TLS), unless
    OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. OTLP over gRPC is the one exporter:
    another OTEL_TRACES_EXPORTER or OTLP protocol is refused.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter == "none":
        return None
    if exporter != "otlp":
        raise SettingsError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ""
    ).strip()
    if not endpoint:
        return None
    name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    if not env.get(name):
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = env.get(name, "").strip().lower() or "grpc"
    if protocol != "grpc":
        raise SettingsError(f"{name} must be grpc (OTLP over gRPC), got {protocol!r}")
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(
            f"the OTLP endpoint must be http://host:port or https://host:port, got {endpoint!r}"
        )
    return endpoint


# OTEL_TRACES_SAMPLER's values: (the share of new traces sampled, None: OTEL_TRACES_SAMPLER_ARG's;
# whether a parent's decision is followed).
SAMPLERS: dict[str, tuple[float | None, bool]] = {
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}


def trace_sampler(env: Mapping[str, str]) -> tuple[float, bool]:
    """(the share of new traces sampled, whether a parent's decision is followed) from
    OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (a ratio between 0 and 1, 1 by default)."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise SettingsError(
            f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, got {name!r}"
        )
    ratio, follows_parent = SAMPLERS[name]
    if ratio is None:
        ratio = _float(env, "OTEL_TRACES_SAMPLER_ARG", 1.0, minimum=0.0)
        if ratio > 1:
            raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG must be at most 1, got {ratio}")
    return ratio, follows_parent


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise SettingsError(f"{name} must be at least {minimum}, got {raw}")
    return value
