"""Fixtures: a fresh SQLite file per test and a real grpc.aio server on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from disposition.v1 import (
    call_ingestion_service_pb2_grpc as ingestion_grpc,
)
from disposition.v1 import (
    disposition_service_pb2_grpc as disposition_grpc,
)
from server.app import App
from server.db import Database
from tests.support import Credentials, onboard, settings_for


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'disposition.db'}"


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
