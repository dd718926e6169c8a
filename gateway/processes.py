"""Child processes of the launchers (make run, tests, bench): tied to us, stopped in order."""

from __future__ import annotations

import ctypes
import signal
import subprocess


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
