"""PostgreSQL's units of work: one statement reads, one statement writes and commits.

A unit reads everything it needs in one statement (READ), decides in Python, and writes the
whole plan in one statement (WRITE: a data-modifying CTE over arrays, run outside an explicit
transaction, so it commits as it completes): two round trips, through asyncpg's own pool with
prepared statements (no ORM, no per-checkout ping). Units of any process commit concurrently;
what serializes them is only what must: the rows they change, and each tenant's feed cursor.

Nothing is locked between the two statements, so WRITE checks that everything the decision
relied on still holds, and aborts itself (`disposition_conflict()`, SQLSTATE 40001) if not:
every status it changes is still the one READ saw (UPDATE ... WHERE status IS NOT DISTINCT FROM
expected, re-checked on the newest row version), every customer, call and idempotency key it
creates is still new (ON CONFLICT DO NOTHING, counted), and every status it sets is allowed by
the catalog in force. The unit then reads and decides again; after OPTIMISTIC_ATTEMPTS such
conflicts it runs inside a transaction with the customers locked by READ (FOR UPDATE).

WRITE takes its locks in one order for every writer (customers, calls, the key, the counters,
then the feed cursors; each set sorted), each step gated on the previous one's result, so two
writers never wait for each other in a cycle. It also announces each tenant's new last cursor
with NOTIFY (delivered at commit) to the change feeds of every replica (postgres_feed.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg

from server.records import (
    Change,
    CustomerState,
    Disposition,
    EffectiveCatalog,
    NewCall,
    Plan,
    Reads,
    Scope,
    Snapshot,
    StoredKey,
)
from server.storage import as_utc, bulk, units

T = TypeVar("T")

OPTIMISTIC_ATTEMPTS = 3
LOCKED_ATTEMPTS = 3
FEED_CHANNEL = "disposition_feed"
_RETRIED = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


class Statement:
    """SQL with `:name` parameters, numbered for the driver once; arguments taken by name."""

    def __init__(self, sql: str) -> None:
        self.names: list[str] = []

        def number(found: re.Match[str]) -> str:
            if found[1] not in self.names:
                self.names.append(found[1])
            return f"${self.names.index(found[1]) + 1}"

        self.sql = _PARAMETER.sub(number, sql)

    def arguments(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


_PARAMETER = re.compile(r"(?<![:\w]):([a-z_]+)")

# The sub-tenant's own catalog when it has one, else the tenant-wide one ('*').
_CATALOG_IN_FORCE = (
    "CASE WHEN EXISTS (SELECT 1 FROM disposition_catalog o"
    " WHERE o.tenant_id = {t} AND o.sub_tenant_id = {s}) THEN {s} ELSE '*' END"
)

# -- READ: rows of four kinds, each a part of the Snapshot -------------------------------------
# Every lookup is a join of an array with a unique index: one probe per element, whatever the
# (generic) plan assumes of the table's size.

_READ_CUSTOMERS = """
WITH found AS MATERIALIZED (
  SELECT c.id, c.tenant_id, c.sub_tenant_id, c.customer_id, c.disposition_status
  FROM unnest(:want_t::text[], :want_s::text[], :want_cid::text[]) AS w(t, s, cid)
  JOIN customers c ON c.tenant_id = w.t AND c.sub_tenant_id = w.s AND c.customer_id = w.cid
  {lock}
)
SELECT 0 AS kind, id AS n, tenant_id AS a, sub_tenant_id AS b, customer_id AS c,
       disposition_status AS d, NULL::text AS e, NULL::boolean AS f, NULL::boolean AS g,
       NULL::boolean AS h, NULL::timestamptz AS at
FROM found
UNION ALL
SELECT 1, e.position, k.t, k.s, e.sub_tenant_id, e.disposition_status, e.label, e.final,
       e.do_not_call, e.callback, NULL
