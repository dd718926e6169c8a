"""The service's one error vocabulary: every error a client can see, declared once.

Each class declares its gRPC code (as a `google.rpc.Code`, so that the domain never imports
grpc), the HTTP status REST clients get, its documented message, the `reason` of the ErrorInfo
it carries, and its other google.rpc details. Handlers only raise; the request interceptor turns
these into statuses. A few classes are answered by Envoy itself (`origin = "gateway"`: an
unknown path, a body over 5 MB, ...): no server raises them, but they are part of what clients
get, in the same envelope.

The lookup tables are derived from the classes, never written again (the model is
python-api-core's exceptions.py): `service_errors()` lists the classes, from which `make gen`
renders the gateway's Lua tables (each reason's HTTP status, each status's envelope message;
gateway/vocabulary.py) and the OpenAPI document's error responses (gateway/openapi.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "disposition.v1"

# ValidationFailed's BadRequest is sent in the `grpc-status-details-bin` trailer, so its size is
# bounded by gRPC clients' metadata limit: 8 KB by default (grpc core, as in grpcio; grpc-java).
MAX_VIOLATION_BYTES = 4096  # the encoded field violations, the final "more problems" one included
MAX_FIELD_BYTES = 512  # a field path is cut to this many UTF-8 bytes (never reached by real paths)
MAX_DESCRIPTION_BYTES = 1024  # a message likewise (a catalog's "must be one of" is up to ~600)

Origin = Literal["server", "gateway"]  # who answers an error: the server, or Envoy itself


class ServiceError(Exception):
    """Base of every error a client may see; unexpected errors become this (500)."""

    code: ClassVar[int] = code_pb2.INTERNAL
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "Internal server error"
    reason: ClassVar[str] = "INTERNAL"
    # Who answers it: the server (raised here), or Envoy (never raised; described only).
    origin: ClassVar[Origin] = "server"
    # google.rpc detail types beside the ErrorInfo every error carries (for the description).
    detail_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def details(self) -> list[any_pb2.Any]:
        """google.rpc detail messages; every error carries an ErrorInfo."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        return [_pack(info)]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code, message=self.message, details=self.details())


class Forbidden(ServiceError):
    """Credentials missing or wrong, partner disabled, or tenant not granted (403)."""

    code = code_pb2.PERMISSION_DENIED
    http_status = 403
    default_message = "Forbidden"
    reason = "FORBIDDEN"


class BadRequest(ServiceError):
    """A required request header is missing (400)."""

    code = code_pb2.INVALID_ARGUMENT
    http_status = 400
    default_message = "Bad request"
    reason = "BAD_REQUEST"


class TenantIdRequired(BadRequest):
    """`x-tenant-id` is missing or blank (400)."""

    default_message = "Tenant ID is required"
    reason = "TENANT_ID_REQUIRED"


class SubTenantIdRequired(BadRequest):
    """`x-sub-tenant-id` is missing or blank (400)."""

    default_message = "Sub-Tenant ID is required"
    reason = "SUB_TENANT_ID_REQUIRED"


class RepeatedHeader(BadRequest):
    """A tenant header sent twice with different values (400): which one was meant?"""

    reason = "REPEATED_HEADER"

    def __init__(self, header: str) -> None:
        super().__init__(f"{header} must be sent once")


class MalformedRequest(BadRequest):
    """The request bytes are not a valid message, e.g. a string that is not UTF-8 (400)."""

    default_message = "Invalid request body"
    reason = "MALFORMED_REQUEST"


class InvalidJsonBody(BadRequest):
    """The body is not JSON, or not shaped like the request (400, from Envoy's transcoder;
    a value of the wrong type for its field is a 422 that names the field)."""

    default_message = "Invalid JSON body"
    reason = "INVALID_JSON_BODY"
    origin = "gateway"


class InvalidIdempotencyKey(BadRequest):
    """`Idempotency-Key` is empty, too long or not printable ASCII (400)."""

    default_message = "Idempotency-Key must be 1 to 255 printable ASCII characters"
    reason = "INVALID_IDEMPOTENCY_KEY"


