"""The error vocabulary (server/errors.py) is declared once and everything else derives from it:
the gateway's Lua tables (build/envelope.lua) and the OpenAPI document's error responses
(build/openapi.json). These fail if a copy is stale or if a table is written by hand again.
(tests/rest/test_gateway_envelope.py checks, through a real Envoy, that each class gets its
status.)"""

from __future__ import annotations

import json
import re

import pytest
from google.rpc import error_details_pb2

from gateway import vocabulary
from server import errors
from tests.support import REPO

BUILD = REPO / "build"
CLASSES = list(errors.service_errors())


def test_every_class_declares_a_distinct_reason_and_says_what_it_is() -> None:
    reasons = [cls.reason for cls in CLASSES]
    assert len(reasons) == len(set(reasons))
    for cls in CLASSES:
        assert cls.__doc__, cls
        assert 400 <= cls.http_status < 600, cls
        assert re.fullmatch(r"[A-Z][A-Z_]*", cls.reason), cls


def test_the_most_general_class_of_a_status_gives_its_message() -> None:
    messages = errors.message_by_http_status()
    assert messages[404] == errors.NotFound.default_message  # not CustomerNotFound's
    assert messages[400] == errors.BadRequest.default_message
    assert messages[500] == errors.ServiceError.default_message
    assert set(messages) == {cls.http_status for cls in CLASSES}


@pytest.mark.parametrize(
    "error",
    [errors.Forbidden(), errors.CustomerNotFound("c"), errors.RateLimited(3),
     errors.ValidationFailed([("f", "m")]), errors.ServiceUnavailable()],
    ids=lambda e: type(e).__name__,
)  # fmt: skip
def test_a_raised_error_carries_its_reason_for_the_gateway(error: errors.ServiceError) -> None:
    info = error_details_pb2.ErrorInfo()
    assert error.to_status().details[0].Unpack(info)
    assert errors.http_status_by_reason()[info.reason] == error.http_status


def test_the_built_lua_filter_is_rendered_from_the_current_classes() -> None:
    built = (BUILD / "envelope.lua").read_text()
    assert built == vocabulary.render(vocabulary.SOURCE.read_text()), "run `make gen`"
    reasons = dict(re.findall(r'\["([A-Z_]+)"\] = (\d+),', built))
    assert {k: int(v) for k, v in reasons.items()} == errors.http_status_by_reason()
    messages = dict(re.findall(r'\[(\d+)\] = "([^"]*)",', built))
    assert {int(k): v for k, v in messages.items()} == errors.message_by_http_status()


def test_the_lua_source_writes_no_status_or_message_of_its_own() -> None:
    """Outside its vocabulary block, the filter names no message of the vocabulary and maps no
    reason: those come from the classes only."""
    source = vocabulary.BLOCK.sub("", vocabulary.SOURCE.read_text())
    for cls in CLASSES:
        assert f'"{cls.default_message}"' not in source, cls
        assert f'"{cls.reason}"' not in source, cls


def test_the_rendered_block_refuses_a_source_without_one() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        vocabulary.render("local x = 1\n")
    with pytest.raises(ValueError, match="ASCII"):
        vocabulary.lua_string("caf\u00e9")


def test_the_openapi_document_lists_every_status_and_message_of_the_vocabulary() -> None:
    document = json.loads((BUILD / "openapi.json").read_text())
    responses = document["components"]["responses"]
    assert set(responses) == {str(cls.http_status) for cls in CLASSES}
    for cls in CLASSES:
        description = responses[str(cls.http_status)]["description"]
        assert f"`{cls.default_message}` ({cls.reason})" in description, cls
    assert "headers" in responses["429"] and "headers" in responses["503"]
    schema = responses["422"]["content"]["application/json"]["schema"]["$ref"]
    assert schema.endswith("/ValidationError")
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            documented = set(operation["responses"]) - {"200"}
            assert documented == set(responses) - {"405"}, (verb, path)
