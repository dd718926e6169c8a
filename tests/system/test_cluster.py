"""Several replicas behind one Envoy: two `disposition-server` processes on one PostgreSQL
schema and one Redis key prefix (both this run's own), a real Envoy balancing over them.

Needs TEST_POSTGRES_URL and TEST_REDIS_URL; skipped without them.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import redis

from devstack import Credentials, EnvoyPorts, ServerProcess, onboard_at, run_envoy
from devstack.envoy import upstream_health
from tests.support.databases import PostgresSchemas, sql
from tests.support.http_client import Reply, assert_rest_reply, call
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, UPDATE

REDIS_URL = os.environ.get("TEST_REDIS_URL") or None

pytestmark = [pytest.mark.envoy, pytest.mark.postgres]

STATUSES = ("interested", "callback_requested", "do_not_call")
RATE_LIMITED = b'{"success":false,"message":"Rate limit exceeded. Try again in 60 seconds."}'


@dataclass
class Cluster:
    database_url: str
    replicas: list[ServerProcess]
    envoy: EnvoyPorts
    partner: Credentials  # a rate limit nobody reaches; granted every tenant the tests use

    def onboard(self, partner_id: str, **kwargs: object) -> Credentials:
        return onboard_at(self.database_url, partner_id, **kwargs)

    def put(
        self,
        customer_id: str,
        status: str,
        request_id: str,
        creds: Credentials | None = None,
        tenant: tuple[str, str] | None = None,
    ) -> Reply:
        body = json.dumps({"customer_id": customer_id, "disposition_status": status})
        creds = creds or self.partner
        tenant_id, sub_tenant_id = tenant or (creds.tenant_id, creds.sub_tenant_id)
        headers = creds.headers(
            x_request_id=request_id, x_tenant_id=tenant_id, x_sub_tenant_id=sub_tenant_id
        )
        return call(self.envoy.http_port, "PUT", UPDATE, body, headers)

    def ingest(self, tenant: tuple[str, str], *customers: str) -> None:
        items = [batch_item(f"call-{uuid.uuid4().hex}", customer) for customer in customers]
        headers = self.partner.headers(x_tenant_id=tenant[0], x_sub_tenant_id=tenant[1])
        reply = call(self.envoy.http_port, "POST", BATCH, json.dumps({"data": items}), headers)
        assert reply.status == 200, reply.body

    def served(self, replica: int) -> set[str]:
        """The request ids of the RPCs replica `replica` logged (one "rpc" line per RPC)."""
        return {
            line["request_id"]
            for line in self.replicas[replica].log_lines()
            if line.get("message") == "rpc"
        }

    def health(self) -> dict[int, bool]:
        return upstream_health(self.envoy.admin_port)

    def wait_health(self, port: int, healthy: bool, timeout: float = 30.0) -> None:
        """Until Envoy sees the replica on `port` as `healthy`."""
        deadline = time.monotonic() + timeout
        while self.health().get(port) is not healthy:
            assert time.monotonic() < deadline, (
                f"Envoy did not see :{port} as healthy={healthy}: {self.health()}"
            )
            time.sleep(0.05)

    def wait_served(self, replica: int, prefix: str, count: int, timeout: float = 30.0) -> None:
        """Until replica `replica` has logged `count` RPCs whose request id starts with `prefix`."""
        deadline = time.monotonic() + timeout
        while (found := sum(rid.startswith(prefix) for rid in self.served(replica))) < count:
            assert time.monotonic() < deadline, f"replica {replica}: {found} {prefix}* RPCs"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresSchemas | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if postgres is None:
        pytest.skip("TEST_POSTGRES_URL is not set (e.g. postgresql+asyncpg://…/test)")
    if REDIS_URL is None:
        pytest.skip("TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    tmp = tmp_path_factory.mktemp("cluster")
    url = postgres.new()
    prefix = f"test-cluster-{uuid.uuid4().hex}:"
    env = {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "LOG_LEVEL": "INFO",
        # As make run-cluster: after SIGTERM, serve until Envoy's health checks (1 s) notice.
        "SHUTDOWN_DRAIN_SECONDS": "2",
    }
    replicas = [ServerProcess(url, tmp / f"replica{i}.log", **env) for i in range(2)]
    try:
        for replica in replicas:
            replica.start()
            # A restart must come back on the same port: Envoy's endpoints are static.
            replica.env["GRPC_PORT"] = str(replica.port)
        ports = [replica.port for replica in replicas]
        with run_envoy(grpc_port=ports, log_path=tmp / "envoy.log") as envoy:
            stack = Cluster(url, replicas, envoy, Credentials("", "", ""))
            stack.partner = stack.onboard(
                "load",
                grants=[("tenant1", "subtenant1"), ("limited", "sub"), ("steady", "sub")],
                rate_limit_per_minute=1_000_000,
            )
            for port in ports:
                stack.wait_health(port, True)
            yield stack
    finally:
        for replica in replicas:
            if replica.process is not None:
                replica.stop()
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


def parallel(jobs: list[Callable[[], Reply]], workers: int = 12) -> list[Reply]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def test_concurrent_updates_spread_over_both_replicas_and_stay_consistent(
    cluster: Cluster,
) -> None:
    customers = [f"spread-{i}" for i in range(10)]
    cluster.ingest(("tenant1", "subtenant1"), *customers)
    plan = [
        (customers[i % len(customers)], STATUSES[(i // len(customers)) % 3], f"spread-{i}")
        for i in range(300)
    ]
    replies = parallel([lambda p=p: cluster.put(*p) for p in plan])

    assert Counter(reply.status for reply in replies) == {200: len(plan)}
    sent = {request_id for _, _, request_id in plan}
    first, second = cluster.served(0) & sent, cluster.served(1) & sent
    assert first and second, "both replicas must serve requests"
    assert first.isdisjoint(second) and first | second == sent  # each ran exactly once
    assert_history_consistent(cluster.database_url, "tenant1", customers)


def assert_history_consistent(database_url: str, tenant: str, customers: list[str]) -> None:
    """Each customer's chain is unbroken and ends at its stored status; the tenant's change-feed
    cursors have no gap and no repeat."""
    rows = sql(
        database_url,
        "SELECT c.customer_id, c.disposition_status, h.previous_status, h.new_status, h.seq"
        " FROM disposition_history h JOIN customers c ON c.id = h.customer_pk"
        " WHERE h.tenant_id = :tenant ORDER BY h.seq",
        tenant=tenant,
    )
    seqs = [row.seq for row in rows]
    assert seqs == list(range(1, len(rows) + 1))
    for customer in customers:
        chain = [row for row in rows if row.customer_id == customer]
        assert chain, f"{customer} has no history"
        assert chain[0].previous_status is None
        for before, after in itertools.pairwise(chain):
            assert after.previous_status == before.new_status, (customer, before, after)
            assert after.new_status != after.previous_status
        assert chain[-1].new_status == chain[-1].disposition_status


def test_rate_limit_holds_across_replicas(cluster: Cluster) -> None:
    limit = 10
    limited = cluster.onboard("limited", grants=[("limited", "sub")], rate_limit_per_minute=limit)
    cluster.ingest(("limited", "sub"), "limited-customer")
    if time.time() % 60 > 50:  # keep the burst inside one rate-limit window
        time.sleep(60.5 - time.time() % 60)
    jobs = [
        lambda i=i: cluster.put("limited-customer", STATUSES[i % 3], f"limited-{i}", limited)
        for i in range(3 * limit)
    ]
    replies = parallel(jobs)

    assert Counter(reply.status for reply in replies) == {200: limit, 429: 2 * limit}
    for reply in replies:
        if reply.status == 429:
            assert_rest_reply(reply, 429, RATE_LIMITED)
            assert 1 <= int(reply.header("retry-after") or "0") <= 60
    sent = {f"limited-{i}" for i in range(3 * limit)}
    assert cluster.served(0) & sent and cluster.served(1) & sent


def test_a_stopped_replica_leaves_rotation_without_failed_requests_and_returns(
    cluster: Cluster,
) -> None:
    cluster.ingest(("steady", "sub"), *(f"steady-{i}" for i in range(8)))
    victim = cluster.replicas[0]
    port = victim.port
    phase = ["before"]
    failures: list[tuple[str, int, bytes]] = []
    done = threading.Event()
    counter = itertools.count()

    def stream(worker: int) -> None:
        while not done.is_set():
            n = next(counter)
            request_id = f"steady-{phase[0]}-{n}"
            reply = cluster.put(
                f"steady-{worker}", STATUSES[n % 3], request_id, tenant=("steady", "sub")
            )
            if reply.status != 200:
                failures.append((request_id, reply.status, reply.body))

    workers = [threading.Thread(target=stream, args=(w,)) for w in range(8)]
    for worker in workers:
        worker.start()
    try:
        for replica in (0, 1):  # traffic reaches both before one stops
            cluster.wait_served(replica, "steady-before-", 10)
        phase[0] = "stopping"
        assert victim.stop() == 0  # SIGTERM: NOT_SERVING, drain, exit
        cluster.wait_health(port, False)  # one health-check interval (1 s) and jitter
        phase[0] = "down"
        cluster.wait_served(1, "steady-down-", 20)
        victim.start()
        cluster.wait_health(port, True)
        phase[0] = "after"
        cluster.wait_served(0, "steady-after-", 10)  # the restarted replica is back in rotation
        cluster.wait_served(1, "steady-after-", 10)
    finally:
        done.set()
        for worker in workers:
            worker.join()

    assert failures == []
    served_after = {rid for rid in cluster.served(0) if rid.startswith("steady-after-")}
    assert served_after, "the restarted replica must receive traffic again"
    down = {rid for rid in cluster.served(1) if rid.startswith("steady-down-")}
    assert down, "the other replica served while the first was down"
    assert_history_consistent(cluster.database_url, "steady", [f"steady-{i}" for i in range(8)])
