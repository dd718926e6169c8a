"""A fast webhook receiver for the webhooks suite: one asyncio process, raw HTTP/1.1 keep-alive.

    python -m tests.bench.webhook_receiver      # prints "listening <port>", serves until SIGTERM

Every POST is answered `200` with an empty body at once, except under `/sleep/<seconds>/…`,
answered after that many seconds (a receiver that hangs). Each arrival is recorded with the
wall-clock time (time.time(): the same clock as the bench's and the server's on one machine)
when its bytes were read, by path; the body is kept as read and only parsed when asked for:
  GET /_counts                  {path: arrivals}
  GET /_events?path=P           [[arrival, data.request_id, data.changed_at], …] of path P
  GET /_span?path=P             [arrivals, first arrival, last arrival] of path P
An asyncio.Protocol instead of http.server (a thread per connection): it serves about 10,000
requests/s on one core here, so the receiver is not what limits a delivery figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devstack.processes import die_with_parent, stop_process

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Arrivals:
    """What arrived, by path: (wall-clock time, body) pairs."""

    def __init__(self) -> None:
        self.by_path: defaultdict[bytes, list[tuple[float, bytes]]] = defaultdict(list)

    def answer(self, method: bytes, target: bytes) -> bytes:
        """The reply to a control request (GET)."""
        parts = urlsplit(target.decode())
        path = parse_qs(parts.query).get("path", [""])[0].encode()
        found: Any
        if parts.path == "/_counts":
            found = {key.decode(): len(value) for key, value in self.by_path.items()}
        elif parts.path == "/_span":
            got = self.by_path.get(path, [])
            found = [len(got), got[0][0] if got else None, got[-1][0] if got else None]
        elif parts.path == "/_events":
            found = []
            for at, body in self.by_path.get(path, []):
                data = json.loads(body)["data"]
                found.append([at, data.get("request_id"), data.get("changed_at")])
        else:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        body = json.dumps(found).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


class Receiving(asyncio.Protocol):
    """One connection: requests parsed straight from the bytes, answered in order."""

    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, target = head.split(b" ", 2)[:2]
            self.handle(method, target, body, now)

    def handle(self, method: bytes, target: bytes, body: bytes, now: float) -> None:
        assert self.transport is not None
        if method == b"GET":
            self.transport.write(self.arrivals.answer(method, target))
            return
        path = target.split(b"?", 1)[0]
        self.arrivals.by_path[path].append((now, body))
        if path.startswith(b"/sleep/"):
            delay = float(path.split(b"/")[2])
            transport = self.transport
            asyncio.get_running_loop().call_later(
                delay, lambda: transport.is_closing() or transport.write(OK)
            )
        else:
            self.transport.write(OK)


async def serve() -> None:
    arrivals = Arrivals()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Receiving(arrivals), "127.0.0.1", 0, backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    server.close()


class ReceiverProcess:
    """The receiver in a child process, and the bench's side of its control requests."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, query: str) -> Any:
        with urllib.request.urlopen(self.url(query), timeout=30) as reply:
            return json.loads(reply.read())

    def count(self, path: str) -> int:
        return int(self._get("/_counts").get(path, 0))

    def span(self, path: str) -> tuple[int, float | None, float | None]:
        count, first, last = self._get(f"/_span?path={path}")
        return int(count), first, last

    def events(self, path: str) -> list[tuple[float, str, datetime]]:
        """(arrival, request id, changed_at) of each event that arrived on `path`."""
        return [
            (at, request_id, datetime.fromisoformat(changed_at))
            for at, request_id, changed_at in self._get(f"/_events?path={path}")
        ]

    def wait_for(self, path: str, count: int, timeout: float) -> int:
        """Poll until `count` events arrived on `path` (or `timeout`); how many did."""
        deadline = time.monotonic() + timeout
        while (found := self.count(path)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return found


@contextmanager
def receiver_process(log_path: Path) -> Iterator[ReceiverProcess]:
    """The receiver on a free loopback port, stopped afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.webhook_receiver"],
            stdout=subprocess.PIPE, stderr=log, preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            if not line.startswith("listening "):
                raise RuntimeError(f"the webhook receiver did not start: {line!r}")
            yield ReceiverProcess(process, int(line.split()[1]))
        finally:
            stop_process(process, grace=5)


if __name__ == "__main__":
    asyncio.run(serve())
