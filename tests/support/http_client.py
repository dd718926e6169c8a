"""A plain HTTP client for REST tests (the standard library's), and the envelope assertion."""

from __future__ import annotations

import http.client

GRPC_HEADERS = {"grpc-status", "grpc-message", "grpc-accept-encoding", "grpc-status-details-bin"}


class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = [(name.lower(), value) for name, value in headers]
        self.body = body

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    if isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        all_headers = {"content-type": "application/json", **(headers or {})}
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


def assert_rest_reply(reply: Reply, status: int, body: bytes) -> None:
    """Status and exact body, JSON content type, a request id and no gRPC header."""
    assert (reply.status, reply.body) == (status, body)
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-length") == str(len(body))
    assert reply.header("x-request-id")
    leaked = {name for name, _ in reply.headers if name.startswith("grpc-")}
    assert not leaked & GRPC_HEADERS, f"gRPC headers reached a REST client: {reply.headers}"
    assert not leaked
