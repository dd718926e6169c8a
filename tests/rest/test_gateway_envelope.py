"""The REST contract as Envoy delivers it: a real Envoy in front of a real grpc.aio test servicer.

The servicer below is a stand-in for server/: it raises the documented statuses, with the same
google.rpc details, depending on the customer_id it receives. Every response is checked byte for
byte (status, body, headers) with the standard library's HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2

from devstack import EnvoyPorts, run_envoy
from disposition.v1 import (
    call_ingestion_service_pb2,
    call_ingestion_service_pb2_grpc,
    disposition_service_pb2,
    disposition_service_pb2_grpc,
)
from server import errors
from tests.support.http_client import Reply, assert_rest_reply, call

DISPOSITION_PATH = "/api/v1/partner/ingest/disposition-status"
BATCH_PATH = "/api/v1/partner/ingest/batch-call"
MAX_BODY = 5 * 1024 * 1024
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

Code = grpc.StatusCode

pytestmark = pytest.mark.envoy


# --- the test servicer ------------------------------------------------------------------------


def _error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="disposition.v1")


def _violation(field: str, description: str) -> error_details_pb2.BadRequest.FieldViolation:
    return error_details_pb2.BadRequest.FieldViolation(field=field, description=description)


def _retry_info(seconds: int, nanos: int = 0) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )


def _packed(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


# customer_id -> (code, message, details), the way server/ reports these failures.
FAILURES: dict[str, tuple[grpc.StatusCode, str, list[any_pb2.Any]]] = {
    "forbidden": (Code.PERMISSION_DENIED, "Forbidden", [_packed(_error_info("FORBIDDEN"))]),
    "no-tenant": (
        Code.INVALID_ARGUMENT,
        "Tenant ID is required",
        [_packed(_error_info("TENANT_ID_REQUIRED"))],
    ),
    "no-sub-tenant": (
        Code.INVALID_ARGUMENT,
        "Sub-Tenant ID is required",
        [_packed(_error_info("SUB_TENANT_ID_REQUIRED"))],
    ),
    "": (
        Code.INVALID_ARGUMENT,
        "Validation failed",
        [
            _packed(_error_info("VALIDATION_FAILED")),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        _violation("customer_id", "customer_id should not be empty"),
                    ]
                )
            ),
        ],
    ),
    "two-problems": (
        Code.INVALID_ARGUMENT,
        "Validation failed",
        [
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        _violation(
                            "customer_id",
                            "customer_id must be shorter than or equal to 255 characters",
                        ),
                        _violation("disposition_status", "disposition_status must be a string"),
                    ]
                )
            ),
            _packed(_error_info("VALIDATION_FAILED")),
        ],
    ),
    "unknown-customer": (
        Code.NOT_FOUND,
        "Customer not found",
        [_packed(_error_info("CUSTOMER_NOT_FOUND"))],
    ),
    "rate-limited": (
        Code.RESOURCE_EXHAUSTED,
        "Rate limit exceeded. Try again in 60 seconds.",
        [_packed(_error_info("RATE_LIMIT_EXCEEDED")), _packed(_retry_info(36, 200_000_000))],
    ),
    "rate-limited-whole": (
        Code.RESOURCE_EXHAUSTED,
        "Rate limit exceeded. Try again in 60 seconds.",
        [_packed(_error_info("RATE_LIMIT_EXCEEDED")), _packed(_retry_info(60))],
    ),
    "crash": (Code.INTERNAL, "Internal server error", []),
    "draining": (Code.UNAVAILABLE, "Server is shutting down", []),
    "slow": (Code.DEADLINE_EXCEEDED, "Deadline exceeded", []),
    "anonymous": (Code.UNAUTHENTICATED, "Unauthenticated", []),
    "conflict": (Code.ALREADY_EXISTS, "Already exists", []),
    "quoted": (Code.NOT_FOUND, 'Customer "x\\y" <não> found', []),
    # A detail type missing from the descriptor set: the transcoder gives up on the JSON body.
    "undescribable": (
        Code.NOT_FOUND,
        "Customer not found",
        [any_pb2.Any(type_url="type.googleapis.com/example.Unknown", value=b"\x08\x01")],
    ),
}


# One instance of every error class the server raises, as the server would raise it.
VOCABULARY_EXAMPLES: dict[str, errors.ServiceError] = {
    "ServiceError": errors.ServiceError(),
    "Forbidden": errors.Forbidden(),
    "BadRequest": errors.BadRequest(),
    "TenantIdRequired": errors.TenantIdRequired(),
    "SubTenantIdRequired": errors.SubTenantIdRequired(),
    "RepeatedHeader": errors.RepeatedHeader("x-tenant-id"),
    "MalformedRequest": errors.MalformedRequest(),
    "InvalidIdempotencyKey": errors.InvalidIdempotencyKey(),
    "ValidationFailed": errors.ValidationFailed([("customer_id", "customer_id is wrong")]),
    "IdempotencyKeyReused": errors.IdempotencyKeyReused(),
    "CustomerNotFound": errors.CustomerNotFound("c-1"),
    "WebhookEndpointNotFound": errors.WebhookEndpointNotFound("we_1"),
    "WebhookDeliveryNotFound": errors.WebhookDeliveryNotFound("1"),
    "RateLimited": errors.RateLimited(12),
    "ServiceUnavailable": errors.ServiceUnavailable(),
}
_GRPC_CODES = {code.value[0]: code for code in Code}


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, text: str, details: list
) -> None:
    status = status_pb2.Status(code=code.value[0], message=text, details=details)
    await context.abort(
        code, text, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


class Recorder:
    """What the servicers received: (method, invocation metadata, request)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], message.Message]] = []

    def record(
        self, method: str, context: grpc.aio.ServicerContext, request: message.Message
    ) -> None:
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        self.calls.append((method, metadata, request))


