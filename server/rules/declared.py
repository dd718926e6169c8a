"""The limits declared on the request messages' fields, checked on a request as it arrives.

The protos declare them once (proto/disposition/v1/field_rules.proto): `google.api.field_behavior
= REQUIRED` for what must be there, `(disposition.v1.rules)` for lengths, item counts, value
ranges, allowed values and patterns. This module turns each message's declarations into checks,
built once per message type; gateway/openapi.py turns the same declarations (and this module's
two implied rules, CONTROL_CHARACTERS and NOT_BLANK) into the OpenAPI document's constraints, so
what the document allows is what these checks accept.

Rules that need more than one field or any data (a call id unique within its batch, an end after
its start, a catalog, a URL's host) stay with the use cases.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from disposition.v1 import field_rules_pb2
from server.errors import ValidationFailed
from server.rules import validation

Violations = validation.Violations

# The regular expressions here and in the protos mean the same in Python (this module) and in
# ECMAScript (JSON Schema validators, generators): `portable` spells out white space (Python's
# `\s` and ECMAScript's differ) and makes `$` the end (Python's `$` also matches before a last
# newline).
WHITE_SPACE = r"\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# Every string of a request refuses these, C0 and C1 (JSON Schema: `not: {pattern: ...}`).
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
# A required string holds at least one character that is not white space (JSON Schema `pattern`).
NOT_BLANK = f"[^{WHITE_SPACE}]"


def portable(regex: str) -> str:
    """`regex` with `\\s`, `\\S` and `$` spelt so that Python and ECMAScript read it alike."""
    out: list[str] = []
    in_class, index = False, 0
    while index < len(regex):
        char = regex[index]
        if char == "\\" and index + 1 < len(regex):
            escaped = regex[index + 1]
            if escaped == "s":
                out.append(WHITE_SPACE if in_class else f"[{WHITE_SPACE}]")
            elif escaped == "S":
                if in_class:
                    raise ValueError(f"{regex!r}: \\S inside a class has no portable spelling")
                out.append(NOT_BLANK)
            else:
                out.append(regex[index : index + 2])
            index += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        elif char == "$" and not in_class:
            char = r"(?!\n)$"
        out.append(char)
        index += 1
    return "".join(out)


_CONTROL = re.compile(CONTROL_CHARACTERS)
_NOT_BLANK = re.compile(NOT_BLANK)

Check = Callable[[Violations, str, Message], None]


# The extensions, as the options' accessors take them (the generated stubs type them loosely).
_RULES: Any = field_rules_pb2.rules
_BEHAVIOR: Any = field_behavior_pb2.field_behavior


def field_rules(field: FieldDescriptor) -> field_rules_pb2.FieldRules | None:
    """The field's `(disposition.v1.rules)`, or None."""
    options = field.GetOptions()
    if not options.HasExtension(_RULES):
        return None
    rules: field_rules_pb2.FieldRules = options.Extensions[_RULES]
    return rules


def is_required(field: FieldDescriptor) -> bool:
    behaviors = field.GetOptions().Extensions[_BEHAVIOR]
    return field_behavior_pb2.FieldBehavior.REQUIRED in behaviors


def is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def check(message: Message, at: str = "", *, nested: bool = True) -> Violations:
    """Every declared limit `message` breaks, as (field path, message) pairs, paths under `at`.

    `nested=False` leaves the items of repeated message fields unchecked (their count is checked),
    for requests whose items the caller checks one by one; so are always those of a field whose
    items are judged alone (`items_judged_alone`)."""
    out: Violations = []
    for field_check in _checks(message.DESCRIPTOR, nested):
        field_check(out, at, message)
    return out


def require(message: Message, at: str = "", *, nested: bool = True) -> None:
    """ValidationFailed with every declared limit `message` breaks."""
    violations = check(message, at, nested=nested)
    if violations:
        raise ValidationFailed(violations)


_CACHE: dict[tuple[str, bool], list[Check]] = {}


def _checks(descriptor: Descriptor | Any, nested: bool) -> list[Check]:
    key = (descriptor.full_name, nested)
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = [_field_check(field, nested) for field in descriptor.fields]
    return found


