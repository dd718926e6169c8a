"""`disposition-webhooks`: delivers webhooks, in a process of its own, until SIGINT or SIGTERM.

With `WEBHOOK_DELIVERY=worker` on the servers, only these processes deliver: deliveries then
take no CPU from the API's event loop (each costs about as much as half an update). It lowers
its own CPU priority (`WEBHOOK_WORKER_NICE`, default 10), so that a host short of CPU serves the
API's requests first; that does not make deliveries free on a host they share (the bench's
webhooks suite, docs/benchmarks.md), where the worker belongs on cores of its own.

Any number may run, on the servers' database: they share the endpoints by lease
(runtime/webhooks.py), as the servers would. It reads the same settings as
`disposition-server`; it serves no API, only `METRICS_PORT` when set (the webhook metrics), and
logs "serving" (with `"role": "webhooks"`) when it delivers.
"""

from __future__ import annotations

import asyncio
import os

from server.app import webhook_dispatcher
from server.db import Database, SchemaOutdated
from server.main import lifecycle, run_command, until_stopped
from server.metrics import Metrics
from server.runtime.feed import FeedHub
from server.settings import Settings


async def run(settings: Settings) -> None:
    db = Database(settings)
    try:
        await db.check_schema()  # the servers (SQLite) or `make migrate` (PostgreSQL) migrate
        metrics = Metrics()
        feed = FeedHub(
            db,
            poll_seconds=settings.feed_poll_seconds,
            heartbeat_seconds=settings.feed_heartbeat_seconds,
        )
        dispatcher = webhook_dispatcher(settings, db, feed, metrics)
        metrics.watch_webhook_backlog(lambda: dispatcher.backlog)
        metrics_port = None
        if settings.metrics_port is not None:
            metrics_port = metrics.serve(settings.metrics_host, settings.metrics_port)
        dispatcher.start()
        lifecycle.info(
            "serving",
            extra={"role": "webhooks", "port": 0, "metrics_port": metrics_port,
                   "nice": os.nice(0)},
        )  # fmt: skip
        await until_stopped()
        lifecycle.info("draining", extra={"role": "webhooks"})
        await dispatcher.close()  # stores what was sent, hands the endpoints back
        await feed.close()
        if metrics_port is not None:
            await asyncio.to_thread(metrics.stop)
        lifecycle.info("stopped", extra={"role": "webhooks"})
    finally:
        await db.dispose()


def _lower_priority(settings: Settings) -> None:
    if settings.webhook_worker_nice:
        os.nice(settings.webhook_worker_nice)


def main() -> None:
    # OSError: METRICS_PORT taken, or the database unreachable.
    run_command("disposition-webhooks", run, (SchemaOutdated, OSError), _lower_priority)


if __name__ == "__main__":
    main()
