"""The rules of a chat request (API.md), in one place for every transport."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from services.errors import ChatError

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    message: str
    session_id: str
    #: False when the server made the session id up (the session is certainly new)
    session_id_given: bool


def is_valid_text(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows "\\ud800"; UTF-8 cannot carry it)."""
    if text.isascii():  # O(1): CPython keeps the flag
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def new_id() -> str:
    return str(uuid.uuid4())


def check_session_id(value: object) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise ChatError("invalid_request", "sessionId must be 1 to 128 characters of A-Z, a-z, 0-9, _ and -.")
    return value


def parse_chat_message(payload: object, max_message_chars: int) -> ChatMessage:
    if not isinstance(payload, dict):
        raise ChatError("invalid_request", "The request must be a JSON object with a 'message' field.")
    message = payload.get("message")
    if not isinstance(message, str):
        raise ChatError("invalid_request", "'message' is required and must be a string.")
    if not message.strip():
        raise ChatError("invalid_request", "'message' must not be empty.")
    if len(message) > max_message_chars:
        raise ChatError("invalid_request", f"'message' is longer than {max_message_chars} characters.")
    if not is_valid_text(message):
        raise ChatError("invalid_request", "'message' must be valid Unicode text (it has a lone surrogate).")
    session_id = payload.get("sessionId")
    if session_id is None:
        return ChatMessage(message, new_id(), False)
    return ChatMessage(message, check_session_id(session_id), True)
