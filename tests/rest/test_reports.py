"""The read endpoints through Envoy: a customer's status, its history page by page, the tenant's
summary, on a real server process (module-scoped stack), asserting exact bodies (over gRPC:
tests/grpc_api/test_reports.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from devstack import Credentials
from server.storage import as_utc
from tests.support.http_client import Reply, assert_rest_reply
from tests.support.payloads import batch_item, status_items
from tests.support.rest import Stack, start_stack

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3}|\.\d{6}|\.\d{9})?Z$")
STATUS_PATH = "/api/v1/partner/customers/{}/disposition-status"
HISTORY_PATH = "/api/v1/partner/customers/{}/disposition-history"
SUMMARY_PATH = "/api/v1/partner/reports/disposition-summary"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("reports"), stack_database_url)


def rest_json(reply: Reply) -> Any:
    """The body of a 200 reply, checked like every REST reply (headers, no gRPC leak)."""
    assert_rest_reply(reply, 200, reply.body)
    return json.loads(reply.body)


def rest_error(reply: Reply, status: int, message: str, errors: list[tuple[str, str]]) -> None:
    body: dict[str, Any] = {"success": False, "message": message}
    if errors:
        body["errors"] = [{"field": field, "message": text} for field, text in errors]
    assert_rest_reply(reply, status, json.dumps(body, separators=(",", ":")).encode())


def rfc3339(value: str) -> datetime:
    assert RFC3339_UTC.match(value), value
    return datetime.fromisoformat(value)


def db_changes(stack: Stack, customer_id: str, tenant: tuple[str, str]) -> list[dict[str, Any]]:
    """A customer's history rows as the API should print them (changed_at parsed), newest first."""
    rows = stack.sql(
        "SELECT h.seq AS cursor, c.customer_id, coalesce(h.previous_status, '')"
        " AS previous_status, coalesce(h.new_status, '') AS disposition_status,"
        " h.changed_at, h.source, p.partner_id, h.request_id, h.tenant_id, h.sub_tenant_id"
        " FROM disposition_history h"
        " JOIN customers c ON c.id = h.customer_pk JOIN partners p ON p.id = h.partner_pk"
        " WHERE c.customer_id = :customer_id AND c.tenant_id = :tenant_id"
        " AND c.sub_tenant_id = :sub_tenant_id"
        " ORDER BY h.id DESC",
        customer_id=customer_id,
        tenant_id=tenant[0],
        sub_tenant_id=tenant[1],
    )
    return [
        {
            **row._asdict(),
            "cursor": str(row.cursor),  # int64 prints as a JSON string
            "changed_at": stored_time(row.changed_at),
        }
        for row in rows
    ]


def stored_time(value: str | datetime) -> datetime:
    """A time as read with plain SQL: SQLite gives its text (UTC), PostgreSQL an aware datetime."""
    return as_utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


def db_created_at(stack: Stack, customer_id: str, tenant: tuple[str, str]) -> datetime:
    [(value,)] = stack.sql(
        "SELECT created_at FROM customers WHERE customer_id = :customer_id"
        " AND tenant_id = :tenant_id AND sub_tenant_id = :sub_tenant_id",
        customer_id=customer_id,
        tenant_id=tenant[0],
        sub_tenant_id=tenant[1],
    )
    return stored_time(value)


def parse_times(data: dict[str, Any], *fields: str) -> dict[str, Any]:
    """`data` with its timestamp fields checked (RFC 3339, UTC) and parsed."""
    return {key: rfc3339(value) if key in fields else value for key, value in data.items()}


# Reserved, unicode and percent characters all travel percent-encoded in one path segment.
SPECIAL_IDS = [
    "a/b",
    "a%2Fb",
    "with space",
    "ünïcødé-客户",
    "what?x=1",
    "hash#tag",
    "100%",
    "plus+sign",
    "semi;colon&amp",
    ".",
    "..",
    "x" * 255,
]


