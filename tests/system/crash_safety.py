"""Crash safety: kill the server (or Envoy) with SIGKILL under concurrent writes, restart it,
and check that nothing acknowledged was lost and nothing unacknowledged slipped in.

    .venv/bin/python -m tests.system.crash_safety [--kills 20] [--target server envoy]
        [--engine sqlite postgres]                       (`make crash-test`: the long form)

tests/system/test_crash_safety.py runs the short form (5 kills of each target) in `make test`.

The load: `--writers` threads send REST status updates through Envoy, each to customers of its
own (so each customer's updates are sequential and their order is known), every status unique;
one more thread ingests 20-call batches of new calls and customers. A killer sends SIGKILL at
random moments (0.2-0.8 s apart, so writes are in flight) and restarts the process: the server on
the same port, behind the same Envoy, with the `disposition-webhooks` worker that delivers its
webhooks (killed and restarted with it, as `make run` runs them); or Envoy, on new ports, in front
of the same server.

Every reply is one of three outcomes:
- 200: acknowledged. Its status must be in the customer's history; its batch's calls all stored.
- refused: the connection to Envoy was refused, so the request was never sent. Its status must
  not be anywhere; the writer keeps its customer.
- in doubt: any other failure (a 5xx envelope, a reset connection): the write may or may not have
  committed. The writer never writes that customer again, so an in-doubt write that committed can
  only be the customer's latest state; a batch in doubt must be stored whole or not at all.
The writer then waits until a read through Envoy succeeds before it writes again.

At the end, on the database itself: every customer's history is an unbroken chain (each row's
previous status is the row before's new status, the first starts from nothing) ending in its
stored status, and its statuses are exactly its acknowledged updates in the order they were
acknowledged, plus at most its one in-doubt update, last.

Webhooks, through the kills: a real receiver in this process (it outlives every restart) is the
endpoint of the writers' tenant, all sub-tenants, created with `disposition-admin` before the
load. It verifies every request's signature (the Standard Webhooks reference library) and answers
503 to the first attempt of about one event in 20, so retries are exercised too. Once the load
has stopped, each history row's `disposition.changed` event (webhook-id `evt_<row id>`) must reach
it with a 2xx answer at least once (the wait gives up after WEBHOOK_STALL_SECONDS without
progress); repeats are counted (at least once allows them); an event for no history row, or
with data that is not the row's, is a problem.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devstack import Credentials, EnvoyPorts, ServerProcess, onboard_at, run_envoy
from devstack.server import WEBHOOKS
from tests.support.databases import PostgresSchemas, settings_for, sql
from tests.support.payloads import batch_item
from tests.support.webhooks import Received, Receiver, create_endpoint

UPDATE = "/api/v1/partner/ingest/disposition-status"
BATCH = "/api/v1/partner/ingest/batch-call"
READ = "/api/v1/partner/customers/{}/disposition-status"
CUSTOMERS_PER_WRITER = 400
CALLS_PER_BATCH = 20
DISPOSITION_CHANGED = "disposition.changed"
WEBHOOK_ENV = {
    "WEBHOOK_ALLOW_PRIVATE_URLS": "true",  # the receiver listens on the loopback
    "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "WEBHOOK_TIMEOUT_SECONDS": "1",  # a killed process's retry claims last 2 x this + 10 s
    "WEBHOOK_LEASE_SECONDS": "3",
}
# After the load, deliveries stall while a killed process's endpoint lease (3 s) and retry
# claims (12 s) expire; the check gives up once none has arrived for a minute past that.
WEBHOOK_STALL_SECONDS = 12 + 60


@dataclass
class Attempt:
    customer_id: str
    status: str
    outcome: str  # "acked", "refused" or "in_doubt"


@dataclass
class BatchAttempt:
    call_ids: list[str]
    customer_ids: list[str]
    outcome: str


@dataclass
class Report:
    target: str
    engine: str
    kills: int = 0
    attempts: int = 0
    acked: int = 0
    refused: int = 0
    in_doubt: int = 0
    in_doubt_committed: int = 0
    batches_acked: int = 0
    batches_in_doubt: int = 0
    batches_in_doubt_committed: int = 0
    history_rows_checked: int = 0
    customers_checked: int = 0
    write_failures: dict[int, int] = field(default_factory=dict)  # HTTP status: writes
    # events (history rows), delivered (2xx at least once), duplicates (more 2xx), retried (first
    # attempt answered 503), missing, phantoms, wait_s (after the load until all delivered)
    webhooks: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        figures = {k: v for k, v in vars(self).items() if k != "problems"}
        return json.dumps({**figures, "problems": len(self.problems)})


class Gateway:
    """Where Envoy listens now (it moves when Envoy is restarted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        # The HTTP status of every write that was not a 200 (0: no reply at all).
        self.write_failures: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def request(
        self, method: str, path: str, body: object, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                method,
                path,
                body=None if body is None else json.dumps(body).encode(),
                headers={"content-type": "application/json", **headers},
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def outcome(self, method: str, path: str, body: object, headers: dict[str, str]) -> str:
        """ "acked" (200), "refused" (never sent) or "in_doubt" (anything else)."""
        try:
            status, _ = self.request(method, path, body, headers)
        except ConnectionRefusedError:
            return "refused"
        except (OSError, http.client.HTTPException):
            status = 0
        if status != 200 and method != "GET":
            with self._lock:
                self.write_failures[status] += 1
        return "acked" if status == 200 else "in_doubt"


class Load:
    """The writers and the batch thread, until stop is set."""

    def __init__(self, gateway: Gateway, partner: Credentials, writers: int) -> None:
        self.gateway = gateway
        self.partner = partner
        self.writers = writers
        self.stop = threading.Event()
        self.attempts: list[list[Attempt]] = [[] for _ in range(writers)]
        self.batches: list[BatchAttempt] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._guard, args=(self._writer, k), daemon=True)
            for k in range(writers)
        ] + [threading.Thread(target=self._guard, args=(self._batches, 0), daemon=True)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _guard(self, work: Callable[[int], None], k: int) -> None:
        try:
            work(k)
        except Exception as exc:  # reported by the check: a bug of this test, not a pass
            self.errors.append(f"load thread {k}: {exc!r}")

    def _wait_until_served(self, customer_id: str) -> None:
        """Reads are harmless: retry one until the stack answers again."""
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            read = self.gateway.outcome(
                "GET", READ.format(customer_id), None, self.partner.headers()
            )
            if read == "acked":
                return
            time.sleep(0.02)

    def _writer(self, k: int) -> None:
        active = [customer_id(k, i) for i in range(CUSTOMERS_PER_WRITER)]
        n = 0
        while not self.stop.is_set() and active:
            customer = active[n % len(active)]
            status = f"s{k}-{n}"
            n += 1
            body = {"customer_id": customer, "disposition_status": status}
            outcome = self.gateway.outcome("PUT", UPDATE, body, self.partner.headers())
            self.attempts[k].append(Attempt(customer, status, outcome))
            if outcome != "acked":
                if outcome == "in_doubt":
                    active.remove(customer)  # never written again: see the module's docstring
                self._wait_until_served(active[0] if active else customer)

    def _batches(self, _k: int) -> None:
        n = 0
        while not self.stop.is_set():
            calls = [f"crash-call-{n}-{i}" for i in range(CALLS_PER_BATCH)]
            customers = [f"crash-new-{n}-{i}" for i in range(CALLS_PER_BATCH)]
            n += 1
            body = {
                "data": [batch_item(c, cu, "new") for c, cu in zip(calls, customers, strict=True)]
            }
            outcome = self.gateway.outcome("POST", BATCH, body, self.partner.headers())
            self.batches.append(BatchAttempt(calls, customers, outcome))
            if outcome != "acked":
                self._wait_until_served(customer_id(0, 0))
            time.sleep(0.05)


def customer_id(writer: int, index: int) -> str:
    return f"crash-{writer}-{index}"


def seed(gateway: Gateway, partner: Credentials, writers: int) -> None:
    """Every writer's customers, with no status (so their history starts with the load)."""
    ids = [customer_id(k, i) for k in range(writers) for i in range(CUSTOMERS_PER_WRITER)]
    for start in range(0, len(ids), 1000):
        items = [batch_item(f"seed-{cid}", cid) for cid in ids[start : start + 1000]]
        status, body = gateway.request("POST", BATCH, {"data": items}, partner.headers())
        assert status == 200, body


class RestartableEnvoy:
    """Envoy in front of one server port; kill_and_restart() SIGKILLs it and starts a new one
    (on new ports). close() stops the current one."""

    def __init__(self, grpc_port: int, log: Path) -> None:
        self.grpc_port = grpc_port
        self.log = log
        self._stack = ExitStack()
        self.ports = self._start()

    def _start(self) -> EnvoyPorts:
        self._stack = ExitStack()
        return self._stack.enter_context(run_envoy(grpc_port=self.grpc_port, log_path=self.log))

    def kill_and_restart(self) -> EnvoyPorts:
        os.kill(self.ports.pid, signal.SIGKILL)
        self._stack.close()  # reaps the killed process
        self.ports = self._start()
        return self.ports

    def close(self) -> None:
        self._stack.close()


def run(
    *,
    target: str,
    engine: str,
    kills: int,
    writers: int,
    workdir: Path,
    postgres_url: str | None,
    webhooks: bool = True,
) -> Report:
    """One crash run; the report's `problems` lists every violation found (empty: it held).
    Without `webhooks`, no endpoint is created and deliveries are not checked."""
    report = Report(target, engine)
    if engine == "postgres":
        assert postgres_url is not None
        schemas = PostgresSchemas(postgres_url)
        database_url = schemas.new()
    else:
        schemas = None
        database_url = f"sqlite+aiosqlite:///{workdir / 'crash.db'}"
    # A graceful restart as deployed: the server reports NOT_SERVING and keeps serving for
    # longer than Envoy's health-check interval (1 s) before it stops taking calls.
    drain = {"SHUTDOWN_DRAIN_SECONDS": "1.5"} if target == "server-term" else {}
    # As `make run` starts them: the server, and a disposition-webhooks worker that delivers.
    server = ServerProcess(
        database_url, workdir / "server.log", **WEBHOOK_ENV, WEBHOOK_DELIVERY="worker", **drain
    )
    worker = ServerProcess(database_url, workdir / "webhooks.log", argv=WEBHOOKS, **WEBHOOK_ENV)
    receiver = Receiver().start()
    try:
        port = server.start()
        worker.start()
        if engine == "sqlite":
            assert settings_for(database_url).sqlite_path() is not None
        server.env["GRPC_PORT"] = str(port)  # restarts come back behind the same Envoy
        partner = onboard_at(database_url, "crash", rate_limit_per_minute=100_000_000)
        with ThreadPoolExecutor(1) as background:  # the admin CLI starts up while Envoy does
            endpoint = background.submit(
                create_endpoint, database_url, receiver.url, tenant_id=partner.tenant_id,
                sub_tenant_id="*", events=[DISPOSITION_CHANGED],
            ) if webhooks else None  # fmt: skip
            envoy = RestartableEnvoy(port, workdir / "envoy.log")
        try:
            if endpoint is not None:
                receiver.answer = WebhookPartner(endpoint.result()["secret"])
            gateway = Gateway(envoy.ports.http_port)
            _wait_for_route(gateway, partner)
            seed(gateway, partner, writers)
            with Load(gateway, partner, writers) as load:
                rng = random.Random(os.getpid())
                for _ in range(kills):
                    time.sleep(rng.uniform(0.2, 0.8))
                    if target in ("server", "server-term"):  # server-term: a graceful restart
                        sig = signal.SIGKILL if target == "server" else signal.SIGTERM
                        for process in (worker, server):
                            process.stop(sig=sig)
                        server.start()
                        worker.start()
                    else:
                        gateway.port = envoy.kill_and_restart().http_port
                    report.kills += 1
                time.sleep(1.0)  # writes after the last restart too
            stopped = time.monotonic()
            report.problems += load.errors
            _wait_for_route(gateway, partner)
            check(report, *read_database(database_url), load.attempts, load.batches)
            check_counters(report, database_url)
            if endpoint is not None:
                events = read_events(database_url, partner.tenant_id)
                received = wait_for_deliveries(receiver, events, WEBHOOK_STALL_SECONDS)
                check_webhooks(report, events, received)
                report.webhooks["wait_s"] = round(time.monotonic() - stopped, 1)
            report.write_failures = dict(sorted(gateway.write_failures.items()))
            if target == "server-term":
                _check_graceful(report)
        finally:
            envoy.close()
    finally:
        receiver.stop()
        for process in (worker, server):
            if process.process is not None and process.process.poll() is None:
                process.stop()
        if schemas is not None:
            schemas.drop_all()
    return report


def _wait_for_route(gateway: Gateway, partner: Credentials) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, _ = gateway.request("GET", READ.format("nobody"), None, partner.headers())
        except OSError:
            status = 0
        if status == 404:  # answered by the server: Envoy routes to it
            return
        time.sleep(0.05)
    raise TimeoutError("Envoy never routed to the server")


Row = tuple[str, str | None, str | None, str | None]  # customer, stored, previous, new


def read_database(database_url: str) -> tuple[list[Row], set[str]]:
    """The crash customers with their history rows in order, and the crash call ids."""
    rows = sql(
        database_url,
        "SELECT c.customer_id, c.disposition_status, h.previous_status, h.new_status"
        " FROM customers c LEFT JOIN disposition_history h ON h.customer_pk = c.id"
        " WHERE c.customer_id LIKE 'crash-%' ORDER BY c.customer_id, h.id",
    )
    calls = sql(database_url, "SELECT call_id FROM calls WHERE call_id LIKE 'crash-%'")
    return [cast(Row, tuple(r)) for r in rows], {call_id for (call_id,) in calls}


def check(
    report: Report,
    rows: list[Row],
    calls: set[str],
    attempts: list[list[Attempt]],
    batches: list[BatchAttempt],
) -> None:
    """Compare what the load saw with what the database holds (read_database)."""
    stored: dict[str, str | None] = {}
    history: dict[str, list[tuple[str | None, str]]] = {}
    for cid, status, previous, new in rows:
        stored[cid] = status
        if new is not None:
            history.setdefault(cid, []).append((previous, new))
            report.history_rows_checked += 1
    for cid, chain in history.items():
        before: str | None = None
        for previous, new in chain:
            if previous != before:
                report.problems.append(f"{cid}: chain broken at {previous!r} -> {new!r}")
            before = new
        if before != stored[cid]:
            report.problems.append(f"{cid}: history ends in {before!r}, stored {stored[cid]!r}")

    per_customer: dict[str, list[Attempt]] = {}
    for writer in attempts:
        for attempt in writer:
            per_customer.setdefault(attempt.customer_id, []).append(attempt)
            report.attempts += 1
            setattr(report, attempt.outcome, getattr(report, attempt.outcome) + 1)
    for cid, tried in per_customer.items():
        report.customers_checked += 1
        written = [new for _, new in history.get(cid, [])]
        acked = [a.status for a in tried if a.outcome == "acked"]
        doubtful = [a.status for a in tried if a.outcome == "in_doubt"]
        if len(doubtful) > 1 or (doubtful and tried[-1].status != doubtful[0]):
            report.problems.append(f"{cid}: written again after an in-doubt write (test bug)")
        if written == acked:
            continue
        if doubtful and written == [*acked, doubtful[0]]:
            report.in_doubt_committed += 1
            continue
        report.problems.append(f"{cid}: history {written} but acknowledged {acked}, in doubt "
                               f"{doubtful}")  # fmt: skip

    batch_customers = {c for batch in batches for c in batch.customer_ids}
    for cid, chain in history.items():
        if cid in batch_customers:
            if chain != [(None, "new")]:
                report.problems.append(f"{cid}: a batch's new customer has history {chain}")
        elif cid not in per_customer:
            report.problems.append(f"{cid}: history {chain} but no update was ever sent")

    for batch in batches:
        present = [c in calls for c in batch.call_ids]
        customers_ok = all(stored.get(c) == "new" for c in batch.customer_ids)
        if batch.outcome == "acked":
            report.batches_acked += 1
            if not all(present) or not customers_ok:
                report.problems.append(f"acknowledged batch lost: {batch.call_ids[0]}…")
        elif any(present):
            report.batches_in_doubt += 1
            report.batches_in_doubt_committed += 1
            if not all(present) or not customers_ok:
                report.problems.append(f"batch stored in part: {batch.call_ids[0]}…")
        else:
            report.batches_in_doubt += batch.outcome == "in_doubt"
            if any(c in stored for c in batch.customer_ids):
                report.problems.append(
                    f"batch not stored but its customers are: {batch.call_ids[0]}"
                )
    if report.acked == 0 or report.batches_acked == 0:
        report.problems.append("the load was never acknowledged: nothing was checked")


def check_counters(report: Report, database_url: str) -> None:
    """The summary's counters moved with exactly what was committed: customers per status and
    changes per status equal a count of the rows themselves."""
    maintained = {
        "customers": sql(database_url, "SELECT tenant_id, sub_tenant_id, disposition_status,"
                         " customers FROM status_counts WHERE customers <> 0"),
        "changes": sql(database_url, "SELECT tenant_id, sub_tenant_id, disposition_status,"
                       " sum(changes) FROM status_change_hours GROUP BY tenant_id, sub_tenant_id,"
                       " disposition_status"),
    }  # fmt: skip
    scanned = {
        "customers": sql(database_url, "SELECT tenant_id, sub_tenant_id,"
                         " coalesce(disposition_status, ''), count(*) FROM customers"
                         " GROUP BY tenant_id, sub_tenant_id, coalesce(disposition_status, '')"),
        "changes": sql(database_url, "SELECT tenant_id, sub_tenant_id, coalesce(new_status, ''),"
                       " count(*) FROM disposition_history GROUP BY tenant_id, sub_tenant_id,"
                       " coalesce(new_status, '')"),
    }  # fmt: skip
    for name, rows in maintained.items():
        if sorted(map(tuple, rows)) != sorted(map(tuple, scanned[name])):
            report.problems.append(f"the summary's {name} counters disagree with the rows")


class WebhookPartner:
    """How the receiver answers, as a partner's would: 400 to a request whose signature does not
    verify, 503 to the first attempt of about one event in 20 (chosen by its id), 200 otherwise."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, request: Received) -> int:
        try:
            self.webhook.verify(request.body, request.headers)
        except WebhookVerificationError:
            return 400
        event_id = request.headers["webhook-id"]
        with self._lock:
            first = event_id not in self._seen
            self._seen.add(event_id)
        return 503 if first and zlib.crc32(event_id.encode()) % 20 == 0 else 200


Event = dict[str, str]  # the fields of a disposition.changed event's data that name its change


def read_events(database_url: str, tenant_id: str) -> dict[str, Event]:
    """The `disposition.changed` event of every history row of the tenant, by webhook-id."""
    rows = sql(database_url, "SELECT h.id, h.seq, c.customer_id, h.previous_status, h.new_status"
               " FROM disposition_history h JOIN customers c ON c.id = h.customer_pk"
               " WHERE h.tenant_id = :tenant_id", tenant_id=tenant_id)  # fmt: skip
    return {
        f"evt_{pk}": {"customer_id": customer, "cursor": str(seq),
                      "previous_status": previous or "", "disposition_status": new or ""}
        for pk, seq, customer, previous, new in rows
    }  # fmt: skip


def wait_for_deliveries(
    receiver: Receiver, event_ids: Iterable[str], stall_seconds: float
) -> list[Received]:
    """What the receiver got, once it answered 2xx to each event at least once (or once none
    of the events still missing had arrived for `stall_seconds`)."""
    waiting = set(event_ids)
    progressed = time.monotonic()
    seen = 0
    while waiting and time.monotonic() - progressed < stall_seconds:
        time.sleep(0.1)
        received = list(receiver.received)
        delivered = {r.headers["webhook-id"] for r in received[seen:] if 200 <= r.status < 300}
        seen = len(received)
        if waiting & delivered:
            waiting -= delivered
            progressed = time.monotonic()
    return list(receiver.received)


def check_webhooks(report: Report, events: dict[str, Event], received: list[Received]) -> None:
    """Every event answered 2xx at least once; every request signed and for a change the
    history holds, with that change's data."""
    delivered: collections.Counter[str] = collections.Counter()
    retried = phantoms = 0
    for request in received:
        event_id = request.headers.get("webhook-id", "")
        if request.status == 400:
            report.problems.append(f"webhook {event_id}: the signature does not verify")
            continue
        event = request.event
        data = event.get("data", {})
        expected = events.get(event_id)
        if (
            event.get("type") != DISPOSITION_CHANGED
            or expected is None
            or {k: data.get(k) for k in expected} != expected
        ):
            phantoms += 1
            report.problems.append(f"webhook {event_id}: no such change in the history: {data}")
        elif 200 <= request.status < 300:
            delivered[event_id] += 1
        else:
            retried += 1
    missing = [event_id for event_id in events if event_id not in delivered]
    if missing:
        report.problems.append(f"{len(missing)} webhook events never delivered: {missing[:5]}…")
    report.webhooks = {
        "events": len(events),
        "delivered": len(delivered),
        "duplicates": sum(delivered.values()) - len(delivered),
        "retried": retried,
        "missing": len(missing),
        "phantoms": phantoms,
    }


def _check_graceful(report: Report) -> None:
    """SIGTERM drains: what the server accepted it finishes (so no write is in doubt), and what
    it no longer takes Envoy answers with the 503 envelope (never committed, never a 500)."""
    if set(report.write_failures) - {503}:
        report.problems.append(f"graceful restarts answered {report.write_failures}: only 503")
    if report.in_doubt_committed or report.batches_in_doubt_committed:
        report.problems.append("a write answered 503 during a graceful restart was committed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per target and engine")
    parser.add_argument("--writers", type=int, default=12)
    parser.add_argument("--target", nargs="+", choices=("server", "server-term", "envoy"),
                        default=["server", "server-term", "envoy"])  # fmt: skip
    parser.add_argument("--engine", nargs="+", choices=("sqlite", "postgres"),
                        default=["sqlite", "postgres"])  # fmt: skip
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("TEST_POSTGRES_URL")
        or "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    )
    args = parser.parse_args(argv)
    failed = False
    for engine in args.engine:
        for target in args.target:
            with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
                try:
                    report = run(target=target, engine=engine, kills=args.kills,
                                 writers=args.writers, workdir=Path(tmp),
                                 postgres_url=args.postgres_url)  # fmt: skip
                except Exception:
                    for log in sorted(Path(tmp).glob("*.log")):
                        print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
                    raise
            print(report.line())
            for problem in report.problems[:20]:
                print(f"  {problem}")
            failed |= bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
