"""Fuzzing the REST API from its OpenAPI document (schemathesis + hypothesis), through Envoy.

Every operation of build/openapi.json gets FUZZ_EXAMPLES generated requests (default 40, a few
hundred in all, in `make test`; `make fuzz` runs 400 each). Schemathesis generates bodies, path
and query parameters from the schemas, valid and not; the partner's credentials and tenant
headers go with every request (schemathesis also leaves some out), so that most requests get past
authentication to the service's own checks. For every reply:
- no 5xx; the status is one the document lists; the body is JSON and matches its schema
  (schemathesis's not_a_server_error, status_code_conformance, content_type_conformance and
  response_schema_conformance);
- anything but a 200 is the error envelope ({"success": false, "message": ...}; a reply to HEAD
  has no body) and left the database untouched: SQLite's `PRAGMA data_version`, read on a
  connection of this test, moves whenever another connection commits a change to the file.

The stack resolves no webhook URL and delivers nothing (WEBHOOK_ALLOW_PRIVATE_URLS, and
WEBHOOK_DELIVERY=worker without a worker): no generated URL is called.

An event stream (the change feed, text/event-stream) never ends: schemathesis reads a 200 stream
up to `max-stream-events` events and checks each. Its first event (the starting cursor) comes at
once and later ones may take a heartbeat period (15 s), so each stream is read to its first
event only, then closed, as a client that connects and leaves would.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devstack import Credentials
from gateway.openapi import DEFAULT_OUT
from tests.support.databases import CommitWatch
from tests.support.payloads import batch_item
from tests.support.rest import Stack, start_stack

pytestmark = pytest.mark.envoy

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EVENT_STREAMS = [
    path
    for path, operations in json.loads(Path(DEFAULT_OUT).read_text())["paths"].items()
    for operation in operations.values()
    if "text/event-stream" in operation["responses"]["200"]["content"]
]
schema = schemathesis.openapi.from_path(
    DEFAULT_OUT,
    config=schemathesis.Config.from_dict(
        {"operations": [{"include-path": p, "max-stream-events": 1} for p in EVENT_STREAMS]}
    ),
)
SEEN: collections.Counter[tuple[str, int]] = collections.Counter()


class Fuzzed:
    def __init__(self, stack: Stack, partner: Credentials, db_path: Path) -> None:
        self.stack = stack
        self.partner = partner
        self.watch = CommitWatch(db_path, drained=False)  # nothing delivers (below)
        self.server_log = db_path.parent / "server.log"

    def data_version(self) -> int:
        return self.watch.version()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    # Generated webhook and callback URLs are never resolved nor called (a generated host may be
    # any public address), and nothing writes behind the requests' backs (a delivering server
    # renews its endpoints' leases, which would move data_version under a refused request).
    quiet = {"WEBHOOK_ALLOW_PRIVATE_URLS": "true", "WEBHOOK_DELIVERY": "worker"}
    for stack in start_stack(tmp_path_factory.mktemp("fuzz"), server_env=quiet):
        assert stack.db_path is not None
        partner = stack.onboard("fuzzer", rate_limit_per_minute=1_000_000_000)
        # A few customers whose ids the generator is likely to hit ("0", "a", ...).
        items = [batch_item(f"fuzz-call-{c}", c, "new") for c in ("0", "a", "A", "00", "customer")]
        assert stack.ingest(partner, *items).status == 200
        yield Fuzzed(stack, partner, stack.db_path)
    total = sum(SEEN.values())
    report = {"requests": total, "by_status": dict(sorted(collections.Counter(
        status for (_, status) in SEEN.elements()).items()))}  # fmt: skip
    print(f"\nfuzzed: {json.dumps(report)}")


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzzed_requests_get_documented_replies_and_rejections_change_nothing(
    case: schemathesis.Case, fuzzed: Fuzzed
) -> None:
    before = fuzzed.data_version()
    response = case.call(
        base_url=f"http://127.0.0.1:{fuzzed.stack.envoy.http_port}",
        headers=fuzzed.partner.headers(),
        timeout=30,
    )
    SEEN[(f"{case.method} {case.operation.path}", response.status_code)] += 1
    if response.status_code >= 500:  # what the server logged, to find it quickly
        log = fuzzed.server_log.read_text().splitlines()[-5:]
        print(f"{response.status_code} for {response.request.method} {response.request.url}"
              f" {dict(response.request.headers)}\n" + "\n".join(log))  # fmt: skip
    case.validate_response(response, checks=CHECKS)
    if response.status_code != 200:
        assert response.content or case.method.upper() == "HEAD", (case.method, response)
        body = response.json() if response.content else {"success": False, "message": ""}
        assert body["success"] is False and isinstance(body["message"], str), body
        assert fuzzed.data_version() == before, f"a {response.status_code} changed the database"
