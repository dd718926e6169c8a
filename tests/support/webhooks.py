"""A real webhook receiver for the tests, and webhook endpoints created as an operator does."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.admin import admin


@dataclass
class Received:
    """One request as the receiver got it, and the status it answered (0: not answered yet)."""

    headers: dict[str, str]
    body: bytes
    status: int = 0

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: records every whole request and answers it
    `answer(request)`; one its sender cut short (killed) gets neither."""

    answer: Callable[[Received], int] = lambda _request: 200
    received: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/disposition"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                body = self.rfile.read(length)
                if len(body) < length:  # the sender went away mid-request (killed)
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Received({**headers, "x-target": self.path}, body)
                request.status = receiver.answer(request)
                with receiver._changed:
                    receiver.received.append(request)
                    receiver._changed.notify_all()
                self.send_response(request.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def wait(self, done: Callable[[list[Received]], bool], timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self.received):
                left = deadline - time.monotonic()
                assert left > 0, f"receiver got {[r.event for r in self.received]}"
                self._changed.wait(left)
            return list(self.received)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that went away (a killed server) is no error of the receiver's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def create_endpoint(
    database_url: str, url: str, *, tenant_id: str, sub_tenant_id: str, events: Sequence[str] = ()
) -> dict[str, Any]:
    """`disposition-admin webhook create` (private URLs allowed: the receiver is on the
    loopback); the endpoint as it printed it, with its secret."""
    flags = [arg for event in events for arg in ("--event", event)]
    done = admin(
        database_url, "webhook", "create", "--tenant-id", tenant_id,
        "--sub-tenant-id", sub_tenant_id, "--url", url, *flags,
        WEBHOOK_ALLOW_PRIVATE_URLS="true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))
