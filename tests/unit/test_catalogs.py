"""The rules of a disposition catalog's definition (pure): defaults, and every refusal with its
message (enforcement: tests/grpc_api/test_catalogs.py and tests/rest/test_catalogs.py)."""

from __future__ import annotations

import pytest

from server.records import Disposition
from server.usecases.catalogs import InvalidCatalog, parse_definitions


def test_definitions_default_label_and_flags() -> None:
    assert parse_definitions([{"disposition_status": "new"}]) == [Disposition("new", "new")]
    assert parse_definitions([{"disposition_status": "dnc", "label": None, "final": True}]) == [
        Disposition("dnc", "dnc", final=True)
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"disposition_status": "x"}, "the catalog must be a JSON list of dispositions"),
        ([], "the catalog lists no dispositions (use 'catalog clear' to remove it)"),
        (
            [{"disposition_status": f"s{n}"} for n in range(501)],
            "the catalog must list at most 500 dispositions",
        ),
        (["new"], "[0] must be an object"),
        ([{}], "[0].disposition_status must be a string"),
        ([{"disposition_status": " "}], "[0].disposition_status should not be empty"),
        (
            [{"disposition_status": "s" * 256}],
            "[0].disposition_status must be shorter than or equal to 255 characters",
        ),
        (
            [{"disposition_status": "a\tb"}],
            "[0].disposition_status must not contain control characters",
        ),
        ([{"disposition_status": "a", "label": 3}], "[0].label must be a string"),
        ([{"disposition_status": "a", "final": "yes"}], "[0].final must be true or false"),
        ([{"disposition_status": "a", "do_not_cal": True}], "[0].do_not_cal is not a known field"),
        (
            [{"disposition_status": "a"}, {"disposition_status": "b"}, {"disposition_status": "a"}],
            "[2].disposition_status 'a' is listed twice",
        ),
        (
            [{"disposition_status": ""}, {"disposition_status": "b", "callback": 1}],
            "[0].disposition_status should not be empty; [1].callback must be true or false",
        ),
    ],
)
def test_definition_rules(raw: object, message: str) -> None:
    with pytest.raises(InvalidCatalog) as caught:
        parse_definitions(raw)
    assert str(caught.value) == message
