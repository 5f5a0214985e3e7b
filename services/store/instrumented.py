"""A ChatStore that times every operation of another one into the server's metrics.

The chat service talks to this wrapper when metrics are on; store calls happen a few
times per answer (begin, checkpoints every few seconds, finish), never per chunk.
"""

from __future__ import annotations

from services.metrics import ChatMetrics
from services.store.base import (
    ChatStore,
    Fence,
    FinishedMessage,
    MessageRecord,
    NewTurn,
    SessionContext,
    SessionRecord,
    SessionSummary,
)


class InstrumentedStore(ChatStore):
    def __init__(self, inner: ChatStore, metrics: ChatMetrics) -> None:
        self.inner = inner
        self._timed = metrics.timed
        self.description = inner.description

    async def open(self) -> None:
        await self.inner.open()
        self.description = self.inner.description

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def load_context(self, session_id: str, limit: int) -> SessionContext | None:
        return await self._timed("load_context", self.inner.load_context(session_id, limit))

    async def begin_turn(self, turn: NewTurn) -> None:
        await self._timed("begin_turn", self.inner.begin_turn(turn))

    async def checkpoint(self, message_id: str, content: str, fence: Fence | None = None) -> None:
        await self._timed("checkpoint", self.inner.checkpoint(message_id, content, fence))

    async def finish_message(self, finished: FinishedMessage) -> None:
        await self._timed("finish_message", self.inner.finish_message(finished))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._timed("get_session", self.inner.get_session(session_id))

    async def get_owner(self, session_id: str) -> tuple[bool, str | None]:
        return await self._timed("get_owner", self.inner.get_owner(session_id))

    async def get_message(self, message_id: str) -> tuple[MessageRecord, str | None] | None:
        return await self._timed("get_message", self.inner.get_message(message_id))

    async def list_sessions(self, owner: str, limit: int = 100) -> list[SessionSummary]:
        return await self._timed("list_sessions", self.inner.list_sessions(owner, limit))

    async def delete_session(self, session_id: str) -> bool:
        return await self._timed("delete_session", self.inner.delete_session(session_id))
