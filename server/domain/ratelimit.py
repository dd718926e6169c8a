"""Per-partner request limits: a fixed window of 60 seconds, aligned to the clock."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("disposition.ratelimit")


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int) -> int | None:
        """Count one request; None if allowed, else the whole seconds until it would be."""

    async def close(self) -> None:
        """Release connections (called once, when the server stops)."""


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

    async def close(self) -> None:
        pass


# One round trip, atomic: count the request in its window's key, give the key a lifetime up to
# the window's end on the first hit (or if it somehow has none), return the count and the
# milliseconds left in the window.
_HIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  ttl = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {count, ttl}
"""


class RedisRateLimiter:
    """Counts in Redis, shared by every replica; fails open when Redis does not answer.

    Same windows as InProcessRateLimiter: key `<prefix>ratelimit:<partner>:<window index>`,
    the index taken from this host's clock (replicas are expected to run NTP).

    When Redis is unreachable or errs, the request is allowed, `on_fail_open` is called and a
    warning is logged at most once per `warn_interval`. After a failure Redis is left alone for
    `retry_after_failure` seconds (those requests fail open too), so an outage costs each request
    nothing instead of a socket timeout; the next attempt reconnects on its own.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "disposition:",
        window_seconds: int = 60,
        clock: Callable[[], float] = time.time,
        on_fail_open: Callable[[], None] = lambda: None,
        warn_interval: float = 30.0,
        retry_after_failure: float = 1.0,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.window_seconds = window_seconds
        self._clock = clock
        self._script = client.register_script(_HIT_SCRIPT)
        self._on_fail_open = on_fail_open
        self._warn_interval = warn_interval
        self._retry_after_failure = retry_after_failure
        self._next_attempt = -math.inf
        self._next_warning = -math.inf
        self._failing = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.25, **options: Any) -> RedisRateLimiter:
        """A limiter on its own client: short timeouts and no client-side retries (fail fast)."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, **options)

    async def hit(self, key: str, limit: int) -> int | None:
        now = self._clock()
        monotonic = time.monotonic()
        if monotonic < self._next_attempt:
            self._fail_open(None)
            return None
        window = int(now // self.window_seconds)
        window_end = (window + 1) * self.window_seconds
        try:
            count, ttl_ms = await self._script(
                keys=[f"{self.key_prefix}ratelimit:{key}:{window}"],
                args=[max(1, math.ceil((window_end - now) * 1000))],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._next_attempt = monotonic + self._retry_after_failure
            self._fail_open(exc)
            return None
        if self._failing:
            self._failing = False
            log.info("rate limiter: Redis answers again, limits apply")
        if int(count) <= limit:
            return None
        return max(1, math.ceil(int(ttl_ms) / 1000))

    def _fail_open(self, exc: BaseException | None) -> None:
        self._failing = True
        self._on_fail_open()
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + self._warn_interval
            log.warning(
                "rate limiter: Redis unavailable, allowing requests unlimited (fail open)",
                extra={"error": repr(exc) if exc is not None else "recent failure"},
            )
        return None

    async def close(self) -> None:
        await self.client.aclose()