FROM unnest(:catalog_t::text[], :catalog_s::text[]) AS k(t, s)
JOIN disposition_catalog e ON e.tenant_id = k.t AND e.sub_tenant_id = {catalog_in_force}
""".replace("{catalog_in_force}", _CATALOG_IN_FORCE.format(t="k.t", s="k.s"))
_READ_CALLS_AND_KEY = """
UNION ALL
SELECT 2, NULL, NULL, NULL, l.call_id, NULL, NULL, NULL, NULL, NULL, NULL
FROM unnest(:call_ids::text[]) AS i(call_id)
JOIN calls l ON l.partner_pk = :calls_partner AND l.call_id = i.call_id
UNION ALL
SELECT 3, NULL, method, fingerprint, response, NULL, NULL, NULL, NULL, NULL, created_at
FROM idempotency_keys WHERE partner_pk = :key_partner AND key = :key
"""
# (customers and catalogs only, or all four) x (optimistic, customers locked)
_READS = {
    (full, locked): Statement(
        _READ_CUSTOMERS.replace("{lock}", "ORDER BY c.id FOR UPDATE OF c" if locked else "")
        + (_READ_CALLS_AND_KEY if full else "")
    )
    for full in (False, True)
    for locked in (False, True)
}

# -- WRITE: the plan, and what follows from it -------------------------------------------------
# Each step runs only once the step before has written (its scalar subquery in the WHERE
# clause): the lock order of the module's docstring. `held` is the check of everything the
# decision relied on; the final SELECT aborts the statement when it failed.

_NEW_CUSTOMERS = """
new_ids AS MATERIALIZED (
  SELECT coalesce(array_agg(nextval(pg_get_serial_sequence('customers', 'id')) ORDER BY n),
                  '{}') AS ids
  FROM generate_series(1, cardinality(:new_t::text[])) AS n
),
new_c AS (
  INSERT INTO customers AS c (id, tenant_id, sub_tenant_id, customer_id, name, email,
                              disposition_status, created_at, updated_at)
  SELECT (SELECT ids FROM new_ids)[n.ord], n.t, n.s, n.cid, n.nm, n.em, n.st,
         :now::timestamptz, :now::timestamptz
  FROM unnest(:new_t::text[], :new_s::text[], :new_cid::text[], :new_name::text[],
              :new_email::text[], :new_status::text[])
       WITH ORDINALITY AS n(t, s, cid, nm, em, st, ord)
  ORDER BY n.ord
  ON CONFLICT (tenant_id, sub_tenant_id, customer_id) DO NOTHING
  RETURNING c.id
),
upd AS (
  UPDATE customers AS c
  SET disposition_status = CASE WHEN u.set_status THEN u.st ELSE c.disposition_status END,
      name = coalesce(u.nm, c.name), email = coalesce(u.em, c.email), updated_at = :now
  FROM unnest(:upd_pk::bigint[], :upd_set::boolean[], :upd_expected::text[],
              :upd_status::text[], :upd_name::text[], :upd_email::text[])
       AS u(pk, set_status, expected, st, nm, em)
  WHERE c.id = u.pk
    AND (NOT u.set_status OR c.disposition_status IS NOT DISTINCT FROM u.expected)
    AND (SELECT count(*) FROM new_c) >= 0
  RETURNING c.id
),"""
_STATUSES_ONLY = """
upd AS (
  UPDATE customers AS c SET disposition_status = u.st, updated_at = :now
  FROM unnest(:upd_pk::bigint[], :upd_expected::text[], :upd_status::text[])
       AS u(pk, expected, st)
  WHERE c.id = u.pk AND c.disposition_status IS NOT DISTINCT FROM u.expected
  RETURNING c.id
),"""
_HELD = """
held AS MATERIALIZED (
  SELECT {created}(SELECT count(*) FROM upd) = cardinality(:upd_pk::bigint[])
     AND NOT EXISTS (
       SELECT 1 FROM unnest(:allowed_t::text[], :allowed_s::text[], :allowed_status::text[])
                     AS a(t, s, st),
            LATERAL (SELECT {catalog_in_force} AS sub) AS x
       WHERE EXISTS (SELECT 1 FROM disposition_catalog e
                     WHERE e.tenant_id = a.t AND e.sub_tenant_id = x.sub)
         AND NOT EXISTS (SELECT 1 FROM disposition_catalog e WHERE e.tenant_id = a.t
                         AND e.sub_tenant_id = x.sub AND e.disposition_status = a.st)
     ) AS ok
),""".replace("{catalog_in_force}", _CATALOG_IN_FORCE.format(t="a.t", s="a.s"))
_CALLS_AND_KEY = """
calls_ins AS (
  INSERT INTO calls (partner_pk, call_id, customer_pk, tenant_id, sub_tenant_id, recording_url,
                     start_time, end_time, contact_number, agent_id, agent_email, agent_name,
                     callback_url, metadata, custom_fields, request_id, created_at)
  SELECT x.partner, x.call_id, coalesce(x.pk, (SELECT ids FROM new_ids)[x.new]), x.t, x.s,
         x.url, x.st, x.et, x.num, x.agent, x.aemail, x.aname, x.cb, x.meta::json,
         x.fields::json, x.req, :now
  FROM unnest(:call_partner::bigint[], :call_id::text[], :call_pk::bigint[],
              :call_new::integer[], :call_t::text[], :call_s::text[], :call_url::text[],
              :call_start::timestamptz[], :call_end::timestamptz[], :call_number::text[],
              :call_agent::text[], :call_agent_email::text[], :call_agent_name::text[],
              :call_callback::text[], :call_metadata::text[], :call_fields::text[],
              :call_request::text[])
       AS x(partner, call_id, pk, new, t, s, url, st, et, num, agent, aemail, aname, cb, meta,
            fields, req)
  WHERE (SELECT ok FROM held)
  ORDER BY x.partner, x.call_id
  ON CONFLICT (partner_pk, call_id) DO NOTHING
  RETURNING 1
),
outbox_ins AS (
  INSERT INTO webhook_outbox (kind, tenant_id, sub_tenant_id, partner_pk, payload, created_at)
  SELECT o.kind, o.t, o.s, o.partner, o.payload, :now
  FROM unnest(:outbox_kind::text[], :outbox_t::text[], :outbox_s::text[],
              :outbox_partner::bigint[], :outbox_payload::text[])
       AS o(kind, t, s, partner, payload)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM calls_ins) >= 0
  RETURNING 1
),
key_new AS (
  INSERT INTO idempotency_keys (partner_pk, key, method, fingerprint, response, created_at)
  SELECT :key_partner::bigint, :key::text, :key_method::text, :key_fingerprint::text,
         :key_response::text, :now
  WHERE :key_partner::bigint IS NOT NULL AND :key_replaces::timestamptz IS NULL
    AND (SELECT ok FROM held) AND (SELECT count(*) FROM calls_ins) >= 0
  ON CONFLICT (partner_pk, key) DO NOTHING
  RETURNING 1
),
key_old AS (
  UPDATE idempotency_keys SET method = :key_method, fingerprint = :key_fingerprint,
                              response = :key_response, created_at = :now
  WHERE partner_pk = :key_partner AND key = :key AND created_at = :key_replaces
    AND (SELECT ok FROM held) AND (SELECT count(*) FROM calls_ins) >= 0
  RETURNING 1
),
key_prune AS (
  DELETE FROM idempotency_keys WHERE id IN (
    SELECT id FROM idempotency_keys
    WHERE :key_partner::bigint IS NOT NULL AND created_at < :key_prune_before
      AND NOT (partner_pk = :key_partner AND key = :key)
      AND (SELECT count(*) FROM key_new) + (SELECT count(*) FROM key_old) = 1
    ORDER BY created_at LIMIT :key_prune_limit FOR UPDATE SKIP LOCKED)
  RETURNING 1
),"""
_CHANGES = """
counts AS (
  INSERT INTO status_counts AS sc (tenant_id, sub_tenant_id, disposition_status, customers)
  SELECT d.t, d.s, d.st, d.n
  FROM unnest(:count_t::text[], :count_s::text[], :count_status::text[], :count_n::bigint[])
       AS d(t, s, st, n)
  WHERE (SELECT ok FROM held){after_key}
  ORDER BY d.t, d.s, d.st
  ON CONFLICT (tenant_id, sub_tenant_id, disposition_status)
  DO UPDATE SET customers = sc.customers + excluded.customers
  RETURNING 1
),
hours AS (
  INSERT INTO status_change_hours AS sh (tenant_id, sub_tenant_id, hour, disposition_status,
                                         changes)
  SELECT d.t, d.s, :hour::timestamptz, d.st, d.n
  FROM unnest(:hour_t::text[], :hour_s::text[], :hour_status::text[], :hour_n::bigint[])
       AS d(t, s, st, n)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM counts) >= 0
  ORDER BY d.t, d.s, d.st
  ON CONFLICT (tenant_id, sub_tenant_id, hour, disposition_status)
  DO UPDATE SET changes = sh.changes + excluded.changes
  RETURNING 1
),
seq AS (
  INSERT INTO feed_sequences AS f (tenant_id, last_seq)
  SELECT q.t, q.n FROM unnest(:cursor_t::text[], :cursor_n::bigint[]) AS q(t, n)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM hours) >= 0
  ORDER BY q.t
  ON CONFLICT (tenant_id) DO UPDATE SET last_seq = f.last_seq + excluded.last_seq
  RETURNING f.tenant_id, f.last_seq
),
hist AS (
  INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id, previous_status,
                                   new_status, source, partner_pk, request_id, changed_at)
  SELECT seq.last_seq - h.off, {customer_pk}, h.t, h.s, h.prev, h.new_status, h.src,
         h.partner, h.req, :now
  FROM unnest(:change_t::text[], :change_s::text[], :change_pk::bigint[],
              :change_new::integer[], :change_previous::text[], :change_status::text[],
              :change_source::text[], :change_partner::bigint[], :change_request::text[],
              :change_offset::bigint[])
       WITH ORDINALITY AS h(t, s, pk, new, prev, new_status, src, partner, req, off, ord)
  JOIN seq ON seq.tenant_id = h.t
  ORDER BY h.ord
  RETURNING 1
)
SELECT CASE
         WHEN NOT (SELECT ok FROM held) THEN disposition_conflict('a customer or a catalog')
         {more_checks}
       END,
       (SELECT count(*) FROM hist),
       (SELECT count(pg_notify(:channel, json_build_array(current_schema(), tenant_id,
                                                          last_seq)::text)) FROM seq)
