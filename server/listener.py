"""Accepting connections without running out of file descriptors.

Tornado's accept loop re-raises EMFILE ("Too many open files"): asyncio then logs a
traceback per attempt, and since the pending connection stays in the backlog the loop
spins on it. Here connections past ``max_connections`` are closed at once, an accept error
pauses accepting briefly, and both are logged as one line per interval with a count.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.ioloop

from server.throttled_log import ThrottledLog

log = logging.getLogger("aichat.listener")

# Share of the soft open-file limit that connections may take when max_connections = 0;
# the rest stays for the store, upstream connections, logs...
DEFAULT_CONNECTION_SHARE = 0.8
# Connections accepted per readiness event (Tornado's heuristic is its listen backlog)
ACCEPTS_PER_EVENT = 128
# How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM (while it lasts, new
# connections wait in the kernel's backlog instead of spinning the loop)
ACCEPT_PAUSE_SECONDS = 0.1
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def resolve_max_connections(configured: int) -> int:
    """``configured``, or 80% of the soft RLIMIT_NOFILE when 0."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, int(soft * DEFAULT_CONNECTION_SHARE))


class CountedSocket(socket.socket):
    """An accepted connection that tells its server when it is closed (by its IOStream)."""

    def __init__(self, accepted: socket.socket, on_close: Callable[[], None]) -> None:
        super().__init__(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        self._on_close: Callable[[], None] | None = on_close

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        super().close()


class LimitedHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer that keeps at most ``max_connections`` connections open (websockets included).

    Plain TCP only (the server has no TLS option): an ssl_options wrap would hide the close.
    """

    def initialize(self, *args: Any, max_connections: int = 0, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        self.max_connections = resolve_max_connections(max_connections)
        self.open_connections = 0
        self._refused = ThrottledLog(log, f"connections refused past max_connections ({self.max_connections})")
        self._accept_errors = ThrottledLog(log, "accept failed, accepting paused briefly")

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def _accept_on(self, sock: socket.socket) -> Callable[[], None]:
        """Like tornado.netutil.add_accept_handler, with the limit and quiet errors."""
        io_loop = tornado.ioloop.IOLoop.current()
        state = {"removed": False, "paused": False}

        def resume() -> None:
            if not state["removed"] and state["paused"]:
                state["paused"] = False
                io_loop.add_handler(sock, on_readable, tornado.ioloop.IOLoop.READ)

        def on_readable(fd: Any, events: int) -> None:
            for _ in range(ACCEPTS_PER_EVENT):
                if state["removed"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    self._accept_errors.note(f"{errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}")
                    if exc.errno in _RESOURCE_ERRORS:
                        state["paused"] = True
                        io_loop.remove_handler(sock)
                        io_loop.call_later(ACCEPT_PAUSE_SECONDS, resume)
                    return
                if self.open_connections >= self.max_connections:
                    connection.close()
                    self._refused.note()
                    continue
                self.open_connections += 1
                self._handle_connection(CountedSocket(connection, self._connection_closed), address)

        def remove() -> None:
            if not state["paused"]:
                io_loop.remove_handler(sock)
            state["removed"] = True

        io_loop.add_handler(sock, on_readable, tornado.ioloop.IOLoop.READ)
        return remove

    def _connection_closed(self) -> None:
        self.open_connections -= 1