def _path(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


@dataclass(frozen=True, slots=True)
class _Text:
    """The rules of one string value."""

    required: bool
    max_length: int
    one_of: tuple[str, ...]
    patterns: tuple[tuple[re.Pattern[str], str], ...]

    @classmethod
    def of(cls, rules: field_rules_pb2.FieldRules | None, required: bool) -> _Text:
        if rules is None:
            return cls(required, 0, (), ())
        patterns = tuple((re.compile(portable(p.regex)), p.message) for p in rules.patterns)
        return cls(required, rules.max_length, tuple(rules.one_of), patterns)

    def check(self, out: Violations, field: str, value: str) -> None:
        if self.required and not _NOT_BLANK.search(value):
            out.append((field, f"{field} should not be empty"))
            return
        if not value:
            return
        if self.max_length and len(value) > self.max_length:
            limit = self.max_length
            out.append((field, f"{field} must be shorter than or equal to {limit} characters"))
            return
        if _CONTROL.search(value):
            out.append((field, f"{field} must not contain control characters"))
            return
        if self.one_of and value not in self.one_of:
            validation.one_of(out, field, value, self.one_of)
            return
        for pattern, message in self.patterns:
            if not pattern.search(value):
                out.append((field, f"{field} {message}"))
                return


def _count_check(
    out: Violations, field: str, count: int, rules: field_rules_pb2.FieldRules | None
) -> None:
    if rules is None:
        return
    if rules.min_items and count < rules.min_items:
        if rules.min_items == 1:
            out.append((field, f"{field} should not be empty"))
        else:
            out.append((field, f"{field} must contain at least {rules.min_items} elements"))
    elif rules.max_items and count > rules.max_items:
        out.append((field, f"{field} must contain no more than {rules.max_items} elements"))


def _field_check(field: FieldDescriptor, nested: bool) -> Check:
    name = field.name
    rules = field_rules(field)
    required = is_required(field)
    repeated = field.is_repeated
    sub = field.message_type
    if is_map(field):
        assert sub is not None
        entry = sub
        key_rules = _Text.of(rules.keys if rules and rules.HasField("keys") else None, True)
        value_field = entry.fields_by_name["value"]
        if value_field.type != FieldDescriptor.TYPE_STRING:
            raise TypeError(f"{field.full_name}: only map<string, string> fields are checked")
        value_rules = _Text.of(rules.items if rules and rules.HasField("items") else None, False)

        def check_map(out: Violations, at: str, message: Message) -> None:
            path = _path(at, name)
            entries = getattr(message, name)
            _count_check(out, path, len(entries), rules)
            for key, value in entries.items():
                key_rules.check(out, path, key)
                value_rules.check(out, f"{path}.{key}", value)

        return check_map
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert sub is not None
        if sub.full_name.startswith("google.protobuf."):
            return _presence_check(name, required, repeated)
        if repeated:
            alone = rules is not None and rules.items_judged_alone

            def check_messages(out: Violations, at: str, message: Message) -> None:
                path = _path(at, name)
                items = getattr(message, name)
                _count_check(out, path, len(items), rules)
                if nested and not alone:
                    checks = _checks(sub, True)
                    for index, item in enumerate(items):
                        item_at = f"{path}[{index}]"
                        for item_check in checks:
                            item_check(out, item_at, item)

            return check_messages

        def check_message(out: Violations, at: str, message: Message) -> None:
            path = _path(at, name)
            if not message.HasField(name):
                if required:
                    out.append((path, f"{path} should not be empty"))
                return
            value = getattr(message, name)
            for sub_check in _checks(sub, True):
                sub_check(out, path, value)

        return check_message
    if field.type == FieldDescriptor.TYPE_STRING:
        if repeated:
            item_rules = _Text.of(rules.items if rules and rules.HasField("items") else None, True)

            def check_strings(out: Violations, at: str, message: Message) -> None:
                path = _path(at, name)
                values: Sequence[str] = getattr(message, name)
                _count_check(out, path, len(values), rules)
                for index, value in enumerate(values):
                    item_rules.check(out, f"{path}[{index}]", value)

            return check_strings
        text = _Text.of(rules, required)
        has_presence = field.has_presence

        def check_string(out: Violations, at: str, message: Message) -> None:
            if has_presence and not message.HasField(name):
                if required:
                    path = _path(at, name)
                    out.append((path, f"{path} should not be empty"))
                return
            text.check(out, _path(at, name), getattr(message, name))

        return check_string
    if field.cpp_type in _INTEGERS and not repeated and rules is not None:
        low = rules.minimum if rules.HasField("minimum") else None
        high = rules.maximum if rules.HasField("maximum") else None

        def check_integer(out: Violations, at: str, message: Message) -> None:
            value = getattr(message, name)
            if low is not None and value < low:
                path = _path(at, name)
                out.append((path, f"{path} must not be less than {low}"))
            elif high is not None and value > high:
                path = _path(at, name)
                out.append((path, f"{path} must not be greater than {high}"))

        return check_integer
    if rules is not None or (required and not field.has_presence):
        raise TypeError(f"{field.full_name}: these declarations are not checked on its type")
    return _presence_check(name, required, repeated)


_INTEGERS = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)


def _presence_check(name: str, required: bool, repeated: bool) -> Check:
    def check_nothing(out: Violations, at: str, message: Message) -> None:
        return None

    if not required or repeated:
        return check_nothing

    def check_present(out: Violations, at: str, message: Message) -> None:
        if not message.HasField(name):
            path = _path(at, name)
            out.append((path, f"{path} should not be empty"))

    return check_present
