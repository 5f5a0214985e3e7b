"""The busy lock of a session, across nodes, with a fencing number.

A node generating an answer holds ``lock:<session>`` (SET NX PX) and ``msg:<message>``
(the pointer other nodes follow to reach it), both holding the same value: who holds it
(node, message, owner) and a fencing number from one INCR counter, so a newer lock always
carries a higher number. The store refuses writes carrying a number older than the
session's newest, so a node that lost its lock (paused past the TTL) cannot store over
the answer of the node that took the session next.

The node renews all its locks in one script call every TTL/3 and releases each one
(compare-and-delete) before the answer's closing frame. A dead node's locks expire after
the TTL, which frees its sessions.

Taking a lock can use a slot of the caller's rate limit in the same script call: a busy
session uses no budget, and a refused message takes no lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.cluster.rate_limit import RATE_FUNCTION, RateUse, rate_status
from services.cluster.redis_client import REDIS_FAILURES, ClusterUnavailable, Keys
from services.rate_limiter import RateStatus

log = logging.getLogger("aichat.cluster")

# KEYS: lock, fence counter, message pointer, and the rate-limit key or the lock again.
# ARGV: TTL (ms), the value without its fence (a JSON object missing its last member's
# value and closing brace), '1' to use a rate-limit slot, then rate()'s arguments.
# Returns {fence, value, count, reset}; fence 0: busy (value: the holder's), -1: rate limited.
_ACQUIRE = RATE_FUNCTION + """
local current = redis.call('GET', KEYS[1])
if current then
  return {0, current, 0, 0}
end
local count, reset = 0, 0
if ARGV[3] == '1' then
  local allowed
  allowed, count, reset = rate(KEYS[4], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
  if allowed == 0 then
    return {-1, '', count, reset}
  end
end
local fence = redis.call('INCR', KEYS[2])
local value = ARGV[2] .. string.format('%d', fence) .. '}'
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[1])
redis.call('SET', KEYS[3], value, 'PX', ARGV[1])
return {fence, value, count, reset}
"""

# KEYS: lock, message pointer. ARGV: the value the caller holds.
_RELEASE = """
local mine = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  mine = 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return mine
"""

# KEYS: lock 1, pointer 1, lock 2, pointer 2, ... ARGV: TTL (ms), value 1, value 2, ...
# Returns the (1-based) numbers of the locks that are no longer this node's.
_RENEW = """
local lost = {}
for i = 2, #ARGV do
  local lock = KEYS[2 * i - 3]
  if redis.call('GET', lock) == ARGV[i] then
    redis.call('PEXPIRE', lock, ARGV[1])
    redis.call('PEXPIRE', KEYS[2 * i - 2], ARGV[1])
  else
    lost[#lost + 1] = i - 1
  end
end
return lost
"""


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a session's lock (or generates a message), as stored in Redis."""

    node_id: str
    session_id: str
    message_id: str
    owner: str | None
    fence: int

    @classmethod
    def parse(cls, raw: bytes | str) -> LockHolder:
        fields = json.loads(raw)
        return cls(fields["n"], fields["s"], fields["m"], fields["o"], int(fields["f"]))


@dataclass(frozen=True, slots=True)
class HeldLock:
    session_id: str
    message_id: str
    fence: int
    value: bytes
    #: the caller's budget once the slot was used, when acquire() was given one to use
    rate: RateStatus | None = None


class SessionLocks:
    def __init__(self, redis: aioredis.Redis, keys: Keys, node_id: str, ttl_seconds: float) -> None:
        self._redis = redis
        self._keys = keys
        self.node_id = node_id
        self.ttl_seconds = ttl_seconds
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        #: the locks this node holds, by session id
        self.held: dict[str, HeldLock] = {}
        self._renewal_failing = False

    async def acquire(
        self, session_id: str, message_id: str, owner: str | None, rate: RateUse | None = None
    ) -> HeldLock | LockHolder | RateStatus:
        """Take the session's lock, using a slot of ``rate`` too when given, in one call.

        A HeldLock; the LockHolder of whoever has the lock (no slot used); or the refused
        RateStatus (no lock taken).
        """
        partial = json.dumps({"n": self.node_id, "s": session_id, "m": message_id, "o": owner})[:-1] + ',"f":'
        lock = self._keys.lock(session_id)
        keys = [lock, self._keys.fence, self._keys.message(message_id), rate.key if rate is not None else lock]
        args: list[object] = [self._ttl_ms, partial, "1" if rate is not None else "0"]
        if rate is not None:
            args += rate.args
        try:
            fence, value, count, reset_us = await self._acquire(keys=keys, args=args)
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"lock: {exc}") from exc
        if fence == 0:
            return LockHolder.parse(value)
        status = None if rate is None else rate_status(rate.limit, fence > 0, count, reset_us)
        if fence < 0:
            assert status is not None
            return status
        held = HeldLock(session_id, message_id, int(fence), value, status)
        self.held[session_id] = held
        return held

    async def release(self, held: HeldLock) -> bool:
        """Free the session if this node still holds it; False if the lock was lost (or Redis is down)."""
        if self.held.get(held.session_id) is held:
            del self.held[held.session_id]
        try:
            return bool(await self._release(
                keys=[self._keys.lock(held.session_id), self._keys.message(held.message_id)], args=[held.value]
            ))
        except REDIS_FAILURES as exc:
            # the lock expires by itself after the TTL
            log.warning("could not release the lock of session %s: %s", held.session_id, exc)
            return False

    async def holder(self, session_id: str) -> LockHolder | None:
        """Who holds the session's lock, None if nobody."""
        try:
            raw = await self._redis.get(self._keys.lock(session_id))
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"lock: {exc}") from exc
        return None if raw is None else LockHolder.parse(raw)

    async def generating(self, message_id: str) -> LockHolder | None:
        """Who generates the message right now, None if no node does."""
        try:
            raw = await self._redis.get(self._keys.message(message_id))
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"message pointer: {exc}") from exc
        return None if raw is None else LockHolder.parse(raw)

    async def renew(self) -> list[HeldLock]:
        """Extend every lock this node holds, in one call; returns the ones it lost."""
        held = list(self.held.values())
        if not held:
            return []
        keys: list[str] = []
        for lock in held:
            keys += (self._keys.lock(lock.session_id), self._keys.message(lock.message_id))
        lost_numbers = await self._renew(keys=keys, args=[self._ttl_ms, *(lock.value for lock in held)])
        lost = []
        for number in lost_numbers:
            lock = held[number - 1]
            # a lock released while this call was in flight is gone on purpose, not lost
            if self.held.get(lock.session_id) is lock:
                del self.held[lock.session_id]
                lost.append(lock)
        return lost

    async def keep_renewed(self) -> None:
        """Renew every TTL/3 until cancelled; a failure is logged once until renewal works again."""
        while True:
            await asyncio.sleep(self.ttl_seconds / 3)
            try:
                lost = await self.renew()
            except REDIS_FAILURES as exc:
                if not self._renewal_failing:
                    log.error("cannot renew this node's session locks: %s", exc)
                self._renewal_failing = True
                continue
            if self._renewal_failing:
                log.info("session lock renewal works again")
                self._renewal_failing = False
            for lock in lost:
                log.warning("lost the lock of session %s (message %s): its store writes will be refused",
                            lock.session_id, lock.message_id)