class DispositionServicer(disposition_service_pb2_grpc.DispositionServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def UpdateDispositionStatus(self, request, context):
        self.recorder.record("UpdateDispositionStatus", context, request)
        customer_id = request.customer_id
        if customer_id == "headers-first":
            # The error then comes in trailers after response headers (not trailers-only).
            await context.send_initial_metadata((("x-served-by", "test"),))
            customer_id = "unknown-customer"
        if customer_id in FAILURES:
            await _abort(context, *FAILURES[customer_id])
        if customer_id.startswith("vocabulary:"):
            raised = VOCABULARY_EXAMPLES[customer_id.removeprefix("vocabulary:")]
            status = raised.to_status()
            await _abort(context, _GRPC_CODES[status.code], status.message, list(status.details))
        return disposition_service_pb2.UpdateDispositionStatusResponse(
            success=customer_id != "unchanged"
        )


class CallIngestionServicer(call_ingestion_service_pb2_grpc.CallIngestionServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def IngestBatchCalls(self, request, context):
        self.recorder.record("IngestBatchCalls", context, request)
        items = [
            call_ingestion_service_pb2.BatchCallOutcome(
                index=index, call_id=item.call.id, customer_id=item.customer.id, status="created"
            )
            for index, item in enumerate(request.data)
        ]
        result = call_ingestion_service_pb2.IngestBatchCallsResult(
            created_calls=len(items), items=items
        )
        return call_ingestion_service_pb2.IngestBatchCallsResponse(success=True, data=result)


class GrpcBackend:
    """A grpc.aio server on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="grpc-backend", daemon=True
        )
        self.server: grpc.aio.Server | None = None

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    async def _start(self) -> int:
        # Room for a 5 MB JSON body (the documented maximum) once it is protobuf.
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        )
        disposition_service_pb2_grpc.add_DispositionServiceServicer_to_server(
            DispositionServicer(self.recorder), self.server
        )
        call_ingestion_service_pb2_grpc.add_CallIngestionServiceServicer_to_server(
            CallIngestionServicer(self.recorder), self.server
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=None), self.loop).result(
                timeout=10
            )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[GrpcBackend, int]]:
    server = GrpcBackend()
    port = server.start()
    try:
        yield server, port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def envoy(backend: tuple[GrpcBackend, int]) -> Iterator[EnvoyPorts]:
    with run_envoy(grpc_port=backend[1]) as ports:
        yield ports


@pytest.fixture(scope="module")
def recorder(backend: tuple[GrpcBackend, int]) -> Recorder:
    return backend[0].recorder


@pytest.fixture(scope="module")
def envoy_without_upstream() -> Iterator[EnvoyPorts]:
    # A bound but never listening socket: connections to it are refused, and no other process
    # can take the port while the test runs.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        with run_envoy(grpc_port=closed.getsockname()[1]) as ports:
            yield ports


# --- helpers ----------------------------------------------------------------------------------


def update(port: int, customer_id: str, **extra: str) -> Reply:
    return call(port, "PUT", DISPOSITION_PATH, json.dumps({"customer_id": customer_id, **extra}))


def json_body_of_size(size: int) -> bytes:
    head, tail = b'{"customer_id":"customer123","disposition_status":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


# --- the documented responses -----------------------------------------------------------------


def test_success_is_the_transcoded_body(envoy: EnvoyPorts) -> None:
    reply = update(envoy.http_port, "customer123", disposition_status="interested")
    assert_rest_reply(reply, 200, b'{"success":true}')


def test_false_success_is_printed(envoy: EnvoyPorts) -> None:
    assert_rest_reply(update(envoy.http_port, "unchanged"), 200, b'{"success":false}')


@pytest.mark.parametrize(
    ("customer_id", "status", "body"),
    [
        ("forbidden", 403, b'{"success":false,"message":"Forbidden"}'),
        ("no-tenant", 400, b'{"success":false,"message":"Tenant ID is required"}'),
        ("no-sub-tenant", 400, b'{"success":false,"message":"Sub-Tenant ID is required"}'),
        (
            "",
            422,
            b'{"success":false,"message":"Validation failed","errors":'
            b'[{"field":"customer_id","message":"customer_id should not be empty"}]}',
        ),
        (
            "two-problems",
            422,
            b'{"success":false,"message":"Validation failed","errors":['
            b'{"field":"customer_id",'
            b'"message":"customer_id must be shorter than or equal to 255 characters"},'
            b'{"field":"disposition_status","message":"disposition_status must be a string"}]}',
        ),
        ("unknown-customer", 404, b'{"success":false,"message":"Customer not found"}'),
        ("headers-first", 404, b'{"success":false,"message":"Customer not found"}'),
        ("undescribable", 404, b'{"success":false,"message":"Customer not found"}'),
        ("crash", 500, b'{"success":false,"message":"Internal server error"}'),
        ("draining", 503, b'{"success":false,"message":"Server is shutting down"}'),
        ("slow", 504, b'{"success":false,"message":"Deadline exceeded"}'),
        ("anonymous", 401, b'{"success":false,"message":"Unauthenticated"}'),
        ("conflict", 409, b'{"success":false,"message":"Already exists"}'),
    ],
)
def test_grpc_status_becomes_the_documented_envelope(
    envoy: EnvoyPorts, customer_id: str, status: int, body: bytes
) -> None:
    reply = update(envoy.http_port, customer_id)
    assert_rest_reply(reply, status, body)
    # Only a 503 says when to come back (1 s: another replica, or this one restarted).
    assert reply.header("retry-after") == ("1" if status == 503 else None)


def test_every_error_the_server_raises_has_an_example() -> None:
    raised = {cls.__name__ for cls in errors.service_errors() if cls.origin == "server"}
    assert raised == set(VOCABULARY_EXAMPLES)


@pytest.mark.parametrize("name", sorted(VOCABULARY_EXAMPLES))
def test_each_error_class_gets_its_declared_http_status_and_message(
    envoy: EnvoyPorts, name: str
) -> None:
    """The gateway's status for each error class is the one the class declares (the Lua filter's
    table is rendered from the classes: nothing can drift), with the class's message."""
    raised = VOCABULARY_EXAMPLES[name]
    reply = update(envoy.http_port, f"vocabulary:{name}")
    assert reply.status == raised.http_status, reply.body
    body = json.loads(reply.body)
    assert (body["success"], body["message"]) == (False, raised.message)
    if isinstance(raised, errors.ValidationFailed):
        assert body["errors"] == [
            {"field": field, "message": message} for field, message in raised.violations
        ]


@pytest.mark.parametrize(
    ("customer_id", "retry_after"), [("rate-limited", "37"), ("rate-limited-whole", "60")]
)
def test_rate_limit_carries_retry_after(
    envoy: EnvoyPorts, customer_id: str, retry_after: str
) -> None:
    reply = update(envoy.http_port, customer_id)
    assert_rest_reply(
        reply, 429, b'{"success":false,"message":"Rate limit exceeded. Try again in 60 seconds."}'
    )
    assert reply.header("retry-after") == retry_after


def test_messages_are_reemitted_as_valid_json(envoy: EnvoyPorts) -> None:
    reply = update(envoy.http_port, "quoted")
    assert reply.status == 404
    assert json.loads(reply.body) == {"success": False, "message": 'Customer "x\\y" <não> found'}
    assert_rest_reply(reply, 404, reply.body)


def test_batch_call_success(envoy: EnvoyPorts) -> None:
    body = {
        "data": [
            {"call": {"id": "call-1"}, "customer": {"id": "customer123"}, "agent": {"id": "a1"}}
        ]
    }
    reply = call(envoy.http_port, "POST", BATCH_PATH, json.dumps(body))
    assert_rest_reply(
        reply,
        200,
        b'{"success":true,"data":{"created_calls":1,"duplicate_calls":0,"created_customers":0,"items":['
        b'{"index":0,"call_id":"call-1","customer_id":"customer123","status":"created","customer_created":false}]}}',
    )


def test_unknown_fields_are_ignored(envoy: EnvoyPorts, recorder: Recorder) -> None:
    body = (
        '{"customer_id":"customer123","disposition_status":"interested","added_later":{"x":[1,2]}}'
    )
    assert_rest_reply(
        call(envoy.http_port, "PUT", DISPOSITION_PATH, body), 200, b'{"success":true}'
    )
    assert recorder.calls[-1][2] == disposition_service_pb2.UpdateDispositionStatusRequest(
        customer_id="customer123", disposition_status="interested"
    )


# --- request ids ------------------------------------------------------------------------------


def test_client_request_id_is_echoed_and_forwarded(envoy: EnvoyPorts, recorder: Recorder) -> None:
    reply = call(
        envoy.http_port,
        "PUT",
        DISPOSITION_PATH,
        '{"customer_id":"customer123"}',
        {"x-request-id": "partner-req-42"},
    )
    assert_rest_reply(reply, 200, b'{"success":true}')
    assert reply.header("x-request-id") == "partner-req-42"
    assert recorder.calls[-1][1]["x-request-id"] == "partner-req-42"


def test_request_id_is_generated_and_forwarded(envoy: EnvoyPorts, recorder: Recorder) -> None:
    reply = update(envoy.http_port, "forbidden")
    request_id = reply.header("x-request-id")
    assert request_id is not None and UUID.match(request_id)
    assert recorder.calls[-1][1]["x-request-id"] == request_id


# --- Envoy's own failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", ['{"customer_id":', "customer_id=customer123", '{"customer_id":"a" "b"}', "[]"]
)
def test_malformed_json(envoy: EnvoyPorts, body: str) -> None:
    reply = call(envoy.http_port, "PUT", DISPOSITION_PATH, body)
    assert_rest_reply(reply, 400, b'{"success":false,"message":"Invalid JSON body"}')


