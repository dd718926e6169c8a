"""An independent client: the Python package that openapi-python-client generates from the OpenAPI
document Envoy serves calls the stack through Envoy, and every reply decodes into its generated
attrs models with the values the service sent, none of them undocumented.

The package is generated for each run (into the run's temporary folder, from GET
/api/v1/openapi.json, with `--fail-on-warning`), so it is the document of this checkout that is
proved. The change feed (text/event-stream) is left out: the generated function for it reads
the whole body before parsing it, which a stream that does not end never lets it do.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import httpx
import pytest

from gateway import openapi
from tests.support.payloads import batch_item
from tests.support.rest import Stack, start_stack

pytestmark = pytest.mark.envoy

BIN = Path(sys.executable).parent
PACKAGE = "disposition_client"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("generated-client"))


@pytest.fixture(scope="module")
def package(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client generated from the served document, importable as `disposition_client`."""
    root = tmp_path_factory.mktemp("client")
    url = f"http://127.0.0.1:{stack.envoy.http_port}{openapi.SPEC_PATH}"
    argv = [str(BIN / "openapi-python-client"), "generate", "--url", url, "--meta", "none",
            "--output-path", str(root / PACKAGE), "--fail-on-warning"]  # fmt: skip
    # Its post-generation hooks run `ruff` (the venv's) over the package.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "warning" not in said.lower(), said
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.partition(".")[0] == PACKAGE]:
            del sys.modules[name]


def _api(name: str) -> Any:
    """The generated module of an operation: `disposition_service.update_disposition_status`."""
    return importlib.import_module(f"{PACKAGE}.api.{name}")


@pytest.fixture(scope="module")
def models(package: ModuleType) -> Any:
    return importlib.import_module(f"{PACKAGE}.models")


@pytest.fixture(scope="module")
def client(stack: Stack, package: ModuleType) -> Iterator[Any]:
    """The partner's client: the key as the token of its one auth header, the secret beside it."""
    creds = stack.partner
    with package.AuthenticatedClient(
        base_url=f"http://127.0.0.1:{stack.envoy.http_port}",
        token=creds.api_key,
        auth_header_name="x-api-key",
        prefix="",
        headers={"x-api-secret": creds.api_secret},
        timeout=httpx.Timeout(30.0),
        raise_on_unexpected_status=True,  # a status the document does not list raises
    ) as client:
        yield client


@pytest.fixture(scope="module")
def tenant(stack: Stack) -> dict[str, str]:
    """The tenant headers, as the generated functions take them."""
    return {"x_tenant_id": stack.partner.tenant_id, "x_sub_tenant_id": stack.partner.sub_tenant_id}


def undocumented(value: Any, path: str = "$") -> list[str]:
    """The keys of a decoded reply that its schema does not name (kept in additional_properties)."""
    if isinstance(value, list):
        return [key for n, item in enumerate(value) for key in undocumented(item, f"{path}[{n}]")]
    if not attrs.has(type(value)):
        return []
    found = [f"{path}.{key}" for key in value.additional_properties]
    for field in attrs.fields(type(value)):
        if field.name != "additional_properties":
            found += undocumented(getattr(value, field.name), f"{path}.{field.name}")
    return found


def _decoded(reply: Any, model: type, status: HTTPStatus = HTTPStatus.OK) -> Any:
    assert reply.status_code == status, reply.content
    assert type(reply.parsed) is model, reply.content
    assert undocumented(reply.parsed) == [], reply.content
    return reply.parsed


def _ingest(
    client: Any, models: Any, tenant: dict[str, str], *items: dict[str, Any], **kw: str
) -> Any:
    body = models.IngestBatchCallsRequest.from_dict({"data": list(items)})
    assert body.to_dict() == {"data": list(items)}  # every field of the JSON form is a model's
    assert undocumented(body) == []
    return _api("call_ingestion_service.ingest_batch_calls").sync_detailed(
        client=client, body=body, **tenant, **kw
    )


def test_every_operation_of_the_document_is_a_generated_function(
    stack: Stack, package: ModuleType
) -> None:
    document = json.loads(
        httpx.get(f"http://127.0.0.1:{stack.envoy.http_port}{openapi.SPEC_PATH}").text
    )
    operations = {
        re.sub(r"(?<!^)(?=[A-Z])", "_", op["operationId"]).lower()
        for path in document["paths"].values()
        for op in path.values()
    }
    api = importlib.import_module(f"{PACKAGE}.api")
    generated = {
        module.name
        for tag in pkgutil.iter_modules(api.__path__)
        for module in pkgutil.iter_modules(
            importlib.import_module(f"{api.__name__}.{tag.name}").__path__
        )
    }
    assert generated == operations


