"""Bulk writes send plain values to the driver: they must store exactly what Core statements
(with their bind processors) store, on both engines."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert

from server.db import Database
from server.models import Customer
from server.storage import bulk


async def test_bulk_rows_are_stored_as_core_statements_store_them(db: Database) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)
    async with db.write() as conn:
        await conn.execute(
            insert(Customer).values(
                tenant_id="t", sub_tenant_id="s", customer_id="core", created_at=at, updated_at=at
            )
        )
        returned = await bulk.insert_rows(
            conn,
            "customers",
            ("tenant_id", "sub_tenant_id", "customer_id", "created_at", "updated_at"),
            [
                ("t", "s", f"bulk-{n}", bulk.db_time(conn, at), bulk.db_time(conn, at))
                for n in range(3)
            ]
            + [("t", "s", "core", bulk.db_time(conn, at), bulk.db_time(conn, at))],
            on_conflict_do_nothing=("tenant_id", "sub_tenant_id", "customer_id"),
            returning=("customer_id",),
        )
        stored = (
            await conn.exec_driver_sql(
                "SELECT customer_id, created_at, updated_at FROM customers ORDER BY customer_id"
            )
        ).all()
    assert sorted(returned) == [("bulk-0",), ("bulk-1",), ("bulk-2",)]  # "core" existed
    assert [row[0] for row in stored] == ["bulk-0", "bulk-1", "bulk-2", "core"]
    assert len({(row[1], row[2]) for row in stored}) == 1  # the same raw value as Core's


async def test_statements_are_split_below_the_parameter_limit(db: Database) -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    count = bulk.MAX_PARAMETERS // 5 * 2 + 7  # three statements of five columns
    async with db.write() as conn:
        returned = await bulk.insert_rows(
            conn,
            "customers",
            ("tenant_id", "sub_tenant_id", "customer_id", "created_at", "updated_at"),
            [
                ("t", "s", f"c{n}", bulk.db_time(conn, at), bulk.db_time(conn, at))
                for n in range(count)
            ],
            returning=("id",),
        )
        await bulk.execute_many(
            conn,
            "UPDATE customers SET disposition_status = ? WHERE id = ?",
            [(f"s{pk}", pk) for (pk,) in returned],
        )
        stored = (
            await conn.exec_driver_sql(
                "SELECT count(*) FROM customers WHERE disposition_status = 's' || id"
            )
        ).scalar()
    assert len(returned) == count
    assert stored == count


def test_json_values_match_json_dumps() -> None:
    assert bulk.db_json({}) == "{}" and bulk.db_json([]) == "[]"
    assert bulk.db_json({"a": "é"}) == '{"a": "\\u00e9"}'


async def test_select_in_reads_every_chunk(db: Database) -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    async with db.write() as conn:
        await bulk.insert_rows(
            conn,
            "customers",
            ("tenant_id", "sub_tenant_id", "customer_id", "created_at", "updated_at"),
            [("t", "s", f"c{n}", bulk.db_time(conn, at), bulk.db_time(conn, at)) for n in range(7)],
        )
        found = await bulk.select_in(
            conn,
            "SELECT customer_id FROM customers WHERE tenant_id = ? AND customer_id IN ({in})",
            ("t",),
            ["c0", "c2", "c3", "nobody", "c6"],
            chunk=2,
        )
    assert sorted(found) == [("c0",), ("c2",), ("c3",), ("c6",)]
