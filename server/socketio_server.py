"""The Socket.IO server, mounted on the Tornado application at /socket.io/."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import Any

import engineio
import engineio.packet
import socketio
import tornado.http1connection
import tornado.web
import tornado.websocket

from handlers.identity import Identify
from handlers.socketio_namespace import ChatNamespace
from server.settings import Settings
from server.throttled_log import LibraryLog, ThrottledLog, describe
from services.chat_service import ChatService
from services.host_filter import HostFilter

log = logging.getLogger("aichat.socketio")

# API.md: frames up to 2 MB are read; only beyond that does the transport close.
MAX_FRAME_BYTES = 2 * 1024 * 1024
# What may wait for a client, in a websocket's write buffer or in a long-polling session's
# queue, before that client counts as gone and is closed.
MAX_UNSENT_BYTES = 256 * 1024
# Long-polling Engine.IO sessions open at once per client address (per /64 for IPv6). A
# session costs ~16 KB and holds no connection: a handshake nobody follows lives for
# ping_interval + ping_timeout. Websocket sessions are not counted (each holds a connection,
# which max_connections bounds), nor sessions once upgraded to websocket, so this stays
# generous for a NAT; behind a proxy, set trust_proxy_headers so that the address is the client's.
MAX_POLLING_SESSIONS_PER_ADDRESS = 100


def address_key(ip: str) -> str:
    """The unit the session cap counts by: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _packet_size(item: object) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, str | bytes) else 64


class PacketQueue(asyncio.Queue):  # type: ignore[type-arg]
    """An Engine.IO session's outgoing queue that knows how many bytes wait in it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsent_bytes = 0

    # asyncio.Queue's documented extension points (as PriorityQueue/LifoQueue use them)
    def _put(self, item: Any) -> None:
        super()._put(item)  # type: ignore[misc]
        self.unsent_bytes += _packet_size(item)

    def _get(self) -> Any:
        item = super()._get()  # type: ignore[misc]
        self.unsent_bytes -= _packet_size(item)
        return item


class ChatEngineIOServer(engineio.AsyncServer):
    """Bounds what waits for a long-polling client, as the websocket path is bounded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflows = ThrottledLog(log, "Socket.IO clients closed for not reading their packets")

    def create_queue(self, *args: Any, **kwargs: Any) -> PacketQueue:
        return PacketQueue(*args, **kwargs)

    async def send_packet(self, sid: str, pkt: engineio.packet.Packet) -> None:
        await super().send_packet(sid, pkt)
        socket = self.sockets.get(sid)
        if socket is not None and socket.queue.unsent_bytes > MAX_UNSENT_BYTES:
            # the client stopped polling: close it rather than queue until its ping timeout
            self.overflows.note()
            del self.sockets[sid]
            await socket.close(wait=False, abort=True, reason=self.reason.TRANSPORT_ERROR)
            while not socket.queue.empty():
                socket.queue.get_nowait()
                socket.queue.task_done()
            socket.queue.put_nowait(None)  # ends a GET that may still wait


