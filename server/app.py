"""One place that assembles the application: services, handlers, routes."""

from __future__ import annotations

from dataclasses import dataclass

import socketio
import tornado.web

from handlers.api_base import NotFoundHandler
from handlers.chat_stream import ChatStreamHandler, ResumeStreamHandler
from handlers.health import HealthHandler, ReadyHandler
from handlers.sessions import CancelHandler, SessionHandler, SessionListHandler
from server.components import build_chat_service, build_provider, build_store
from server.settings import Settings
from server.socketio_server import MAX_FRAME_BYTES, build_socketio
from services.ai.base import ChatProvider
from services.chat_service import ChatService
from services.store.base import ChatStore

SESSION_ID = r"([^/]+)"


@dataclass
class Application:
    settings: Settings
    provider: ChatProvider
    store: ChatStore
    chat: ChatService
    sio: socketio.AsyncServer
    web: tornado.web.Application

    async def open(self) -> None:
        await self.store.open()
        if self.chat.cluster is not None:
            await self.chat.cluster.start()

    async def close(self) -> None:
        if self.chat.cluster is not None:
            await self.chat.cluster.close()
        await self.provider.close()
        await self.store.close()


def build_application(settings: Settings, store: ChatStore | None = None) -> Application:
    """Assemble everything from ``settings``; ``store`` replaces the configured one (tests)."""
    provider = build_provider(settings)
    store = store if store is not None else build_store(settings)
    chat = build_chat_service(settings, provider, store)
    sio, socketio_handler = build_socketio(settings, chat)
    server = settings.server
    api = {"chat": chat, "cors_origins": server.cors_origins}
    stream = {**api, "heartbeat_seconds": server.heartbeat_seconds, "max_body_bytes": server.max_body_bytes}
    web = tornado.web.Application(
        [
            (r"/api/v2/ai/chat/stream", ChatStreamHandler, stream),
            (r"/api/v2/ai/chat/stream/" + SESSION_ID, ResumeStreamHandler, stream),
            (r"/api/v2/ai/chat/sessions", SessionListHandler, api),
            (r"/api/v2/ai/chat/sessions/" + SESSION_ID + r"/cancel", CancelHandler, api),
            (r"/api/v2/ai/chat/sessions/" + SESSION_ID, SessionHandler, api),
            (r"/healthz", HealthHandler, api),
            (r"/readyz", ReadyHandler, api),
            (r"/socket.io/", socketio_handler),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=api,
        websocket_max_message_size=MAX_FRAME_BYTES,
        compress_response=False,
    )
    return Application(settings, provider, store, chat, sio, web)
