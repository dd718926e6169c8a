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
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg

from server.storage import as_utc, bulk, units
from server.storage.catalogs import Disposition, EffectiveCatalog
from server.storage.customers import CustomerState
from server.storage.idempotency import StoredKey
from server.storage.units import Plan, Reads, Snapshot

T = TypeVar("T")

OPTIMISTIC_ATTEMPTS = 3
LOCKED_ATTEMPTS = 3
FEED_CHANNEL = "disposition_feed"
_RETRIED = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)

_CATALOG_IN_FORCE = (
    # The sub-tenant's own catalog when it has one, else the tenant-wide one ('*').
    "CASE WHEN EXISTS (SELECT 1 FROM disposition_catalog o"
    " WHERE o.tenant_id = {t} AND o.sub_tenant_id = {s}) THEN {s} ELSE '*' END"
)

READ_SQL = """
WITH found AS MATERIALIZED (
  SELECT c.id, c.tenant_id, c.sub_tenant_id, c.customer_id, c.disposition_status
  FROM unnest($1::text[], $2::text[], $3::text[]) AS w(t, s, cid)
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
FROM unnest($4::text[], $5::text[]) AS k(t, s)
JOIN disposition_catalog e ON e.tenant_id = k.t AND e.sub_tenant_id = CATALOG_IN_FORCE
UNION ALL
SELECT 2, NULL, NULL, NULL, call_id, NULL, NULL, NULL, NULL, NULL, NULL
FROM calls WHERE partner_pk = $6 AND call_id = ANY($7::text[])
UNION ALL
SELECT 3, NULL, method, fingerprint, response, NULL, NULL, NULL, NULL, NULL, created_at
FROM idempotency_keys WHERE partner_pk = $8 AND key = $9
""".replace("CATALOG_IN_FORCE", _CATALOG_IN_FORCE.format(t="k.t", s="k.s"))
READ_OPTIMISTIC = READ_SQL.format(lock="")
READ_LOCKED = READ_SQL.format(lock="ORDER BY c.id FOR UPDATE OF c")

