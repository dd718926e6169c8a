"""Field checks the use cases run themselves (on data that is not a request message, such as a
catalog file, or needing the data of a request as a whole). The limits of request fields are
declared on the protos and checked by declared.py. Each check appends (field, message)
violations; nothing raises here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

MAX_TEXT = 255
MAX_CHOICES_TEXT = 500

Violations = list[tuple[str, str]]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def required_text(out: Violations, field: str, value: str, *, max_length: int = MAX_TEXT) -> bool:
    """A non-blank string of at most max_length characters. True when valid."""
    if not value.strip():
        out.append((field, f"{field} should not be empty"))
        return False
    return optional_text(out, field, value, max_length=max_length)


def optional_text(out: Violations, field: str, value: str, *, max_length: int = MAX_TEXT) -> bool:
    """Any string (empty allowed) of at most max_length characters, no control characters."""
    if len(value) > max_length:
        out.append((field, f"{field} must be shorter than or equal to {max_length} characters"))
        return False
    if _CONTROL.search(value):
        out.append((field, f"{field} must not contain control characters"))
        return False
    return True


def one_of(out: Violations, field: str, value: str, choices: Sequence[str]) -> None:
    """`value` must be one of `choices`; the message lists them in order (up to MAX_CHOICES_TEXT
    characters, so that a long list cannot blow up an error reply)."""
    if value in choices:
        return
    listed: list[str] = []
    length = 0
    for choice in choices:
        length += len(choice) + 2
        if length > MAX_CHOICES_TEXT and listed:
            break
        listed.append(choice)
    more = len(choices) - len(listed)
    text = ", ".join(listed) + (f" and {more} more" if more else "")
    out.append((field, f"{field} must be one of: {text}"))


def utc_date(out: Violations, field: str, value: str) -> datetime | None:
    """The instant an ISO 8601 UTC timestamp of the declared form (declared.py checked its
    pattern) names, or a violation for a date or time that does not exist (February 30th)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        out.append((field, f"{field} must be a valid ISO 8601 date string"))
        return None
    return parsed.astimezone(UTC)
