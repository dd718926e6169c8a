"""Property tests (hypothesis) against a real server process and Envoy on a SQLite file.

gRPC, directly: arbitrary bytes as any method's request, arbitrary unicode and huge strings in
the fields, invalid UTF-8 where a string belongs, junk in the tenant metadata. REST, through
Envoy: arbitrary JSON values as bodies (nulls, nested junk, wrong types), duplicate keys and
invalid UTF-8. Whatever the input: never INTERNAL/UNKNOWN (gRPC) or a 5xx (REST), REST replies
in the documented envelope, and a rejected request leaves the database as it was (SQLite's
`PRAGMA data_version` moves when another connection commits a change).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack import Credentials, EnvoyPorts, ServerProcess, onboard_at, run_envoy
from disposition.v1 import disposition_service_pb2 as pb
from tests.http_helpers import call
from tests.support import CommitWatch, batch_item

pytestmark = pytest.mark.envoy

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "60"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
UNARY = [
    "/disposition.v1.DispositionService/UpdateDispositionStatus",
    "/disposition.v1.DispositionService/BatchUpdateDispositionStatus",
    "/disposition.v1.DispositionService/GetDispositionStatus",
    "/disposition.v1.DispositionService/ListDispositionHistory",
    "/disposition.v1.DispositionService/GetDispositionSummary",
    "/disposition.v1.DispositionService/ListDispositions",
    "/disposition.v1.CallIngestionService/IngestBatchCalls",
]
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
REST_BODIES = [
    ("PUT", "/api/v1/partner/ingest/disposition-status"),
    ("POST", "/api/v1/partner/ingest/disposition-status/batch"),
    ("POST", "/api/v1/partner/ingest/batch-call"),
]


@dataclass
class Target:
    channel: grpc.Channel
    envoy: EnvoyPorts
    partner: Credentials
    watch: CommitWatch

    def data_version(self) -> int:
        return self.watch.version()

    def raw_call(
        self, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> tuple[grpc.StatusCode, str]:
        """`payload` sent as the request's bytes, as they are; the reply's status."""
        rpc = self.channel.unary_unary(method)  # bytes in, bytes out
        try:
            rpc(payload, metadata=metadata or self.partner.metadata(), timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("properties")
    db = tmp / "disposition.db"
    url = f"sqlite+aiosqlite:///{db}"
    server = ServerProcess(url, tmp / "server.log")
    server.start()
    try:
        partner = onboard_at(url, "prop", rate_limit_per_minute=1_000_000_000)
        with run_envoy(grpc_port=server.port, log_path=tmp / "envoy.log") as envoy, \
                grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # fmt: skip
            items = [batch_item(f"call-{c}", c, "new") for c in ("a", "0", "customer")]
            reply = call(envoy.http_port, "POST", "/api/v1/partner/ingest/batch-call",
                         json.dumps({"data": items}), partner.headers())  # fmt: skip
            assert reply.status == 200, reply.body
            yield Target(channel, envoy, partner, CommitWatch(db))
    finally:
        server.stop()
    assert "Traceback" not in (tmp / "server.log").read_text()


def _fault_free(target: Target, code: grpc.StatusCode, details: str, before: int) -> None:
    assert code not in SERVER_FAULTS, details
    if code != grpc.StatusCode.OK:
        assert target.data_version() == before, f"a refused call ({code}) changed the database"


@PROPERTY
@given(method=st.sampled_from(UNARY), payload=st.binary(max_size=4096))
def test_grpc_arbitrary_bytes_are_refused_cleanly(
    target: Target, method: str, payload: bytes
) -> None:
    before = target.data_version()
    code, details = target.raw_call(method, payload)
    _fault_free(target, code, details, before)


# Field values: any unicode (no surrogates: protobuf strings are UTF-8), sometimes huge.
TEXT = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=256, max_size=300),
    st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1_000, 200_000)),
    st.sampled_from(["a", "0", "customer", "", " ", "\x00", "'; DROP TABLE customers; --"]),
)


@PROPERTY
@given(customer=TEXT, status=st.one_of(st.none(), TEXT))
def test_grpc_update_with_any_strings(target: Target, customer: str, status: str | None) -> None:
    request = pb.UpdateDispositionStatusRequest(customer_id=customer)
    if status is not None:
        request.disposition_status = status
    before = target.data_version()
    code, details = target.raw_call(UNARY[0], request.SerializeToString())
    _fault_free(target, code, details, before)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT), details  # fmt: skip


@PROPERTY
@given(bad=st.binary(min_size=1, max_size=64).filter(lambda b: not _is_utf8(b)),
       field=st.sampled_from([1, 2]))  # fmt: skip
def test_grpc_invalid_utf8_in_a_string_field_is_invalid_argument(
    target: Target, bad: bytes, field: int
) -> None:
    # Field 1 (customer_id) or 2 (disposition_status), wire type 2, with bytes that are not UTF-8.
    payload = bytes([field << 3 | 2, len(bad)]) + bad
    before = target.data_version()
    code, details = target.raw_call(UNARY[0], payload)
    _fault_free(target, code, details, before)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


IDENTITY_OUTCOMES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@PROPERTY
@given(tenant=HEADER_VALUE, sub_tenant=HEADER_VALUE, key=HEADER_VALUE)
def test_grpc_junk_identity_metadata_is_refused_with_400_or_403_codes(
    target: Target, tenant: str, sub_tenant: str, key: str
) -> None:
    metadata = target.partner.metadata(x_tenant_id=tenant, x_sub_tenant_id=sub_tenant)
    for headers in (metadata, target.partner.metadata(x_api_key=key)):
        before = target.data_version()
        code, details = target.raw_call(
            UNARY[0], pb.UpdateDispositionStatusRequest(customer_id="a").SerializeToString(),
            headers,
        )  # fmt: skip
        _fault_free(target, code, details, before)
        assert code in IDENTITY_OUTCOMES, details


# JSON: nulls, booleans, numbers, strings, nested lists and objects, in any place.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["customer_id", "disposition_status", "items", "data", "call", "customer", "agent", "id"]
BODY = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
    st.fixed_dictionaries(
        {"data": st.lists(st.dictionaries(st.sampled_from(FIELDS), JSON), max_size=3)}
    ),
)


def _rest(target: Target, method: str, path: str, raw: bytes) -> tuple[int, Any]:
    before = target.data_version()
    reply = call(target.envoy.http_port, method, path, raw, target.partner.headers())
    assert reply.status < 500, (path, raw[:200], reply.body)
    assert reply.header("content-type") == "application/json"
    body = json.loads(reply.body)
    if reply.status != 200:
        assert body["success"] is False and isinstance(body["message"], str), body
        assert target.data_version() == before, f"a {reply.status} changed the database"
    return reply.status, body


@PROPERTY
@given(endpoint=st.sampled_from(REST_BODIES), body=BODY)
def test_rest_any_json_body_gets_an_envelope(
    target: Target, endpoint: tuple[str, str], body: object
) -> None:
    status, _ = _rest(target, *endpoint, json.dumps(body).encode())
    assert status in (200, 400, 404, 422)


@PROPERTY
@given(endpoint=st.sampled_from(REST_BODIES), first=JSON, second=JSON)
def test_rest_duplicate_keys_are_handled(
    target: Target, endpoint: tuple[str, str], first: object, second: object
) -> None:
    raw = (f'{{"customer_id": {json.dumps(first)}, "customer_id": {json.dumps(second)},'
           f' "disposition_status": "dup"}}').encode()  # fmt: skip
    status, _ = _rest(target, *endpoint, raw)
    assert status in (200, 400, 404, 422)


@PROPERTY
@given(endpoint=st.sampled_from(REST_BODIES),
       bad=st.binary(min_size=1, max_size=16).filter(lambda b: not _is_utf8(b)))  # fmt: skip
def test_rest_invalid_utf8_is_a_400_or_422(
    target: Target, endpoint: tuple[str, str], bad: bytes
) -> None:
    raw = b'{"customer_id": "a' + bad + b'", "disposition_status": "x"}'
    status, _ = _rest(target, *endpoint, raw)
    assert status in (400, 422)
