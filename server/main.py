"""`disposition-server`: runs the gRPC server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from server.app import App, PortUnavailable
from server.db import Database, SchemaOutdated
from server.settings import Settings, SettingsError

# Start and stop ("serving", "draining", "stopped") are logged whatever LOG_LEVEL is: launchers
# (devstack/) know a server is ready by its own "serving" line, which names the port it bound.
lifecycle = logging.getLogger("disposition.lifecycle")
lifecycle.setLevel(logging.INFO)

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


async def serve(settings: Settings) -> None:
    app = App(settings, Database(settings))
    port = await app.start()
    tune_gc()
    lifecycle.info(
        "serving",
        extra={
            "port": port,
            "database": _redacted(settings.database_url),
            "rate_limits": "in-process" if settings.redis_url is None else "redis",
            "redis": None if settings.redis_url is None else _redacted(settings.redis_url),
            "metrics_port": app.metrics_port,
        },
    )
    await until_stopped()
    lifecycle.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await app.stop()
    lifecycle.info("stopped")


# Young objects between collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Cheaper garbage collection for a server that allocates in bursts.

    A 1,000-item batch makes thousands of short-lived objects; at CPython's default threshold
    every 700 of them start a collection, and the older generations' collections walk every
    object the process holds (modules, SQLAlchemy's metadata and compiled statements, protobuf
    descriptors). gc.freeze() moves what start-up made into a generation that is never
    collected (it lives as long as the process anyway), and a higher young threshold makes
    collections rarer. Cycles are still collected; measured by `make bench`'s ingest suite:
    about 20,700 -> 26,000 calls/s (see docs/benchmarks.md).
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _redacted(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


async def until_stopped() -> None:
    """Return at the process's SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_command(
    command: str,
    run: Callable[[Settings], Coroutine[Any, Any, None]],
    refusals: tuple[type[Exception], ...],
    prepare: Callable[[Settings], None] = lambda _settings: None,
) -> None:
    """A process's life: settings from the environment, JSON logs, `prepare`, then `run` until
    it returns. Bad settings, or one of `refusals` from `run`, are one line on stderr naming
    `command`, and exit code 2."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    prepare(settings)
    try:
        asyncio.run(run(settings))
    except refusals as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    run_command("disposition-server", serve, (SchemaOutdated, PortUnavailable))


if __name__ == "__main__":
    main()