@pytest.mark.parametrize(
    ("path", "body", "field", "problem"),
    [
        (DISPOSITION_PATH, '{"customer_id":123}', "customer_id", "customer_id must be a string"),
        (DISPOSITION_PATH, '{"customer_id":true}', "customer_id", "customer_id must be a string"),
        (
            DISPOSITION_PATH,
            '{"customer_id":"customer123","disposition_status":5}',
            "disposition_status",
            "disposition_status must be a string",
        ),
        (
            DISPOSITION_PATH,
            '{"customer_id":{"id":1}}',
            "customer_id",
            "customer_id must not be an object",
        ),
        (
            BATCH_PATH,
            '{"data":[{"call":{"id":123}}]}',
            "data[0].call.id",
            "data[0].call.id must be a string",
        ),
        (
            BATCH_PATH,
            '{"data":[{},{"customer":{"disposition_status":false}}]}',
            "data[1].customer.disposition_status",
            "data[1].customer.disposition_status must be a string",
        ),
        (BATCH_PATH, '{"data":[{"call":"c1"}]}', "data[0].call", "data[0].call must be an object"),
        (
            BATCH_PATH,
            '{"data":[{"metadata":[1]}]}',
            "data[0].metadata",
            "data[0].metadata must be an object",
        ),
        # The transcoder would read a single value as a list of it, an inner list's items as
        # the outer list's own, and drop a null; unknown members are not looked into.
        (BATCH_PATH, '{"x":{"data":1},"data":{"call":{}}}', "data", "data must be a list"),
        (BATCH_PATH, '{"data":[[{"call":{}}]]}', "data[0]", "data[0] must not be a list or null"),
        (
            BATCH_PATH,
            '{"x":[[1],null],"data":[{"call":{"id":1}}, null]}',
            "data[1]",
            "data[1] must not be a list or null",
        ),
        (
            BATCH_PATH,
            '{"x\\"[[":[],"data":[{"custom_fields":[{"value":"a[[\\"b"}, [ ]]}]}',
            "data[0].custom_fields[1]",
            "data[0].custom_fields[1] must not be a list or null",
        ),
    ],
)
def test_wrongly_typed_field(
    envoy: EnvoyPorts, path: str, body: str, field: str, problem: str
) -> None:
    reply = call(envoy.http_port, "POST" if path == BATCH_PATH else "PUT", path, body)
    expected = {
        "success": False,
        "message": "Validation failed",
        "errors": [{"field": field, "message": problem}],
    }
    assert_rest_reply(reply, 422, json.dumps(expected, separators=(",", ":")).encode())


