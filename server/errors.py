"""The one error hierarchy of the service.

Each class declares its gRPC code (as a `google.rpc.Code`, so that the domain
never imports grpc), the HTTP status the gateway gives it, its documented
message and the google.rpc details it carries. Handlers only raise; the
request interceptor turns these into statuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "disposition.v1"

# ValidationFailed's BadRequest is sent in the `grpc-status-details-bin` trailer, so its size is
# bounded by gRPC clients' metadata limit: 8 KB by default (grpc core, as in grpcio; grpc-java).
MAX_VIOLATION_BYTES = 4096  # the encoded field violations, the final "more problems" one included
MAX_FIELD_BYTES = 512  # a field path is cut to this many UTF-8 bytes (never reached by real paths)
MAX_DESCRIPTION_BYTES = 1024  # a message likewise (a catalog's "must be one of" is up to ~600)


class ServiceError(Exception):
    """Base of every error a client may see; unexpected errors become this (500)."""

    code: ClassVar[int] = code_pb2.INTERNAL
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "Internal server error"
    reason: ClassVar[str] = "INTERNAL"

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


class CustomerNotFound(ServiceError):
    """No customer with this id in the caller's tenant and sub-tenant (404)."""

    code = code_pb2.NOT_FOUND
    http_status = 404
    default_message = "Customer not found"
    reason = "CUSTOMER_NOT_FOUND"

    def __init__(self, customer_id: str) -> None:
        super().__init__()
        self.customer_id = customer_id

    def details(self) -> list[any_pb2.Any]:
        resource = error_details_pb2.ResourceInfo(
            resource_type="customer", resource_name=self.customer_id
        )
        return [*super().details(), _pack(resource)]


class RateLimited(ServiceError):
    """The partner used up its requests for the current window (429, with RetryInfo)."""

    code = code_pb2.RESOURCE_EXHAUSTED
    http_status = 429
    default_message = "Rate limit exceeded. Try again in 60 seconds."
    reason = "RATE_LIMIT_EXCEEDED"

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
