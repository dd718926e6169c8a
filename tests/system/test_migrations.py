"""Alembic owns the schema: migrations match the models on both engines, create_all-era files
are stamped or refused, and a PostgreSQL server never starts on a schema that is not at head."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from devstack import onboard
from server.app import App
from server.db import Database, SchemaOutdated
from server.models import Base
from server.schema import (
    BASELINE,
    _baseline_metadata,
    alembic_config,
    current_revision,
    head_revision,
)
from tests.support import BIN, REPO
from tests.support.databases import PostgresSchemas, settings_for, sql


def differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def migrated_from_empty(url: str) -> Database:
    db = Database(settings_for(url))
    assert await db.create_schema() == head_revision()
    assert await db.create_schema() == head_revision()  # idempotent
    return db


async def test_sqlite_migrated_from_empty_matches_the_models(tmp_path: Path) -> None:
    db = await migrated_from_empty(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        async with db.read() as conn:
            assert await conn.run_sync(differences) == []
            names = await conn.run_sync(lambda c: inspect(c).get_unique_constraints("customers"))
        # Deterministic names (the models' naming convention), also on SQLite.
        assert [u["name"] for u in names] == ["uq_customers_tenant_id_sub_tenant_id_customer_id"]
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_migrated_from_empty_matches_the_models(
    postgres: PostgresSchemas | None,
) -> None:
    if postgres is None:
        pytest.skip("PostgreSQL variant: TEST_POSTGRES_URL is not set")
    schema = f"{postgres.prefix}_empty"
    postgres.created.append(schema)  # create_schema creates it; dropped with the others
    db = await migrated_from_empty(postgres.url(schema))
    try:
        async with db.read() as conn:
            assert await conn.run_sync(differences) == []
            assert await conn.run_sync(current_revision) == head_revision()
    finally:
        await db.dispose()


def create_all_era(path: Path, *, drop_column: str | None = None) -> None:
    """A file as `create_all` made it before migrations (no alembic_version table): the
    baseline revision's tables, which were the models of that time."""
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    _baseline_metadata(alembic_config()).create_all(engine)
    engine.dispose()
    if drop_column is not None:
        table, column = drop_column.split(".")
        with sqlite3.connect(path) as conn:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


async def test_a_create_all_era_file_is_stamped_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    create_all_era(path)
    db = Database(settings_for(f"sqlite+aiosqlite:///{path}"))
    try:
        assert await db.create_schema() == head_revision()
        async with db.read() as conn:
            assert await conn.run_sync(current_revision) == head_revision()
        await onboard(db, "after-stamp")  # and it is usable
    finally:
        await db.dispose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
    assert BASELINE == "0001"


async def test_a_create_all_era_file_missing_a_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    create_all_era(path, drop_column="customers.email")
    db = Database(settings_for(f"sqlite+aiosqlite:///{path}"))
    try:
        with pytest.raises(SchemaOutdated, match=r"missing columns: customers\.email\b"):
            await db.create_schema()
    finally:
        await db.dispose()
    with sqlite3.connect(path) as conn:  # refused, not half-stamped
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "alembic_version" not in tables


@pytest.mark.postgres
async def test_a_postgres_server_refuses_a_schema_not_at_head(
    postgres: PostgresSchemas | None, tmp_path: Path
) -> None:
    """Replicas never migrate by themselves: `make migrate` is the operator's step."""
    if postgres is None:
        pytest.skip("PostgreSQL variant: TEST_POSTGRES_URL is not set")
    schema = f"{postgres.prefix}_unmigrated"
    postgres.created.append(schema)
    url = postgres.url(schema)
    base_db = Database(settings_for(postgres.base_url))
    try:
        async with base_db.write() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    finally:
        await base_db.dispose()
    app = App(settings_for(url), Database(settings_for(url)))
    with pytest.raises(SchemaOutdated, match=r"has no schema version.*run `make migrate`"):
        await app.start()
    await app.db.dispose()
    env = {**os.environ, "DATABASE_URL": url, "GRPC_PORT": "0"}
    refused = subprocess.run(
        [str(BIN / "disposition-server")], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "run `make migrate`" in refused.stderr
    admin = subprocess.run(  # any other admin command refuses the same way, exit code 2
        [str(BIN / "disposition-admin"), "list"], env=env, capture_output=True, text=True
    )
    assert admin.returncode == 2
    assert "run `make migrate`" in admin.stderr and "Traceback" not in admin.stderr
    migrated = subprocess.run(
        [str(BIN / "disposition-admin"), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert '"revision": "' + head_revision() + '"' in migrated.stdout
    assert sql(url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]


def test_the_alembic_command_line_works(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DATABASE_URL": url}

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "alembic"), *args], env=env, cwd=REPO, capture_output=True, text=True
        )

    assert alembic("upgrade", "head").returncode == 0
    current = alembic("current")
    assert current.returncode == 0 and f"{head_revision()} (head)" in current.stdout
    checked = alembic("check")  # autogenerate finds nothing to do
    assert checked.returncode == 0, checked.stderr