@pytest.mark.envoy
@pytest.mark.parametrize("customer_id", SPECIAL_IDS)
def test_rest_status_and_history_of_any_customer_id(stack: Stack, customer_id: str) -> None:
    n = SPECIAL_IDS.index(customer_id)
    creds = stack.onboard(f"ids-{n}")
    tenant = (creds.tenant_id, creds.sub_tenant_id)
    segment = quote(customer_id, safe="")
    reply = stack.request("GET", STATUS_PATH.format(segment), creds=creds)
    rest_error(reply, 404, "Customer not found", [])
    assert stack.ingest(creds, batch_item(f"call-{n}", customer_id)).status == 200
    reply = stack.request("GET", STATUS_PATH.format(segment), creds=creds)
    body = rest_json(reply)
    assert body["data"]["customer_id"] == customer_id
    reply = stack.put({"customer_id": customer_id, "disposition_status": "interested"}, creds)
    assert reply.status == 200
    for path in (STATUS_PATH, HISTORY_PATH):
        reply = stack.request("GET", path.format(segment), creds=creds)
        body = rest_json(reply)
        if path == STATUS_PATH:
            (change,) = db_changes(stack, customer_id, tenant)
            assert body == {
                "success": True,
                "data": {
                    "customer_id": customer_id,
                    "disposition_status": "interested",
                    "updated_at": body["data"]["updated_at"],
                },
            }
            assert rfc3339(body["data"]["updated_at"]) == change["changed_at"]
        else:
            data = body["data"]
            assert (data["customer_id"], data["next_page_token"]) == (customer_id, "")
            items = [parse_times(item, "changed_at") for item in data["items"]]
            assert items == db_changes(stack, customer_id, tenant)
            assert [item["disposition_status"] for item in items] == ["interested"]


@pytest.mark.envoy
def test_rest_status_without_history_is_dated_by_creation(stack: Stack) -> None:
    creds = stack.onboard("created")
    assert stack.ingest(creds, batch_item("cr-1", "fresh")).status == 200
    body = rest_json(stack.request("GET", STATUS_PATH.format("fresh"), creds=creds))
    assert body == {
        "success": True,
        "data": {
            "customer_id": "fresh",
            "disposition_status": "",
            "updated_at": body["data"]["updated_at"],
        },
    }
    created = db_created_at(stack, "fresh", (creds.tenant_id, creds.sub_tenant_id))
    assert rfc3339(body["data"]["updated_at"]) == created


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("segment", "message"),
    [
        ("%20", "customer_id should not be empty"),
        ("%20%09", "customer_id should not be empty"),
        ("c" * 256, "customer_id must be shorter than or equal to 255 characters"),
        ("%C3%BC" * 256, "customer_id must be shorter than or equal to 255 characters"),
    ],
)
def test_rest_customer_id_validation(stack: Stack, segment: str, message: str) -> None:
    for path in (STATUS_PATH, HISTORY_PATH):
        reply = stack.request("GET", path.format(segment))
        rest_error(reply, 422, "Validation failed", [("customer_id", message)])


@pytest.mark.envoy
def test_rest_unknown_customer(stack: Stack) -> None:
    for path in (STATUS_PATH, HISTORY_PATH):
        rest_error(stack.request("GET", path.format("nobody")), 404, "Customer not found", [])


@pytest.mark.envoy
def test_rest_history_pages_with_both_sources(stack: Stack) -> None:
    creds = stack.onboard("pager")
    tenant = (creds.tenant_id, creds.sub_tenant_id)
    customer_id = "page/me?"
    reply = stack.ingest(creds, *status_items(customer_id, ["a", "b", "c"], "pg"))
    assert reply.status == 200
    for status in ("d", "", "e"):
        reply = stack.put({"customer_id": customer_id, "disposition_status": status}, creds)
        assert reply.status == 200
    expected = db_changes(stack, customer_id, tenant)
    assert [(c["previous_status"], c["disposition_status"], c["source"]) for c in expected] == [
        ("", "e", "disposition_update"),
        ("d", "", "disposition_update"),
        ("c", "d", "disposition_update"),
        ("b", "c", "batch_call"),
        ("a", "b", "batch_call"),
        ("", "a", "batch_call"),
    ]
    seen: list[dict[str, Any]] = []
    pages = []
    query: dict[str, str] = {"page_size": "2"}
    while True:
        path = HISTORY_PATH.format(quote(customer_id, safe="")) + "?" + urlencode(query)
        data = rest_json(stack.request("GET", path, creds=creds))["data"]
        assert data["customer_id"] == customer_id
        seen += [parse_times(item, "changed_at") for item in data["items"]]
        pages.append(len(data["items"]))
        if not data["next_page_token"]:
            break
        query["page_token"] = data["next_page_token"]
    assert pages == [2, 2, 2]
    assert seen == expected


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("page_size=abc", [("page_size", "page_size must be an integer")]),
        ("page_size=2.5", [("page_size", "page_size must be an integer")]),
        ("page_size=99999999999", [("page_size", "page_size must be an integer")]),
        ("page_size=-1", [("page_size", "page_size must not be less than 0")]),
        ("page_size=501", [("page_size", "page_size must not be greater than 500")]),
        ("page_token=not-a-token", [("page_token", "page_token is invalid")]),
        (
            "page_size=1000&page_token=%25",
            [
                ("page_size", "page_size must not be greater than 500"),
                ("page_token", "page_token is invalid"),
            ],
        ),
    ],
)
def test_rest_history_query_validation(stack: Stack, query: str, errors: list[Any]) -> None:
    reply = stack.request("GET", HISTORY_PATH.format("customer123") + "?" + query)
    rest_error(reply, 422, "Validation failed", errors)


