"""The sliding-window rate limiter in Redis, shared by every node and transport.

The same exact sliding *log* as services.rate_limiter.RateLimiter, kept as one sorted set
per key (score: the request time in microseconds, by Redis' own clock, so the nodes'
clocks do not matter). One Lua script call per message drops the times that left the
window (ZREMRANGEBYSCORE), counts the rest (ZCARD), adds this request when there is room
(ZADD) and lets the key expire after a window of silence (PEXPIRE). It answers the same
allowed / remaining / reset as the in-process limiter.

The same Lua function also runs inside the session lock's script (services.cluster.locks),
so starting an answer checks the lock and uses a slot in one round trip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.cluster.redis_client import REDIS_FAILURES, ClusterUnavailable, Keys
from services.rate_limiter import RateStatus

# rate(key, window (us), limit, '1' to use a slot ('0': peek), a unique member name,
# the time (us) or '' for Redis' TIME) -> allowed (1/0), count, reset (us).
# Numbers go back to Redis through string.format('%d'): Lua's tostring would round
# a microsecond timestamp (14 significant digits).
RATE_FUNCTION = """
local function rate(key, window, limit, use, member, given_now)
  local now
  if given_now ~= '' then
    now = tonumber(given_now)
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  window = tonumber(window)
  limit = tonumber(limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
  local count = redis.call('ZCARD', key)
  local allowed = 0
  if count < limit then
    allowed = 1
    if use == '1' then
      redis.call('ZADD', key, string.format('%d', now), member)
      redis.call('PEXPIRE', key, math.ceil(window / 1000))
      count = count + 1
    end
  end
  local reset = 0
  if count > 0 then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    reset = window - (now - tonumber(oldest[2]))
  end
  return allowed, count, reset
end
"""

# KEYS[1] the key's sorted set. ARGV: window (us), limit, 1 to use a slot (0: peek),
# a unique member name, and the time (us) or ''.
_SCRIPT = RATE_FUNCTION + """
local allowed, count, reset = rate(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return {allowed, count, reset}
"""


@dataclass(frozen=True, slots=True)
class RateUse:
    """One slot of a key's budget, to be used by a script that also does other work."""

    key: str  #: the Redis key
    limit: int
    #: window (us), limit, '1', member, now: the rate() arguments after the key
    args: tuple[object, ...]


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

    def use(self, key: str, limit: int) -> RateUse:
        """What a combined script needs to use one slot of ``key``'s budget."""
        return RateUse(self._keys.rate(key), limit, self._arguments(limit, use=True))

    def _arguments(self, limit: int, *, use: bool) -> tuple[object, ...]:
        now = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        return (self._window_us, limit, 1 if use else 0, os.urandom(9).hex() if use else "", now)

    async def _call(self, key: str, limit: int, *, use: bool) -> RateStatus:
        try:
            allowed, count, reset_us = await self._script(
                keys=[self._keys.rate(key)], args=list(self._arguments(limit, use=use))
            )
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"rate limit: {exc}") from exc
        return rate_status(limit, allowed, count, reset_us)


def rate_status(limit: int, allowed: int, count: int, reset_us: int) -> RateStatus:
    """The RateStatus of what rate() returned."""
    remaining = max(0, limit - count)
    reset = 0 if count == 0 else max(0, -(-reset_us // 1_000_000))  # ceil, in whole seconds
    return RateStatus(bool(allowed), limit, remaining, reset)
