"""The Redis connection every cluster part shares, and the names of its keys."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

#: how many connections one node may hold (one of them is the pub/sub subscriber). Opened
#: only as needed; high enough that a burst of new chats rarely waits for one (measured: 200
#: chats at once took 92 ms of claims through 64 connections, 47 ms through 200)
MAX_CONNECTIONS = 256
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