def test_a_batch_call_creates_its_customer_and_a_replay_gets_the_same_typed_reply(
    client: Any, models: Any, tenant: dict[str, str]
) -> None:
    item = batch_item("gc-call-1", "gc-batch-customer", "interested")
    first = _ingest(client, models, tenant, item, idempotency_key="gc-key-1", x_request_id="gc-r1")
    reply = _decoded(first, models.IngestBatchCallsResponse)
    assert first.headers["x-request-id"] == "gc-r1"
    assert reply.success is True
    assert type(reply.data) is models.IngestBatchCallsResult
    assert (reply.data.created_calls, reply.data.duplicate_calls, reply.data.created_customers) == (
        1, 0, 1,
    )  # fmt: skip
    assert reply.data.items == [
        models.BatchCallOutcome(
            index=0, call_id="gc-call-1", customer_id="gc-batch-customer", status="created",
            customer_created=True,
        )
    ]  # fmt: skip
    again = _ingest(client, models, tenant, item, idempotency_key="gc-key-1")
    assert _decoded(again, models.IngestBatchCallsResponse) == reply
    assert again.headers["idempotent-replayed"] == "true"


def test_a_status_update_shows_in_the_typed_history(
    client: Any, models: Any, tenant: dict[str, str]
) -> None:
    customer = "gc/ada 1"  # a path segment the generated function must percent-encode
    created = _ingest(client, models, tenant, batch_item("gc-call-2", customer, "interested"))
    assert _decoded(created, models.IngestBatchCallsResponse).data.created_customers == 1
    body = models.UpdateDispositionStatusRequest(
        customer_id=customer, disposition_status="callback_requested"
    )
    updated = _api("disposition_service.update_disposition_status").sync_detailed(
        client=client, body=body, x_request_id="gc-r2", **tenant
    )
    assert _decoded(updated, models.UpdateDispositionStatusResponse).success is True

    read = _api("disposition_service.list_disposition_history").sync_detailed(
        customer, client=client, page_size=10, **tenant
    )
    page = _decoded(read, models.ListDispositionHistoryResponse).data
    assert type(page) is models.DispositionHistoryPage
    assert (page.customer_id, page.next_page_token) == (customer, "")
    assert all(type(entry) is models.DispositionChange for entry in page.items)
    newest, oldest = page.items
    assert (newest.previous_status, newest.disposition_status, newest.source) == (
        "interested", "callback_requested", "disposition_update",
    )  # fmt: skip
    assert (oldest.previous_status, oldest.disposition_status, oldest.source) == (
        "", "interested", "batch_call",
    )  # fmt: skip
    assert (newest.request_id, newest.partner_id, newest.tenant_id, newest.sub_tenant_id) == (
        "gc-r2", "123", tenant["x_tenant_id"], tenant["x_sub_tenant_id"],
    )  # fmt: skip
    assert isinstance(newest.changed_at, datetime) and newest.changed_at.utcoffset() is not None
    assert newest.changed_at >= oldest.changed_at
    # An int64, typed `int | str` by the document; the transcoder prints it as a string.
    assert isinstance(newest.cursor, str) and int(newest.cursor) > int(oldest.cursor)


def test_errors_decode_into_the_generated_error_models(
    stack: Stack, package: ModuleType, client: Any, models: Any, tenant: dict[str, str]
) -> None:
    update = _api("disposition_service.update_disposition_status")
    missing = update.sync_detailed(
        client=client, body=models.UpdateDispositionStatusRequest(customer_id="gc-nobody"), **tenant
    )
    error = _decoded(missing, models.Error, HTTPStatus.NOT_FOUND)
    assert (error.success, error.message) == (False, "Customer not found")

    blank = update.sync_detailed(
        client=client, body=models.UpdateDispositionStatusRequest(customer_id=""), **tenant
    )
    invalid = _decoded(blank, models.ValidationError, HTTPStatus.UNPROCESSABLE_ENTITY)
    assert (invalid.success, invalid.message) == (False, "Validation failed")
    assert [(e.field, e.message) for e in invalid.errors] == [
        ("customer_id", "customer_id should not be empty")
    ]
    assert all(type(e) is models.ValidationErrorErrorsItem for e in invalid.errors)

    history = _api("disposition_service.list_disposition_history")
    too_many = history.sync_detailed("customer123", client=client, page_size=501, **tenant)
    invalid = _decoded(too_many, models.ValidationError, HTTPStatus.UNPROCESSABLE_ENTITY)
    assert [e.field for e in invalid.errors] == ["page_size"]

    creds = stack.partner
    with package.Client(
        base_url=f"http://127.0.0.1:{stack.envoy.http_port}",
        headers={"x-api-key": creds.api_key, "x-api-secret": "wrong"},
        raise_on_unexpected_status=True,
    ) as stranger:
        refused = history.sync_detailed("customer123", client=stranger, **tenant)
    error = _decoded(refused, models.Error, HTTPStatus.FORBIDDEN)
    assert (error.success, error.message) == (False, "Forbidden")