# $1 now; every other parameter is an array (empty when the plan has none of its kind) or a
# scalar of the idempotency key. Each step runs only once the one before has written (its
# scalar subquery in the WHERE clause), in the lock order described above.
WRITE_SQL = """
WITH new_c AS (
  INSERT INTO customers AS c (tenant_id, sub_tenant_id, customer_id, name, email,
                              disposition_status, created_at, updated_at)
  SELECT n.t, n.s, n.cid, n.nm, n.em, n.st, $1::timestamptz, $1::timestamptz
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
       AS n(t, s, cid, nm, em, st)
  ORDER BY n.t, n.s, n.cid
  ON CONFLICT (tenant_id, sub_tenant_id, customer_id) DO NOTHING
  RETURNING c.id, c.tenant_id, c.sub_tenant_id, c.customer_id
),
upd AS (
  UPDATE customers AS c
  SET disposition_status = CASE WHEN u.set_status THEN u.st ELSE c.disposition_status END,
      name = coalesce(u.nm, c.name), email = coalesce(u.em, c.email), updated_at = $1
  FROM unnest($8::bigint[], $9::boolean[], $10::text[], $11::text[], $12::text[], $13::text[])
       AS u(pk, set_status, expected, st, nm, em)
  WHERE c.id = u.pk
    AND (NOT u.set_status OR c.disposition_status IS NOT DISTINCT FROM u.expected)
    AND (SELECT count(*) FROM new_c) >= 0
  RETURNING c.id
),
held AS MATERIALIZED (
  SELECT (SELECT count(*) FROM new_c) = cardinality($2::text[])
     AND (SELECT count(*) FROM upd) = cardinality($8::bigint[])
     AND NOT EXISTS (
       SELECT 1 FROM unnest($14::text[], $15::text[], $16::text[]) AS a(t, s, st),
            LATERAL (SELECT CATALOG_IN_FORCE AS sub) AS x
       WHERE EXISTS (SELECT 1 FROM disposition_catalog e
                     WHERE e.tenant_id = a.t AND e.sub_tenant_id = x.sub)
         AND NOT EXISTS (SELECT 1 FROM disposition_catalog e WHERE e.tenant_id = a.t
                         AND e.sub_tenant_id = x.sub AND e.disposition_status = a.st)
     ) AS ok
),
calls_ins AS (
  INSERT INTO calls (partner_pk, call_id, customer_pk, tenant_id, sub_tenant_id, recording_url,
                     start_time, end_time, contact_number, agent_id, agent_email, agent_name,
                     callback_url, metadata, custom_fields, request_id, created_at)
  SELECT x.partner, x.call_id, coalesce(x.pk, r.id), x.t, x.s, x.url, x.st, x.et, x.num,
         x.agent, x.aemail, x.aname, x.cb, x.meta::json, x.fields::json, x.req, $1
  FROM unnest($17::bigint[], $18::text[], $19::text[], $20::bigint[], $21::text[], $22::text[],
              $23::text[], $24::timestamptz[], $25::timestamptz[], $26::text[], $27::text[],
              $28::text[], $29::text[], $30::text[], $31::text[], $32::text[], $33::text[])
       AS x(partner, call_id, cid, pk, t, s, url, st, et, num, agent, aemail, aname, cb, meta,
            fields, req)
  LEFT JOIN new_c r ON x.pk IS NULL AND r.tenant_id = x.t AND r.sub_tenant_id = x.s
                   AND r.customer_id = x.cid
  WHERE (SELECT ok FROM held)
  ORDER BY x.partner, x.call_id
  ON CONFLICT (partner_pk, call_id) DO NOTHING
  RETURNING 1
),
key_new AS (
  INSERT INTO idempotency_keys (partner_pk, key, method, fingerprint, response, created_at)
  SELECT $34::bigint, $35::text, $36::text, $37::text, $38::text, $1
  WHERE $34::bigint IS NOT NULL AND $39::timestamptz IS NULL
    AND (SELECT ok FROM held) AND (SELECT count(*) FROM calls_ins) >= 0
  ON CONFLICT (partner_pk, key) DO NOTHING
  RETURNING 1
),
key_old AS (
  UPDATE idempotency_keys SET method = $36, fingerprint = $37, response = $38, created_at = $1
  WHERE partner_pk = $34 AND key = $35 AND created_at = $39
    AND (SELECT ok FROM held) AND (SELECT count(*) FROM calls_ins) >= 0
  RETURNING 1
),
key_prune AS (
  DELETE FROM idempotency_keys WHERE id IN (
    SELECT id FROM idempotency_keys
    WHERE $34::bigint IS NOT NULL AND created_at < $40 AND NOT (partner_pk = $34 AND key = $35)
      AND (SELECT count(*) FROM key_new) + (SELECT count(*) FROM key_old) = 1
    ORDER BY created_at LIMIT $41 FOR UPDATE SKIP LOCKED)
  RETURNING 1
),
counts AS (
  INSERT INTO status_counts AS sc (tenant_id, sub_tenant_id, disposition_status, customers)
  SELECT d.t, d.s, d.st, d.n
  FROM unnest($42::text[], $43::text[], $44::text[], $45::bigint[]) AS d(t, s, st, n)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM key_prune) >= 0
  ORDER BY d.t, d.s, d.st
  ON CONFLICT (tenant_id, sub_tenant_id, disposition_status)
  DO UPDATE SET customers = sc.customers + excluded.customers
  RETURNING 1
),
hours AS (
  INSERT INTO status_change_hours AS sh (tenant_id, sub_tenant_id, hour, disposition_status,
                                         changes)
  SELECT d.t, d.s, $46::timestamptz, d.st, d.n
  FROM unnest($47::text[], $48::text[], $49::text[], $50::bigint[]) AS d(t, s, st, n)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM counts) >= 0
  ORDER BY d.t, d.s, d.st
  ON CONFLICT (tenant_id, sub_tenant_id, hour, disposition_status)
  DO UPDATE SET changes = sh.changes + excluded.changes
  RETURNING 1
),
seq AS (
  INSERT INTO feed_sequences AS f (tenant_id, last_seq)
  SELECT q.t, q.n FROM unnest($51::text[], $52::bigint[]) AS q(t, n)
  WHERE (SELECT ok FROM held) AND (SELECT count(*) FROM hours) >= 0
  ORDER BY q.t
  ON CONFLICT (tenant_id) DO UPDATE SET last_seq = f.last_seq + excluded.last_seq
  RETURNING f.tenant_id, f.last_seq
),
hist AS (
  INSERT INTO disposition_history (seq, customer_pk, tenant_id, sub_tenant_id, previous_status,
                                   new_status, source, partner_pk, request_id, changed_at)
  SELECT seq.last_seq - h.off, coalesce(h.pk, r.id), h.t, h.s, h.prev, h.new, h.src,
         h.partner, h.req, $1
  FROM unnest($53::text[], $54::text[], $55::text[], $56::bigint[], $57::text[], $58::text[],
              $59::text[], $60::bigint[], $61::text[], $62::bigint[]) WITH ORDINALITY
       AS h(t, s, cid, pk, prev, new, src, partner, req, off, ord)
  JOIN seq ON seq.tenant_id = h.t
  LEFT JOIN new_c r ON h.pk IS NULL AND r.tenant_id = h.t AND r.sub_tenant_id = h.s
                   AND r.customer_id = h.cid
  ORDER BY h.ord
  RETURNING 1
)
SELECT CASE
         WHEN NOT (SELECT ok FROM held) THEN disposition_conflict('a customer or a catalog')
         WHEN (SELECT count(*) FROM calls_ins) <> cardinality($18::text[])
           THEN disposition_conflict('a call')
         WHEN $34::bigint IS NOT NULL
              AND (SELECT count(*) FROM key_new) + (SELECT count(*) FROM key_old) <> 1
           THEN disposition_conflict('the idempotency key')
       END,
       (SELECT count(*) FROM hist),
       (SELECT count(pg_notify($63, json_build_array(current_schema(), tenant_id,
                                                     last_seq)::text)) FROM seq)
""".replace("CATALOG_IN_FORCE", _CATALOG_IN_FORCE.format(t="a.t", s="a.s"))