def test_a_list_of_lists_is_found_at_the_end_of_a_5_mb_body(envoy: EnvoyPorts) -> None:
    """The body is scanned as its chunks pass (none is held): the list at its end is found."""
    tail = '","data":[{},[{}]]}'
    body = '{"padding":"' + "[[" * ((MAX_BODY - len(tail) - 12) // 2) + tail
    assert len(body) <= MAX_BODY
    reply = call(envoy.http_port, "POST", BATCH_PATH, body)
    expected = b'{"success":false,"message":"Validation failed","errors":[{"field":"data[1]",'
    assert_rest_reply(reply, 422, expected + b'"message":"data[1] must not be a list or null"}]}')


def test_body_of_exactly_5_mb_passes(envoy: EnvoyPorts) -> None:
    body = json_body_of_size(MAX_BODY)
    assert len(body) == 5_242_880
    assert_rest_reply(
        call(envoy.http_port, "PUT", DISPOSITION_PATH, body), 200, b'{"success":true}'
    )


def test_body_over_5_mb_is_rejected(envoy: EnvoyPorts) -> None:
    reply = call(envoy.http_port, "PUT", DISPOSITION_PATH, json_body_of_size(MAX_BODY + 1))
    assert_rest_reply(reply, 413, b'{"success":false,"message":"Payload too large"}')


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("PUT", "/api/v1/partner/ingest/disposition"),
        ("GET", "/api/v1/partner/ingest/batch-call/x"),
    ],
)
def test_unknown_path(envoy: EnvoyPorts, method: str, path: str) -> None:
    assert_rest_reply(
        call(envoy.http_port, method, path), 404, b'{"success":false,"message":"Not found"}'
    )


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", DISPOSITION_PATH, "PUT"),
        ("POST", DISPOSITION_PATH, "PUT"),
        ("DELETE", DISPOSITION_PATH, "PUT"),
        ("GET", BATCH_PATH, "POST"),
        ("PUT", BATCH_PATH, "POST"),
    ],
)
def test_wrong_method(envoy: EnvoyPorts, method: str, path: str, allow: str) -> None:
    reply = call(envoy.http_port, method, path, "{}" if method in ("POST", "PUT") else None)
    assert_rest_reply(reply, 405, b'{"success":false,"message":"Method not allowed"}')
    assert reply.header("allow") == allow


