"""What one node does for the cluster: its session locks, stop requests, and followers.

The chat service asks it to claim a session before an answer starts (the lock and the
caller's rate-limit slot, in one script call) and to release it before the closing frame,
to stop an answer that another node generates, and to follow (resume) an answer that
another node generates.

Following: the follower's node creates a *mirror* Generation, local to it, and asks the
generating node over its control channel to relay the answer. The generating node
attaches a RelayListener to the real Generation: it sends the whole text so far, then
each delta as it comes (merged while a publish is in flight), then the ending, to the
follower node's channel, where they feed the mirror; local clients attach to the mirror
as to any generation. Nothing is relayed, and nothing is written to Redis, per token of
an answer nobody follows. A mirror whose generating node is gone (its ``msg:`` pointer
expired with its locks) ends with what the store has: the saved partial and its status.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from services.cluster.control import ControlChannel
from services.cluster.locks import HeldLock, LockHolder, SessionLocks
from services.cluster.rate_limit import RedisRateLimiter
from services.cluster.redis_client import REDIS_FAILURES, ClusterUnavailable, Keys
from services.errors import ChatError
from services.generation import Generation, GenerationListener, Outcome
from services.rate_limiter import RateStatus
from services.store.base import STATUS_PARTIAL, ChatStore, StoreError

log = logging.getLogger("aichat.cluster")

UNAVAILABLE = "The service is temporarily unavailable; please retry shortly."
BUSY = "An answer for this session is still being generated."
NOT_FOUND = "No such session."

#: at most this many followers relayed from one node, and mirrors on one node
MAX_RELAYS = 10_000
MAX_MIRRORS = 10_000
#: a release that Redis does not answer in this long is left to the lock's TTL
RELEASE_SECONDS = 1.0
#: how often a delete looks whether another node's stopped answer has freed the session
RELEASE_POLL_SECONDS = 0.02


def unavailable(exc: Exception) -> ChatError:
    log.error("redis unavailable: %s", exc)
    return ChatError("unavailable", UNAVAILABLE)


class RelayListener:
    """On the generating node: sends one answer to one follower node's mirror."""

    __slots__ = ("_cluster", "node_id", "token", "generation", "_pending", "_seq", "_outcome", "_sender")

    def __init__(self, cluster: ClusterCoordinator, node_id: str, token: str, generation: Generation) -> None:
        self._cluster = cluster
        self.node_id = node_id
        self.token = token
        self.generation = generation
        # the text so far goes first, even when empty: it tells the follower the relay is on
        self._pending = [generation.text]
        self._seq = generation.length
        self._outcome: Outcome | None = None
        self._sender: asyncio.Task[None] | None = asyncio.create_task(self._send())

    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        self._pending.append(text)
        self._seq = seq
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    def on_end(self, generation: Generation, outcome: Outcome) -> None:
        self._outcome = outcome
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    def close(self) -> None:
        self._pending.clear()
        self._outcome = None
        if self._sender is not None:
            self._sender.cancel()

    async def _send(self) -> None:
        send = self._cluster.control.send
        try:
            while True:
                if self._pending:
                    text = "".join(self._pending)
                    self._pending.clear()
                    if not await send(self.node_id, {"t": "d", "r": self.token, "q": self._seq, "d": text}):
                        # the follower's node is gone: relay no more
                        self._cluster.drop_relay(self)
                        self.generation.detach(self)
                        break
                elif self._outcome is not None:
                    outcome, self._outcome = self._outcome, None
                    error = None if outcome.error is None else [outcome.error.code, outcome.error.message]
                    await send(self.node_id, {"t": "e", "r": self.token, "q": self._seq, "s": outcome.status,
                                              "c": outcome.cancelled, "e": error})
                    self._cluster.drop_relay(self)
                    break
                else:
                    break
        except ClusterUnavailable as exc:
            # the follower's node ends its mirror from the store once the answer's pointer expires
            log.warning("answer %s: relay to node %r stopped: %s", self.generation.message_id, self.node_id, exc)
            self._cluster.drop_relay(self)
            self.generation.detach(self)
        finally:
            self._sender = None


