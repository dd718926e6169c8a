"""The limits declared on the request fields (server/rules/declared.py): their messages, and that
the OpenAPI document (gateway/openapi.py, build/openapi.json) allows exactly what they accept."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema_rs
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disposition.v1 import call_ingestion_service_pb2 as ingestion
from disposition.v1 import disposition_service_pb2 as dispositions
from disposition.v1 import webhook_service_pb2 as webhooks
from gateway import openapi
from server.rules import declared

UTC_MESSAGE = "must be in UTC (end with Z or +00:00)"
ISO_MESSAGE = "must be a valid ISO 8601 date string"


def problems(message: Message, field: str) -> list[str]:
    return [text for path, text in declared.check(message) if path == field]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-26T09:30:00Z", []),
        ("2026-11-26T09:30:00.123456+00:00", []),
        ("2024-02-29T00:00:00Z", []),  # a leap year
        ("2026-11-26T09:30:00", [f"start_time {UTC_MESSAGE}"]),  # no offset: ambiguous
        ("2026-11-26T09:30:00+01:00", [f"start_time {UTC_MESSAGE}"]),
        ("2026-11-26T09:30:00-00:00", [f"start_time {UTC_MESSAGE}"]),
        ("2026-02-29T00:00:00Z", [f"start_time {ISO_MESSAGE}"]),  # not a leap year
        ("2100-02-29T00:00:00Z", [f"start_time {ISO_MESSAGE}"]),
        ("2026-04-31T00:00:00Z", [f"start_time {ISO_MESSAGE}"]),
        ("0000-01-01T00:00:00Z", [f"start_time {ISO_MESSAGE}"]),
        ("2026-11-26T24:00:00Z", [f"start_time {ISO_MESSAGE}"]),
        ("2026-11-26T09:30Z", [f"start_time {ISO_MESSAGE}"]),  # seconds are required
        ("2026-11-26", [f"start_time {ISO_MESSAGE}"]),
        ("26/11/2026 09:30", [f"start_time {ISO_MESSAGE}"]),
        ("   ", ["start_time should not be empty"]),
        ("2026-11-26T09:30:00Z\n", ["start_time must not contain control characters"]),
    ],
)
def test_timestamps(value: str, expected: list[str]) -> None:
    assert problems(ingestion.Call(start_time=value), "start_time") == expected


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("contact_number", "+14155550123", []),
        ("contact_number", "14155550123", ["must be a phone number in E.164 format"]),
        ("contact_number", "+1 415 555", ["must be a phone number in E.164 format"]),
        ("recording_url", "https://rec.example.com/a/call.MP3?sig=1", []),
        ("recording_url", "https://rec.example.com/a/call.txt", ["must point to an MP3"]),
        ("recording_url", "https://rec.example.com.mp3", ["must point to an MP3"]),  # no path
        ("recording_url", "ftp://rec.example.com/a.mp3", ["must be a URL address"]),
        ("recording_url", "https://rec.example.com/a b.mp3", ["must be a URL address"]),
        ("id", "\u0085", ["must not contain control characters"]),  # C1 too
        ("id", "\ufeff\u3000", ["should not be empty"]),  # white space in JSON Schema too
        ("id", "x" * 256, ["must be shorter than or equal to 255 characters"]),
    ],
)
def test_call_fields(field: str, value: str, expected: list[str]) -> None:
    found = problems(ingestion.Call(**{field: value}), field)
    assert len(found) == len(expected)
    for text, start in zip(found, expected, strict=True):
        assert text.startswith(f"{field} {start}"), text


def test_webhook_urls_get_the_documented_messages_in_order() -> None:
    def url(value: str) -> list[str]:
        return problems(webhooks.CreateWebhookEndpointRequest(url=value), "url")

    assert url("https://hooks.example.com/x") == []
    assert url("http://127.0.0.1:9/x") == []  # the host's rules are the use case's
    assert url("ftp://hooks.example.com/") == ["url must be an https URL"]
    assert url("https://u:p@hooks.example.com/") == ["url must not contain credentials"]
    assert url("https://" + "a" * 64 + ".example.com/") == ["url must be a valid URL"]
    assert url("https://hooks.example.com:65536/") == ["url must be a valid URL"]
    assert url("") == ["url should not be empty"]


def test_maps_lists_and_ranges() -> None:
    item = ingestion.BatchCallItem(metadata={"": "v", "k": "x" * 2049})
    found = declared.check(item)
    assert ("metadata", "metadata should not be empty") in found
    assert ("metadata.k", "metadata.k must be shorter than or equal to 2048 characters") in found
    events = webhooks.CreateWebhookEndpointRequest(url="https://h.example/", events=["x", ""])
    assert declared.check(events) == [
        ("events[0]", "events[0] must be one of: disposition.changed, call.processed"),
        ("events[1]", "events[1] should not be empty"),
    ]
    assert declared.check(ingestion.IngestBatchCallsRequest()) == [
        ("data", "data should not be empty")
    ]
    many = dispositions.BatchUpdateDispositionStatusRequest(
        items=[dispositions.DispositionStatusUpdate() for _ in range(1001)]
    )  # items judged alone: only their count is a refusal
    assert declared.check(many) == [("items", "items must contain no more than 1000 elements")]
    history = dispositions.ListDispositionHistoryRequest(customer_id="c", page_size=501)
    assert declared.check(history) == [("page_size", "page_size must not be greater than 500")]


def test_portable_regexes_read_alike_in_python_and_ecmascript() -> None:
    assert declared.portable(r"^a\s$") == "^a[" + declared.WHITE_SPACE + r"](?!\n)$"
    assert re.search(declared.portable("^a$"), "a\n") is None
    assert re.search(declared.portable(r"[$]\S"), "$x") is not None  # a class's $ stays
    with pytest.raises(ValueError):
        declared.portable(r"[\S]")


# --- the document allows what the checks accept -----------------------------------------------

DOCUMENT = json.loads(openapi.DEFAULT_OUT.read_text())
SCHEMAS = DOCUMENT["components"]["schemas"]
# (message, field, the schema holding it): every checked string of a request body.
FIELDS = [
    (message, field.name, message.DESCRIPTOR.name)
    for message in (
        dispositions.UpdateDispositionStatusRequest,
        ingestion.Call,
        ingestion.Agent,
        ingestion.Customer,
        ingestion.CustomField,
        ingestion.BatchCallItem,
        webhooks.CreateWebhookEndpointRequest,
    )
    for field in message.DESCRIPTOR.fields
    if field.type == field.TYPE_STRING and not field.is_repeated
]
TRICKY = st.sampled_from(
    ["", " ", "\t", "\n", "\x85", "\ufeff", "a\n", "\u3000x", "+14155550123", "+14155550123\n",
     "https://h.example/a.mp3", "https://h.example/a.mp3\n", "a@b.co", "2026-11-26T09:30:00Z",
     "2026-11-26T09:30:00Z\n", "2024-02-29T00:00:00+00:00", "x" * 256]
)  # fmt: skip


def _accepted_by_document(schema: dict[str, Any], value: str) -> bool:
    return bool(jsonschema_rs.validator_for(schema).is_valid(value))


@pytest.mark.parametrize(("message", "name", "holder"), FIELDS)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_document_allows_exactly_what_the_checks_accept(
    message: type[Message], name: str, holder: str, data: st.DataObject
) -> None:
    schema = {k: v for k, v in SCHEMAS[holder]["properties"][name].items() if k != "description"}
    generated = st.from_regex(schema["pattern"]) if "pattern" in schema else st.text()
    value = data.draw(st.one_of(TRICKY, st.text(), generated))
    accepted = problems(message(**{name: value}), name) == []
    assert _accepted_by_document(schema, value) is accepted, (holder, name, value, schema)