class ValidationFailed(ServiceError):
    """The body breaks one or more field rules (422, with a BadRequest detail).

    `violations` keeps every problem. The BadRequest lists them in order for as long as their
    encoded size fits in MAX_VIOLATION_BYTES (4 KB: about 35 problems of a batch item, never
    fewer than 2), each field path cut to MAX_FIELD_BYTES and each message to
    MAX_DESCRIPTION_BYTES. When problems are left out, a last violation with the empty field (the
    request as a whole) says how many: "967 more problems not listed; fix the listed ones and
    retry to see the rest". So the whole error trailer stays under 6.5 KB, even base64-encoded,
    below the 8 KB metadata limit of gRPC clients, and every REST and gRPC client receives it.
    """

    code = code_pb2.INVALID_ARGUMENT
    http_status = 422
    default_message = "Validation failed"
    reason = "VALIDATION_FAILED"
    detail_types = ("google.rpc.BadRequest",)

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(field_violations=self.listed_violations())
        return [*super().details(), _pack(bad_request)]

    def listed_violations(self) -> list[error_details_pb2.BadRequest.FieldViolation]:
        """The violations the BadRequest carries: the first ones that fit, then a count of the
        others (see the class docstring)."""
        listed: list[error_details_pb2.BadRequest.FieldViolation] = []
        used = 0
        for field, message in self.violations:
            violation = _violation(
                _clip(field, MAX_FIELD_BYTES), _clip(message, MAX_DESCRIPTION_BYTES)
            )
            size = _violation_size(violation)
            if used + size > MAX_VIOLATION_BYTES:
                break
            listed.append(violation)
            used += size
        else:
            return listed
        # Some are left out: make room for their count (sized for the largest it could be).
        total = len(self.violations)
        room = MAX_VIOLATION_BYTES - _violation_size(_more_problems(total))
        while used > room:
            used -= _violation_size(listed.pop())
        return [*listed, _more_problems(total - len(listed))]


class IdempotencyKeyReused(ValidationFailed):
    """The partner sent this `Idempotency-Key` before with another body or endpoint (422)."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self) -> None:
        super().__init__(
            [("Idempotency-Key", "Idempotency-Key was already used with a different request")]
        )


class NotFound(ServiceError):
    """No such path (404, from Envoy's routes)."""

    code = code_pb2.NOT_FOUND
    http_status = 404
    default_message = "Not found"
    reason = "NOT_FOUND"
    origin: ClassVar[Origin] = "gateway"  # its subclasses below are raised by the server


class _ResourceNotFound(NotFound):
    """A resource the server looked for is missing (404, with a ResourceInfo naming it); not an
    error of its own, only what the classes below share."""

    origin = "server"
    detail_types = ("google.rpc.ResourceInfo",)
    resource_type: ClassVar[str]

    def __init__(self, resource_name: str) -> None:
        super().__init__()
        self.resource_name = resource_name

    def details(self) -> list[any_pb2.Any]:
        resource = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type, resource_name=self.resource_name
        )
        return [*super().details(), _pack(resource)]


class CustomerNotFound(_ResourceNotFound):
    """No customer with this id in the caller's tenant and sub-tenant (404)."""

    default_message = "Customer not found"
    reason = "CUSTOMER_NOT_FOUND"
    resource_type = "customer"


class WebhookEndpointNotFound(_ResourceNotFound):
    """No webhook endpoint with this id of the calling partner in the caller's tenant and
    sub-tenant (404)."""

    default_message = "Webhook endpoint not found"
    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"
    resource_type = "webhook_endpoint"


class WebhookDeliveryNotFound(_ResourceNotFound):
    """No delivery with this id of the webhook endpoint (404)."""

    default_message = "Webhook delivery not found"
    reason = "WEBHOOK_DELIVERY_NOT_FOUND"
    resource_type = "webhook_delivery"


class RateLimited(ServiceError):
    """The partner used up its requests for the current window (429, with RetryInfo)."""

    code = code_pb2.RESOURCE_EXHAUSTED
    http_status = 429
    default_message = "Rate limit exceeded. Try again in 60 seconds."
    reason = "RATE_LIMIT_EXCEEDED"
    detail_types = ("google.rpc.RetryInfo",)

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__()
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=self.retry_after_seconds)
        )
        return [*super().details(), _pack(retry)]


