"""The host application's own login, when the chat is embedded (server/embedding.py)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import tornado.httputil

from services.errors import ChatError

log = logging.getLogger("aichat.http")

#: ``identify(request) -> user id or None``, sync or async, given by the host
Identify = Callable[[tornado.httputil.HTTPServerRequest], "str | None | Awaitable[str | None]"]


async def host_user(identify: Identify | None, request: tornado.httputil.HTTPServerRequest) -> str | None:
    """The user the host's ``identify`` names for ``request``; None: the JWT rules decide."""
    if identify is None:
        return None
    try:
        user = identify(request)
        if inspect.isawaitable(user):
            user = await user
    except Exception:
        log.exception("the host's identify() failed")
        raise ChatError("internal_error", "Internal server error.") from None
    if user is None:
        return None
    if not isinstance(user, str) or not user:
        log.error("the host's identify() returned %s, not a user id string or None", type(user).__name__)
        raise ChatError("internal_error", "Internal server error.")
    return user
