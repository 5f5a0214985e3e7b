"""HTTP streaming transport: POST a message, get its answer as Server-Sent Events."""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from handlers.api_base import ApiHandler, as_chat_error
from handlers.sse import SSE_HEADERS, SseWriter
from services.errors import ChatError
from services.generation import Generation


class SseHandler(ApiHandler):
    """Shared by the chat and the resume endpoints: SSE response set-up and teardown."""

    def initialize(  # type: ignore[override]
        self, heartbeat_seconds: float, **api: Any
    ) -> None:
        super().initialize(**api)
        self.heartbeat_seconds = heartbeat_seconds
        self.writer: SseWriter | None = None
        self.generation: Generation | None = None
        self.stream_counted = False  # in the open-connections gauge

    def start_event_stream(self) -> None:
        # An event stream is never compressed, even in an application with
        # compress_response on: gzip would hold frames back until its buffer fills.
        self._transforms = [t for t in self._transforms if not isinstance(t, tornado.web.GZipContentEncoding)]
        for name, value in SSE_HEADERS.items():
            self.set_header(name, value)
        # small frames must leave at once, not wait for Nagle's algorithm
        self.request.connection.stream.set_nodelay(True)  # type: ignore[union-attr]
        self.chat.metrics.connection_opened("sse")
        self.stream_counted = True

    def _uncount_stream(self) -> None:
        # on_finish and on_connection_close may both come: count the stream down once
        if self.stream_counted:
            self.stream_counted = False
            self.chat.metrics.connection_closed("sse")

    def on_finish(self) -> None:
        self._uncount_stream()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # ends a body still being read (stream_request_body)
        self._uncount_stream()
        if self.writer is not None:
            self.writer.connection_lost()
        if self.generation is not None and self.writer is not None:
            self.chat.detach(self.generation, self.writer)


class ChatStreamHandler(SseHandler):
    """POST /api/v2/ai/chat/stream"""

    reads_body = True
    #: a refusal decided in a synchronous step, sent by _send_refusal()
    refusal: ChatError | None = None

    async def prepare(self) -> None:
        await super().prepare()  # Host, the body size (declared, then as it streams), identity
        if self.refusal is not None or self._finished or self.request.method != "POST":
            return await self._send_refusal()
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            self.reject(ChatError("unsupported_media_type", "Content-Type must be application/json."))
        await self._send_refusal()

    async def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        super().data_received(chunk)  # counts the body; past max_body_bytes: reject()
        await self._send_refusal()

    def reject(self, error: ChatError) -> None:
        # answered by _send_refusal(), right after: the budget for the headers is async to read
        # (the shared limiter in cluster mode)
        self.chat.metrics.refused(error.code)
        self.rejected = True
        if self.refusal is None:
            self.refusal = error

    async def _send_refusal(self) -> None:
        error, self.refusal = self.refusal, None
        if error is not None and not self._finished:
            if error.rate is None:
                error.rate = await self.chat.rate_status(self.caller())
            super().reject(error)

    async def refuse(self, error: ChatError) -> None:
        # every chat response tells the caller's budget, even one refused before the service saw it
        if error.rate is None:
            error.rate = await self.chat.rate_status(self.caller())
        if not self._finished:
            self.send_chat_error(error)

    async def post(self) -> None:
        if self.rejected or self._finished:
            return
        try:
            payload = json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...]]]]
            payload = None
        if not isinstance(payload, dict):
            self.chat.metrics.refused("invalid_json")
            return await self.refuse(ChatError("invalid_json", "The body must be a JSON object."))
        self.writer = SseWriter(self, self.heartbeat_seconds)
        try:
            started = await self.chat.start_chat(payload, self.caller(), self.writer)
        except Exception as exc:
            self.writer.connection_lost()
            self.writer = None
            return await self.refuse(as_chat_error(exc))
        self.generation = started.generation
        if self.writer.closed.done():  # the client left while the chat was being set up
            self.chat.detach(started.generation, self.writer)
            return
        self.start_event_stream()
        for name, value in started.rate.headers().items():
            self.set_header(name, value)
        self.flush()  # headers now: the client knows the stream is on before the first token
        await self.writer.closed


class ResumeStreamHandler(SseHandler):
    """GET /api/v2/ai/chat/stream/{messageId} with Last-Event-ID: replay, then follow live."""

    async def get(self, message_id: str) -> None:
        last_event_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument("lastEventId", "")
        after_seq = 0
        if last_event_id:  # the `id:` of the last frame received: <messageId>:<seq>
            event_message, _, seq = last_event_id.rpartition(":")
            # isdigit() alone passes "²", and int() refuses over 4,300 digits
            if event_message != message_id or not (seq.isascii() and seq.isdigit() and len(seq) <= 18):
                return self.send_chat_error(
                    ChatError("invalid_request", "Last-Event-ID is not an event id of this message.")
                )
            after_seq = int(seq)
        self.writer = SseWriter(self, self.heartbeat_seconds)
        self.start_event_stream()
        try:
            resumed = await self.chat.resume(message_id, after_seq, self.caller(), self.writer)
        except Exception as exc:
            self.writer.connection_lost()
            self.writer = None
            self.clear_header("Content-Type")
            return self.send_chat_error(as_chat_error(exc))
        self.generation = resumed
        if self.writer.closed.done():
            self.chat.detach(resumed, self.writer)
            return
        await self.writer.closed
