"""The Redis connection every cluster part shares, and the names of its keys."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

#: how many connections one node may hold (one of them is the pub/sub subscriber), opened only
#: as needed. Not hundreds: Redis and this node's event loop each run one command at a time, so
#: more connections do not answer a burst sooner, and each new one costs a handshake (HELLO and
#: a PING). Measured, 200 scripts at once against a local Redis: 13-20 ms of CPU on a warm pool
#: of 16, 32, 64 or 256 connections alike; on a cold pool 37 / 58 / 169 ms through 32 / 64 / 256
#: connections (0.8 ms per connection opened). 64 leaves room for a Redis a round trip away.
MAX_CONNECTIONS = 64
#: how long a command waits for a free pooled connection before failing (redis-py's
#: default pool would raise at once when full)
POOL_WAIT_SECONDS = 2.0
#: a command that gets no answer in this long fails: an unreachable Redis must not hang a chat
SOCKET_TIMEOUT_SECONDS = 2.0


class ClusterUnavailable(Exception):
    """Redis did not answer; the detail is for the log only."""


#: what a failed Redis call may raise (OSError: a socket error redis-py did not wrap)
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client on a blocking pool: when every connection is busy, a command waits for one."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


class Keys:
    """Every key and channel name, under one prefix so several deployments share a Redis."""

    __slots__ = ("prefix", "fence")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        #: one counter for every lock ever taken: a newer lock always has a higher number
        self.fence = f"{prefix}:fence"

    def rate(self, key: str) -> str:
        return f"{self.prefix}:rate:{key}"

    def lock(self, session_id: str) -> str:
        return f"{self.prefix}:lock:{session_id}"

    def message(self, message_id: str) -> str:
        return f"{self.prefix}:msg:{message_id}"

    def node_channel(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"
