"""Schemathesis hooks for tests/rest/test_schemathesis.py (SCHEMATHESIS_HOOKS names this module).

The OpenAPI document states every limit of a single field. A few rules need more than one field
or data the generator cannot know, and a request that breaks one is refused (422) though each of
its fields is valid; these hooks make generated requests keep them, as a real client's would:
- a batch call's `end_time` is after its `start_time`, and its call ids are unique in the batch;
- a summary's `to` is after its `from`;
- a `page_token` is one the server issued (generated ones are all unknown: empty instead);
- a partner has at most 16 webhook endpoints: each one created is deleted again at once;
- the tenant headers, where sent, are the partner's (a generated tenant is one it has no grant
  for: 403), and may still be left out (400);
- an Idempotency-Key is used for one request only (a key sent again with another body is a 422,
  as the IETF draft asks): each generated key gets a suffix of its own.

Nothing else is changed: every other value is sent as generated.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import urllib.request
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis

BATCH_CALL = "/api/v1/partner/ingest/batch-call"
SUMMARY = "/api/v1/partner/reports/disposition-summary"
ENDPOINTS = "/api/v1/partner/webhook-endpoints"
_KEYS = itertools.count(1)
_RUN = secrets.token_hex(4)  # keys of an earlier run on the same stack are kept for 24 hours
_TENANT = {
    name: json.loads(os.environ["FUZZ_HEADERS"])[name]
    for name in ("x-tenant-id", "x-sub-tenant-id")
}


def _instant(value: object) -> datetime | None:
    """A valid UTC timestamp's instant (the server refuses any other)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None or parsed.year == 9999:
        return None
    return parsed.astimezone(UTC)


def _later(start: datetime) -> str:
    return (start + timedelta(seconds=1)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fix_batch_call(body: Any) -> None:
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return
    seen: set[str] = set()
    for index, item in enumerate(items):
        call = item.get("call") if isinstance(item, dict) else None
        if not isinstance(call, dict):
            continue
        start, end = _instant(call.get("start_time")), _instant(call.get("end_time"))
        if start is not None and end is not None and end <= start:
            call["end_time"] = _later(start)
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id.strip():
            while call_id in seen:
                call_id = f"{call_id[:240]}~{index}"
            call["id"] = call_id
            seen.add(call_id)


def _fix_summary(query: Any) -> None:
    if not isinstance(query, MutableMapping):
        return
    start, end = _instant(query.get("from")), _instant(query.get("to"))
    if start is not None and end is not None and end <= start:
        query["to"] = _later(start)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    path, method = case.operation.path, case.method.upper()
    if (path, method) == (BATCH_CALL, "POST"):
        _fix_batch_call(case.body)
    elif (path, method) == (SUMMARY, "GET"):
        _fix_summary(case.query)
    if isinstance(case.query, MutableMapping) and isinstance(case.query.get("page_token"), str):
        case.query["page_token"] = ""
    headers = case.headers
    if isinstance(headers, MutableMapping):
        for name in ("x-tenant-id", "x-sub-tenant-id"):  # the partner's, where any is sent
            if name in headers:
                headers[name] = _TENANT[name]
    key = headers.get("Idempotency-Key") if isinstance(headers, MutableMapping) else None
    if isinstance(key, str) and key.strip() and key.isascii() and key.isprintable():
        headers["Idempotency-Key"] = f"{key.strip()[:200]}-{_RUN}-{next(_KEYS)}"


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if (case.operation.path, case.method.upper(), response.status_code) != (ENDPOINTS, "POST", 200):
        return
    endpoint_id = json.loads(response.content)["data"]["id"]
    base = os.environ["FUZZ_BASE_URL"]
    headers = json.loads(os.environ["FUZZ_HEADERS"])
    request = urllib.request.Request(f"{base}{ENDPOINTS}/{endpoint_id}", method="DELETE")
    for name, value in headers.items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200, reply.status
