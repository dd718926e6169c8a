"""The OpenAPI document: served by Envoy, generated from the protos, and true of the running
service (every documented operation answers with a documented status and body; every REST route
of envoy.yaml is documented)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import openapi_spec_validator
import openapi_spec_validator.validation.exceptions
import pytest
import schemathesis
import yaml

from gateway import openapi
from gateway.envoy_config import DEFAULT_DESCRIPTOR, TEMPLATE
from tests.support.http_client import call
from tests.support.payloads import batch_item
from tests.support.rest import Stack, start_stack

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Private URLs allowed, as `make run` does: a webhook endpoint on the loopback is created.
    yield from start_stack(
        tmp_path_factory.mktemp("openapi"), server_env={"WEBHOOK_ALLOW_PRIVATE_URLS": "true"}
    )


@pytest.fixture(scope="module")
def served(stack: Stack) -> dict[str, Any]:
    reply = call(stack.envoy.http_port, "GET", openapi.SPEC_PATH)
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/json"
    document: dict[str, Any] = json.loads(reply.body)
    return document


def test_the_served_document_is_the_one_generated_from_the_protos(served: dict[str, Any]) -> None:
    assert served == openapi.load(DEFAULT_DESCRIPTOR)
    assert served["openapi"] == "3.1.0"


def test_it_is_a_valid_openapi_3_1_document(served: dict[str, Any]) -> None:
    openapi_spec_validator.validate(served)  # the OpenAPI 3.1 meta-schema (raises)
    schema = schemathesis.openapi.from_dict(served)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14  # 7 of DispositionService, 1 of CallIngestion, 6 of Webhook
    broken = {**served, "paths": {"/x": {"get": {"responses": {"200": {"description": 5}}}}}}
    with pytest.raises(openapi_spec_validator.validation.exceptions.OpenAPIValidationError):
        openapi_spec_validator.validate(broken)


def _documented(served: dict[str, Any]) -> set[tuple[str, str]]:
    return {(verb.upper(), path) for path, ops in served["paths"].items() for verb in ops}


def test_every_rest_route_of_envoy_is_documented_and_nothing_else(
    served: dict[str, Any],
) -> None:
    config = yaml.safe_load(TEMPLATE.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    routed: set[tuple[str, str]] = set()
    for route in host["routes"]:
        match = route["match"]
        methods = [h["string_match"]["exact"] for h in match.get("headers", [])
                   if h["name"] == ":method"]  # fmt: skip
        if "route" not in route or not methods:
            continue  # direct responses (404, 405, the document itself), native gRPC
        (method,) = methods
        if "path" in match:
            routed.add((method, match["path"]))
        else:  # a regex route serves every documented path it matches
            regex = match["safe_regex"]["regex"]
            found = {
                (verb, path)
                for verb, path in _documented(served)
                if verb == method and re.fullmatch(regex, re.sub(r"\{\w+\}", "x", path))
            }
            assert len(found) == 1, (regex, found)
            routed |= found
    assert routed == _documented(served)


def _validator(served: dict[str, Any], operation: dict[str, Any], status: int) -> Any:
    """A JSON Schema validator for the documented body of `status` (refs resolved in place)."""
    response = operation["responses"][str(status)]
    if "$ref" in response:
        response = served["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": served["components"]})


def _check(served: dict[str, Any], method: str, path: str, status: int, body: bytes) -> None:
    template = next(p for p in served["paths"] if re.fullmatch(
        re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p)), path.split("?")[0]))  # fmt: skip
    operation = served["paths"][template][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path}: {status} is not documented"
    errors = [str(e) for e in _validator(served, operation, status).iter_errors(json.loads(body))]
    assert errors == [], f"{method} {path} {status}: {body!r}"


def test_each_operation_answers_as_documented(stack: Stack, served: dict[str, Any]) -> None:
    port = stack.envoy.http_port
    headers = stack.partner.headers()
    hooks = "/api/v1/partner/webhook-endpoints"
    created = call(port, "POST", hooks, b'{"url": "http://127.0.0.1:9/hooks"}', headers)
    assert created.status == 200, created.body
    _check(served, "POST", hooks, 200, created.body)
    endpoint = f"{hooks}/{json.loads(created.body)['data']['id']}"
    requests: list[tuple[str, str, object, int]] = [
        ("POST", "/api/v1/partner/ingest/batch-call",
         {"data": [batch_item("oa-call-1", "oa-customer", "interested")]}, 200),
        ("PUT", "/api/v1/partner/ingest/disposition-status",
         {"customer_id": "oa-customer", "disposition_status": "callback_requested"}, 200),
        ("POST", "/api/v1/partner/ingest/disposition-status/batch",
         {"items": [{"customer_id": "oa-customer", "disposition_status": "sold"},
                    {"customer_id": "oa-nobody", "disposition_status": "sold"}]}, 200),
        ("GET", "/api/v1/partner/customers/oa-customer/disposition-status", None, 200),
        ("GET", "/api/v1/partner/customers/oa-customer/disposition-history?page_size=1", None,
         200),
        ("GET", "/api/v1/partner/reports/disposition-summary", None, 200),
        ("GET", "/api/v1/partner/dispositions", None, 200),
        # Documented errors, with the envelopes of the schemas.
        ("PUT", "/api/v1/partner/ingest/disposition-status", {"customer_id": ""}, 422),
        ("PUT", "/api/v1/partner/ingest/disposition-status", {"customer_id": "oa-nobody"}, 404),
        ("GET", "/api/v1/partner/customers/oa-nobody/disposition-status", None, 404),
        ("POST", "/api/v1/partner/ingest/batch-call", b"{not json", 400),
        ("GET", "/api/v1/partner/reports/disposition-summary?from=yesterday", None, 422),
        # A webhook endpoint's life.
        ("POST", hooks, {"url": "ftp://hooks.example.com/"}, 422),
        ("GET", hooks, None, 200),
        ("POST", f"{endpoint}/rotate-secret", None, 200),
        ("GET", f"{endpoint}/deliveries?status=failed&page_size=10", None, 200),
        ("POST", f"{endpoint}/deliveries/999999/retry", None, 404),
        ("DELETE", endpoint, None, 200),
        ("DELETE", endpoint, None, 404),
    ]  # fmt: skip
    for method, path, body, expected in requests:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        reply = call(port, method, path, raw, headers)
        assert reply.status == expected, (method, path, reply.body)
        _check(served, method, path, reply.status, reply.body)
    forbidden = call(port, "GET", "/api/v1/partner/dispositions", None,
                     {**headers, "x-api-secret": "wrong"})  # fmt: skip
    assert forbidden.status == 403
    _check(served, "GET", "/api/v1/partner/dispositions", 403, forbidden.body)


def test_the_document_is_public_and_only_for_get(stack: Stack) -> None:
    reply = call(stack.envoy.http_port, "GET", openapi.SPEC_PATH, None, {})  # no credentials
    assert reply.status == 200
    wrong = call(stack.envoy.http_port, "POST", openapi.SPEC_PATH, b"{}")
    assert (wrong.status, wrong.header("allow")) == (405, "GET")
    assert json.loads(wrong.body) == {"success": False, "message": "Method not allowed"}


def test_make_gen_writes_the_document_next_to_the_descriptor() -> None:
    written = Path(DEFAULT_DESCRIPTOR).parent / "openapi.json"
    assert json.loads(written.read_text()) == openapi.load(DEFAULT_DESCRIPTOR)


def test_a_replayed_batch_carries_the_documented_replay_header(
    stack: Stack, served: dict[str, Any]
) -> None:
    path = "/api/v1/partner/ingest/batch-call"
    documented = served["paths"][path]["post"]["responses"]["200"]["headers"]
    assert documented["idempotent-replayed"] == {"$ref": "#/components/headers/IdempotentReplayed"}
    assert served["components"]["headers"]["IdempotentReplayed"]["schema"]["enum"] == ["true"]
    body = json.dumps({"data": [batch_item("oa-replay-1", "oa-replay", "new")]}).encode()
    headers = {**stack.partner.headers(), "Idempotency-Key": "oa-replay-key"}
    first = call(stack.envoy.http_port, "POST", path, body, headers)
    again = call(stack.envoy.http_port, "POST", path, body, headers)
    assert (first.status, first.header("idempotent-replayed")) == (200, None)
    assert (again.status, again.header("idempotent-replayed"), again.body) == (
        200,
        "true",
        first.body,
    )
    unreplayed = served["paths"]["/api/v1/partner/dispositions"]["get"]["responses"]["200"]
    assert "idempotent-replayed" not in unreplayed["headers"]
