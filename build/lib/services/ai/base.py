"""What the chat service needs from a model provider: a stream of text deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class UsageReport:
    """Filled by a provider when the upstream reports token usage (end of stream)."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens: dict[str, int] | None = None


class ChatProvider(Protocol):
    #: shown in the start-up line and stored with each answer
    name: str
    model: str

    def stream(self, messages: list[dict[str, str]], usage: UsageReport) -> AsyncIterator[str]:
        """Yield the answer's text deltas. Raise services.errors.UpstreamError on failure."""
        ...

    async def close(self) -> None: ...
