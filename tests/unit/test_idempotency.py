"""The pure rules of idempotency: a request's fingerprint and which Idempotency-Key values are
accepted (the behaviour: tests/grpc_api/test_idempotency.py and tests/rest/test_idempotency.py)."""

from __future__ import annotations

import pytest

from server.errors import InvalidIdempotencyKey
from server.usecases import idempotency
from server.usecases import ingestion as domain


def test_fingerprint_is_canonical() -> None:
    item = domain.BatchItem(call=None, agent=None, customer=None, metadata={"a": "1", "b": "2"})
    reordered = domain.BatchItem(
        call=None, agent=None, customer=None, metadata={"b": "2", "a": "1"}
    )
    same = idempotency.fingerprint("M", [item])
    assert same == idempotency.fingerprint("M", (reordered,))
    assert same != idempotency.fingerprint("N", [item])
    assert same != idempotency.fingerprint("M", [item, item])


@pytest.mark.parametrize("key", ["", " ", "k" * 256, "clé", "tab\there", "nul\x00"])
def test_parse_key_refuses(key: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        idempotency.parse_key(key)


def test_parse_key_accepts() -> None:
    assert idempotency.parse_key(None) is None
    for key in ("k", "550e8400-e29b-41d4-a716-446655440000", "a b~!", "x" * 255):
        assert idempotency.parse_key(key) == key
