"""The REST API's OpenAPI 3.1 description, generated from the protos (the descriptor set).

    python -m gateway.openapi [--descriptor build/disposition.pb] [--out build/openapi.json]

`make gen` writes build/openapi.json next to the descriptor set; Envoy serves that file at
GET /api/v1/openapi.json (envoy.yaml). Generated, not written by hand, so it cannot drift from
what the transcoder does: every method with a google.api.http rule is one operation, its path
variables are path parameters, the other fields of a GET's request are query parameters, and
bodies and replies are the request and response messages as the transcoder prints them
(proto field names, 64-bit integers as strings, Timestamps as RFC 3339 strings). A
server-streaming method replies with a Server-Sent Events stream of them (text/event-stream, the
transcoder's stream_sse_style_delimited), its schema that of one event as OpenAPI 3.1 tools read
it (`data`: the reply's JSON). Descriptions are the protos' comments. The error responses are
the documented envelopes, one per HTTP status of the error vocabulary (server/errors.py), the
same classes that gateway/envelope.lua's status and message tables are rendered from.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

from disposition.v1 import field_rules_pb2
from gateway.envoy_config import DEFAULT_DESCRIPTOR
from server import errors
from server.rules import declared

DEFAULT_OUT = DEFAULT_DESCRIPTOR.parent / "openapi.json"
SERVICES = (
    "disposition.v1.DispositionService",
    "disposition.v1.CallIngestionService",
    "disposition.v1.WebhookService",
)
# The methods that honour an `Idempotency-Key` header (their servicers pass it on).
IDEMPOTENT_METHODS = frozenset({"BatchUpdateDispositionStatus", "IngestBatchCalls"})
SPEC_PATH = "/api/v1/openapi.json"
MAX_BODY_BYTES = 5 * 1024 * 1024

FieldType = descriptor_pb2.FieldDescriptorProto
# The extensions, as the options' accessors take them (the generated stubs type them loosely).
_RULES: Any = field_rules_pb2.rules
_BEHAVIOR: Any = field_behavior_pb2.field_behavior
_SCALARS: dict[int, dict[str, Any]] = {
    FieldType.TYPE_STRING: {"type": "string"},
    FieldType.TYPE_BOOL: {"type": "boolean"},
    FieldType.TYPE_DOUBLE: {"type": "number"},
    FieldType.TYPE_FLOAT: {"type": "number"},
    FieldType.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    **{
        t: {"type": "integer", "format": "int32"}
        for t in (FieldType.TYPE_INT32, FieldType.TYPE_SINT32, FieldType.TYPE_SFIXED32)
    },
    **{
        t: {"type": "integer", "format": "uint32", "minimum": 0}
        for t in (FieldType.TYPE_UINT32, FieldType.TYPE_FIXED32)
    },
    # proto3 JSON: 64-bit integers are printed as strings (requests' are parameters).
    **{
        t: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
        for t in (
            FieldType.TYPE_INT64,
            FieldType.TYPE_SINT64,
            FieldType.TYPE_SFIXED64,
            FieldType.TYPE_UINT64,
            FieldType.TYPE_FIXED64,
        )
    },
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}

# Replies of these statuses say how long to wait (whole seconds).
RETRY_AFTER_STATUSES = frozenset({429, 503})
# Replies of these statuses never follow authentication: no rate-limit headers.
UNAUTHENTICATED_STATUSES = frozenset({403, 405})

_RATE_LIMIT_NOTE = (
    " On every reply to a request that passed authentication (IETF httpapi ratelimit "
    "headers, draft 7), for the partner's window of 60 seconds."
)
# components.headers: the response headers, referred to by each response.
RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "RequestId": {
        "description": "The request's id (the `x-request-id` sent, or one made up), as logged",
        "schema": {"type": "string"},
    },
    "RateLimitLimit": {
        "description": "The partner's requests per window." + _RATE_LIMIT_NOTE,
        "schema": {"type": "integer", "minimum": 1},
    },
    "RateLimitRemaining": {
        "description": "The requests left in the current window." + _RATE_LIMIT_NOTE,
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimitReset": {
        "description": "Seconds until the current window ends and the count starts over."
        + _RATE_LIMIT_NOTE,
        "schema": {"type": "integer", "minimum": 1, "maximum": 60},
    },
    "RateLimitPolicy": {
        "description": "The limit and its window, e.g. `120;w=60`." + _RATE_LIMIT_NOTE,
        "schema": {"type": "string", "pattern": "^[0-9]+;w=60$"},
    },
    "RetryAfter": {
        "description": "Whole seconds to wait before sending again",
        "schema": {"type": "integer", "minimum": 0},
    },
    "IdempotentReplayed": {
        "description": "`true` when the reply is the stored reply of an earlier request with the "
        "same Idempotency-Key and body (nothing was applied again); absent otherwise",
        "schema": {"type": "string", "enum": ["true"]},
    },
}


def response_headers(status: int) -> dict[str, Any]:
    """The headers a reply of `status` may carry (references to components.headers)."""
    names = ["RequestId"]
    if status not in UNAUTHENTICATED_STATUSES:
        names += ["RateLimitLimit", "RateLimitRemaining", "RateLimitReset", "RateLimitPolicy"]
    if status in RETRY_AFTER_STATUSES:
        names.append("RetryAfter")
    return {_HEADER_NAMES[name]: {"$ref": f"#/components/headers/{name}"} for name in names}


_HEADER_NAMES = {
    "RequestId": "x-request-id",
    "RateLimitLimit": "RateLimit-Limit",
    "RateLimitRemaining": "RateLimit-Remaining",
    "RateLimitReset": "RateLimit-Reset",
    "RateLimitPolicy": "RateLimit-Policy",
    "RetryAfter": "Retry-After",
    "IdempotentReplayed": "idempotent-replayed",  # usecases/idempotency.REPLAYED_HEADER
}


def error_responses() -> dict[str, dict[str, Any]]:
    """The documented envelopes of every REST reply that is not a success, one per HTTP status,
    derived from the error vocabulary (server/errors.py): each lists the messages of its
    status's errors and what causes each."""
    by_status: dict[int, list[type[errors.ServiceError]]] = {}
    for cls in errors.service_errors():
        by_status.setdefault(cls.http_status, []).append(cls)
    responses: dict[str, dict[str, Any]] = {}
    for status, classes in sorted(by_status.items()):
        causes = "\n".join(
            f"- `{cls.default_message}` ({cls.reason}): {' '.join((cls.__doc__ or '').split())}"
            for cls in classes
        )
        schema = "ValidationError" if status == errors.ValidationFailed.http_status else "Error"
        responses[str(status)] = {
            "description": f"{classes[0].default_message}. The envelope's message is one of:\n"
            + causes,
            "headers": response_headers(status),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    return responses


class _Descriptors:
    """Messages, enums and comments of a FileDescriptorSet, by full name."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[tuple[str, tuple[int, ...]], str] = {}
        self.files = list(files.file)
        for file in self.files:
            prefix = f".{file.package}" if file.package else ""
            for message in file.message_type:
                self._add_message(prefix, message)
            for enum in file.enum_type:
                self.enums[f"{prefix}.{enum.name}"] = enum
            for location in file.source_code_info.location:
                text = location.leading_comments.strip()
                if text:
                    self.comments[(file.name, tuple(location.path))] = " ".join(text.split())

        # The messages a request carries (their schemas state the declared limits).
        self.request_messages: set[str] = set()
        pending = [
            method.input_type
            for file in self.files
            for service in file.service
            for method in service.method
        ]
        while pending:
            name = pending.pop()
            if name in self.request_messages or name not in self.messages:
                continue
            self.request_messages.add(name)
            pending += [f.type_name for f in self.messages[name].field if f.type_name]
        # Those of them whose fields' limits are not refusals: the items of a list whose items
        # are judged alone (reported in the reply), and what they hold.
        self.judged_alone: set[str] = set()
        pending = [
            f.type_name
            for name in self.request_messages
            for f in self.messages[name].field
            if f.type_name and f.options.Extensions[_RULES].items_judged_alone
        ]
        while pending:
            name = pending.pop()
            if name in self.judged_alone or name not in self.messages:
                continue
            self.judged_alone.add(name)
            pending += [f.type_name for f in self.messages[name].field if f.type_name]

    def _add_message(self, prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        for nested in message.nested_type:
            self._add_message(name, nested)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


_INT32 = frozenset({FieldType.TYPE_INT32, FieldType.TYPE_SINT32, FieldType.TYPE_SFIXED32})
_INT64 = frozenset(
    {
        FieldType.TYPE_INT64,
        FieldType.TYPE_SINT64,
        FieldType.TYPE_SFIXED64,
        FieldType.TYPE_UINT64,
        FieldType.TYPE_FIXED64,
    }
)
_INT32_RANGE = (-(2**31), 2**31 - 1)
_INT64_RANGE = (-(2**63), 2**63 - 1)


def _rules(field: descriptor_pb2.FieldDescriptorProto) -> field_rules_pb2.FieldRules | None:
    if not field.options.HasExtension(_RULES):
        return None
    rules: field_rules_pb2.FieldRules = field.options.Extensions[_RULES]
    return rules


def _required(field: descriptor_pb2.FieldDescriptorProto) -> bool:
    return field_behavior_pb2.FieldBehavior.REQUIRED in field.options.Extensions[_BEHAVIOR]


def _min_items(field: descriptor_pb2.FieldDescriptorProto) -> int:
    rules = _rules(field)
    return rules.min_items if rules is not None else 0


def _range(rules: field_rules_pb2.FieldRules | None, bounds: tuple[int, int]) -> dict[str, int]:
    """minimum and maximum: the declared ones, within what the type holds."""
    low, high = bounds
    if rules is not None and rules.HasField("minimum"):
        low = max(low, rules.minimum)
    if rules is not None and rules.HasField("maximum"):
        high = min(high, rules.maximum)
    return {"minimum": low, "maximum": high}


# What the control-character and blank rules allow, as a pattern a generator can follow.
_PRINTED = declared.portable(r"^[^\x00-\x1f\x7f-\x9f]*$")
_PRINTED_REQUIRED = declared.portable(
    r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
)


def _text(rules: field_rules_pb2.FieldRules | None, *, required: bool) -> dict[str, Any]:
    """A request string's limits as declared.py checks them: no control characters anywhere;
    required: not blank; then the declared length, values and patterns, which an empty value
    of an optional field skips."""
    # `not` with the type: a null (where allowed) holds no control character either.
    schema: dict[str, Any] = {"not": {"type": "string", "pattern": declared.CONTROL_CHARACTERS}}
    pattern = _PRINTED_REQUIRED if required else _PRINTED  # no control character, not blank
    if rules is not None:
        if rules.max_length:
            schema["maxLength"] = rules.max_length
        # A format where no pattern states the shape (a pattern is exact; RFC 3339's date-time,
        # say, allows offsets and leap seconds that the server refuses).
        if rules.format and not rules.patterns and required:
            schema["format"] = rules.format
        elif rules.format and not rules.patterns:  # empty is no value: others have the format
            schema["anyOf"] = [{"maxLength": 0}, {"format": rules.format}]
        if rules.one_of:
            schema["enum"] = ([] if required else [""]) + list(rules.one_of)
        if rules.patterns:
            # The last pattern is the field's whole shape: each one narrows those before it and
            # holds a character that is not white space (checked below). One pattern, no allOf:
            # generators cannot join two patterns, and filter instead.
            last = rules.patterns[-1].regex
            if required and re.search(declared.portable(last), " \t"):
                raise ValueError(f"{last!r} lets a blank value through; a required field's cannot")
            pattern = declared.portable(last if required else f"^$|(?:{last})")
    if required:
        schema["minLength"] = 1
    schema["pattern"] = pattern
    return schema


class _Builder:
    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.d = _Descriptors(files)
        self.schemas: dict[str, Any] = {}
        self.field_comments: dict[str, dict[str, str]] = {}
        self.error_responses = error_responses()  # components.responses; each operation refers
        for file in self.d.files:
            prefix = f".{file.package}" if file.package else ""
            for m_index, message in enumerate(file.message_type):
                self._collect_field_comments(file.name, prefix, message, (4, m_index))

    def _collect_field_comments(
        self, file: str, prefix: str, message: descriptor_pb2.DescriptorProto, path: tuple[int, ...]
    ) -> None:
        name = f"{prefix}.{message.name}"
        found = self.field_comments.setdefault(name, {})
        for f_index, field in enumerate(message.field):
            comment = self.d.comments.get((file, (*path, 2, f_index)))
            if comment:
                found[field.name] = comment
        for n_index, nested in enumerate(message.nested_type):
            self._collect_field_comments(file, name, nested, (*path, 3, n_index))

    def ref(self, type_name: str) -> dict[str, Any]:
        """A $ref to the message's schema (built on first use)."""
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        key = type_name.rsplit(".", 1)[-1]
        if key not in self.schemas:
            self.schemas[key] = {}  # placeholder: recursive messages end here
            self.schemas[key] = self.message_schema(type_name)
        return {"$ref": f"#/components/schemas/{key}"}

    def message_schema(self, type_name: str) -> dict[str, Any]:
        message = self.d.messages[type_name]
        comments = self.field_comments.get(type_name, {})
        request = type_name in self.d.request_messages
        limits = request and type_name not in self.d.judged_alone
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.field:
            schema = self.field_schema(field, request=limits)
            if field.name in comments:
                schema = {**schema, "description": comments[field.name]}
            if limits and (_required(field) or _min_items(field)):
                required.append(field.name)
            elif request and isinstance(schema.get("type"), str):
                # proto3 JSON reads null as the field's default: so does the server.
                schema = {**schema, "type": [schema["type"], "null"]}
            properties[field.name] = schema
        message_schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            message_schema["required"] = required
        if request:
            # Unknown members are ignored, but one named "" is refused: protobuf's JSON reader
            # takes it for the object itself (400 Invalid JSON body, or 422 naming the object).
            message_schema["propertyNames"] = {"minLength": 1}
        return message_schema

    def field_schema(
        self, field: descriptor_pb2.FieldDescriptorProto, *, request: bool = False
    ) -> dict[str, Any]:
        """The field's schema; with `request`, its declared limits too (the checks of
        server/rules/declared.py, stated as JSON Schema)."""
        rules = _rules(field) if request else None
        if field.type == FieldType.TYPE_MESSAGE:
            entry = self.d.messages.get(field.type_name)
            if entry is not None and entry.options.map_entry:
                value = self.field_schema(entry.field[1])
                if request:
                    keys = rules.keys if rules is not None and rules.HasField("keys") else None
                    values = rules.items if rules is not None and rules.HasField("items") else None
                    return {
                        "type": "object",
                        "propertyNames": _text(keys, required=True),
                        "additionalProperties": {**value, **_text(values, required=False)},
                    }
                return {"type": "object", "additionalProperties": value}
            single = self.ref(field.type_name)
        elif field.type == FieldType.TYPE_ENUM:
            names = [value.name for value in self.d.enums[field.type_name].value]
            single = {"type": "string", "enum": names}
        elif request and field.type in _INT64:
            # A parameter's digits, read as an int64 (no request body has an int64 field).
            single = {"type": "integer", "format": "int64", **_range(rules, _INT64_RANGE)}
        elif request and field.type in _INT32:
            single = {**_SCALARS[field.type], **_range(rules, _INT32_RANGE)}
        elif request and field.type == FieldType.TYPE_STRING:
            repeated = field.label == FieldType.LABEL_REPEATED
            items = rules.items if repeated and rules is not None else rules
            single = {"type": "string", **_text(items, required=repeated or _required(field))}
        else:
            single = dict(_SCALARS[field.type])
        if field.label == FieldType.LABEL_REPEATED:
            array: dict[str, Any] = {"type": "array", "items": single}
            if rules is not None and rules.min_items:
                array["minItems"] = rules.min_items
            if rules is not None and rules.max_items:
                array["maxItems"] = rules.max_items
            return array
        if field.proto3_optional and isinstance(single.get("type"), str):
            # Presence matters: null (or absent) leaves the value as it is.
            single["type"] = [single["type"], "null"]
        return single

    def success(self, method: descriptor_pb2.MethodDescriptorProto) -> dict[str, Any]:
        """The 200 reply: the response message, or a stream of them as Server-Sent Events."""
        reply = self.ref(method.output_type)
        headers = response_headers(200)
        if method.name in IDEMPOTENT_METHODS:
            headers[_HEADER_NAMES["IdempotentReplayed"]] = {
                "$ref": "#/components/headers/IdempotentReplayed"
            }
        if not method.server_streaming:
            return {
                "description": "Success",
                "headers": headers,
                "content": {"application/json": {"schema": reply}},
            }
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "One reply, as JSON",
                    "contentMediaType": "application/json",
                    "contentSchema": reply,
                }
            },
        }
        return {
            "description": "A stream of Server-Sent Events that does not end: one event per "
            "reply, a `data:` line holding the reply's JSON",
            "headers": headers,
            "content": {"text/event-stream": {"schema": event}},
        }

    def operation(
        self, service: str, method: descriptor_pb2.MethodDescriptorProto, rule: http_pb2.HttpRule,
        verb: str, path: str, comment: str,
    ) -> dict[str, Any]:  # fmt: skip
        request = self.d.messages[method.input_type]
        path_fields = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        parameters: list[dict[str, Any]] = [
            {"$ref": "#/components/parameters/TenantId"},
            {"$ref": "#/components/parameters/SubTenantId"},
            {"$ref": "#/components/parameters/RequestId"},
        ]
        comments = self.field_comments.get(method.input_type, {})
        for field in request.field:
            if field.name in path_fields:
                location = "path"
            elif rule.body == "*":
                continue
            else:
                location = "query"
            parameter: dict[str, Any] = {
                "name": field.name,
                "in": location,
                "required": location == "path",
                "schema": self.field_schema(field, request=True),
            }
            if field.name in comments:
                parameter["description"] = comments[field.name]
            parameters.append(parameter)
        if method.name in IDEMPOTENT_METHODS:
            parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
        operation: dict[str, Any] = {
            "operationId": method.name,
            "summary": comment.split(". ")[0].rstrip(".") if comment else method.name,
            "description": comment or method.name,
            "tags": [service.rsplit(".", 1)[-1]],
            "parameters": parameters,
            "responses": {
                "200": self.success(method),
                **{
                    status: {"$ref": f"#/components/responses/{status}"}
                    for status in self.error_responses
                    # A 405 answers a method the path does not have, never this operation.
                    if status != str(errors.MethodNotAllowed.http_status)
                },
            },
        }
        if rule.body == "*":
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.ref(method.input_type)}},
            }
        return operation


