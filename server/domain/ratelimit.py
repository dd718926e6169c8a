"""Per-partner request limits: a fixed window of 60 seconds, aligned to the clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int) -> int | None:
        """Count one request; None if allowed, else the whole seconds until it would be."""


class InProcessRateLimiter:
    """Counts in this process's memory (one replica). Old windows are dropped as time passes."""

    def __init__(self, *, window_seconds: int = 60, clock: Callable[[], float] = time.time):
        self.window_seconds = window_seconds
        self._clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    async def hit(self, key: str, limit: int) -> int | None:
        now = self._clock()
        window = int(now // self.window_seconds)
        if window != self._window:
            self._window = window
            self._counts = {}
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count <= limit:
            return None
        window_end = (window + 1) * self.window_seconds
        return max(1, math.ceil(window_end - now))
