"""The SQLite writer thread (group commits): a failed transaction, in its work or in its COMMIT,
rolls back and leaves the connection ready for the next one."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from server.db import Database
from tests.support.databases import settings_for


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(settings_for(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"))
    await database.create_schema()
    yield database
    await database.dispose()


def add(tenant: str) -> Callable[[sqlite3.Connection], None]:
    """Work that creates the tenant's feed_sequences row."""

    def work(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO feed_sequences (tenant_id, last_seq) VALUES (?, 1)", (tenant,))

    return work


async def test_failures_roll_back_and_the_next_transaction_commits(sqlite_db: Database) -> None:
    def fail_in_work(conn: sqlite3.Connection) -> None:
        add("in-work")(conn)
        raise RuntimeError("injected")

    def fail_in_commit(conn: sqlite3.Connection) -> None:
        # A deferred foreign-key violation is only detected by COMMIT.
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute(
            "INSERT INTO partner_credentials (partner_pk, api_key, secret_sha256, created_at)"
            " VALUES (999, 'k', 's', '2026-01-01 00:00:00.000000')"
        )
        add("in-commit")(conn)

    with pytest.raises(RuntimeError, match="injected"):
        await sqlite_db.write_in_thread(fail_in_work)
    with pytest.raises(sqlite3.IntegrityError):
        await sqlite_db.write_in_thread(fail_in_commit)
    await sqlite_db.write_in_thread(add("after"))
    async with sqlite_db.read() as conn:
        found = (await conn.exec_driver_sql("SELECT tenant_id FROM feed_sequences")).all()
        credentials = (await conn.exec_driver_sql("SELECT count(*) FROM partner_credentials")).one()
    assert found == [("after",)]
    assert credentials == (0,)


async def test_a_disposed_database_writes_again(sqlite_db: Database) -> None:
    def work(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO feed_sequences (tenant_id, last_seq) VALUES ('t', 1)")
        return 7

    await sqlite_db.dispose()
    assert await sqlite_db.write_in_thread(work) == 7
