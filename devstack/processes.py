"""Child processes of the dev stack: tied to the launcher (they die with it), stopped in order."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Callable, Sequence


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Loaded here, in the launcher, not in the child: between fork and exec the child of a
# multi-threaded launcher (gRPC's threads, asyncio's executor) must not dlopen, since another
# thread may have held the loader's or malloc's lock at the fork. (In a CI run a restarted
# server died with SIGSEGV before logging anything, just after gRPC warned in the test process
# that other threads were calling into gRPC at the fork: tests/system/test_feed_restart.py.)
_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM if the launching process dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


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
