"""Render the error vocabulary (server/errors.py) into the gateway's Lua filter.

    python -m gateway.vocabulary --out build/envelope.lua

gateway/envelope.lua holds the filter's logic and, between its `@vocabulary-begin` and
`@vocabulary-end` lines, empty tables; this writes the filter with those lines replaced by
tables derived from the error classes: each ErrorInfo reason's HTTP status, each HTTP status's
envelope message, and the two messages the filter itself gives. `make gen` runs it, and Envoy
runs the result (envoy.yaml: build/envelope.lua), so the HTTP side of every error is declared in
one place.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from server import errors

SOURCE = Path(__file__).resolve().parent / "envelope.lua"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "build" / "envelope.lua"
BLOCK = re.compile(r"^-- @vocabulary-begin\n.*?^-- @vocabulary-end\n", re.DOTALL | re.MULTILINE)
_SAFE = re.compile(r"[ -~]*")  # printable ASCII: the same bytes in a Lua and a Python literal


def lua_string(text: str) -> str:
    if not _SAFE.fullmatch(text):
        raise ValueError(f"not printable ASCII: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def repeated_request_fields() -> list[str]:
    """Every list field a REST request body can carry, as its path of names ("data",
    "data.custom_fields"): the lists the filter checks for lists and nulls in them."""
    from disposition.v1 import (
        call_ingestion_service_pb2,
        disposition_service_pb2,
        webhook_service_pb2,
    )

    found: set[str] = set()

    def walk(message: Any, at: str, depth: int) -> None:
        for field in message.fields:
            path = f"{at}.{field.name}" if at else field.name
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                continue
            if field.is_repeated:
                found.add(path)
            if entry is not None and not entry.full_name.startswith("google.") and depth < 8:
                walk(entry, path, depth + 1)

    for module in (call_ingestion_service_pb2, disposition_service_pb2, webhook_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                walk(method.input_type, "", 0)
    return sorted(found)


def block() -> str:
    """The Lua lines that replace the source's vocabulary block."""
    reasons = "".join(
        f"  [{lua_string(reason)}] = {status},\n"
        for reason, status in sorted(errors.http_status_by_reason().items())
    )
    messages = "".join(
        f"  [{status}] = {lua_string(message)},\n"
        for status, message in errors.message_by_http_status().items()
    )
    lists = "".join(f"  [{lua_string(path)}] = true,\n" for path in repeated_request_fields())
    return (
        "-- @vocabulary-begin (rendered from server/errors.py and the protos by vocabulary.py)\n"
        f"local HTTP_STATUS_FOR_REASON = {{\n{reasons}}}\n"
        f"local MESSAGE_FOR_STATUS = {{\n{messages}}}\n"
        f"local INVALID_JSON_BODY = {lua_string(errors.InvalidJsonBody.default_message)}\n"
        f"local VALIDATION_FAILED = {lua_string(errors.ValidationFailed.default_message)}\n"
        f"local REPEATED_FIELDS = {{\n{lists}}}\n"
        "-- @vocabulary-end\n"
    )


def render(source: str) -> str:
    """`source` (the filter) with its vocabulary block rendered."""
    found = BLOCK.findall(source)
    if len(found) != 1:
        raise ValueError("the Lua filter must hold one @vocabulary-begin ... @vocabulary-end block")
    return BLOCK.sub(lambda _: block(), source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(SOURCE.read_text()))


if __name__ == "__main__":
    main()
