"""Fixtures: a fresh database per test and a real grpc.aio server on port 0.

Database-backed tests run on SQLite and, when TEST_POSTGRES_URL is set
(postgresql+asyncpg://…), on PostgreSQL too (`[sqlite]` / `[postgresql]` in their ids).
SQLite: one file migrated per run, copied for each test. PostgreSQL: a schema of this run
(`?search_path=t_<pid>_<random>_<n>`), emptied for each test; module-scoped stacks get their own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from devstack import Credentials, onboard
from disposition.v1 import (
    call_ingestion_service_pb2_grpc as ingestion_grpc,
)
from disposition.v1 import (
    disposition_service_pb2_grpc as disposition_grpc,
)
from server.app import App
from server.db import Database
from tests.support.databases import PostgresSchemas, run_in_thread, settings_for

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL") or None
NO_POSTGRES = "PostgreSQL variant: TEST_POSTGRES_URL is not set"
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per run; tests get copies."""
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def migrate() -> None:
        db = Database(settings_for(f"sqlite+aiosqlite:///{path}"))
        try:
            await db.create_schema()
        finally:
            await db.dispose()

    run_in_thread(migrate())
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresSchemas | None]:
    """This run's PostgreSQL schemas (None without TEST_POSTGRES_URL); dropped at the end."""
    if POSTGRES_URL is None:
        yield None
        return
    schemas = PostgresSchemas(POSTGRES_URL)
    try:
        yield schemas
    finally:
        schemas.drop_all()


@pytest.fixture(scope="session")
def postgres_shared(postgres: PostgresSchemas | None) -> str | None:
    """The run's schema for function-scoped tests (emptied before each)."""
    return None if postgres is None else postgres.new()


def fresh_database(engine: str, directory: Path, template: Path, postgres_url: str | None) -> str:
    if engine == "sqlite":
        path = directory / "disposition.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"
    if postgres_url is None:
        pytest.skip(NO_POSTGRES)
    return postgres_url


@pytest.fixture(params=ENGINES)
def database_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    postgres: PostgresSchemas | None,
    postgres_shared: str | None,
) -> str:
    """An empty database at the current schema, on each engine."""
    url = fresh_database(request.param, tmp_path, sqlite_template, postgres_shared)
    if postgres is not None and url == postgres_shared:
        postgres.empty(url)
    return url


@pytest.fixture
def postgres_url(postgres: PostgresSchemas | None, postgres_shared: str | None) -> str:
    """PostgreSQL only: the run's schema, emptied (skips without TEST_POSTGRES_URL)."""
    if postgres is None or postgres_shared is None:
        pytest.skip(NO_POSTGRES)
    return postgres.empty(postgres_shared)


@pytest.fixture(scope="module", params=ENGINES)
def stack_database_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    postgres: PostgresSchemas | None,
) -> str:
    """For a module's shared REST stack: a database of its own, on each engine."""
    if request.param == "postgresql" and postgres is None:
        pytest.skip(NO_POSTGRES)
    pg_url = postgres.new() if request.param == "postgresql" and postgres else None
    return fresh_database(
        request.param, tmp_path_factory.mktemp("stack-db"), sqlite_template, pg_url
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(settings_for(database_url))
    await database.create_schema()
    yield database
    await database.dispose()


@pytest.fixture
async def app(database_url: str, db: Database) -> AsyncIterator[App]:
    """A real server on an ephemeral port, sharing the test's database file."""
    server = App(settings_for(database_url), Database(settings_for(database_url)))
    await server.start()
    yield server
    await server.stop(grace=1)


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture
def dispositions(channel: grpc.aio.Channel) -> disposition_grpc.DispositionServiceStub:
    return disposition_grpc.DispositionServiceStub(channel)


@pytest.fixture
def ingestion(channel: grpc.aio.Channel) -> ingestion_grpc.CallIngestionServiceStub:
    return ingestion_grpc.CallIngestionServiceStub(channel)


@pytest.fixture
async def partner(db: Database) -> Credentials:
    """Partner 123, granted tenant1/subtenant1, as in the documentation's example."""
    return await onboard(db, "123")
