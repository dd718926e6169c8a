"""Child processes of the dev stack: tied to the launcher (they die with it), stopped in order."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Sequence


def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM if the launching process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process(
    process: subprocess.Popen[bytes], *, grace: float, sig: int = signal.SIGTERM
) -> int:
    """Send `sig`, wait up to `grace` seconds, then SIGKILL; always reaps. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def stop_processes(
    processes: Sequence[subprocess.Popen[bytes]], *, grace: float, sig: int = signal.SIGTERM
) -> list[int]:
    """`stop_process` for several at once: all get `sig` first, so they drain side by side."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    return [stop_process(process, grace=grace, sig=sig) for process in processes]