"""
_MORE_CHECKS = """
         WHEN (SELECT count(*) FROM calls_ins) <> cardinality(:call_id::text[])
           THEN disposition_conflict('a call')
         WHEN :key_partner::bigint IS NOT NULL
              AND (SELECT count(*) FROM key_new) + (SELECT count(*) FROM key_old) <> 1
           THEN disposition_conflict('the idempotency key')"""

# Status changes of existing customers only (single updates, batch updates), or everything.
WRITE_STATUSES = Statement(
    "WITH"
    + _STATUSES_ONLY
    + _HELD.replace("{created}", "")
    + _CHANGES.replace("{after_key}", "")
    .replace("{customer_pk}", "h.pk")
    .replace("{more_checks}", "")
)
WRITE_ANY = Statement(
    "WITH"
    + _NEW_CUSTOMERS
    + _HELD.replace(
        "{created}", "(SELECT count(*) FROM new_c) = cardinality(:new_t::text[])\n     AND "
    )
    + _CALLS_AND_KEY
    + _CHANGES.replace("{after_key}", " AND (SELECT count(*) FROM key_prune) >= 0")
    .replace("{customer_pk}", "coalesce(h.pk, (SELECT ids FROM new_ids)[h.new])")
    .replace("{more_checks}", _MORE_CHECKS)
)


def _only_statuses(plan: Plan) -> bool:
    return not (plan.new_customers or plan.profiles or plan.calls or plan.key)


def write_statement(plan: Plan) -> tuple[str, list[Any]]:
    """The WRITE statement for a plan and its arguments (columns as arrays).

    New customers get their ids in the statement, in the order of their (sorted) array, the
    order in which writers insert keys; the changes and calls of a new customer name it by its
    position there (1-based), those of an existing one by its id.
    """
    new = sorted(plan.new_customers)
    positions = {(n.tenant_id, n.sub_tenant_id, n.customer_id): i for i, n in enumerate(new, 1)}

    def position(row: Change | NewCall) -> int | None:
        """A new customer's position in `new`; None for an existing one (named by its id)."""
        if row.customer_pk is not None:
            return None
        return positions[row.tenant_id, row.sub_tenant_id, row.customer_id]

    changes = plan.changes
    values: dict[str, Any] = {"now": plan.now, "hour": units.hour_of(plan.now)}
    values["channel"] = FEED_CHANNEL
    updates = units.customer_updates(plan)
    # Every status set, checked against its scope's catalog in force.
    allowed = sorted({(c.tenant_id, c.sub_tenant_id, c.new_status) for c in changes
                      if c.new_status})  # fmt: skip
    _put(values, "allowed", ("t", "s", "status"), allowed)
    _put(values, "count", ("t", "s", "status", "n"), units.status_deltas(plan))
    _put(values, "hour", ("t", "s", "status", "n"), units.hour_deltas(plan))
    _put(values, "cursor", ("t", "n"), units.tenant_counts(changes))
    _put(values, "change", ("t", "s", "pk", "new", "previous", "status", "source", "partner",
                            "request", "offset"), [
        (c.tenant_id, c.sub_tenant_id, c.customer_pk, position(c), c.previous_status,
         c.new_status, c.source, c.partner_pk, c.request_id, offset)
        for c, offset in zip(changes, units.cursor_offsets(changes), strict=True)
    ])  # fmt: skip
    if _only_statuses(plan):
        _put(values, "upd", ("pk", "expected", "status"),
             [(u.customer_pk, u.expected, u.status) for u in updates])  # fmt: skip
        return WRITE_STATUSES.sql, WRITE_STATUSES.arguments(values)
    _put(values, "new", ("t", "s", "cid", "name", "email", "status"), new)
    _put(values, "upd", ("pk", "set", "expected", "status", "name", "email"), updates)
    _put(values, "call", ("partner", "id", "pk", "new", "t", "s", "url", "start", "end",
                          "number", "agent", "agent_email", "agent_name", "callback", "metadata",
                          "fields", "request"), [
        (c.partner_pk, c.call_id, c.customer_pk, position(c), c.tenant_id, c.sub_tenant_id,
         c.recording_url, c.start_time, c.end_time, c.contact_number, c.agent_id,
         c.agent_email, c.agent_name, c.callback_url, bulk.db_json(c.metadata),
         bulk.db_json(c.custom_fields), c.request_id)
        for c in plan.calls
    ])  # fmt: skip
    _put(values, "outbox", ("kind", "t", "s", "partner", "payload"), units.outbox_rows(plan))
    key = plan.key
    values.update(
        key_partner=None if key is None else key.partner_pk,
        key=None if key is None else key.key,
        key_method=None if key is None else key.method,
        key_fingerprint=None if key is None else key.fingerprint,
        key_response=None if key is None else key.response,
        key_replaces=None if key is None else key.replaces,
        key_prune_before=None if key is None else key.prune_before,
        key_prune_limit=units.PRUNE_KEYS,
    )
    return WRITE_ANY.sql, WRITE_ANY.arguments(values)


