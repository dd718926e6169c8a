"""Alembic's environment: migrations run through the service's own async engines.

`server.schema.upgrade` hands over a connection already inside a transaction; the `alembic`
command line (no connection) opens one on DATABASE_URL (SQLite pragmas and the PostgreSQL
search_path included) and runs the migrations on it through `AsyncConnection.run_sync`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from server.models import Base


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE via table copies
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_database_url() -> None:
    from server.db import Database
    from server.settings import Settings

    db = Database(Settings.from_env())
    try:
        async with db.write() as conn:
            await conn.run_sync(run_on)
    finally:
        await db.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them on a database")
given = context.config.attributes.get("connection")
if given is not None:
    run_on(given)
else:
    asyncio.run(run_on_database_url())
