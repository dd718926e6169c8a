"""The catalog in force: which statuses a tenant, or one of its sub-tenants, accepts.

A tenant may define a tenant-wide catalog (sub-tenant `*`) and any sub-tenant its own, which
replaces the tenant-wide one for that sub-tenant. Without either, any status is accepted. The
empty status (clear) and an omitted one (unchanged) are always accepted. Writers check statuses
against the catalog read in their own unit of work (`in_force` of the snapshot's
EffectiveCatalog), so a status is checked against the catalog in force when the change commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import ValidationFailed
from server.records import TENANT_WIDE, Disposition, EffectiveCatalog
from server.rules import validation

SCOPE_SUB_TENANT, SCOPE_TENANT, SCOPE_NONE = "sub_tenant", "tenant", ""


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


def in_force(found: EffectiveCatalog) -> Catalog:
    """The Catalog of an effective catalog read (storage.catalogs.effective_catalog)."""
    if found.sub_tenant_id is None:
        return UNRESTRICTED
    scope = SCOPE_TENANT if found.sub_tenant_id == TENANT_WIDE else SCOPE_SUB_TENANT
    return Catalog(scope, tuple(found.dispositions))