def build(files: descriptor_pb2.FileDescriptorSet) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP-bound method of SERVICES."""
    builder = _Builder(files)
    paths: dict[str, dict[str, Any]] = {}
    for file in builder.d.files:
        for s_index, service in enumerate(file.service):
            full = f"{file.package}.{service.name}"
            if full not in SERVICES:
                continue
            for m_index, method in enumerate(service.method):
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb is None or verb == "custom":
                    continue
                path = getattr(rule, verb)
                comment = builder.d.comments.get((file.name, (6, s_index, 2, m_index)), "")
                paths.setdefault(path, {})[verb] = builder.operation(
                    full, method, rule, verb, path, comment
                )
    envelope_properties: dict[str, Any] = {
        "success": {"const": False},
        "message": {"type": "string", "description": "What went wrong, for people"},
    }
    envelope = {"type": "object", "required": ["success", "message"],
                "properties": envelope_properties}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Disposition service",
            "version": "v1",
            "description": "Record and read the outcome of every customer interaction. "
            f"Request bodies are JSON, at most {MAX_BODY_BYTES:,} bytes (5 MB). Every reply "
            "carries `x-request-id` (the client's own when it sends one).",
        },
        "servers": [{"url": "/"}],
        "security": [{"ApiKey": [], "ApiSecret": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "ApiSecret": {"type": "apiKey", "in": "header", "name": "x-api-secret"},
            },
            "parameters": {
                "TenantId": _header("x-tenant-id", "The tenant the request acts for", True),
                "SubTenantId": _header(
                    "x-sub-tenant-id", "The sub-tenant the request acts for", True
                ),
                "RequestId": _header(
                    "x-request-id", "Your id for this request, echoed and logged", False
                ),
                "IdempotencyKey": {
                    **_header(
                        "Idempotency-Key",
                        "Retries with the same key and body get the first reply (24 hours)",
                        False,
                    ),
                    # usecases/idempotency.parse_key (HTTP trims the ends of a header's value).
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 255,  # idempotency.MAX_KEY_LENGTH
                        "pattern": "^[!-~]([ -~]*[!-~])?$",
                    },
                },
            },
            "schemas": {
                **dict(sorted(builder.schemas.items())),
                "Error": envelope,
                "ValidationError": {
                    **envelope,
                    "required": ["success", "message", "errors"],
                    "properties": {
                        **envelope_properties,
                        "message": {"const": "Validation failed"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "message"],
                                "properties": {
                                    "field": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
            "responses": builder.error_responses,
            "headers": RESPONSE_HEADERS,
        },
    }


def _header(name: str, description: str, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


def load(descriptor: Path) -> dict[str, Any]:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    return build(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--descriptor", type=Path, default=DEFAULT_DESCRIPTOR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    document = load(args.descriptor)
    args.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
