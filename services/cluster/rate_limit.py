"""The sliding-window rate limiter in Redis, shared by every node and transport.

The same exact sliding *log* as services.rate_limiter.RateLimiter, kept as one sorted set
per key (score: the request time in microseconds, by Redis' own clock, so the nodes'
clocks do not matter). One Lua script call per message drops the times that left the
window (ZREMRANGEBYSCORE), counts the rest (ZCARD), adds this request when there is room
(ZADD) and lets the key expire after a window of silence (PEXPIRE). It answers the same
allowed / remaining / reset as the in-process limiter.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import redis.asyncio as aioredis

from services.cluster.redis_client import REDIS_FAILURES, ClusterUnavailable, Keys
from services.rate_limiter import RateStatus

# KEYS[1] the key's sorted set. ARGV: window (us), limit, 1 to use a slot (0: peek),
# a unique member name, and the time (us) or '' for Redis' TIME.
# Numbers go back to Redis through string.format('%d'): Lua's tostring would round
# a microsecond timestamp (14 significant digits).
_SCRIPT = """
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  allowed = 1
  if ARGV[3] == '1' then
    redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[4])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
    count = count + 1
  end
end
local reset = 0
if count > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  reset = window - (now - tonumber(oldest[2]))
end
return {allowed, count, reset}
"""


class RedisRateLimiter:
    """The async limiter interface of services.rate_limiter.RateLimiter, over Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        window_seconds: float,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` (seconds) replaces Redis' TIME: only for tests that compare limiters."""
        self._redis = redis
        self._keys = keys
        self.window = window_seconds
        self._window_us = round(window_seconds * 1_000_000)
        self._clock = clock
        self._script = redis.register_script(_SCRIPT)

    async def peek(self, key: str, limit: int) -> RateStatus:
        """The budget of ``key`` without using any of it; ``allowed``: would acquire() pass now."""
        return await self._call(key, limit, use=False)

    async def acquire(self, key: str, limit: int) -> RateStatus:
        """Use one slot of ``key``'s budget if there is one."""
        return await self._call(key, limit, use=True)

    async def _call(self, key: str, limit: int, *, use: bool) -> RateStatus:
        now = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        member = os.urandom(9).hex() if use else ""
        try:
            allowed, count, reset_us = await self._script(
                keys=[self._keys.rate(key)], args=[self._window_us, limit, 1 if use else 0, member, now]
            )
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"rate limit: {exc}") from exc
        remaining = max(0, limit - count)
        reset = 0 if count == 0 else max(0, -(-reset_us // 1_000_000))  # ceil, in whole seconds
        return RateStatus(bool(allowed), limit, remaining, reset)