@pytest.mark.envoy
def test_rest_summary_and_read_after_write(stack: Stack) -> None:
    creds = stack.onboard("reporter", grants=[("reports", "north")])
    items = [batch_item("r-1", "r1"), batch_item("r-2", "r2", "interested")]
    assert stack.ingest(creds, *items).status == 200
    expected = {
        "tenant_id": "reports",
        "sub_tenant_id": "north",
        "from": "",
        "to": "",
        "total_customers": 2,
        "customers_without_status": 1,
        "total_changes": 1,
        "statuses": [
            {"disposition_status": "", "customers": 1, "changes": 0},
            {"disposition_status": "interested", "customers": 1, "changes": 1},
        ],
    }
    assert rest_summary(stack, creds) == expected
    # Every acknowledged PUT shows in the very next summary.
    for n, status in enumerate(["do_not_call", "interested", ""] * 3, start=1):
        assert stack.put({"customer_id": "r1", "disposition_status": status}, creds).status == 200
        data = rest_summary(stack, creds)
        assert data["total_changes"] == 1 + n
        assert data["customers_without_status"] == (1 if status == "" else 0)
    window = {"from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00+00:00"}
    assert rest_summary(stack, creds, window) == {
        **expected,
        **window,
        "total_changes": 0,
        "statuses": [
            {"disposition_status": "", "customers": 1, "changes": 0},
            {"disposition_status": "interested", "customers": 1, "changes": 0},
        ],
    }


def rest_summary(
    stack: Stack, creds: Credentials, window: dict[str, str] | None = None
) -> dict[str, Any]:
    path = SUMMARY_PATH + ("?" + urlencode(window) if window else "")
    before = datetime.now(UTC)
    data = dict(rest_json(stack.request("GET", path, creds=creds))["data"])
    generated_at = rfc3339(data.pop("generated_at"))
    assert before - timedelta(seconds=1) <= generated_at <= datetime.now(UTC)
    return data


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("from=yesterday", [("from", "from must be a valid ISO 8601 date string")]),
        (
            "to=2026-11-26T10%3A00%3A00-05%3A00",
            [("to", "to must be in UTC (end with Z or +00:00)")],
        ),
        (
            "from=2026-11-27T00:00:00Z&to=2026-11-26T00:00:00Z",
            [("to", "to must be after from")],
        ),
    ],
)
def test_rest_summary_validation(stack: Stack, query: str, errors: list[Any]) -> None:
    rest_error(stack.request("GET", SUMMARY_PATH + "?" + query), 422, "Validation failed", errors)


@pytest.mark.envoy
def test_rest_tenant_isolation(stack: Stack) -> None:
    owner = stack.onboard("owner", grants=[("iso", "one")])
    other_tenant = stack.onboard("stranger", grants=[("iso-other", "one")])
    sibling = stack.onboard("sibling", grants=[("iso", "two")])
    assert stack.ingest(owner, batch_item("iso-1", "secret", "vip")).status == 200
    for creds in (other_tenant, sibling):
        for path in (STATUS_PATH, HISTORY_PATH):
            reply = stack.request("GET", path.format("secret"), creds=creds)
            rest_error(reply, 404, "Customer not found", [])
    assert rest_summary(stack, sibling) == {
        "tenant_id": "iso",
        "sub_tenant_id": "two",
        "from": "",
        "to": "",
        "total_customers": 0,
        "customers_without_status": 0,
        "total_changes": 0,
        "statuses": [],
    }
    # Headers for a tenant or sub-tenant the partner was not granted.
    for headers in ({"x_tenant_id": "iso"}, {"x_sub_tenant_id": "two"}):
        for path in (STATUS_PATH.format("secret"), HISTORY_PATH.format("secret"), SUMMARY_PATH):
            reply = stack.request("GET", path, creds=other_tenant, **headers)
            rest_error(reply, 403, "Forbidden", [])


@pytest.mark.envoy
@pytest.mark.parametrize(
    "path", [STATUS_PATH.format("customer123"), HISTORY_PATH.format("customer123"), SUMMARY_PATH]
)
def test_rest_reads_allow_only_get(stack: Stack, path: str) -> None:
    reply = stack.request("POST", path, {})
    rest_error(reply, 405, "Method not allowed", [])
    assert reply.header("allow") == "GET"