def test_grpc_server_down(envoy_without_upstream: EnvoyPorts) -> None:
    reply = update(envoy_without_upstream.http_port, "customer123")
    assert_rest_reply(reply, 503, b'{"success":false,"message":"Service unavailable"}')


# --- native gRPC and the admin interface ------------------------------------------------------


def test_native_grpc_is_proxied_untouched(envoy: EnvoyPorts) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{envoy.http_port}") as channel:
        stub = disposition_service_pb2_grpc.DispositionServiceStub(channel)
        ok = stub.UpdateDispositionStatus(
            disposition_service_pb2.UpdateDispositionStatusRequest(customer_id="unchanged"),
            timeout=10,
        )
        assert ok == disposition_service_pb2.UpdateDispositionStatusResponse(success=False)
        with pytest.raises(grpc.RpcError) as failure:
            stub.UpdateDispositionStatus(
                disposition_service_pb2.UpdateDispositionStatusRequest(customer_id="rate-limited"),
                timeout=10,
            )
    error = failure.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "Rate limit exceeded. Try again in 60 seconds."
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay == duration_pb2.Duration(seconds=36, nanos=200_000_000)


def test_admin_listens_on_loopback_only(envoy: EnvoyPorts) -> None:
    url = f"http://127.0.0.1:{envoy.admin_port}/config_dump"
    with urllib.request.urlopen(url, timeout=5) as reply:
        dump = json.load(reply)
    [admin] = [config["bootstrap"]["admin"] for config in dump["configs"] if "bootstrap" in config]
    assert admin["address"]["socket_address"]["address"] == "127.0.0.1"
