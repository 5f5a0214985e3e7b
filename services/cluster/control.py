"""One pub/sub channel per node: requests to this node, and relayed answers for it.

Other nodes publish small JSON messages to ``node:<id>``: stop an answer, start or stop
following one, and the deltas and ending of an answer this node follows. The subscriber
runs as one task that reconnects by itself when Redis goes away and comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from services.cluster.redis_client import REDIS_FAILURES, ClusterUnavailable, Keys

log = logging.getLogger("aichat.cluster")

#: pause before subscribing again after Redis went away
RECONNECT_SECONDS = 0.5

ControlHandler = Callable[[dict[str, Any]], None]


class ControlChannel:
    def __init__(self, redis: aioredis.Redis, keys: Keys, node_id: str, handler: ControlHandler) -> None:
        self._redis = redis
        self._keys = keys
        self.node_id = node_id
        self.channel = keys.node_channel(node_id)
        self._handler = handler
        #: set while this node's subscription is live (clear while Redis is away)
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def send(self, node_id: str, message: dict[str, Any]) -> int:
        """Publish to a node's channel; returns how many subscribers got it (0: the node is gone)."""
        try:
            return int(await self._redis.publish(self._keys.node_channel(node_id), json.dumps(message)))
        except REDIS_FAILURES as exc:
            raise ClusterUnavailable(f"publish: {exc}") from exc

    async def _listen(self) -> None:
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                if failing:
                    log.info("control channel subscribed again")
                    failing = False
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                self.subscribed.clear()
                await _close_quietly(pubsub)
                raise
            except REDIS_FAILURES as exc:
                self.subscribed.clear()
                if not failing:
                    log.error("control channel lost: %s; subscribing again when Redis answers", exc)
                failing = True
                await _close_quietly(pubsub)
                await asyncio.sleep(RECONNECT_SECONDS)

    def _dispatch(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("ignoring a malformed control message (%d bytes)", len(data))
            return
        if not isinstance(message, dict):
            return
        try:
            self._handler(message)
        except Exception:
            log.exception("control message %r failed", str(message.get("t"))[:20])


async def _close_quietly(pubsub: aioredis.client.PubSub) -> None:
    try:
        await pubsub.aclose()
    except REDIS_FAILURES:
        pass
