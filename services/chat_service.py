"""Chat orchestration shared by every transport.

Validation, authentication, ownership, rate limits, busy sessions, conversation context,
persistence and cancellation all live here; transports only translate their wire format
into these calls and render the events they get back through a GenerationListener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from services.ai.base import ChatProvider, UsageReport
from services.auth import TokenVerifier
from services.chat_request import MESSAGE_ID, check_session_id, new_id, parse_chat_message
from services.errors import ChatError, UpstreamError
from services.generation import MAX_ANSWER_CHARS, Generation, GenerationListener, Outcome
from services.log_context import ANSWER_IDS
from services.metrics import ChatMetrics
from services.rate_limiter import USER_KEY_PREFIX, Limiter, RateStatus, address_key
from services.store.base import (
    STATUS_COMPLETE,
    STATUS_ERROR,
    STATUS_PARTIAL,
    ChatStore,
    Fence,
    FencedOut,
    FinishedMessage,
    NewTurn,
    OwnershipConflict,
    SessionRecord,
    SessionSummary,
    StoreError,
)
from services.store.health import StoreHealth

if TYPE_CHECKING:
    from services.cluster.coordinator import ClusterCoordinator
    from services.cluster.locks import HeldLock

log = logging.getLogger("aichat.chat")
T = TypeVar("T")

# A fast upstream can hand over many chunks without the event loop getting a turn;
# give it back at least this often so every stream keeps moving.
FAIR_SLICE_SECONDS = 0.002

# Longest wait for the final store write of an answer.
STORE_FINISH_SECONDS = 10

NOT_FOUND = "No such session."
STORE_FAILED = "The conversation could not be saved; please try again."


@dataclass(frozen=True, slots=True)
class ChatPolicy:
    system_prompt: str
    max_history_messages: int
    max_message_chars: int
    on_client_disconnect: str  # finish | cancel
    authenticated_limit: int
    anonymous_limit: int
    checkpoint_seconds: float


#: a Socket.IO message without a `token` field (as opposed to `token: null`, anonymous)
NO_TOKEN: object = object()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the credentials as the transport received them, and where from."""

    client_ip: str
    #: HTTP `Authorization` header, when the transport is HTTP
    authorization: str | None = None
    #: the token a Socket.IO message carried: it wins; None (`token: null`) is anonymous
    token: object = NO_TOKEN
    #: the token given once in the Socket.IO handshake, used when the message has none
    handshake_token: object = None
    #: the user an embedding host's own login named; when set, no token is looked at
    host_user: str | None = None
    #: which transport asks ("sse" or "socketio"): the label of its answers in the metrics
    transport: str = "sse"


@dataclass(frozen=True, slots=True)
class StartedChat:
    generation: Generation
    rate: RateStatus


