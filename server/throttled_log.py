"""Logging for errors a client can cause at will: one line per interval with a count, no traceback."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from server.access_log import loggable

# At most one line per this many seconds for each kind of client-caused error
LOG_INTERVAL_SECONDS = 10.0
# Characters of an error's detail kept (it may quote what the client sent)
MAX_DETAIL = 100


class ThrottledLog:
    """Counts occurrences of one kind of error; logs the first, then at most one line per interval."""

    __slots__ = ("_logger", "_what", "_interval", "_count", "_last_logged")

    def __init__(self, logger: logging.Logger, what: str, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._logger = logger
        self._what = what
        self._interval = interval
        self._count = 0
        self._last_logged = float("-inf")

    def note(self, detail: str = "") -> None:
        """One occurrence; ``detail`` (may be client-controlled) is escaped and cut."""
        self._count += 1
        now = time.monotonic()
        if now - self._last_logged < self._interval:
            return
        since = "" if self._last_logged == float("-inf") else f" in the last {now - self._last_logged:.0f}s"
        self._logger.warning("%s: %d%s%s", self._what, self._count, since,
                             f" (last: {loggable(detail, MAX_DETAIL)})" if detail else "")
        self._count = 0
        self._last_logged = now


def describe(exc: BaseException | None) -> str:
    """An exception as one short line (its type and message), instead of a traceback."""
    if exc is None:
        return ""
    return f"{type(exc).__name__}: {exc}"


class LibraryLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger handed to python-socketio / python-engineio.

    They log per packet: INFO/WARNING lines with the packet's contents (tokens included) and
    a traceback for each packet they fail to decode or dispatch. Here INFO/WARNING are
    dropped, and errors become one throttled line with the exception's type and message.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        super().__init__(logger, {})
        self.errors = ThrottledLog(logger, what)

    # called per packet sent (twice per streamed chunk): one call that does nothing
    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        return None

    info = warning = debug

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.ERROR:
            return None
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = str(msg)
        exc_info = kwargs.get("exc_info")
        if exc_info is True:
            exc_info = sys.exc_info()[1]
        elif isinstance(exc_info, tuple):
            exc_info = exc_info[1]
        error = describe(exc_info) if isinstance(exc_info, BaseException) else ""
        self.errors.note(f"{text} {error}".strip())

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs
