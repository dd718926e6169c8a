"""`disposition-server` (or another gRPC server command) as a child process of the dev stack.

Ready means: this process, since this start, logged its JSON `"serving"` line, which names the
port it bound. Nothing is asked over the network, so another server that happens to hold the
port can never answer for it; a server that cannot bind exits, and `start` says so with the
end of its log.

Its log (JSON lines on stderr) goes to `log_path`, appended across restarts, or, without one, to
the launcher's own stderr (`make run`), passed through line by line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from devstack.processes import die_with_parent, stop_process

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER: tuple[str, ...] = (str(BIN / "disposition-server"),)
WEBHOOKS: tuple[str, ...] = (str(BIN / "disposition-webhooks"),)  # the webhook worker


class ServerStartError(RuntimeError):
    """The server exited, or did not log "serving", in time; the message ends with its log."""


def serving_port(line: bytes) -> int | None:
    """The port of a `"serving"` log line; None for any other line."""
    if b'"serving"' not in line:
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("message") != "serving":
        return None
    return int(entry["port"])


class ServerProcess:
    """A gRPC server child on GRPC_PORT (0 by default: a free port, read from its log)."""

    def __init__(
        self,
        database_url: str | None,
        log_path: Path | None = None,
        *,
        argv: Sequence[str] = SERVER,
        **env: str,
    ) -> None:
        self.log_path = log_path
        self.argv = list(argv)
        self.env = {
            **os.environ,
            "GRPC_PORT": "0",
            "SHUTDOWN_GRACE_SECONDS": "5",
            **({"DATABASE_URL": database_url} if database_url is not None else {}),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._offset = 0
        self._serving = threading.Event()
        self._tail: list[str] = []  # without a log file: the last lines passed through

    def launch(self) -> None:
        """Start the process; `wait_ready` waits for it (several can start side by side)."""
        self.port = 0
        self._serving.clear()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as log:
                self._offset = log.tell()
                self.process = subprocess.Popen(
                    self.argv, env=self.env, stdout=log, stderr=log, cwd=REPO,
                    start_new_session=True, preexec_fn=die_with_parent,
                )  # fmt: skip
            return
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops children in order
            preexec_fn=die_with_parent,
        )  # fmt: skip
        assert self.process.stdout is not None
        threading.Thread(
            target=self._pass_through, args=(self.process.stdout,), daemon=True
        ).start()

    def _pass_through(self, pipe: IO[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            self._tail = [*self._tail[-29:], line.decode(errors="replace").rstrip()]
            port = serving_port(line)
            if port is not None and not self._serving.is_set():
                self.port = port
                self._serving.set()

    def _scan_log(self) -> None:
        assert self.log_path is not None
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            for line in log:
                port = serving_port(line)
                if port is not None:
                    self.port = port
                    self._serving.set()
                    return

    def log_tail(self, characters: int = 3000) -> str:
        if self.log_path is None:
            return "\n".join(self._tail)[-characters:]
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, timeout: float = 30.0) -> int:
        """The port, once this start's "serving" line is logged; ServerStartError if the process
        exits first or `timeout` passes."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path is not None:
                self._scan_log()
            if self._serving.is_set():
                return self.port
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{Path(self.argv[-1]).name} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            self._serving.wait(0.05)
        raise ServerStartError(f"no 'serving' line after {timeout} s:\n{self.log_tail()}")

    def start(self, timeout: float = 30.0) -> int:
        """Launch and wait until ready; the bound port."""
        self.launch()
        try:
            return self.wait_ready(timeout)
        except ServerStartError:
            self.stop(timeout=5)
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig`, wait up to `timeout` seconds (then SIGKILL), reap; the exit code."""
        assert self.process is not None
        return stop_process(self.process, grace=timeout, sig=sig)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of its log file."""
        assert self.log_path is not None, "this server logs to the launcher's stderr"
        return [
            json.loads(line)
            for line in self.log_path.read_text().splitlines()
            if line.startswith("{")
        ]
