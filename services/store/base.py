"""The store interface the chat service talks to, and the records it exchanges.

A turn is written in three steps, none of them per chunk:
``begin_turn`` (session, user message and an empty assistant placeholder, in one go),
``checkpoint`` every few seconds while a long answer streams, and ``finish_message``
once at the end with the final text and status.

Fencing (cluster mode): each write of a turn may carry the fencing number of the session
lock it was made under. A session remembers the highest number it has seen; a write
carrying a lower one (from a node that lost its lock) is refused with FencedOut, so it
cannot land over the turn of the node that holds the session now. Writes without a
number (one process) are never refused.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime

# Message status values (API.md, Sessions and history).
STATUS_COMPLETE = "complete"
STATUS_PARTIAL = "partial"
STATUS_ERROR = "error"

TITLE_CHARS = 80


class StoreError(Exception):
    """The store did not answer or refused a write; the detail is for the log only."""


class FencedOut(StoreError):
    """A write carried an older fencing number than the session's newest: refused."""


@dataclass(frozen=True, slots=True)
class Fence:
    """The session and fencing number a write is made under (cluster mode)."""

    session_id: str
    number: int


class OwnershipConflict(StoreError):
    """begin_turn found the session owned by someone else (a race between two first messages)."""


@dataclass(frozen=True, slots=True)
class ContextMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a new turn needs to know: who owns the session and its last messages."""

    owner: str | None
    messages: list[ContextMessage]


@dataclass(frozen=True, slots=True)
class NewTurn:
    session_id: str
    owner: str | None
    user_message_id: str
    user_content: str
    assistant_message_id: str
    model: str
    created_at: datetime
    #: the fencing number of the session lock (cluster mode); the session keeps the highest
    fence: int | None = None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: str
    session_id: str
    role: str
    content: str
    status: str
    created_at: datetime
    model: str | None = None
    usage: dict[str, int] | None = None
    ttft_ms: float | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    owner: str | None
    title: str
    created_at: datetime
    updated_at: datetime
    messages: list[MessageRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SessionSummary:
    id: str
    title: str
    updated_at: datetime
    message_count: int


@dataclass(frozen=True, slots=True)
class FinishedMessage:
    message_id: str
    session_id: str
    content: str
    status: str
    finished_at: datetime
    usage: dict[str, int] | None = None
    ttft_ms: float | None = None
    #: refused (FencedOut) when lower than the session's highest fencing number
    fence: int | None = None


def make_title(first_message: str) -> str:
    title = " ".join(first_message.split())
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1] + "…"


class ChatStore(abc.ABC):
    """Sessions and messages. Every method raises StoreError when the store fails."""

    #: what start-up logs about this store (never a secret)
    description: str = ""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema or indexes (idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise StoreError otherwise."""

    @abc.abstractmethod
    async def load_context(self, session_id: str, limit: int) -> SessionContext | None:
        """The session's owner and its last ``limit`` messages, oldest first; None if absent."""

    @abc.abstractmethod
    async def begin_turn(self, turn: NewTurn) -> None:
        """Create the session if new, store the user message and the assistant placeholder.

        With ``turn.fence``: FencedOut if the session has seen a higher number, else the
        session's number becomes ``turn.fence``.
        """

    @abc.abstractmethod
    async def checkpoint(self, message_id: str, content: str, fence: Fence | None = None) -> None:
        """Save the text generated so far of an unfinished assistant message.

        FencedOut if ``fence`` is older than its session's highest number.
        """

    @abc.abstractmethod
    async def finish_message(self, finished: FinishedMessage) -> None:
        """Store the final text and status of an assistant message.

        FencedOut if ``finished.fence`` is older than its session's highest number.
        """

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def get_owner(self, session_id: str) -> tuple[bool, str | None]:
        """Whether the session exists, and its owner (None: anonymous); one cheap lookup."""

    @abc.abstractmethod
    async def get_message(self, message_id: str) -> tuple[MessageRecord, str | None] | None:
        """A message and the owner of its session, or None."""

    @abc.abstractmethod
    async def list_sessions(self, owner: str, limit: int = 100) -> list[SessionSummary]:
        """The owner's sessions, most recently updated first."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages; False if there was none."""
