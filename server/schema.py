"""The schema's versions, owned by Alembic (server/migrations/).

Everything here is synchronous and runs on a connection that is already inside a transaction
(`AsyncConnection.run_sync`), so a migration commits or rolls back as a whole with the version
stamp (PostgreSQL's DDL is transactional; on SQLite the writer's `BEGIN IMMEDIATE` holds the
file's write lock, so processes starting at once migrate one after the other).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, inspect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The first revision: today's whole schema, as create_all made it before migrations existed.
BASELINE = "0001"
# Any constant: one migrator at a time per PostgreSQL database (pg_advisory_xact_lock).
_MIGRATION_LOCK = 0x6469_7370_6F73


class SchemaOutdated(RuntimeError):
    """The database is not at the schema this version needs (or cannot be brought there)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code (no alembic.ini needed).

    With `connection`, server/migrations/env.py runs on it (inside its transaction);
    without, env.py connects to DATABASE_URL itself (the `alembic` command line).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision stamped in the database (None: never migrated)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(conn: Connection, *, url: str, schema: str | None = None) -> str:
    """Bring the database to head (idempotent); returns the head revision.

    A database made by `create_all` before migrations existed (no alembic_version table) is
    stamped with the baseline when it has all of its tables and columns, else refused.
    """
    if conn.dialect.name == "postgresql":
        if schema is not None:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    config = alembic_config(conn)
    if current_revision(conn) is None:
        baseline = _baseline_metadata(config)
        present = set(inspect(conn).get_table_names())
        if present & set(baseline.tables):
            gaps = _gaps(conn, baseline, present)
            if gaps:
                raise SchemaOutdated(
                    f"{url}: the database predates this version ({gaps}); "
                    "recreate it or migrate it by hand"
                )
            command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    return head_revision()


def check_head(conn: Connection, *, url: str) -> None:
    """Refuse a database that is not at head (servers on PostgreSQL never migrate by themselves)."""
    current, head = current_revision(conn), head_revision()
    if current == head:
        return
    found = "has no schema version" if current is None else f"is at schema revision {current}"
    raise SchemaOutdated(
        f"{url}: the database {found}, this version needs {head}; "
        "run `make migrate` (or `disposition-admin migrate`) against it first"
    )


def _baseline_metadata(config: Config) -> MetaData:
    script = ScriptDirectory.from_config(config).get_revision(BASELINE)
    assert script is not None
    module: Any = script.module
    return module.metadata  # type: ignore[no-any-return]


def _gaps(conn: Connection, baseline: MetaData, present: set[str]) -> str:
    """What a pre-migration database lacks of the baseline: tables, then columns."""
    inspector = inspect(conn)
    tables = [name for name in baseline.tables if name not in present]
    columns: list[str] = []
    for table in baseline.sorted_tables:
        if table.name in present:
            have = {column["name"] for column in inspector.get_columns(table.name)}
            columns += [f"{table.name}.{c.name}" for c in table.columns if c.name not in have]
    parts = []
    if tables:
        parts.append(f"missing tables: {', '.join(tables)}")
    if columns:
        parts.append(f"missing columns: {', '.join(columns)}")
    return "; ".join(parts)