class ChatService:
    def __init__(
        self,
        *,
        provider: ChatProvider,
        store: ChatStore,
        verifier: TokenVerifier,
        limiter: Limiter,
        policy: ChatPolicy,
        store_health: StoreHealth | None = None,
        metrics: ChatMetrics | None = None,
        cluster: ClusterCoordinator | None = None,
    ) -> None:
        """``cluster``: cluster mode (the limiter is then the shared Redis one)."""
        self.provider = provider
        self.metrics = metrics if metrics is not None else ChatMetrics(enabled=False)
        self.store = store
        self.verifier = verifier
        self.limiter = limiter
        self.policy = policy
        #: recent write failures: /readyz and the chat path look at it
        self.store_health = store_health if store_health is not None else StoreHealth()
        self.accepting = True
        self._grace_cut = asyncio.Event()
        self._by_session: dict[str, Generation] = {}
        self._by_message: dict[str, Generation] = {}
        self.cluster = cluster
        if cluster is not None:
            cluster.bind(self._by_session, self._by_message, self.detach)

    # --- identity -------------------------------------------------------------------

    def identify(self, caller: Caller) -> str | None:
        """The caller's user id, None for anonymous; ChatError `invalid_token` for a bad token."""
        if caller.host_user is not None:
            return caller.host_user
        if caller.authorization is not None:
            return self.verifier.user_from_authorization(caller.authorization)
        return self.verifier.user_id(caller.handshake_token if caller.token is NO_TOKEN else caller.token)

    async def rate_status(self, caller: Caller) -> RateStatus | None:
        """The caller's chat budget, without using any (a bad token counts as its address).

        None when it cannot be known (cluster mode with Redis away).
        """
        try:
            user = self.identify(caller)
        except ChatError:
            user = None
        return await self._peek(*self._rate_key(user, caller))

    async def _peek(self, key: str, limit: int) -> RateStatus | None:
        try:
            return await self.limiter.peek(key, limit)
        except Exception as exc:  # the shared limiter's Redis is away: answer without the headers
            log.debug("rate limit unknown: %s", exc)
            return None

    def _rate_key(self, user: str | None, caller: Caller) -> tuple[str, int]:
        if user is not None:
            return USER_KEY_PREFIX + user, self.policy.authenticated_limit
        return "ip:" + address_key(caller.client_ip), self.policy.anonymous_limit

    # --- chat -----------------------------------------------------------------------

    async def start_chat(self, payload: object, caller: Caller, listener: GenerationListener) -> StartedChat:
        """Check a chat message and start generating its answer, delivered to ``listener``.

        Raises ChatError (with ``rate`` set when the caller is known) before anything starts.
        """
        try:
            return await self._start_chat(payload, caller, listener)
        except ChatError as error:
            self.metrics.refused(error.code)
            raise

    async def _start_chat(self, payload: object, caller: Caller, listener: GenerationListener) -> StartedChat:
        try:
            user = self.identify(caller)
        except ChatError as error:
            error.rate = await self.rate_status(caller)
            raise
        rate_key, limit = self._rate_key(user, caller)
        held: HeldLock | None = None
        message_id = new_id()
        try:
            request = parse_chat_message(payload, self.policy.max_message_chars)
            if not self.accepting:
                raise ChatError("unavailable", "The server is shutting down; please retry shortly.")
            self._check_not_running(request.session_id, user)
            context = None
            if request.session_id_given:
                context = await self._store_call(
                    self.store.load_context(request.session_id, self.policy.max_history_messages)
                )
                # writing needs the same owner: an owned session is its owner's alone, and a
                # user's words must not land in an anonymous one, readable by anyone with the id
                if context is not None and context.owner != user:
                    raise ChatError("not_found", NOT_FOUND)
                self._check_not_running(request.session_id, user)  # another request may have won the race
                if not self.accepting:  # shutdown began meanwhile
                    raise ChatError("unavailable", "The server is shutting down; please retry shortly.")
            if self.cluster is not None:
                # busy across nodes: the one lock in Redis decides, whichever node asks; the
                # same call uses the budget (rate_limited raised there)
                # the owner is the caller: an existing session's owner was checked to be it
                held = await self.cluster.claim(request.session_id, message_id, user, user, rate_key, limit)
                self._check_not_running(request.session_id, user)
                assert held.rate is not None
                rate = held.rate
            else:
                rate = await self._acquire(rate_key, limit)
            if not rate.allowed:
                raise ChatError("rate_limited", "Too many messages; please wait before sending more.",
                                retry_after=rate.retry_after)
        except asyncio.CancelledError:
            if held is not None:  # cancelled from outside after the claim: stop renewing it
                self.cluster.abandon(held)  # type: ignore[union-attr]
            raise
        except ChatError as error:
            if held is not None:
                await self.cluster.release(held)  # type: ignore[union-attr]
            if error.rate is None:
                error.rate = await self._peek(rate_key, limit)
            raise

        owner = user  # an existing session's owner is the caller's (checked above)
        generation = Generation(request.session_id, message_id, owner, time.monotonic())
        self._by_session[generation.session_id] = generation
        self._by_message[generation.message_id] = generation
        self.metrics.answer_started()
        generation.attach(listener)
        messages = [{"role": "system", "content": self.policy.system_prompt}] if self.policy.system_prompt else []
        if context is not None:
            messages.extend({"role": m.role, "content": m.content} for m in context.messages)
        messages.append({"role": "user", "content": request.message})
        turn = NewTurn(
            session_id=generation.session_id,
            owner=owner,
            user_message_id=new_id(),
            user_content=request.message,
            assistant_message_id=generation.message_id,
            model=self.provider.model,
            created_at=datetime.now(UTC),
            fence=held.fence if held is not None else None,
        )
        generation.task = asyncio.create_task(self._generate(generation, turn, messages, caller.transport, held))
        return StartedChat(generation, rate)

    async def _acquire(self, key: str, limit: int) -> RateStatus:
        try:
            return await self.limiter.acquire(key, limit)
        except ChatError:
            raise
        except Exception as exc:  # the shared limiter's Redis is away
            log.error("rate limit unavailable: %s", exc)
            raise ChatError("unavailable", "The service is temporarily unavailable; please retry shortly.") from None

    def detach(self, generation: Generation, listener: GenerationListener) -> None:
        """A client stopped listening (went away); apply `on_client_disconnect`."""
        left = generation.detach(listener)
        if self.cluster is not None and self.cluster.detached(generation):
            return  # a follower of another node's answer: never cancels it
        if left == 0 and self.policy.on_client_disconnect == "cancel":
            generation.cancel("disconnect")

    async def cancel(self, session_id: object, caller: Caller) -> Generation:
        """Stop the answer being generated for a session (`not_found` if none is yours)."""
        user = self.identify(caller)
        session_id = check_session_id(session_id)
        generation = self._by_session.get(session_id)
        if generation is None and self.cluster is not None:
            holder = await self.cluster.stop_remote(session_id, user)  # generated by another node?
            if holder is not None:
                return Generation(holder.session_id, holder.message_id, holder.owner, 0.0)
        if generation is None or not self._may_access(generation.owner, user):
            raise ChatError("not_found", "No answer is being generated for this session.")
        generation.cancel("user")
        return generation

    async def resume(
        self, message_id: object, after_seq: object, caller: Caller, listener: GenerationListener
    ) -> Generation:
        """Re-attach to an answer after ``after_seq``: live if still generating, else the stored one."""
        user = self.identify(caller)
        if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
            raise ChatError("invalid_request", "messageId is missing or malformed.")
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ChatError("invalid_request", "afterSeq must be a whole number, 0 or more.")
        generation = self._by_message.get(message_id)
        if generation is not None:
            if not self._may_access(generation.owner, user):
                raise ChatError("not_found", "No such message.")
            generation.attach(listener, after_seq)
            return generation
        if self.cluster is not None:
            mirror = await self.cluster.follow(message_id, user)  # generated by another node?
            if mirror is not None:
                mirror.attach(listener, after_seq)
                return mirror
        found = await self._store_call(self.store.get_message(message_id))
        if found is None or found[0].role != "assistant" or not self._may_access(found[1], user):
            raise ChatError("not_found", "No such message.")
        generation = Generation.from_stored(*found)
        generation.attach(listener, after_seq)
        return generation

    # --- history --------------------------------------------------------------------

    async def get_session(self, session_id: object, caller: Caller) -> SessionRecord:
        user = self.identify(caller)
        session = await self._store_call(self.store.get_session(check_session_id(session_id)))
        if session is None or not self._may_access(session.owner, user):
            raise ChatError("not_found", NOT_FOUND)
        return session

    async def list_sessions(self, caller: Caller) -> list[SessionSummary]:
        user = self.identify(caller)
        if user is None:
            raise ChatError("invalid_token", "Listing sessions needs a token.")
        return await self._store_call(self.store.list_sessions(user))

    async def delete_session(self, session_id: object, caller: Caller) -> None:
        user = self.identify(caller)
        session_id = check_session_id(session_id)
        exists, owner = await self._store_call(self.store.get_owner(session_id))
        if not exists or not self._may_access(owner, user):
            raise ChatError("not_found", NOT_FOUND)
        running = self._by_session.get(session_id)
        if running is not None:
            running.cancel("user")
            await asyncio.wait({running.task} if running.task else set())
        elif self.cluster is not None:
            # an answer on another node stops too, and is written before the session goes: its
            # node frees the session after that write (the write of a node that takes longer
            # updates rows that are gone: it brings nothing back)
            holder = await self.cluster.stop_remote(session_id, user)
            if holder is not None and not await self.cluster.wait_released(holder, STORE_FINISH_SECONDS + 1):
                log.warning("session %s: deleted while another node's answer still held it", session_id)
        await self._store_call(self.store.delete_session(session_id))

    async def ready(self) -> bool:
        """Whether to send traffic here: the store answers, has not failed to write lately, and
        no shutdown has begun."""
        if not self.accepting or not self.store_health.healthy:
            return False
        try:
            await asyncio.wait_for(self.store.ping(), timeout=5)
        except (StoreError, TimeoutError):
            return False
        return self.cluster is None or await self.cluster.ready()

    # --- lifecycle ------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._by_session)

    async def shutdown(self, grace_seconds: float) -> None:
        """Refuse new chats, let running answers finish for ``grace_seconds``, cancel the rest."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        cut = asyncio.ensure_future(self._grace_cut.wait())
        # a loop, not one snapshot: a chat that was being set up when shutdown began registers late
        while self._by_session and loop.time() < deadline and not cut.done():
            tasks = {g.task for g in self._by_session.values() if g.task is not None}
            log.info("waiting up to %.1fs for %d answer(s) to finish", deadline - loop.time(), len(tasks))
            await asyncio.wait(tasks | {cut}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        cut.cancel()
        if self._by_session:
            log.info("cancelling %d answer(s) still running; their text so far is kept", len(self._by_session))
            for generation in list(self._by_session.values()):
                generation.cancel("shutdown")
            tasks = {g.task for g in self._by_session.values() if g.task is not None}
            await asyncio.wait(tasks, timeout=STORE_FINISH_SECONDS + 1)

    def cut_grace(self) -> None:
        """End the shutdown grace now (a second SIGTERM/SIGINT): cancel and store what runs."""
        self._grace_cut.set()

    # --- internals ------------------------------------------------------------------

    @staticmethod
    def _may_access(owner: str | None, user: str | None) -> bool:
        return owner is None or owner == user

    def _check_not_running(self, session_id: str, user: str | None) -> None:
        """`busy` while an answer is being generated; `not_found` if you may not write into it."""
        running = self._by_session.get(session_id)
        if running is None:
            return
        if running.owner != user:  # the write rule of start_chat, for a session not stored yet
            raise ChatError("not_found", NOT_FOUND)
        raise ChatError("busy", "An answer for this session is still being generated.")

    @staticmethod
    async def _store_call(operation: Awaitable[T]) -> T:
        try:
            return await operation
        except StoreError as exc:
            log.error("store failure: %s", exc)
            raise ChatError("internal_error", "The conversation store is unavailable; please try again.") from None

    async def _generate(
        self,
        generation: Generation,
        turn: NewTurn,
        messages: list[dict[str, str]],
        transport: str,
        held: HeldLock | None = None,
    ) -> None:
        generation.started = True
        ANSWER_IDS.set((generation.session_id, generation.message_id))  # this task's own context
        started = time.monotonic()
        usage = UsageReport()
        # The user message is written while the upstream works on its first token.
        begun = asyncio.create_task(self._begin_turn(generation, turn))
        # If that write fails, stop the upstream call at once instead of at its first token.
        begun.add_done_callback(lambda task: task.cancelled() or task.exception() is None or generation.cancel("store"))
        ttft_ms: float | None = None
        error: ChatError | None = None
        checkpointing: asyncio.Task[None] | None = None
        try:
            if not self.store_health.healthy:
                # The store failed lately: store the question before calling the upstream, so a
                # full disk does not cost an upstream call per message. While healthy the two
                # overlap: awaiting first would add the write to every answer's first token
                # (SQLite: median 0.12 ms, p99 5 ms; MongoDB: a network round trip).
                await asyncio.shield(begun)
            # a cancel that came before this task ran is only noted (see Generation.cancel)
            if generation.cancel_requested is None:
                async with contextlib.aclosing(self.provider.stream(messages, usage)) as deltas:
                    slice_start = next_checkpoint = time.monotonic()
                    async for delta in deltas:
                        if ttft_ms is None:
                            # stored before the first frame is sent; shielded so that a cancel
                            # meanwhile stops the answer, not the write of the question
                            await asyncio.shield(begun)
                            ttft_ms = (time.monotonic() - started) * 1000
                            next_checkpoint = time.monotonic() + self.policy.checkpoint_seconds
                        generation.publish(delta)
                        if generation.length > MAX_ANSWER_CHARS:
                            raise UpstreamError("upstream_error", f"answer longer than {MAX_ANSWER_CHARS} characters")
                        now = time.monotonic()
                        if now >= next_checkpoint:
                            next_checkpoint = now + self.policy.checkpoint_seconds
                            if checkpointing is None or checkpointing.done():
                                checkpointing = asyncio.create_task(self._checkpoint(generation, turn.fence))
                        if now - slice_start > FAIR_SLICE_SECONDS:
                            await asyncio.sleep(0)
                            slice_start = time.monotonic()
            await asyncio.shield(begun)
        except asyncio.CancelledError:
            if generation.cancel_requested is None:
                # not ours (the loop or a host is tearing tasks down): forget the answer at
                # once, without awaiting anything, and let the cancellation propagate
                self._by_session.pop(generation.session_id, None)
                self._by_message.pop(generation.message_id, None)
                if held is not None:
                    self.cluster.abandon(held)  # type: ignore[union-attr]
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except UpstreamError as exc:
            log.warning("answer %s: upstream %s: %s", generation.message_id, exc.code, exc.detail)
            error = exc
        except OwnershipConflict:
            error = ChatError("not_found", NOT_FOUND)
        except StoreError:  # logged by _begin_turn
            error = ChatError("internal_error", STORE_FAILED)
        except Exception:
            log.exception("answer %s: unexpected failure", generation.message_id)
            error = ChatError("internal_error", "The answer failed unexpectedly.")
        try:
            await self._finish(generation, begun, checkpointing, usage, ttft_ms, error, held)
        finally:
            self.metrics.answer_ended(
                transport,
                generation.outcome.status if generation.outcome is not None else STATUS_ERROR,
                duration_seconds=time.monotonic() - generation.created_at,
                ttft_seconds=None if ttft_ms is None else ttft_ms / 1000,
                # the deltas relayed, counted once here: nothing is recorded per chunk
                chunks=len(generation.deltas),
                tokens=usage.tokens,
            )

    async def _begin_turn(self, generation: Generation, turn: NewTurn) -> None:
        """Store the question; a failure is logged here, once, and marks the store unhealthy."""
        try:
            await self.store.begin_turn(turn)
        except OwnershipConflict:
            log.info("answer %s: session taken by another caller meanwhile", generation.message_id)
            raise
        except FencedOut as exc:  # not a store failure: this node lost the session's lock
            log.error("answer %s: not stored, the session moved on: %s", generation.message_id, exc)
            raise
        except StoreError as exc:
            self.store_health.write_failed()
            log.error("answer %s: could not store the user message: %s", generation.message_id, exc)
            raise
        except Exception as exc:
            self.store_health.write_failed()
            log.exception("answer %s: could not store the user message", generation.message_id)
            raise StoreError(type(exc).__name__) from exc
        self.store_health.write_succeeded()

    async def _checkpoint(self, generation: Generation, fence: int | None) -> None:
        try:
            await self.store.checkpoint(
                generation.message_id, generation.text,
                None if fence is None else Fence(generation.session_id, fence),
            )
        except FencedOut as exc:  # not a store failure: this node lost the session's lock
            log.warning("answer %s: checkpoint refused, the session moved on: %s", generation.message_id, exc)
        except StoreError as exc:
            self.store_health.write_failed()
            log.warning("answer %s: checkpoint failed: %s", generation.message_id, exc)
        except Exception:
            self.store_health.write_failed()
            log.exception("answer %s: checkpoint failed", generation.message_id)

    async def _finish(
        self,
        generation: Generation,
        begun: asyncio.Task[None],
        checkpointing: asyncio.Task[None] | None,
        usage: UsageReport,
        ttft_ms: float | None,
        error: ChatError | None,
        held: HeldLock | None = None,
    ) -> None:
        generation.finishing = True  # from here on a cancel changes nothing
        text = generation.text
        cancelled = generation.cancel_requested is not None
        if error is None and not cancelled:
            status = STATUS_COMPLETE
        else:
            status = STATUS_PARTIAL if text else STATUS_ERROR
        stored = False
        try:
            async with asyncio.timeout(STORE_FINISH_SECONDS):  # a hung store must not pin the session
                if not begun.done():
                    await asyncio.wait({begun})
                if not begun.cancelled() and begun.exception() is None:
                    if checkpointing is not None:
                        await asyncio.wait({checkpointing})  # must not land after the final text
                    await self.store.finish_message(
                        FinishedMessage(
                            message_id=generation.message_id,
                            session_id=generation.session_id,
                            content=text,
                            status=status,
                            finished_at=datetime.now(UTC),
                            usage=usage.tokens,
                            ttft_ms=ttft_ms,
                            fence=held.fence if held is not None else None,
                        )
                    )
                    stored = True
                    self.store_health.write_succeeded()
        except FencedOut as exc:
            # this node lost the session's lock (paused past its TTL): the newer answer stays
            log.error("answer %s: not stored, the session moved on: %s", generation.message_id, exc)
        except (StoreError, TimeoutError) as exc:
            self.store_health.write_failed()
            log.error("answer %s: could not store the answer: %s", generation.message_id, exc or "timed out")
        except Exception:
            self.store_health.write_failed()
            log.exception("answer %s: could not store the answer", generation.message_id)
        finally:
            if not stored and error is None:
                taken = begun.done() and not begun.cancelled() and isinstance(begun.exception(), OwnershipConflict)
                error = ChatError("not_found", NOT_FOUND) if taken else ChatError("internal_error", STORE_FAILED)
            self._by_session.pop(generation.session_id, None)
            self._by_message.pop(generation.message_id, None)
            if held is not None:  # the session is free before its closing frame
                await self.cluster.release(held)  # type: ignore[union-attr]
            generation.end(Outcome(status=status, text=text, error=error, cancelled=cancelled and error is None))
