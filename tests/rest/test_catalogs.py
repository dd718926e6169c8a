"""Disposition catalogs through real Envoy and a real server process: enforced on every write
path, listed per tenant and sub-tenant, changed with the admin CLI while the stack runs (over
gRPC: tests/grpc_api/test_catalogs.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.admin import admin, write
from tests.support.http_client import assert_rest_reply
from tests.support.payloads import batch_item
from tests.support.rest import BATCH, BATCH_UPDATE, Stack, start_stack

DISPOSITIONS = "/api/v1/partner/dispositions"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("catalog-stack"), stack_database_url)


@pytest.mark.envoy
def test_rest_catalog_on_every_write_path(stack: Stack, tmp_path: Path) -> None:
    creds = stack.onboard("rest-cat", grants=[("cat-tenant", "s1")])
    assert stack.ingest(creds, batch_item("rc-1", "rc-customer")).status == 200
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, creds),
        200,
        b'{"success":true,"data":{"restricted":false,"scope":"","dispositions":[]}}',
    )
    catalog_file = write(
        tmp_path,
        "catalog.json",
        [
            {"disposition_status": "interested", "label": "Interested"},
            {"disposition_status": "do_not_call", "do_not_call": True},
        ],
    )
    done = admin(
        stack.database_url, "catalog", "set", "--tenant", "cat-tenant", "--file", catalog_file
    )
    assert done.returncode == 0, done.stderr
    # Takes effect on the next request, without a restart.
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, creds),
        200,
        b'{"success":true,"data":{"restricted":true,"scope":"tenant","dispositions":['
        b'{"disposition_status":"interested","label":"Interested","final":false,'
        b'"do_not_call":false,"callback":false},'
        b'{"disposition_status":"do_not_call","label":"do_not_call","final":false,'
        b'"do_not_call":true,"callback":false}]}}',
    )
    refused = (
        b'{"success":false,"message":"Validation failed","errors":[{"field":"disposition_status",'
        b'"message":"disposition_status must be one of: interested, do_not_call"}]}'
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "bogus"}, creds),
        422,
        refused,
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "interested"}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": None}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": ""}, creds),
        200,
        b'{"success":true}',
    )
    assert_rest_reply(
        stack.request("POST", BATCH, {"data": [batch_item("rc-2", "rc-customer", "nope")]}, creds),
        422,
        b'{"success":false,"message":"Validation failed","errors":[{"field":'
        b'"data[0].customer.disposition_status","message":"data[0].customer.disposition_status'
        b' must be one of: interested, do_not_call"}]}',
    )
    assert_rest_reply(
        stack.request(
            "POST",
            BATCH_UPDATE,
            {
                "items": [
                    {"customer_id": "rc-customer", "disposition_status": "nope"},
                    {"customer_id": "rc-customer", "disposition_status": "do_not_call"},
                ]
            },
            creds,
        ),
        200,
        b'{"success":true,"data":{"ok":1,"not_found":0,"invalid":1,"changed":1,"items":['
        b'{"index":0,"customer_id":"rc-customer","status":"invalid","changed":false,"errors":'
        b'[{"field":"items[0].disposition_status","message":"items[0].disposition_status must be'
        b' one of: interested, do_not_call"}]},'
        b'{"index":1,"customer_id":"rc-customer","status":"ok","changed":true,"errors":[]}]}}',
    )
    assert [row[:3] for row in stack.history("rc-customer")] == [
        (None, "interested", "disposition_update"),
        ("interested", None, "disposition_update"),
        (None, "do_not_call", "batch_update"),
    ]
    assert stack.sql("SELECT count(*) FROM calls WHERE call_id = 'rc-2'") == [(0,)]
    cleared = admin(stack.database_url, "catalog", "clear", "--tenant", "cat-tenant")
    assert cleared.returncode == 0, cleared.stderr
    assert_rest_reply(
        stack.put({"customer_id": "rc-customer", "disposition_status": "bogus"}, creds),
        200,
        b'{"success":true}',
    )


@pytest.mark.envoy
def test_rest_catalogs_are_per_tenant_and_sub_tenant(stack: Stack, tmp_path: Path) -> None:
    creds = stack.onboard("rest-scopes", grants=[("scope-tenant", "s1"), ("scope-tenant", "s2")])
    stranger = stack.onboard("rest-stranger", grants=[("elsewhere", "s1")])
    own = write(tmp_path, "own.json", [{"disposition_status": "s2_only"}])
    wide = write(tmp_path, "wide.json", [{"disposition_status": "everyone"}])
    for args in (["--sub-tenant", "s2", "--file", own], ["--file", wide]):
        assert (
            admin(
                stack.database_url, "catalog", "set", "--tenant", "scope-tenant", *args
            ).returncode
            == 0
        )
    scope_of = {
        sub: json.loads(stack.request("GET", DISPOSITIONS, None, creds, x_sub_tenant_id=sub).body)[
            "data"
        ]
        for sub in ("s1", "s2")
    }
    assert [
        (d["scope"], [e["disposition_status"] for e in d["dispositions"]])
        for d in scope_of.values()
    ] == [
        ("tenant", ["everyone"]),
        ("sub_tenant", ["s2_only"]),
    ]
    assert_rest_reply(
        stack.request("GET", DISPOSITIONS, None, stranger),
        200,
        b'{"success":true,"data":{"restricted":false,"scope":"","dispositions":[]}}',
    )
    for headers in (
        {"x_tenant_id": "scope-tenant"},
        {"x_tenant_id": "scope-tenant", "x_sub_tenant_id": "s2"},
    ):
        assert_rest_reply(
            stack.request("GET", DISPOSITIONS, None, stranger, **headers),
            403,
            b'{"success":false,"message":"Forbidden"}',
        )
