"""The provider used when no model is configured: an honest canned answer, streamed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from services.ai.base import UsageReport

DEMO_ANSWER = (
    "Hello! This server is running in demo mode: no AI model is configured, so this is a "
    "canned answer streamed word by word to show that streaming works. To get real answers, "
    "set OPENAI_API_KEY (and optionally OPENAI_MODEL), or point OPENAI_BASE_URL at any "
    "OpenAI-compatible server such as Ollama, vLLM, llama.cpp or LM Studio, then restart. "
    "You said: "
)

_WORDS = re.compile(r"\S+\s*|\s+")


class DemoProvider:
    name = "demo"

    def __init__(self, chunk_delay_seconds: float = 0.03) -> None:
        self.model = "demo"
        self._delay = chunk_delay_seconds

    async def stream(self, messages: list[dict[str, str]], usage: UsageReport) -> AsyncIterator[str]:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        answer = DEMO_ANSWER + f"“{last_user[:200]}”"
        for word in _WORDS.findall(answer):
            await asyncio.sleep(self._delay)
            yield word
        usage.tokens = None

    async def close(self) -> None:
        return None
