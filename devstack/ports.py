"""Ports for the dev stack: free ones for tests and the bench, and a check of the fixed ones that
`make run` and `make run-cluster` use, before anything starts.

A fixed port that another program holds would otherwise be found only half-way: a server that
cannot bind exits, and a readiness check that only knocks on the port would be answered by the
other program. `check_free` names the variable to change instead, in one line.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable


class PortTaken(RuntimeError):
    """A port the stack must bind is already in use; the message names its variable."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `host:port` now.

    SO_REUSEADDR as servers set it: connections of a stopped server lingering in TIME_WAIT do
    not count, while any listener on the port (on this address or on every address) does.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_free(ports: Iterable[tuple[str, int]], host: str = "127.0.0.1") -> None:
    """Raise PortTaken for the first of `ports` ((variable, port) pairs) that is in use.

    Port 0 (any free port) is never taken. A variable may number several ports (replicas take
    GRPC_PORT, GRPC_PORT+1, ...): the message then says which one is taken.
    """
    seen: dict[str, int] = {}
    for variable, port in ports:
        base = seen.setdefault(variable, port)
        if port and not is_free(port, host):
            which = variable if port == base else f"{variable}+{port - base}"
            raise PortTaken(f"{which} {port} is in use; set {variable}=<a free port>")