def _put(values: dict[str, Any], prefix: str, names: tuple[str, ...], rows: Any) -> None:
    """`rows` as one array per column, named `<prefix>_<name>` (asyncpg sends each as one)."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    for name, column in zip(names, columns, strict=True):
        values[f"{prefix}_{name}"] = list(column)


def read_statement(reads: Reads, *, locked: bool) -> tuple[str, list[Any]]:
    """The READ statement for what a unit reads, and its arguments."""
    values: dict[str, Any] = {}
    wanted = [(*scope, cid) for scope, ids in reads.customers.items() for cid in ids]
    _put(values, "want", ("t", "s", "cid"), wanted)
    _put(values, "catalog", ("t", "s"), list(reads.catalogs))
    full = reads.calls is not None or reads.key is not None
    if full:
        values["calls_partner"], values["call_ids"] = (
            (reads.calls[0], list(reads.calls[1])) if reads.calls is not None else (None, [])
        )
        values["key_partner"], values["key"] = reads.key if reads.key is not None else (None, None)
    statement = _READS[full, locked]
    return statement.sql, statement.arguments(values)


def snapshot_of(reads: Reads, rows: list[asyncpg.Record]) -> Snapshot:
    customers: dict[Scope, dict[str, CustomerState]] = {s: {} for s in reads.customers}
    entries: dict[Scope, list[tuple[int, str, Disposition]]] = {}
    existing_calls: set[str] = set()
    key: StoredKey | None = None
    for kind, n, a, b, c, d, e, f, g, h, at in rows:
        if kind == 0:
            customers[Scope(a, b)][c] = CustomerState(n, c, d)
        elif kind == 1:
            entries.setdefault(Scope(a, b), []).append((n, c, Disposition(d, e, f, g, h)))
        elif kind == 2:
            existing_calls.add(c)
        else:
            key = StoredKey(a, b, c, as_utc(at))
    catalogs = {}
    for scope in reads.catalogs:
        found = sorted(entries.get(scope, []), key=lambda entry: entry[0])
        catalogs[scope] = (
            EffectiveCatalog(found[0][1], [entry[2] for entry in found])
            if found
            else EffectiveCatalog(None, [])
        )
    return Snapshot(customers, catalogs, existing_calls, key)


async def _session_kept(_conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: units leave no session state behind (no
    cursor, lock, LISTEN or SET). asyncpg still rolls back an open transaction first; its default
    reset would cost a round trip per unit."""