class Mirror:
    """On a follower's node: the local stand-in of an answer another node generates."""

    __slots__ = ("token", "node_id", "generation", "ready", "missing")

    def __init__(self, token: str, node_id: str, generation: Generation) -> None:
        self.token = token
        self.node_id = node_id
        self.generation = generation
        #: set once the generating node sent the text so far (or the mirror ended)
        self.ready = asyncio.Event()
        #: consecutive watchdog rounds that found no pointer to the generating node
        self.missing = 0


class ClusterCoordinator:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        node_id: str,
        lock_ttl_seconds: float,
        store: ChatStore,
        limiter: RedisRateLimiter,
    ) -> None:
        self.redis = redis
        # the configured name plus a per-instance suffix: two ChatServers in one process (same
        # host:pid default) must not share a control channel
        self.node_id = f"{node_id}/{os.urandom(3).hex()}"
        self.ttl_seconds = lock_ttl_seconds
        self.store = store
        self.limiter = limiter
        self.locks = SessionLocks(redis, keys, self.node_id, lock_ttl_seconds)
        self.control = ControlChannel(redis, keys, self.node_id, self._on_control)
        self._keys = keys
        # this node's running answers, shared with (owned by) the chat service
        self._by_session: dict[str, Generation] = {}
        self._by_message: dict[str, Generation] = {}
        self._detach: Callable[[Generation, GenerationListener], object] = Generation.detach
        self._relays: dict[str, RelayListener] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._mirrors_by_message: dict[str, Mirror] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    def bind(
        self,
        by_session: dict[str, Generation],
        by_message: dict[str, Generation],
        detach: Callable[[Generation, GenerationListener], object],
    ) -> None:
        """The chat service's registry of this node's running answers, and its way of letting a
        listener go (which applies `on_client_disconnect`): a follower on another node that
        leaves is a client that leaves."""
        self._by_session = by_session
        self._by_message = by_message
        self._detach = detach

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self.control.start()
        self._background = [
            asyncio.create_task(self.locks.keep_renewed()),
            asyncio.create_task(self._watch_mirrors()),
        ]
        try:  # a Redis that is down at start-up is not fatal: /readyz says so until it answers
            await asyncio.wait_for(self.control.subscribed.wait(), timeout=5)
        except TimeoutError:
            log.error("redis does not answer yet; new chats get 503 until it does")

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for relay in list(self._relays.values()):
            relay.close()
        # followers of other nodes' answers: told to come back, not left open with heartbeats
        closing = ChatError("unavailable", "The server is shutting down; please resume shortly.")
        for mirror in list(self._mirrors.values()):
            self._end(mirror, Outcome(status=STATUS_PARTIAL, text=mirror.generation.text, error=closing))
        await self.control.stop()
        await self.redis.aclose()

    async def ready(self) -> bool:
        if not self.control.subscribed.is_set():
            return False
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=3)
        except (*REDIS_FAILURES, TimeoutError):
            return False
        return True

    # --- the chat service's calls -----------------------------------------------------

    async def claim(
        self, session_id: str, message_id: str, owner: str | None, user: str | None, rate_key: str, limit: int
    ) -> HeldLock:
        """Take the session's lock for a new answer and use a slot of the caller's budget, in one call.

        ChatError busy / not_found (no budget used), rate_limited (no lock taken), unavailable.
        """
        if not self.control.subscribed.is_set():
            # Redis went away (or never came): stop and resume of this answer could not work
            raise ChatError("unavailable", UNAVAILABLE)
        try:
            result = await self.locks.acquire(session_id, message_id, owner, self.limiter.use(rate_key, limit))
        except ClusterUnavailable as exc:
            raise unavailable(exc) from None
        if isinstance(result, LockHolder):
            if result.owner != user:  # the write rule: only the session's owner (anonymous: anonymous)
                raise ChatError("not_found", NOT_FOUND)
            raise ChatError("busy", BUSY)
        if isinstance(result, RateStatus):
            error = ChatError("rate_limited", "Too many messages; please wait before sending more.",
                              retry_after=result.retry_after)
            error.rate = result
            raise error
        return result

    def abandon(self, held: HeldLock) -> None:
        """Stop renewing ``held`` without a round trip (its task was cancelled from outside):
        the session is free again within the lock's TTL."""
        if self.locks.held.get(held.session_id) is held:
            del self.locks.held[held.session_id]

    async def release(self, held: HeldLock) -> None:
        """Free the session (before the answer's closing frame)."""
        try:
            async with asyncio.timeout(RELEASE_SECONDS):
                await self.locks.release(held)
        except TimeoutError:
            log.warning("releasing the lock of session %s timed out; it expires by itself", held.session_id)

    async def stop_remote(self, session_id: str, user: str | None) -> LockHolder | None:
        """Ask the node generating the session's answer to stop it; None if no node does (for this user)."""
        try:
            holder = await self.locks.holder(session_id)
            if holder is None or (holder.owner is not None and holder.owner != user):
                return None
            if holder.node_id == self.node_id and session_id not in self._by_session:
                return None  # this node's answer ended a moment ago
            await self.control.send(holder.node_id, {"t": "stop", "s": session_id, "m": holder.message_id})
        except ClusterUnavailable as exc:
            raise unavailable(exc) from None
        return holder

    async def wait_released(self, holder: LockHolder, within_seconds: float) -> bool:
        """Wait until the answer ``holder`` names has freed its session, which its node does
        after the answer's last store write; False if that took longer than ``within_seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_seconds
        try:
            while True:
                current = await self.locks.holder(holder.session_id)
                if current is None or current.message_id != holder.message_id:
                    return True
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(RELEASE_POLL_SECONDS)
        except ClusterUnavailable as exc:
            raise unavailable(exc) from None

    async def follow(self, message_id: str, user: str | None) -> Generation | None:
        """A local mirror of an answer another node generates, or None if no node generates it."""
        mirror = self._mirrors_by_message.get(message_id)
        if mirror is None:
            try:
                holder = await self.locks.generating(message_id)
            except ClusterUnavailable as exc:
                raise unavailable(exc) from None
            if holder is None or holder.node_id == self.node_id:
                return None  # ended: the store has it
            if holder.owner is not None and holder.owner != user:
                raise ChatError("not_found", "No such message.")
            mirror = self._mirrors_by_message.get(message_id)  # another follower came meanwhile
            if mirror is None:
                if len(self._mirrors) >= MAX_MIRRORS:
                    raise ChatError("unavailable", UNAVAILABLE)
                mirror = Mirror(os.urandom(9).hex(), holder.node_id,
                                Generation(holder.session_id, message_id, holder.owner, 0.0))
                self._mirrors[mirror.token] = mirror
                self._mirrors_by_message[message_id] = mirror
                try:
                    await self.control.send(holder.node_id,
                                            {"t": "follow", "m": message_id, "r": mirror.token, "n": self.node_id})
                except ClusterUnavailable as exc:
                    self._forget(mirror)
                    raise unavailable(exc) from None
        elif mirror.generation.owner is not None and mirror.generation.owner != user:
            raise ChatError("not_found", "No such message.")
        try:
            # a dead node never answers: the watchdog then ends the mirror from the store
            await asyncio.wait_for(mirror.ready.wait(), timeout=3 * self.ttl_seconds + 5)
        except TimeoutError:
            await self._end_from_store(mirror)
        return mirror.generation

    def detached(self, generation: Generation) -> bool:
        """A follower left: stop the relay when it was the mirror's last. False if not a mirror."""
        mirror = self._mirrors_by_message.get(generation.message_id)
        if mirror is None or mirror.generation is not generation:
            return False
        if not generation.listeners and generation.outcome is None:
            self._forget(mirror)
            self._spawn(self._send_quietly(mirror.node_id, {"t": "unfollow", "r": mirror.token}))
        return True

    def drop_relay(self, relay: RelayListener) -> None:
        if self._relays.get(relay.token) is relay:
            del self._relays[relay.token]

    # --- control messages -------------------------------------------------------------

    def _on_control(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "d":
            mirror = self._mirrors.get(str(message.get("r")))
            if mirror is not None and mirror.generation.outcome is None:
                text = message.get("d")
                if isinstance(text, str) and text:
                    mirror.generation.publish(text)
                mirror.ready.set()
        elif kind == "e":
            mirror = self._mirrors.get(str(message.get("r")))
            if mirror is not None:
                error = message.get("e")
                self._end(mirror, Outcome(
                    status=str(message.get("s")),
                    text=mirror.generation.text,
                    error=ChatError(str(error[0]), str(error[1])) if isinstance(error, list) else None,
                    cancelled=bool(message.get("c")),
                ))
        elif kind == "stop":
            generation = self._by_session.get(str(message.get("s")))
            if generation is not None and generation.message_id == message.get("m"):
                generation.cancel("user")
        elif kind == "follow":
            self._start_relay(message)
        elif kind == "unfollow":
            relay = self._relays.pop(str(message.get("r")), None)
            if relay is not None:
                relay.close()
                self._detach(relay.generation, relay)
        elif kind == "gone":
            mirror = self._mirrors.get(str(message.get("r")))
            if mirror is not None:
                self._spawn(self._end_from_store(mirror))

    def _start_relay(self, message: dict[str, Any]) -> None:
        token, node_id = str(message.get("r")), str(message.get("n"))
        generation = self._by_message.get(str(message.get("m")))
        if generation is None or generation.outcome is not None or len(self._relays) >= MAX_RELAYS:
            self._spawn(self._send_quietly(node_id, {"t": "gone", "r": token}))
            return
        previous = self._relays.pop(token, None)
        if previous is not None:
            previous.generation.detach(previous)
            previous.close()
        relay = RelayListener(self, node_id, token, generation)
        try:
            generation.attach(relay, generation.length)
        except ChatError:  # the answer has all the listeners it may have: the follower ends from the store
            relay.close()
            self._spawn(self._send_quietly(node_id, {"t": "gone", "r": token}))
            return
        self._relays[token] = relay

    # --- follower side ----------------------------------------------------------------

    def _end(self, mirror: Mirror, outcome: Outcome) -> None:
        self._forget(mirror)
        mirror.ready.set()
        if mirror.generation.outcome is None:
            mirror.generation.end(outcome)

    def _forget(self, mirror: Mirror) -> None:
        if self._mirrors.get(mirror.token) is mirror:
            del self._mirrors[mirror.token]
        if self._mirrors_by_message.get(mirror.generation.message_id) is mirror:
            del self._mirrors_by_message[mirror.generation.message_id]

    async def _end_from_store(self, mirror: Mirror) -> None:
        """The generating node is gone: end the mirror with the stored text and status."""
        if mirror.generation.outcome is not None:
            return
        generation = mirror.generation
        try:
            found = await self.store.get_message(generation.message_id)
        except StoreError as exc:
            log.error("answer %s: store failure while ending a follower: %s", generation.message_id, exc)
            found = None
        if generation.outcome is not None:  # the relay's ending came meanwhile
            return
        if found is None:
            self._end(mirror, Outcome("error", generation.text, ChatError("internal_error", "The answer was lost.")))
            return
        stored = Generation.from_stored(*found)
        text = stored.text
        if len(text) > generation.length and text.startswith(generation.text):
            generation.publish(text[generation.length:])
        assert stored.outcome is not None
        self._end(mirror, Outcome(stored.outcome.status, generation.text, stored.outcome.error))

    async def _watch_mirrors(self) -> None:
        """Every TTL/3, one MGET: a mirror whose answer has no pointer twice in a row ends from the store."""
        failing = False
        while True:
            await asyncio.sleep(self.ttl_seconds / 3)
            mirrors = list(self._mirrors.values())
            if not mirrors:
                continue
            try:
                pointers = await self.redis.mget([self._keys.message(m.generation.message_id) for m in mirrors])
            except REDIS_FAILURES as exc:
                if not failing:
                    log.error("cannot check followed answers: %s", exc)
                failing = True
                continue
            failing = False
            for mirror, pointer in zip(mirrors, pointers, strict=True):
                # twice: a normal ending releases the pointer just before its relayed ending arrives
                mirror.missing = 0 if pointer is not None else mirror.missing + 1
                if mirror.missing >= 2:
                    self._spawn(self._end_from_store(mirror))

    # --- helpers ----------------------------------------------------------------------

    async def _send_quietly(self, node_id: str, message: dict[str, Any]) -> None:
        try:
            await self.control.send(node_id, message)
        except ClusterUnavailable as exc:
            log.warning("control message to node %r not sent: %s", node_id, exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
