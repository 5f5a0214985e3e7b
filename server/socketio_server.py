"""The Socket.IO server, mounted on the Tornado application at /socket.io/."""

from __future__ import annotations

import engineio.packet
import socketio
import tornado.websocket

from handlers.identity import Identify
from handlers.socketio_namespace import ChatNamespace
from server.settings import Settings
from services.chat_service import ChatService

# API.md: frames up to 2 MB are read; only beyond that does the transport close.
MAX_FRAME_BYTES = 2 * 1024 * 1024
# What may wait in a websocket's write buffer before its client counts as gone.
MAX_UNSENT_BYTES = 256 * 1024


class ChatSocketIOServer(socketio.AsyncServer):
    async def _handle_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        await super()._handle_eio_disconnect(eio_sid, reason)
        # A long-polling client that says goodbye still has a GET waiting for packets, and
        # python-engineio leaves it open for ping_interval + ping_timeout (JS engine.io
        # answers it at once): end it with a NOOP, as engineio does itself on upgrade.
        socket = self.eio.sockets.get(eio_sid)
        if reason == self.eio.reason.CLIENT_DISCONNECT and socket is not None and not socket.upgraded:
            socket.queue.put_nowait(engineio.packet.Packet(engineio.packet.NOOP))


def build_socketio(
    settings: Settings, chat: ChatService, identify: Identify | None = None
) -> tuple[socketio.AsyncServer, type]:
    origins = settings.server.cors_origins
    sio = ChatSocketIOServer(
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
    sio.register_namespace(ChatNamespace(chat, identify))
    base = socketio.get_tornado_handler(sio)

    class SocketIOHandler(base):  # type: ignore[misc, valid-type]
        def check_origin(self, origin: str) -> bool:
            if "*" in origins:
                return True
            if origin in origins:
                return True
            # same origin only (engineio's driver would let any origin upgrade)
            return tornado.websocket.WebSocketHandler.check_origin(self, origin)

        def check_xsrf_cookie(self) -> None:
            """Polling POSTs carry Engine.IO packets, not forms: a host app's `xsrf_cookies`
            must not refuse them. Engine.IO checks the Origin itself (cors_allowed_origins)."""

        @property
        def max_message_size(self) -> int:
            # the frame limit of API.md, whatever the (host) application's own setting
            return MAX_FRAME_BYTES

        def get_compression_options(self) -> None:
            return None  # no permessage-deflate, see http_compression above

        async def open(self, *args: str, **kwargs: str) -> None:
            # engineio does not await websocket writes: bound what may pile up for a client
            # that stops reading; past it the write fails and engineio closes the connection
            if self.ws_connection is not None:
                self.ws_connection.stream.max_write_buffer_size = MAX_UNSENT_BYTES  # type: ignore[attr-defined]
            # small frames must leave at once: without this each answer's tail waits ~40 ms
            # for a delayed ACK (Nagle)
            self.set_nodelay(True)
            await super().open(*args, **kwargs)

    return sio, SocketIOHandler
