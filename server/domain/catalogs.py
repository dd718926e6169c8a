"""Disposition catalogs: which statuses a tenant, or one of its sub-tenants, accepts.

A tenant may define a tenant-wide catalog (sub-tenant `*`) and any sub-tenant its own, which
replaces the tenant-wide one for that sub-tenant. Without either, any status is accepted. The
empty status (clear) and an omitted one (unchanged) are always accepted. Writers read the
catalog with `load()` inside their own write transaction, so a status is checked against the
catalog that is in force when the change commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from server import context
from server.db import Database
from server.domain import validation
from server.errors import ValidationFailed
from server.storage import catalogs
from server.storage.catalogs import TENANT_WIDE as TENANT_WIDE
from server.storage.catalogs import Disposition as Disposition

MAX_ENTRIES = 500
SCOPE_SUB_TENANT, SCOPE_TENANT, SCOPE_NONE = "sub_tenant", "tenant", ""
_FLAGS = ("final", "do_not_call", "callback")
_KEYS = frozenset({"disposition_status", "label", *_FLAGS})


class InvalidCatalog(ValueError):
    """A catalog definition (e.g. the admin CLI's file) breaks the rules."""


@dataclass(frozen=True, slots=True)
class Catalog:
    """The catalog in force for a tenant and sub-tenant; `scope` says where it comes from."""

    scope: str
    dispositions: tuple[Disposition, ...]

    @property
    def restricted(self) -> bool:
        return bool(self.dispositions)

    @property
    def statuses(self) -> tuple[str, ...]:
        return tuple(entry.disposition_status for entry in self.dispositions)

    def check(self, out: validation.Violations, field: str, value: str | None) -> None:
        """Append a violation when `value` sets a status this catalog does not allow."""
        if value and self.dispositions:
            validation.one_of(out, field, value, self.statuses)

    def require(self, values: Iterable[tuple[str, str | None]]) -> None:
        """Raise ValidationFailed naming every (field, status) this catalog does not allow."""
        if not self.dispositions:
            return
        out: validation.Violations = []
        for field, value in values:
            self.check(out, field, value)
        if out:
            raise ValidationFailed(out)


UNRESTRICTED = Catalog(SCOPE_NONE, ())


async def load(conn: AsyncConnection, *, tenant_id: str, sub_tenant_id: str) -> Catalog:
    """The catalog in force, read on `conn` (a writer's own transaction) in one query."""
    found = await catalogs.effective_catalog(conn, tenant_id=tenant_id, sub_tenant_id=sub_tenant_id)
    return in_force(found)


def in_force(found: catalogs.EffectiveCatalog) -> Catalog:
    """The Catalog of an effective_catalog read."""
    if found.sub_tenant_id is None:
        return UNRESTRICTED
    scope = SCOPE_TENANT if found.sub_tenant_id == TENANT_WIDE else SCOPE_SUB_TENANT
    return Catalog(scope, tuple(found.dispositions))


async def list_dispositions(db: Database) -> Catalog:
    """The catalog in force for the caller's tenant and sub-tenant."""
    ctx = context.get()
    assert ctx.tenant_id is not None and ctx.sub_tenant_id is not None
    async with db.read() as conn:
        return await load(conn, tenant_id=ctx.tenant_id, sub_tenant_id=ctx.sub_tenant_id)


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
