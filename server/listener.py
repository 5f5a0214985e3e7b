"""Accepting connections without running out of file descriptors.

Tornado's accept loop re-raises EMFILE ("Too many open files"): asyncio then logs a
traceback per attempt, and since the pending connection stays in the backlog the loop
spins on it. Here connections past ``max_connections`` are closed at once, an accept error
pauses accepting briefly, and both are logged as one line per interval with a count.
"""

from __future__ import annotations

import errno
import logging
import os
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
# Descriptors kept free beyond those open at start-up when max_connections = 0
RESERVED_DESCRIPTORS = 8


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: count nothing
        return 0


def resolve_max_connections(configured: int) -> int:
    """``configured``, or when 0: 80% of the soft RLIMIT_NOFILE, and no more than what the
    descriptors already open at start-up (store, loop, logs) leave, with a small margin."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    left = soft - _open_descriptors() - RESERVED_DESCRIPTORS
    return max(1, min(int(soft * DEFAULT_CONNECTION_SHARE), left))


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
        self._refused = ThrottledLog(log, f"connections closed at once (max_connections {self.max_connections})")
        self._accept_errors = ThrottledLog(log, "accept failed, accepting paused briefly")
        # freed when accept() fails for want of a descriptor, so that the waiting connection
        # can be accepted and closed at once instead of hanging in the backlog
        self._spare_fd: int | None = self._open_spare()

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def _refuse_one(self, sock: socket.socket) -> bool | None:
        """Out of descriptors: use the spare one to accept and close a waiting connection.

        True: one was refused; None: none was waiting (Linux reports EMFILE before it looks
        at the queue); False: accept failed even so.
        """
        if self._spare_fd is None:
            return False
        os.close(self._spare_fd)
        self._spare_fd = None
        refused: bool | None
        try:
            connection, _ = sock.accept()
            connection.close()
            refused = True
        except BlockingIOError:
            refused = None
        except OSError:
            refused = False
        self._spare_fd = self._open_spare()
        return refused

    def stop(self) -> None:
        super().stop()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

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
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        refused = self._refuse_one(sock)
                        if refused is None:
                            return
                        if refused:
                            self._refused.note("out of file descriptors")
                            continue
                    self._accept_errors.note(f"{errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}")
                    if exc.errno in _RESOURCE_ERRORS:
                        state["paused"] = True
                        io_loop.remove_handler(sock)
                        io_loop.call_later(ACCEPT_PAUSE_SECONDS, resume)
                    return
                if self.open_connections >= self.max_connections:
                    connection.close()
                    self._refused.note("max_connections")
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
