"""Socket.IO transport: `ai:*` events translated to and from the chat service."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import socketio

from handlers.api_base import as_chat_error
from handlers.identity import Identify, host_user
from services.chat_service import NO_TOKEN, Caller, ChatService
from services.errors import ChatError
from services.generation import Generation, Outcome
from services.store.base import STATUS_ERROR

log = logging.getLogger("aichat.socketio")


class SocketStream:
    """A GenerationListener emitting one answer to one Socket.IO client.

    Deltas that arrive while the previous emit is still being handed to the transport
    are merged into the next `ai:stream`, so a fast answer costs fewer frames; the
    concatenated content is unchanged.
    """

    __slots__ = ("_namespace", "_sid", "_pending", "_seq", "_outcome", "_ended", "_sender", "_connection")

    def __init__(self, namespace: ChatNamespace, sid: str, connection: Connection) -> None:
        self._namespace = namespace
        self._sid = sid
        self._connection = connection
        self._pending: list[str] = []
        self._seq = 0
        self._outcome: Outcome | None = None
        self._ended = False
        self._sender: asyncio.Task[None] | None = None

    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        self._pending.append(text)
        self._seq = seq
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(generation))

    def on_end(self, generation: Generation, outcome: Outcome) -> None:
        self._outcome = outcome
        if self._connection.streams.get(generation.message_id, (None, None))[1] is self:
            del self._connection.streams[generation.message_id]
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(generation))

    def abort(self, generation: Generation) -> None:
        # dropped after a failure: whatever is queued is suspect; end with an error instead
        self._pending.clear()
        self.on_end(generation, Outcome(status=STATUS_ERROR, text="",
                                        error=ChatError("internal_error", "The answer could not be delivered.")))

    def replaced(self) -> None:
        """A newer `ai:resume` of this answer on this connection took over: send nothing more."""
        self._pending.clear()
        self._ended = True

    async def _send(self, generation: Generation) -> None:
        emit = self._namespace.emit
        try:
            while True:
                if self._pending:
                    text = "".join(self._pending) if len(self._pending) > 1 else self._pending[0]
                    self._pending.clear()
                    await emit("ai:stream", {"content": text, "sessionId": generation.session_id,
                                             "messageId": generation.message_id, "seq": self._seq}, to=self._sid)
                elif self._outcome is not None and not self._ended:
                    self._ended = True
                    await emit(*end_event(generation.session_id, generation.message_id, self._outcome), to=self._sid)
                else:
                    break
        except Exception:  # the client is gone; its disconnect handler detaches us
            log.debug("emit to %s failed", self._sid, exc_info=True)
        finally:
            self._sender = None


def end_event(session_id: str, message_id: str, outcome: Outcome) -> tuple[str, dict[str, Any]]:
    if outcome.error is not None:
        return "ai:error", {"error": outcome.error.message, "code": outcome.error.code,
                            "sessionId": session_id, "messageId": message_id}
    payload: dict[str, Any] = {"response": outcome.text, "sessionId": session_id, "messageId": message_id}
    if outcome.cancelled:
        payload["cancelled"] = True
    return "ai:complete", payload


class Connection:
    """What the namespace remembers per client: kept small, there may be many."""

    __slots__ = ("client_ip", "token", "host_user", "streams")

    def __init__(self, client_ip: str, token: object, host_user: str | None = None) -> None:
        self.client_ip = client_ip
        self.token = token
        #: who the embedding host's login says this is, decided once on the handshake request
        self.host_user = host_user
        #: answers this client is watching, by message id
        self.streams: dict[str, tuple[Generation, SocketStream]] = {}


class ChatNamespace(socketio.AsyncNamespace):
    def __init__(self, chat: ChatService, identify: Identify | None = None, namespace: str = "/") -> None:
        super().__init__(namespace)
        self.chat = chat
        self.identify = identify
        self.connections: dict[str, Connection] = {}

    async def trigger_event(self, event: object, *args: Any) -> Any:
        # event names like `ai:chat` are not method names: route them to on_ai_chat
        # python-socketio routes a client's own `emit("disconnect")` / `emit("connect")` here too;
        # only the server's count: connect for a new sid, disconnect once the sid is leaving
        if not isinstance(event, str):  # `42[123]`: not an event of ours (and no traceback)
            return None
        if event == "connect" and args and args[0] in self.connections:
            return None
        if event == "disconnect" and args and self.server.manager.is_connected(args[0], self.namespace):
            return None
        handler = getattr(self, "on_" + event.replace(":", "_"), None)
        if handler is None:
            return None
        return await handler(*args)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: object = None) -> None:
        # engineio's Tornado driver reports every peer as 127.0.0.1; the Tornado request
        # has the real one (and honours X-Forwarded-For when the server trusts proxies)
        request = environ["tornado.handler"].request
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            # the handshake request carries the host's cookies, for polling and websocket alike
            user = await host_user(self.identify, request)
        except ChatError as error:
            raise socketio.exceptions.ConnectionRefusedError(error.to_payload()) from None
        self.connections[sid] = Connection(request.remote_ip or "unknown", token, user)
        self.chat.metrics.connection_opened("socketio")

    async def on_disconnect(self, sid: str, reason: object = None) -> None:
        connection = self.connections.pop(sid, None)
        if connection is None:
            return
        self.chat.metrics.connection_closed("socketio")
        for generation, stream in list(connection.streams.values()):
            self.chat.detach(generation, stream)
        connection.streams.clear()

    def _caller(self, connection: Connection, data: object) -> Caller:
        token = data.get("token", NO_TOKEN) if isinstance(data, dict) else NO_TOKEN
        return Caller(client_ip=connection.client_ip, token=token, handshake_token=connection.token,
                      host_user=connection.host_user, transport="socketio")

    async def _error(self, sid: str, error: ChatError, session_id: object = None) -> None:
        payload = error.to_payload()
        if isinstance(session_id, str):
            payload["sessionId"] = session_id
        await self.emit("ai:error", payload, to=sid)

    async def on_ai_chat(self, sid: str, data: object = None, *_: Any) -> None:
        connection = self.connections.get(sid)
        if connection is None:
            return
        stream = SocketStream(self, sid, connection)
        try:
            started = await self.chat.start_chat(data, self._caller(connection, data), stream)
        except Exception as exc:
            session_id = data.get("sessionId") if isinstance(data, dict) else None
            return await self._error(sid, as_chat_error(exc), session_id)
        if sid not in self.connections:  # left while the chat was being set up
            self.chat.detach(started.generation, stream)
            return
        connection.streams[started.generation.message_id] = (started.generation, stream)

    async def on_ai_cancel(self, sid: str, data: object = None, *_: Any) -> None:
        connection = self.connections.get(sid)
        if connection is None:
            return
        session_id = data.get("sessionId") if isinstance(data, dict) else None
        try:
            await self.chat.cancel(session_id, self._caller(connection, data))
        except Exception as exc:
            await self._error(sid, as_chat_error(exc), session_id)

    async def on_ai_resume(self, sid: str, data: object = None, *_: Any) -> None:
        connection = self.connections.get(sid)
        if connection is None:
            return
        payload = data if isinstance(data, dict) else {}
        stream = SocketStream(self, sid, connection)
        try:
            resumed = await self.chat.resume(payload.get("messageId"), payload.get("afterSeq", 0),
                                             self._caller(connection, data), stream)
        except Exception as exc:
            return await self._error(sid, as_chat_error(exc))
        if resumed.outcome is None:
            # one stream per answer per connection: a repeated resume (or a resume of the chat
            # this connection started) replaces the earlier one rather than adding a copy
            earlier = connection.streams.get(resumed.message_id)
            connection.streams[resumed.message_id] = (resumed, stream)
            if earlier is not None:
                earlier[1].replaced()
                resumed.detach(earlier[1])
