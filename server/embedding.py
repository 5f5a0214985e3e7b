"""The chat as a component a Tornado application mounts: one assembly path.

``run.py`` serves a ChatServer on its own (server/app.py, server/lifecycle.py); a host
application mounts one (or several) into its own ``tornado.web.Application``::

    chat = ChatServer(settings="settings.ini", identify=current_user_from_cookie)
    app = tornado.web.Application(my_routes + chat.routes(prefix="/chat"), **my_settings)
    await chat.start()
    ...
    await chat.stop(grace_seconds=30)

Everything a ChatServer uses is built here, once, and owned by it: nothing is kept at
module level, so two of them in one process (two prefixes, two stores) do not meet.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import socketio

from handlers.chat_stream import ChatStreamHandler, ResumeStreamHandler
from handlers.health import HealthHandler, ReadyHandler
from handlers.identity import Identify
from handlers.metrics import MetricsHandler
from handlers.sessions import CancelHandler, SessionHandler, SessionListHandler
from handlers.web_ui import web_ui_routes
from server.access_log import quiet_upstream_client_loggers
from server.components import build_chat_service, build_metrics, build_provider, build_store
from server.settings import Settings, load_settings, with_environment
from server.socketio_server import build_socketio
from services.ai.base import ChatProvider
from services.chat_service import ChatService
from services.host_filter import HostFilter
from services.metrics import ChatMetrics
from services.store.base import ChatStore

log = logging.getLogger("aichat.server")

SESSION_ID = r"([^/]+)"
PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")

Route = tuple[str, type, dict[str, Any]] | tuple[str, type]


def resolve_settings(settings: str | Path | Settings | None, environ: Any = None) -> Settings:
    """A path (read like run.py's --config), a Settings object or None (built-in defaults);
    the environment is laid over each, as for run.py."""
    if isinstance(settings, Settings):
        return with_environment(settings, environ)
    return load_settings(Path(settings) if settings is not None else None, environ=environ)


class ChatServer:
    """Chat routes, Socket.IO and the services behind them, for one prefix of a Tornado app.

    ``identify(request) -> user id | None`` (sync or async) lets the host's own login decide
    who the caller is on every chat route and on the Socket.IO handshake; None falls back to
    the JWT rules. ``store`` replaces the configured store (tests); ``environ`` replaces
    ``os.environ`` (None = the process environment); ``bound_host`` is the address the
    serving HTTP server listens on, when known (for the `allowed_hosts` default).
    """

    def __init__(
        self,
        settings: str | Path | Settings | None = None,
        identify: Identify | None = None,
        *,
        store: ChatStore | None = None,
        environ: Any = None,
        bound_host: str = "",
    ) -> None:
        self.settings = resolve_settings(settings, environ)
        self.identify = identify
        # DNS-rebinding guard: `allowed_hosts`, else loopback names only when the server is bound
        # to loopback. Mounted in a host's app the address is the host's own: unknown ("") here,
        # so any Host is served until `allowed_hosts` names them.
        self.host_filter = HostFilter(self.settings.server.allowed_hosts, bound_host)
        #: this server's own Prometheus registry (server.metrics), never the process-wide one
        self.metrics: ChatMetrics = build_metrics(self.settings)
        self.provider: ChatProvider = build_provider(self.settings, self.metrics)
        self.store: ChatStore = store if store is not None else build_store(self.settings)
        self.chat: ChatService = build_chat_service(self.settings, self.provider, self.store, self.metrics)
        self.sio: socketio.AsyncServer
        self.sio, self._socketio_handler = build_socketio(self.settings, self.chat, self.host_filter, identify)
        self._started = False
        self._stopped = False

    @property
    def handler_args(self) -> dict[str, Any]:
        """What every chat handler is given (also for a standalone app's JSON 404)."""
        server = self.settings.server
        return {"chat": self.chat, "cors_origins": server.cors_origins, "identify": self.identify,
                "max_body_bytes": server.max_body_bytes, "host_filter": self.host_filter}

    def routes(self, prefix: str = "") -> list[Route]:
        """Every chat route, the Socket.IO handler and (web_ui) the chat page under ``prefix``
        ("" or "/chat")."""
        prefix = prefix.rstrip("/")
        if not PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be empty or a path like '/chat', not {prefix!r}")
        base = re.escape(prefix)
        api = self.handler_args
        server = self.settings.server
        stream = {**api, "heartbeat_seconds": server.heartbeat_seconds}
        routes: list[Route] = [
            (base + r"/api/v2/ai/chat/stream", ChatStreamHandler, stream),
            (base + r"/api/v2/ai/chat/stream/" + SESSION_ID, ResumeStreamHandler, stream),
            (base + r"/api/v2/ai/chat/sessions", SessionListHandler, api),
            (base + r"/api/v2/ai/chat/sessions/" + SESSION_ID + r"/cancel", CancelHandler, api),
            (base + r"/api/v2/ai/chat/sessions/" + SESSION_ID, SessionHandler, api),
            (base + r"/healthz", HealthHandler, api),
            (base + r"/readyz", ReadyHandler, api),
            (base + r"/socket.io/", self._socketio_handler),
        ]
        if self.metrics.enabled:
            routes.append((base + r"/metrics", MetricsHandler, {"registry": self.metrics.registry,
                           "host_filter": self.host_filter, "max_body_bytes": server.max_body_bytes}))
        if server.web_ui:
            routes += web_ui_routes(prefix, host_filter=self.host_filter, max_body_bytes=server.max_body_bytes)
        return routes

    async def start(self) -> None:
        """Open the store (and, in cluster mode, join the cluster); call before serving. Also
        sets the upstream HTTP clients' loggers to WARNING (their INFO lines carry the
        upstream URL with its query)."""
        quiet_upstream_client_loggers()
        if not self._started:
            await self.store.open()
            self._started = True
            if self.chat.cluster is not None:
                await self.chat.cluster.start()

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Refuse new chats, give answers in flight ``grace_seconds`` (default: the
        `shutdown_grace_seconds` setting), then close Socket.IO, the provider and the store."""
        try:
            await self.drain(grace_seconds)
        finally:
            await self.close()

    async def drain(self, grace_seconds: float | None = None) -> None:
        """stop()'s first half: new chats get `unavailable` (and /readyz 503) while answers in
        flight get their grace, then Socket.IO clients are disconnected; a standalone server
        stops listening only after it."""
        grace = self.settings.server.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        await self.chat.shutdown(grace)
        await self.sio.shutdown()

    async def close(self) -> None:
        """stop()'s second half: the provider and the store."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.chat.cluster is not None and self._started:
                await _bounded("leaving the cluster", self.chat.cluster.close())
            await _bounded("closing the AI provider's connections", self.provider.close())
        finally:
            if self._started:
                await self.store.close()  # not bounded: it writes what is queued

    def cut_grace(self) -> None:
        """End a running stop()'s grace now: answers still running are cancelled and stored."""
        self.chat.cut_grace()

    def describe(self) -> str:
        provider = self.provider
        if provider.name == "demo":
            ai = "AI provider demo (demo mode: no model configured; set OPENAI_API_KEY or OPENAI_BASE_URL)"
        else:
            ai = f"AI provider openai, model {provider.model} at {getattr(provider, 'endpoint', '')}"
        cluster = self.settings.cluster
        # never the Redis URL: it may hold a password
        mode = f" | cluster node {cluster.node_id!r}, keys {cluster.key_prefix}:*" if cluster.enabled else ""
        return f"{ai} | store {self.store.description}{mode}"


#: a closing step that takes longer is abandoned (logged): a stop must end, and what is
#: left (sockets to Redis or the upstream) goes with the process
CLOSE_STEP_SECONDS = 5.0


async def _bounded(step: str, closing: Awaitable[None]) -> None:
    try:
        await asyncio.wait_for(closing, timeout=CLOSE_STEP_SECONDS)
    except TimeoutError:
        log.warning("%s took over %.0fs; left to the process exit", step, CLOSE_STEP_SECONDS)
