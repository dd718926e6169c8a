"""Per-partner request limits: a fixed window of 60 seconds, aligned to the clock."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("disposition.ratelimit")


@dataclass(frozen=True, slots=True)
class Quota:
    """Where a key stands in the current window, as this limiter knows it now (no round trip):
    the requests `remaining` under `limit`, and the whole seconds until the window resets."""

    limit: int
    remaining: int
    reset_seconds: int
    window_seconds: int


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int) -> int | None:
        """Count one request; None if allowed, else the whole seconds until it would be."""

    def quota(self, key: str, limit: int) -> Quota:
        """The key's standing now, from what this limiter holds in memory."""

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

    def quota(self, key: str, limit: int) -> Quota:
        now = self._clock()
        window = int(now // self.window_seconds)
        used = self._counts.get(key, 0) if window == self._window else 0
        return _quota(
            limit, limit - used, (window + 1) * self.window_seconds - now, self.window_seconds
        )

    async def close(self) -> None:
        pass


def _quota(limit: int, remaining: int, seconds_left: float, window_seconds: int) -> Quota:
    reset = min(window_seconds, max(1, math.ceil(seconds_left)))
    return Quota(limit, max(0, min(limit, remaining)), reset, window_seconds)


# One round trip, atomic: take up to ARGV[2] requests of the window's count without passing the
# limit ARGV[3] (what would pass it is given back), give the key a lifetime up to the window's
# end on the first hit (or if it somehow has none); returns the requests granted, the window's
# count and the milliseconds left in the window.
_LEASE_SCRIPT = """
local wanted = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local count = redis.call('INCRBY', KEYS[1], wanted)
local granted = wanted
if count > limit then
  granted = math.max(0, wanted - (count - limit))
  count = redis.call('DECRBY', KEYS[1], wanted - granted)
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  ttl = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {granted, count, ttl}
"""


_LEASED, _FAILED_OPEN = -1, -2  # _take's outcomes besides a wait in seconds


class _Lease:
    """A partner's requests taken from the shared count of one window, not yet used here."""

    __slots__ = ("first_hit", "full_at", "left", "taken", "used", "waiting", "window",
                 "window_start")  # fmt: skip

    def __init__(self, window: int, window_start: float, first_hit: float) -> None:
        self.window = window
        self.window_start = window_start
        self.first_hit = first_hit
        self.waiting = 0  # requests waiting for a grant from Redis
        self.left = 0  # granted and not yet used
        self.used = 0  # requests allowed here in this window
        self.taken = 0  # the window's shared count at the last grant (every replica's)
        self.full_at = 0  # the limit the window was found full at (0: not): refused up to it


class RedisRateLimiter:
    """Counts in Redis, shared by every replica; fails open when Redis does not answer.

    Same windows as InProcessRateLimiter: key `<prefix>ratelimit:<partner>:<window index>`,
    the index taken from this host's clock (replicas are expected to run NTP).

    A request costs no round trip to Redis: each replica takes a lease of several requests from
    the window's shared count at a time (one atomic script): about `lease_seconds` of this
    replica's traffic for the partner in the window so far, or as many as are waiting for it if
    more, and never more than a quarter of what is left under the limit (so near the limit
    leases shrink to one request). The count in Redis is of requests granted, never above the
    limit: all replicas together allow at most `limit` requests per window, exactly as when
    every request was counted in Redis. What a replica took and did not use by the end of the
    window is not allowed elsewhere in that window; the lease sizes bound it. Once the count
    reaches the limit, the replica refuses the partner without asking Redis until the window
    ends (a window's count never goes down), unless the partner's limit is raised meanwhile.

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
        lease_seconds: float = 0.05,
        max_lease: int = 1000,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.window_seconds = window_seconds
        self._clock = clock
        self._script = client.register_script(_LEASE_SCRIPT)
        self._on_fail_open = on_fail_open
        self._warn_interval = warn_interval
        self._retry_after_failure = retry_after_failure
        self.lease_seconds = lease_seconds
        self.max_lease = max_lease
        self._leases: dict[str, _Lease] = {}
        self._refills: dict[str, asyncio.Future[None]] = {}
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
        while True:
            now = self._clock()
            window = int(now // self.window_seconds)
            lease = self._leases.get(key)
            if lease is None or lease.window != window:
                lease = self._leases[key] = _Lease(window, window * self.window_seconds, now)
                self._drop_old_leases(window)
            if lease.left > 0:
                lease.left -= 1
                lease.used += 1
                return None
            if limit <= lease.full_at:
                return max(1, math.ceil(lease.window_start + self.window_seconds - now))
            refill = self._refills.get(key)
            if refill is not None:  # another request of this partner is asking Redis: wait
                lease.waiting += 1
                try:
                    await asyncio.shield(refill)
                finally:
                    lease.waiting -= 1
                continue
            refill = self._refills[key] = asyncio.get_running_loop().create_future()
            try:
                outcome = await self._take(key, lease, limit, now)
            finally:
                del self._refills[key]
                refill.set_result(None)
            if outcome != _LEASED:
                return None if outcome == _FAILED_OPEN else outcome

    async def _take(self, key: str, lease: _Lease, limit: int, now: float) -> int:
        """Take a lease for the window from Redis: _LEASED (the lease has requests again),
        _FAILED_OPEN (Redis did not answer: allow this one uncounted), or the whole seconds to
        wait when the window is full."""
        monotonic = time.monotonic()
        if monotonic < self._next_attempt:
            self._fail_open(None)
            return _FAILED_OPEN
        # This replica's recent rate for the partner, or the requests waiting, if more.
        elapsed = max(now - lease.first_hit, self.lease_seconds)
        demand = max(math.ceil(lease.used / elapsed * self.lease_seconds), lease.waiting + 1)
        wanted = min(self.max_lease, demand, max(1, (limit - lease.taken) // 4))
        window_end = lease.window_start + self.window_seconds
        try:
            granted, count, ttl_ms = await self._script(
                keys=[f"{self.key_prefix}ratelimit:{key}:{lease.window}"],
                args=[max(1, math.ceil((window_end - now) * 1000)), wanted, limit],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._next_attempt = monotonic + self._retry_after_failure
            self._fail_open(exc)
            return _FAILED_OPEN
        if self._failing:
            self._failing = False
            log.info("rate limiter: Redis answers again, limits apply")
        lease.taken = int(count)
        if int(granted) > 0:
            lease.left += int(granted)
            return _LEASED
        lease.full_at = limit
        return max(1, math.ceil(int(ttl_ms) / 1000))

    def quota(self, key: str, limit: int) -> Quota:
        """From this replica's lease: the window's shared count at its last grant (every
        replica's requests, this one's unused grants included, which are still this replica's
        to allow). A replica that has not asked Redis in this window yet knows of no use."""
        now = self._clock()
        window = int(now // self.window_seconds)
        lease = self._leases.get(key)
        seconds_left = (window + 1) * self.window_seconds - now
        if lease is None or lease.window != window:
            return _quota(limit, limit, seconds_left, self.window_seconds)
        if limit <= lease.full_at:
            return _quota(limit, 0, seconds_left, self.window_seconds)
        return _quota(limit, limit - lease.taken + lease.left, seconds_left, self.window_seconds)

    def _drop_old_leases(self, window: int) -> None:
        if len(self._leases) > 1000:
            self._leases = {k: v for k, v in self._leases.items() if v.window == window}

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
