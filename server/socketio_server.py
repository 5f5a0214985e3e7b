"""The Socket.IO server, mounted on the Tornado application at /socket.io/."""

from __future__ import annotations

import socketio
import tornado.websocket

from handlers.socketio_namespace import ChatNamespace
from server.settings import Settings
from services.chat_service import ChatService

# API.md: frames up to 2 MB are read; only beyond that does the transport close.
MAX_FRAME_BYTES = 2 * 1024 * 1024


def build_socketio(settings: Settings, chat: ChatService) -> tuple[socketio.AsyncServer, type]:
    origins = settings.server.cors_origins
    sio = socketio.AsyncServer(
        async_mode="tornado",
        # None = same origin only; "*" = any; else the listed origins
        cors_allowed_origins="*" if "*" in origins else (list(origins) or None),
        max_http_buffer_size=MAX_FRAME_BYTES,
        ping_interval=settings.server.socketio_ping_interval_seconds,
        ping_timeout=settings.server.socketio_ping_timeout_seconds,
        # per-token frames are tiny: compression costs more CPU than it saves
        http_compression=False,
        logger=False,
        engineio_logger=False,
    )
    sio.register_namespace(ChatNamespace(chat))
    base = socketio.get_tornado_handler(sio)

    class SocketIOHandler(base):  # type: ignore[misc, valid-type]
        def check_origin(self, origin: str) -> bool:
            if "*" in origins:
                return True
            if origin in origins:
                return True
            # same origin only (engineio's driver would let any origin upgrade)
            return tornado.websocket.WebSocketHandler.check_origin(self, origin)

        def get_compression_options(self) -> None:
            return None  # no permessage-deflate, see http_compression above

    return sio, SocketIOHandler
