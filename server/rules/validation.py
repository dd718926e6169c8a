"""Field rules. Each check appends (field, message) violations; nothing raises here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import SplitResult, urlsplit

MAX_TEXT = 255
MAX_URL = 2048
MAX_CHOICES_TEXT = 500

Violations = list[tuple[str, str]]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_AUDIO_SUFFIXES = (".mp3", ".wav", ".aac", ".m4a")


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


def disposition_status(out: Violations, field: str, value: str | None) -> bool:
    """Absent (unchanged), empty (cleared) or a non-blank status. True when valid."""
    if value is None or value == "":
        return True
    if not value.strip():
        out.append((field, f"{field} should not be blank; send an empty string to clear it"))
        return False
    return optional_text(out, field, value)


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


def page_size(out: Violations, field: str, value: int, *, default: int, maximum: int) -> int:
    """A page size from 0 (the default) to `maximum`; how many to list."""
    if value < 0:
        out.append((field, f"{field} must not be less than 0"))
    elif value > maximum:
        out.append((field, f"{field} must not be greater than {maximum}"))
    return value or default


def optional_email(out: Violations, field: str, value: str) -> None:
    if value and (len(value) > 320 or not _EMAIL.match(value)):
        out.append((field, f"{field} must be an email"))


def optional_url(out: Violations, field: str, value: str) -> None:
    if value and _http_url(value) is None:
        out.append((field, f"{field} must be a URL address"))


def _http_url(value: str) -> SplitResult | None:
    """The parts of an http(s) URL with a host, or None."""
    if len(value) > MAX_URL or _CONTROL.search(value) or " " in value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts


def recording_url(out: Violations, field: str, value: str) -> None:
    if not value.strip():
        out.append((field, f"{field} should not be empty"))
    elif (parts := _http_url(value)) is None:
        out.append((field, f"{field} must be a URL address"))
    elif not parts.path.lower().endswith(_AUDIO_SUFFIXES):
        out.append((field, f"{field} must point to an MP3, WAV, AAC or M4A file"))


def utc_timestamp(out: Violations, field: str, value: str) -> datetime | None:
    """An ISO 8601 timestamp in UTC (`Z` or `+00:00`); returns it when valid."""
    if not value.strip():
        out.append((field, f"{field} should not be empty"))
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or ("T" not in value and "t" not in value):
        out.append((field, f"{field} must be a valid ISO 8601 date string"))
        return None
    if parsed.tzinfo is UTC:  # `Z`, or `+00:00`: the common case, nothing to convert
        return parsed
    offset = parsed.utcoffset()
    if offset is None or offset:
        out.append((field, f"{field} must be in UTC (end with Z or +00:00)"))
        return None
    return parsed.replace(tzinfo=UTC)


def e164(out: Violations, field: str, value: str) -> None:
    if not value.strip():
        out.append((field, f"{field} should not be empty"))
    elif not _E164.match(value):
        out.append((field, f"{field} must be a phone number in E.164 format, e.g. +14155550123"))
