"""Disposition catalogs: a partner lists the one in force; an operator (the admin CLI) defines,
reads and clears them.

What a catalog allows is a rule (server/rules/catalogs.py); this module reads and writes them.
A catalog definition (the admin CLI's JSON file) is checked here, by `parse_definitions`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from server.db import Database
from server.records import TENANT_WIDE as TENANT_WIDE  # the admin CLI's vocabulary
from server.records import Caller
from server.records import Disposition as Disposition
from server.rules import validation
from server.rules.catalogs import Catalog, in_force
from server.storage import catalogs

MAX_ENTRIES = 500
_FLAGS = ("final", "do_not_call", "callback")
_KEYS = frozenset({"disposition_status", "label", *_FLAGS})


class InvalidCatalog(ValueError):
    """A catalog definition (e.g. the admin CLI's file) breaks the rules."""


async def load_catalog(conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str) -> Catalog:
    """The catalog in force, read on `conn` in one query."""
    found = await catalogs.effective_catalog(conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id)
    return in_force(found)


async def list_dispositions(db: Database, *, caller: Caller) -> Catalog:
    """The catalog in force for the caller's tenant and sub-tenant."""
    async with db.read() as conn:
        return await load_catalog(
            conn, tenant_id=caller.tenant_id, sub_tenant_id=caller.sub_tenant_id
        )


# --- administration (the admin CLI) ----------------------------------------------------------


def parse_definitions(raw: object) -> list[Disposition]:
    """A catalog from its JSON form: a list of {"disposition_status", "label"?, flags?}.

    The label defaults to the status and the flags to false. Raises InvalidCatalog listing
    every problem.
    """
    if not isinstance(raw, list):
        raise InvalidCatalog("the catalog must be a JSON list of dispositions")
    if not raw:
        raise InvalidCatalog("the catalog lists no dispositions (use 'catalog clear' to remove it)")
    if len(raw) > MAX_ENTRIES:
        raise InvalidCatalog(f"the catalog must list at most {MAX_ENTRIES} dispositions")
    problems: validation.Violations = []
    entries: list[Disposition] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        entry = _parse_entry(problems, f"[{index}]", item)
        if entry is None:
            continue
        if entry.disposition_status in seen:
            problems.append(
                (
                    f"[{index}].disposition_status",
                    f"[{index}].disposition_status {entry.disposition_status!r} is listed twice",
                )
            )
        seen.add(entry.disposition_status)
        entries.append(entry)
    if problems:
        raise InvalidCatalog("; ".join(message for _, message in problems))
    return entries


def _parse_entry(out: validation.Violations, at: str, item: Any) -> Disposition | None:
    if not isinstance(item, dict):
        out.append((at, f"{at} must be an object"))
        return None
    before = len(out)
    for key in sorted(set(item) - _KEYS):
        out.append((f"{at}.{key}", f"{at}.{key} is not a known field"))
    status = item.get("disposition_status")
    if not isinstance(status, str):
        out.append((f"{at}.disposition_status", f"{at}.disposition_status must be a string"))
    else:
        validation.required_text(out, f"{at}.disposition_status", status)
    label = item.get("label")
    if label is None:  # omitted or null: the status itself
        label = status
    elif not isinstance(label, str):
        out.append((f"{at}.label", f"{at}.label must be a string"))
    else:
        validation.required_text(out, f"{at}.label", label)
    flags = {name: item.get(name, False) for name in _FLAGS}
    for name, value in flags.items():
        if not isinstance(value, bool):
            out.append((f"{at}.{name}", f"{at}.{name} must be true or false"))
    if len(out) > before:
        return None
    assert isinstance(status, str) and isinstance(label, str)
    return Disposition(status, label, **flags)


async def set_catalog(
    db: Database, *, tenant_id: str, sub_tenant_id: str, dispositions: list[Disposition]
) -> None:
    """Replace the catalog of a tenant (`*`) or sub-tenant, atomically."""
    async with db.write() as conn:
        await catalogs.replace_catalog(
            conn,
            tenant_id=tenant_id,
            sub_tenant_id=sub_tenant_id,
            dispositions=dispositions,
            now=datetime.now(UTC),
        )


async def get_catalog(db: Database, *, tenant_id: str, sub_tenant_id: str) -> list[Disposition]:
    """Exactly the catalog defined for a tenant (`*`) or sub-tenant; empty when none."""
    async with db.read() as conn:
        return await catalogs.list_catalog(conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id)


async def clear_catalog(db: Database, *, tenant_id: str, sub_tenant_id: str) -> int:
    """Remove the catalog of a tenant (`*`) or sub-tenant; returns how many entries it had."""
    async with db.write() as conn:
        return await catalogs.delete_catalog(conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id)
