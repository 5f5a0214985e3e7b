"""One answer being generated, decoupled from the clients watching it.

A generation runs as its own task owned by the chat service; transports attach
listeners to it. A client that goes away only detaches its listener, so the answer can
be finished and stored (`on_client_disconnect = finish`), and a client that comes back
can re-attach from where it was (resume).

Positions: ``seq`` of a delta is the length of the answer, in characters, once that
delta is added. It rises with every non-empty delta, and a client resuming "after seq N"
gets exactly ``text[N:]``, from memory while generating or from the store afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from services.errors import ChatError
from services.store.base import STATUS_ERROR, MessageRecord

log = logging.getLogger("aichat.chat")

# Bounds the in-memory buffer of one answer; an upstream that goes past it is cut off.
MAX_ANSWER_CHARS = 1_000_000

# Clients following one live answer at once (the original stream and its resumes): every
# listener costs a copy of every delta, so a hostile client must not multiply them.
MAX_LISTENERS = 32


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended."""

    status: str  # complete | partial | error (the stored message status)
    text: str
    error: ChatError | None = None
    cancelled: bool = False


class GenerationListener(Protocol):
    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        """Called synchronously for each delta (or a replayed run of them); must not block."""

    def on_end(self, generation: Generation, outcome: Outcome) -> None:
        """Called once, after the last delta."""

    def abort(self, generation: Generation) -> None:
        """End the response at once: the listener failed and is being dropped."""


class Generation:
    __slots__ = (
        "session_id", "message_id", "owner", "deltas", "length", "listeners", "outcome",
        "task", "cancel_requested", "created_at", "finishing", "started",
    )

    def __init__(self, session_id: str, message_id: str, owner: str | None, created_at: float) -> None:
        self.session_id = session_id
        self.message_id = message_id
        self.owner = owner
        self.created_at = created_at
        self.deltas: list[str] = []
        self.length = 0
        self.listeners: list[GenerationListener] = []
        self.outcome: Outcome | None = None
        self.task: asyncio.Task[None] | None = None
        #: why a cancel was asked for: "user", "disconnect", "shutdown" or "store"
        self.cancel_requested: str | None = None
        #: set by the task's first step, and once the final text is being stored
        self.started = False
        self.finishing = False

    @classmethod
    def from_stored(cls, message: MessageRecord, owner: str | None) -> Generation:
        """An answer that already ended, rebuilt from the store so it can be replayed."""
        generation = cls(message.session_id, message.id, owner, 0.0)
        if message.content:
            generation.deltas.append(message.content)
            generation.length = len(message.content)
        error = ChatError("upstream_error", "The answer failed.") if message.status == STATUS_ERROR else None
        generation.outcome = Outcome(status=message.status, text=message.content, error=error)
        return generation

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def publish(self, delta: str) -> None:
        self.deltas.append(delta)
        self.length += len(delta)
        for listener in self.listeners:
            try:
                listener.on_delta(self, self.length, delta)
            except Exception:
                self._drop(listener)

    def end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                listener.on_end(self, outcome)
            except Exception:
                log.exception("answer %s: a listener failed at the end", self.message_id)
                self._abort(listener)

    def attach(self, listener: GenerationListener, after_seq: int = 0) -> None:
        """Start delivering to ``listener``, first replaying what came after ``after_seq``.

        ChatError `busy` when MAX_LISTENERS clients already follow this live answer.
        """
        if self.outcome is None and len(self.listeners) >= MAX_LISTENERS:
            raise ChatError("busy", "Too many clients are following this answer; close one and retry.")
        if after_seq < self.length:
            listener.on_delta(self, self.length, self.text[after_seq:])
        if self.outcome is not None:
            listener.on_end(self, self.outcome)
        else:
            self.listeners.append(listener)

    def _drop(self, listener: GenerationListener) -> None:
        # one client's broken transport must not fail the answer for the others
        log.exception("answer %s: dropping a listener that failed", self.message_id)
        self.listeners = [other for other in self.listeners if other is not listener]
        self._abort(listener)

    def _abort(self, listener: GenerationListener) -> None:
        # a dropped listener must still end its response, or its client waits forever
        try:
            listener.abort(self)
        except Exception:
            log.exception("answer %s: a dropped listener could not end its response", self.message_id)

    def detach(self, listener: GenerationListener) -> int:
        """Stop delivering to ``listener``; returns how many listeners are left."""
        if listener in self.listeners:
            self.listeners.remove(listener)
        return len(self.listeners)

    def cancel(self, reason: str) -> bool:
        # once the answer is being stored, it ends as it is: a cancel now would cut the store
        # write and leave the session busy
        if self.task is None or self.task.done() or self.finishing:
            return False
        if self.cancel_requested is None:
            self.cancel_requested = reason
            # A task cancelled before its first step never runs its own clean-up (the
            # CancelledError lands before any try:); one not started yet sees the note instead.
            if self.started:
                self.task.cancel()
        return True