class ServiceUnavailable(ServiceError):
    """The server is shutting down or cannot serve now; retry, elsewhere if possible (503)."""

    code = code_pb2.UNAVAILABLE
    http_status = 503
    default_message = "Service unavailable"
    reason = "UNAVAILABLE"


class MethodNotAllowed(ServiceError):
    """The path exists but not with this method (405, from Envoy's routes, with `Allow`)."""

    code = code_pb2.UNIMPLEMENTED
    http_status = 405
    default_message = "Method not allowed"
    reason = "METHOD_NOT_ALLOWED"
    origin = "gateway"


class RequestTimeout(ServiceError):
    """The request did not arrive in time: headers within 10 s, the whole of it within 60 s
    (408, from Envoy)."""

    code = code_pb2.DEADLINE_EXCEEDED
    http_status = 408
    default_message = "Request timeout"
    reason = "REQUEST_TIMEOUT"
    origin = "gateway"


class PayloadTooLarge(ServiceError):
    """The body is over 5 MB (413, from Envoy)."""

    code = code_pb2.RESOURCE_EXHAUSTED
    http_status = 413
    default_message = "Payload too large"
    reason = "PAYLOAD_TOO_LARGE"
    origin = "gateway"


class HeadersTooLarge(ServiceError):
    """The request headers are over 60 KB (431, from Envoy)."""

    code = code_pb2.RESOURCE_EXHAUSTED
    http_status = 431
    default_message = "Request header fields too large"
    reason = "HEADERS_TOO_LARGE"
    origin = "gateway"


class NotImplementedByServer(ServiceError):
    """The server does not have this method yet, e.g. during a rolling deploy (501)."""

    code = code_pb2.UNIMPLEMENTED
    http_status = 501
    default_message = "Not implemented"
    reason = "NOT_IMPLEMENTED"
    origin = "gateway"


class BadGateway(ServiceError):
    """The server's reply could not be read (502, from Envoy); retry."""

    code = code_pb2.UNAVAILABLE
    http_status = 502
    default_message = "Service unavailable"
    reason = "BAD_GATEWAY"
    origin = "gateway"


class GatewayTimeout(ServiceError):
    """No reply within the route's timeout (504, from Envoy): the request may or may not have
    been applied; retry with the same Idempotency-Key or call ids."""

    code = code_pb2.DEADLINE_EXCEEDED
    http_status = 504
    default_message = "Gateway timeout"
    reason = "GATEWAY_TIMEOUT"
    origin = "gateway"


def service_errors() -> Iterator[type[ServiceError]]:
    """ServiceError and every subclass: each parent before its children, in declaration order.
    A private class (`_ResourceNotFound`) is what its children share, not an error of its own:
    only its children are listed."""
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop(0)
        if not cls.__name__.startswith("_"):
            yield cls
        pending[0:0] = cls.__subclasses__()


def http_status_by_reason() -> dict[str, int]:
    """ErrorInfo reason -> HTTP status, for every error the server raises."""
    return {cls.reason: cls.http_status for cls in service_errors() if cls.origin == "server"}


def message_by_http_status() -> dict[int, str]:
    """Each HTTP status's envelope message for a reply that carries none of its own: the
    message of the most general class with that status (BadRequest's for 400, NotFound's for
    404, ServiceError's for 500)."""
    found: dict[int, str] = {}
    for cls in service_errors():
        found.setdefault(cls.http_status, cls.default_message)
    return dict(sorted(found.items()))


def _violation(field: str, description: str) -> error_details_pb2.BadRequest.FieldViolation:
    return error_details_pb2.BadRequest.FieldViolation(field=field, description=description)


def _more_problems(count: int) -> error_details_pb2.BadRequest.FieldViolation:
    problems = "problem" if count == 1 else "problems"
    return _violation(
        "", f"{count} more {problems} not listed; fix the listed ones and retry to see the rest"
    )


def _violation_size(violation: error_details_pb2.BadRequest.FieldViolation) -> int:
    """Bytes the violation adds to an encoded BadRequest (its tag and length included)."""
    return int(error_details_pb2.BadRequest(field_violations=[violation]).ByteSize())


def _clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, ending with "…" when cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - len("…".encode())].decode(errors="ignore") + "…"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
