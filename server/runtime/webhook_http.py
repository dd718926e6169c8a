"""The webhook deliveries' HTTP client: POST a body, read the status, keep the connection.

Small on purpose: HTTP/1.1 POST with Content-Length, no redirects (a 3xx is a failed attempt,
as Standard Webhooks advises), a deadline for the whole attempt, and connections kept per
origin for the next delivery. Every new connection resolves the host again and checks each
address (rules/webhooks.py: no loopback, private, link-local or metadata address unless
private URLs are allowed), then connects to a checked address: a host that resolved to a
public address at creation and to an internal one later (DNS rebinding) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

from server.rules import webhooks as rules

USER_AGENT = "disposition-webhooks/1"
MAX_HEADER_BYTES = 64 * 1024
IDLE_PER_ORIGIN = 32


class DeliveryError(Exception):
    """The attempt failed before an HTTP status was read; the message says why (no secrets)."""


class RefusedAddress(DeliveryError):
    """The URL's host resolves to an address deliveries may not reach."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The host's addresses; RefusedAddress if any is internal (unless allowed)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        refused = [address for address in addresses if rules.refused_address(address)]
        if refused:
            raise RefusedAddress(f"{host} resolves to a private or internal address")
    if not addresses:
        raise DeliveryError(f"cannot resolve {host}")
    return addresses


class WebhookClient:
    """POSTs to webhook URLs; one instance per process, shared by every endpoint."""

    def __init__(self, *, timeout_seconds: float, allow_private: bool) -> None:
        self.timeout_seconds = timeout_seconds
        self.allow_private = allow_private
        self._idle: defaultdict[Origin, list[_Connection]] = defaultdict(list)
        self._tls = ssl.create_default_context()

    async def close(self) -> None:
        for connections in self._idle.values():
            for _, writer in connections:
                writer.close()
        self._idle.clear()

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> int:
        """The reply's status code; DeliveryError (or TimeoutError) when there is none."""
        parts = urlsplit(url)
        if parts.hostname is None:
            raise DeliveryError("the URL has no host")
        default_port = 443 if parts.scheme == "https" else 80
        origin = Origin(parts.scheme, parts.hostname, parts.port or default_port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        head = [f"POST {target} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {USER_AGENT}",
                f"Content-Length: {len(body)}", "Connection: keep-alive"]  # fmt: skip
        head += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        async with asyncio.timeout(self.timeout_seconds):
            reused = self._idle[origin].pop() if self._idle[origin] else None
            if reused is not None:
                try:
                    return await self._exchange(origin, reused, request)
                except (DeliveryError, OSError, asyncio.IncompleteReadError):
                    pass  # the server closed the kept connection: once more on a new one
            connection = await self._connect(origin)
            try:
                return await self._exchange(origin, connection, request)
            except asyncio.IncompleteReadError:
                raise DeliveryError("the connection closed before a full reply") from None
            except (ConnectionError, ssl.SSLError) as exc:
                raise DeliveryError(f"connection failed: {type(exc).__name__}") from None

    async def _connect(self, origin: Origin) -> _Connection:
        addresses = await resolve(origin.host, origin.port, allow_private=self.allow_private)
        last: OSError | None = None
        for address in addresses:
            try:
                return await asyncio.open_connection(
                    address, origin.port,
                    ssl=self._tls if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )  # fmt: skip
            except OSError as exc:
                last = exc
        raise DeliveryError(f"cannot connect to {origin.host}:{origin.port} ({last})")

    async def _exchange(self, origin: Origin, connection: _Connection, request: bytes) -> int:
        reader, writer = connection
        writer.write(request)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            writer.close()
            raise DeliveryError("the reply is not HTTP/1.x")
        status = int(parts[1])
        length, chunked, close = None, False, parts[0] == b"HTTP/1.0"
        read = 0
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            read += len(line)
            if read > MAX_HEADER_BYTES:
                writer.close()
                raise DeliveryError("the reply's headers are too large")
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection":
                close = close or value == b"close"
        if chunked:
            await _skip_chunked(reader)
        elif length is not None:
            await _skip(reader, length)
        else:  # until the server closes: nothing to keep
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            close = True
        if close:
            writer.close()
        elif len(self._idle[origin]) < IDLE_PER_ORIGIN:
            self._idle[origin].append(connection)
        else:
            writer.close()
        return status


async def _skip(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        chunk = await reader.read(min(length, 65536))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(chunk)


async def _skip_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise DeliveryError("the reply's chunked body is malformed") from None
        if size == 0:
            await reader.readuntil(b"\r\n")  # (trailers are not expected)
            return
        await _skip(reader, size + 2)
