"""In-process sliding-window rate limiter, one budget shared by every transport.

Choice: an exact sliding *log*, kept as a fixed ring of the last ``limit`` request times
per key. A request is allowed when the oldest of those times has left the window, which
is one comparison (O(1)); the remaining budget and the reset time come from a binary
search over the ring, which is sorted in time order (O(log limit)). Unlike a
sliding-window *counter* it never over- or under-counts at window edges, and its memory
is small and fixed: 8 bytes per allowed request slot (160 B per anonymous address at the
default limit). Keys live in cachetools TTLCaches: a key idle for a whole window holds
no live timestamps and expires, and ``max_keys`` caps memory under a flood of distinct
addresses (the least recently used key is dropped first). Users' keys (``user:`` prefix)
have a cache of their own, so a flood of anonymous addresses never evicts a user's budget
(which would hand that user a fresh one).

Anonymous callers are keyed by ``address_key``: an IPv6 client is its /64 (one host
usually holds a whole /64 and can rotate through it), an IPv4-mapped IPv6 address its
IPv4 address.
"""

from __future__ import annotations

import ipaddress
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache

_NEVER = float("-inf")

#: keys starting with this are users' budgets, kept apart from addresses'
USER_KEY_PREFIX = "user:"


def address_key(client_ip: str) -> str:
    """The rate-limit identity of a client address: IPv4 as is, IPv6 as its /64 prefix."""
    if ":" not in client_ip:
        return client_ip
    try:
        address = ipaddress.IPv6Address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


@dataclass(frozen=True, slots=True)
class RateStatus:
    allowed: bool
    limit: int
    remaining: int
    #: seconds until a slot frees (0 when the budget is untouched)
    reset_seconds: int

    @property
    def retry_after(self) -> int | None:
        return None if self.allowed else max(1, self.reset_seconds)

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class Limiter(Protocol):
    """What the chat service uses: this in-process limiter, or the Redis one in cluster mode.

    Async for both, so the chat service has one code path; here nothing actually waits.
    """

    async def peek(self, key: str, limit: int) -> RateStatus: ...

    async def acquire(self, key: str, limit: int) -> RateStatus: ...


class _Ring:
    """The last ``size`` request times of one key, oldest at ``head``."""

    __slots__ = ("times", "head")

    def __init__(self, size: int) -> None:
        self.times = array("d", [_NEVER]) * size
        self.head = 0

    def first_live(self, cutoff: float) -> int:
        """How many of the times (in age order) are at or before ``cutoff``."""
        times, head, size = self.times, self.head, len(self.times)
        low, high = 0, size
        while low < high:
            middle = (low + high) // 2
            if times[(head + middle) % size] <= cutoff:
                low = middle + 1
            else:
                high = middle
        return low


class RateLimiter:
    def __init__(
        self,
        window_seconds: float,
        *,
        max_keys: int = 100_000,
        max_user_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window_seconds
        self._clock = clock
        self._rings: TTLCache[str, _Ring] = TTLCache(maxsize=max_keys, ttl=window_seconds, timer=clock)
        self._user_rings: TTLCache[str, _Ring] = TTLCache(maxsize=max_user_keys, ttl=window_seconds, timer=clock)

    def __len__(self) -> int:
        return len(self._rings) + len(self._user_rings)

    def _cache(self, key: str) -> TTLCache[str, _Ring]:
        return self._user_rings if key.startswith(USER_KEY_PREFIX) else self._rings

    async def peek(self, key: str, limit: int) -> RateStatus:
        """The budget of ``key`` without using any of it; ``allowed``: would acquire() pass now."""
        now = self._clock()
        ring = self._cache(key).get(key)
        if ring is None or len(ring.times) != limit:
            return RateStatus(True, limit, limit, 0)
        return self._status(ring, now, allowed=ring.times[ring.head] <= now - self.window)

    async def acquire(self, key: str, limit: int) -> RateStatus:
        """Use one slot of ``key``'s budget if there is one."""
        now = self._clock()
        rings = self._cache(key)
        ring = rings.get(key)
        if ring is None or len(ring.times) != limit:
            ring = _Ring(limit)
        elif ring.times[ring.head] > now - self.window:
            return self._status(ring, now, allowed=False)
        ring.times[ring.head] = now
        ring.head = (ring.head + 1) % limit
        rings[key] = ring  # (re)insert: refreshes the key's expiry
        return self._status(ring, now, allowed=True)

    def _status(self, ring: _Ring, now: float, *, allowed: bool) -> RateStatus:
        size = len(ring.times)
        expired = ring.first_live(now - self.window)
        remaining = expired
        if expired == size:
            return RateStatus(allowed, size, size, 0)
        oldest_live = ring.times[(ring.head + expired) % size]
        # (now - oldest_live) first: exact for nearby times, so a slot used just now reports the
        # window itself, never window + 1 from rounding in (oldest_live + window)
        reset = max(0, math.ceil(self.window - (now - oldest_live)))
        return RateStatus(allowed, size, remaining, reset)
