"""Which answer the running code works for, for log lines (`server.log_format = json`).

Set once when an answer's task starts; a task runs in its own copy of the context, so
every log line of that answer, and only of it, can carry its ids.
"""

from __future__ import annotations

from contextvars import ContextVar

#: (sessionId, messageId) of the answer the current task generates, or None
ANSWER_IDS: ContextVar[tuple[str, str] | None] = ContextVar("aichat_answer_ids", default=None)