class ChatSocketIOServer(socketio.AsyncServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: sessions that began on long-polling, per address key (upgraded ones pruned lazily),
        #: and the key of each of them
        self.polling_sessions: dict[str, set[str]] = {}
        self._session_address: dict[str, str] = {}
        self.packet_errors = ThrottledLog(log, "Socket.IO packets refused")

    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return ChatEngineIOServer

    def polling_sessions_from(self, ip: str) -> int:
        """Long-polling sessions open from ``ip``'s address key."""
        sids = self.polling_sessions.get(address_key(ip))
        if sids is None:
            return 0
        if len(sids) >= MAX_POLLING_SESSIONS_PER_ADDRESS:
            # only now look for upgraded ones (each is dropped once: cheap overall)
            for sid in [sid for sid in sids if (s := self.eio.sockets.get(sid)) is None or s.upgraded]:
                sids.discard(sid)
                self._session_address.pop(sid, None)
        return len(sids)

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        request = environ["tornado.handler"].request
        if request.query_arguments.get("transport", [b"polling"]) == [b"polling"]:
            key = address_key(request.remote_ip or "unknown")
            self._session_address[eio_sid] = key
            self.polling_sessions.setdefault(key, set()).add(eio_sid)
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        # a packet python-socketio cannot decode or dispatch (`42[123]`, `42[]`, bad JSON,
        # an unexpected attachment) would otherwise cost a traceback each
        try:
            await super()._handle_eio_message(eio_sid, data)
        except Exception as exc:
            self.packet_errors.note(describe(exc))

    async def _handle_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        key = self._session_address.pop(eio_sid, None)
        sids = self.polling_sessions.get(key) if key is not None else None
        if sids is not None:
            sids.discard(eio_sid)
            if not sids:
                del self.polling_sessions[key]  # type: ignore[arg-type]
        await super()._handle_eio_disconnect(eio_sid, reason)
        # A long-polling client that says goodbye still has a GET waiting for packets, and
        # python-engineio leaves it open for ping_interval + ping_timeout (JS engine.io
        # answers it at once): end it with a NOOP, as engineio does itself on upgrade.
        socket = self.eio.sockets.get(eio_sid)
        if reason == self.eio.reason.CLIENT_DISCONNECT and socket is not None and not socket.upgraded:
            socket.queue.put_nowait(engineio.packet.Packet(engineio.packet.NOOP))


def build_socketio(
    settings: Settings, chat: ChatService, host_filter: HostFilter, identify: Identify | None = None
) -> tuple[socketio.AsyncServer, type]:
    origins = settings.server.cors_origins
    any_origin = "*" in origins
    sio = ChatSocketIOServer(
        async_mode="tornado",
        # None = same origin only; "*" = any; else the listed origins
        cors_allowed_origins="*" if any_origin else (list(origins) or None),
        # with any origin allowed, never with credentials (engineio would echo the Origin
        # with Allow-Credentials: true, letting any site use a visitor's cookies)
        cors_credentials=not any_origin,
        max_http_buffer_size=MAX_FRAME_BYTES,
        ping_interval=settings.server.socketio_ping_interval_seconds,
        ping_timeout=settings.server.socketio_ping_timeout_seconds,
        # per-token frames are tiny: compression costs more CPU than it saves
        http_compression=False,
        # both log per packet (a traceback for each bad one): quieted, see LibraryLog
        logger=LibraryLog(logging.getLogger("aichat.socketio.library"), "Socket.IO errors"),
        engineio_logger=LibraryLog(logging.getLogger("aichat.engineio"), "Engine.IO errors"),
    )
    sio.register_namespace(ChatNamespace(chat, identify))
    base = socketio.get_tornado_handler(sio)
    websocket_errors = ThrottledLog(log, "Socket.IO websockets closed on a protocol error")

    @tornado.web.stream_request_body
    class SocketIOHandler(base):  # type: ignore[misc, valid-type]
        """The body streams in so that this route sets its own 2 MB cap (a host application's
        HTTPServer may allow far more) and nothing is read from a refused request."""

        def prepare(self) -> None:
            self._body = bytearray()
            connection = self.request.connection
            if isinstance(connection, tornado.http1connection.HTTP1Connection):
                # Tornado answers a longer body with 400 and closes, as engineio would
                connection.set_max_body_size(MAX_FRAME_BYTES + 65536)
            # before the websocket upgrade, and for every long-polling request
            if not host_filter.allows(self.request.headers.get("Host")):
                return self._refuse(400, "invalid_host", "This Host is not served.")
            if "sid" not in self.request.query_arguments and self.request.query_arguments.get(
                    "transport", [b"polling"]) == [b"polling"]:  # a long-polling handshake
                if sio.polling_sessions_from(self.request.remote_ip or "unknown") >= MAX_POLLING_SESSIONS_PER_ADDRESS:
                    self.set_header("Retry-After", str(int(sio.eio.ping_interval + sio.eio.ping_timeout)))
                    return self._refuse(429, "rate_limited", "Too many Socket.IO sessions from this address.")

        def data_received(self, chunk: bytes) -> None:
            if not self._finished:
                self._body += chunk

        async def post(self, *args: Any, **kwargs: Any) -> None:
            # engineio's driver reads request.body, which a streamed request leaves empty
            self.request.body = bytes(self._body)
            self._body = bytearray()
            await super().post(*args, **kwargs)

        def _refuse(self, status: int, code: str, message: str) -> None:
            # answered before the request is read: Tornado closes the connection (see reject())
            self.set_header("Connection", "close")
            self.set_status(status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps({"error": message, "code": code}))

        def check_origin(self, origin: str) -> bool:
            if any_origin:
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
            # what engineio's driver does, plus: a frame engineio cannot decode (`x`, an empty
            # one) ends its task with an exception that asyncio would log as a traceback
            self._eio_task = asyncio.ensure_future(self._serve_websocket())

        async def _serve_websocket(self) -> None:
            try:
                await sio.eio.handle_request(self)
            except Exception as exc:
                websocket_errors.note(describe(exc))
                self.close()

    return sio, SocketIOHandler
