"""Property tests (hypothesis) through Envoy, in front of a real server process on a SQLite file:
arbitrary JSON values as bodies (nulls, nested junk, wrong types), duplicate keys and invalid
UTF-8. Whatever the input: never a 5xx, replies in the documented envelope, and a rejected
request leaves the database as it was (SQLite's `PRAGMA data_version` moves when another
connection commits a change). Over gRPC directly: tests/grpc_api/test_properties.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstack import EnvoyPorts, run_envoy
from tests.support.http_client import call
from tests.support.properties import PROPERTY, Seeded, is_utf8, seeded_server

pytestmark = pytest.mark.envoy

REST_BODIES = [
    ("PUT", "/api/v1/partner/ingest/disposition-status"),
    ("POST", "/api/v1/partner/ingest/disposition-status/batch"),
    ("POST", "/api/v1/partner/ingest/batch-call"),
]


@dataclass
class Target:
    seeded: Seeded
    envoy: EnvoyPorts

    def data_version(self) -> int:
        return self.seeded.data_version()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("properties")
    with (
        seeded_server(tmp) as seeded,
        run_envoy(grpc_port=seeded.server.port, log_path=tmp / "envoy.log") as envoy,
    ):
        yield Target(seeded, envoy)


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
    reply = call(target.envoy.http_port, method, path, raw, target.seeded.partner.headers())
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
       bad=st.binary(min_size=1, max_size=16).filter(lambda b: not is_utf8(b)))  # fmt: skip
def test_rest_invalid_utf8_is_a_400_or_422(
    target: Target, endpoint: tuple[str, str], bad: bytes
) -> None:
    raw = b'{"customer_id": "a' + bad + b'", "disposition_status": "x"}'
    status, _ = _rest(target, *endpoint, raw)
    assert status in (400, 422)