def write_arguments(plan: Plan) -> list[Any]:
    """WRITE_SQL's parameters for a plan (columns as arrays)."""
    changes = plan.changes
    # The statuses set, each checked against its scope's catalog in force.
    allowed = sorted({(c[0], c[1], c.new_status) for c in changes if c.new_status})
    calls = [
        (c.partner_pk, c.call_id, c.customer_id, c.customer_pk, c.tenant_id, c.sub_tenant_id,
         c.recording_url, c.start_time, c.end_time, c.contact_number, c.agent_id, c.agent_email,
         c.agent_name, c.callback_url, bulk.db_json(c.metadata), bulk.db_json(c.custom_fields),
         c.request_id)
        for c in plan.calls
    ]  # fmt: skip
    key = plan.key
    key_arguments = (
        (key.partner_pk, key.key, key.method, key.fingerprint, key.response, key.replaces,
         key.prune_before)
        if key is not None
        else (None,) * 7
    )  # fmt: skip
    history = [
        (c.tenant_id, c.sub_tenant_id, c.customer_id, c.customer_pk, c.previous_status,
         c.new_status, c.source, c.partner_pk, c.request_id, offset)
        for c, offset in zip(changes, units.cursor_offsets(changes), strict=True)
    ]  # fmt: skip
    return [
        plan.now,
        *_columns(plan.new_customers, 6),
        *_columns(units.customer_updates(plan), 6),
        *_columns(allowed, 3),
        *_columns(calls, 17),
        *key_arguments,
        units.PRUNE_KEYS,
        *_columns(units.status_deltas(plan), 4),
        units.hour_of(plan.now),
        *_columns(units.hour_deltas(plan), 4),
        *_columns(units.tenant_counts(changes), 2),
        *_columns(history, 10),
        FEED_CHANNEL,
    ]


def _columns(rows: Any, width: int) -> list[list[Any]]:
    """Rows as `width` column lists (asyncpg sends each as one array)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def read_arguments(reads: Reads) -> list[Any]:
    wanted = [(*scope, cid) for scope, ids in reads.customers.items() for cid in ids]
    partner_pk, call_ids = reads.calls if reads.calls is not None else (None, [])
    key_partner, key = reads.key if reads.key is not None else (None, None)
    return [
        *_columns(wanted, 3),
        *_columns(list(reads.catalogs), 2),
        partner_pk,
        list(call_ids),
        key_partner,
        key,
    ]


def snapshot_of(reads: Reads, rows: list[asyncpg.Record]) -> Snapshot:
    customers: dict[units.Scope, dict[str, CustomerState]] = {s: {} for s in reads.customers}
    entries: dict[units.Scope, list[tuple[int, str, Disposition]]] = {}
    existing_calls: set[str] = set()
    key: StoredKey | None = None
    for kind, n, a, b, c, d, e, f, g, h, at in rows:
        if kind == 0:
            customers[units.Scope(a, b)][c] = CustomerState(n, c, d)
        elif kind == 1:
            entries.setdefault(units.Scope(a, b), []).append((n, c, Disposition(d, e, f, g, h)))
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
        # Leave connections for batch requests beside the group commits.
        return 2

    async def pool(self) -> asyncpg.Pool:
        """The pool, opened on first use (inside the running event loop)."""
        if self._pool is None:
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._pool is None:
                    settings = {} if self.schema is None else {"search_path": self.schema}
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=1, max_size=self.pool_size, server_settings=settings
                    )
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
        read_arguments_ = read_arguments(reads)
        for _ in range(OPTIMISTIC_ATTEMPTS):
            async with pool.acquire() as conn:
                rows = await conn.fetch(READ_OPTIMISTIC, *read_arguments_)
                plan, result = decide(snapshot_of(reads, rows))
                if plan is None:
                    return result
                try:
                    await conn.fetch(WRITE_SQL, *write_arguments(plan))
                except _RETRIED:
                    continue
            self._on_commit()
            return result
        for attempt in range(LOCKED_ATTEMPTS):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(READ_LOCKED, *read_arguments_)
                    plan, result = decide(snapshot_of(reads, rows))
                    if plan is None:
                        return result
                    await conn.fetch(WRITE_SQL, *write_arguments(plan))
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
