"""Property tests (hypothesis) over gRPC, directly against a real server process on a SQLite file:
arbitrary bytes as any method's request, arbitrary unicode and huge strings in the fields, invalid
UTF-8 where a string belongs, junk in the tenant metadata. Whatever the input: never
INTERNAL/UNKNOWN, and a rejected request leaves the database as it was (SQLite's
`PRAGMA data_version` moves when another connection commits a change). Through Envoy:
tests/rest/test_properties.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from disposition.v1 import disposition_service_pb2 as pb
from tests.support.properties import PROPERTY, Seeded, is_utf8, seeded_server

UNARY = [
    "/disposition.v1.DispositionService/UpdateDispositionStatus",
    "/disposition.v1.DispositionService/BatchUpdateDispositionStatus",
    "/disposition.v1.DispositionService/GetDispositionStatus",
    "/disposition.v1.DispositionService/ListDispositionHistory",
    "/disposition.v1.DispositionService/GetDispositionSummary",
    "/disposition.v1.DispositionService/ListDispositions",
    "/disposition.v1.CallIngestionService/IngestBatchCalls",
    "/disposition.v1.WebhookService/CreateWebhookEndpoint",
    "/disposition.v1.WebhookService/ListWebhookEndpoints",
    "/disposition.v1.WebhookService/DeleteWebhookEndpoint",
    "/disposition.v1.WebhookService/RotateWebhookEndpointSecret",
    "/disposition.v1.WebhookService/ListWebhookDeliveries",
    "/disposition.v1.WebhookService/RetryWebhookDelivery",
]
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


@dataclass
class Target:
    seeded: Seeded
    channel: grpc.Channel

    def data_version(self) -> int:
        return self.seeded.data_version()

    def raw_call(
        self, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> tuple[grpc.StatusCode, str]:
        """`payload` sent as the request's bytes, as they are; the reply's status."""
        rpc = self.channel.unary_unary(method)  # bytes in, bytes out
        try:
            rpc(payload, metadata=metadata or self.seeded.partner.metadata(), timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with (
        seeded_server(tmp_path_factory.mktemp("properties")) as seeded,
        grpc.insecure_channel(f"127.0.0.1:{seeded.server.port}") as channel,
    ):
        yield Target(seeded, channel)


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
@given(bad=st.binary(min_size=1, max_size=64).filter(lambda b: not is_utf8(b)),
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
    metadata = target.seeded.partner.metadata(x_tenant_id=tenant, x_sub_tenant_id=sub_tenant)
    for headers in (metadata, target.seeded.partner.metadata(x_api_key=key)):
        before = target.data_version()
        code, details = target.raw_call(
            UNARY[0], pb.UpdateDispositionStatusRequest(customer_id="a").SerializeToString(),
            headers,
        )  # fmt: skip
        _fault_free(target, code, details, before)
        assert code in IDENTITY_OUTCOMES, details
