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
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from gateway.envoy_config import DEFAULT_DESCRIPTOR
from server import errors

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
    # proto3 JSON: 64-bit integers are printed as strings and read from strings or numbers.
    **{
        t: {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"}
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

    def _add_message(self, prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        for nested in message.nested_type:
            self._add_message(name, nested)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


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
        properties: dict[str, Any] = {}
        for field in message.field:
            schema = self.field_schema(field)
            if field.name in comments:
                schema = {**schema, "description": comments[field.name]}
            properties[field.name] = schema
        return {"type": "object", "properties": properties}

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type == FieldType.TYPE_MESSAGE:
            entry = self.d.messages.get(field.type_name)
            if entry is not None and entry.options.map_entry:
                value = self.field_schema(entry.field[1])
                return {"type": "object", "additionalProperties": value}
            single = self.ref(field.type_name)
        elif field.type == FieldType.TYPE_ENUM:
            names = [value.name for value in self.d.enums[field.type_name].value]
            single = {"type": "string", "enum": names}
        else:
            single = dict(_SCALARS[field.type])
        if field.label == FieldType.LABEL_REPEATED:
            return {"type": "array", "items": single}
        if field.proto3_optional and isinstance(single.get("type"), str):
            # Presence matters: null (or absent) leaves the value as it is.
            single["type"] = [single["type"], "null"]
        return single

    def success(self, method: descriptor_pb2.MethodDescriptorProto) -> dict[str, Any]:
        """The 200 reply: the response message, or a stream of them as Server-Sent Events."""
        reply = self.ref(method.output_type)
        headers = response_headers(200)
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
                "schema": self.field_schema(field),
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
                "IdempotencyKey": _header(
                    "Idempotency-Key",
                    "Retries with the same key and body get the first reply (24 hours)",
                    False,
                ),
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
