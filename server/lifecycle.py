"""Start-up, serving, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from dataclasses import dataclass

import tornado.httpserver
import tornado.netutil

from server.app import build_web_application
from server.embedding import ChatServer
from server.listener import LimitedHTTPServer
from server.settings import Settings
from server.socketio_server import MAX_FRAME_BYTES
from services.store.base import ChatStore

log = logging.getLogger("aichat")

# Room for a burst of new connections (Tornado's default is 128).
LISTEN_BACKLOG = 1024

# One SIGTERM to a process group can arrive twice: the one-file executable's launcher
# forwards its own copy to the server. Only a signal this long after the first counts as
# "signal again" (cut the grace short).
REPEAT_SIGNAL_SECONDS = 1.0


@dataclass
class RunningServer:
    app: ChatServer
    http: tornado.httpserver.HTTPServer
    port: int
    stopped: bool = False

    async def shutdown(self, grace_seconds: float) -> None:
        """Refuse new chats, give answers in flight ``grace_seconds``, then close everything."""
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.app.drain(grace_seconds)
            self.http.stop()
            await asyncio.wait_for(self.http.close_all_connections(), timeout=5)
        except TimeoutError:
            log.warning("some connections did not close in time")
        finally:
            await self.app.close()


async def start_server(settings: Settings, store: ChatStore | None = None) -> RunningServer:
    """``settings`` are final (the environment already merged): the ChatServer adds nothing."""
    app = ChatServer(settings, store=store, environ={}, bound_host=settings.server.host)
    await app.start()
    http = LimitedHTTPServer(
        build_web_application(app),
        max_connections=settings.server.max_connections,
        xheaders=settings.server.trust_proxy_headers,
        # sized for /socket.io/ (2 MB frames); every API route lowers it to max_body_bytes
        # for its own requests (ApiHandler.prepare), and answers 413
        max_body_size=MAX_FRAME_BYTES + 65536,
        # reap connections that sit idle between requests, or trickle a request body
        idle_connection_timeout=settings.server.idle_connection_timeout_seconds,
        body_timeout=settings.server.body_timeout_seconds,
    )
    host = settings.server.host
    sockets = tornado.netutil.bind_sockets(
        settings.server.port, host, family=socket.AF_UNSPEC if ":" in host else socket.AF_INET,
        backlog=LISTEN_BACKLOG,
    )
    http.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    log.info("listening on http://%s:%d | %s | event loop %s", host, port, app.describe(), loop)
    return RunningServer(app, http, port)


def tune_garbage_collector() -> None:
    """Keep start-up objects out of the cyclic GC's scans.

    Everything loaded at start-up (the openai SDK's models alone are tens of MB of objects)
    was traversed by every full collection, which stalled every stream. Frozen, they are
    never scanned (measured: TTFC p99 at 50 bursty streams 224 -> ~150 ms on SSE,
    197 -> ~105 ms on Socket.IO, CPU per chunk -10 to -20%). The thresholds stay the
    defaults: raising them made RSS grow round after round in the memory benchmark.
    """
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully. Returns the exit code."""
    running = await start_server(settings)
    tune_garbage_collector()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    first_signal = loop.time()
    log.info("shutting down: no new chats; up to %gs for answers in flight (signal again to stop them now)",
             settings.server.shutdown_grace_seconds)

    def signal_again() -> None:
        if loop.time() - first_signal >= REPEAT_SIGNAL_SECONDS:
            log.info("signalled again: stopping the answers in flight now")
            running.app.cut_grace()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signal_again)
    await running.shutdown(settings.server.shutdown_grace_seconds)
    log.info("stopped")
    return 0