class PostgresUnits:
    """storage.units.Units on PostgreSQL, on a pool of asyncpg connections of its own."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None,
        pool_size: int,
        on_commit: Callable[[], None],
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self._on_commit = on_commit
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None

    @property
    def concurrency(self) -> int:
        # One group commit in flight per process; the next gathers meanwhile, so that under
        # load each statement carries many updates. Batch requests run units of their own.
        return 1

    async def pool(self) -> asyncpg.Pool:
        """The pool, opened on first use (inside the running event loop)."""
        if self._pool is None:
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._pool is None:
                    settings = {} if self.schema is None else {"search_path": self.schema}
                    # The statements are written for generic plans (arrays, never literals):
                    # planned once per connection instead of at every execution.
                    settings["plan_cache_mode"] = "force_generic_plan"
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=1, max_size=self.pool_size, server_settings=settings,
                        reset=_session_kept,
                    )  # fmt: skip
        return self._pool

    def pool_state(self) -> tuple[int, int] | None:
        """(connections open, connections in use), None before the pool opens (metrics: read
        from another thread, so only from the pool's plain counters)."""
        pool = self._pool
        if pool is None:
            return None
        return pool.get_size(), pool.get_size() - pool.get_idle_size()

    async def run(self, reads: Reads, decide: Callable[[Snapshot], tuple[Plan | None, T]]) -> T:
        pool = await self.pool()
        read = read_statement(reads, locked=False)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with pool.acquire() as conn:
                rows = await conn.fetch(read[0], *read[1])
                plan, result = decide(snapshot_of(reads, rows))
                if plan is None:
                    return result
                write, arguments = write_statement(plan)
                try:
                    await conn.fetch(write, *arguments)
                except _RETRIED:
                    continue
            self._on_commit()
            return result
        read = read_statement(reads, locked=True)
        for attempt in range(LOCKED_ATTEMPTS):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(read[0], *read[1])
                    plan, result = decide(snapshot_of(reads, rows))
                    if plan is None:
                        return result
                    write, arguments = write_statement(plan)
                    await conn.fetch(write, *arguments)
            except _RETRIED:
                if attempt + 1 == LOCKED_ATTEMPTS:
                    raise
                continue
            self._on_commit()
            return result
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
