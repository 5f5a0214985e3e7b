"""A real OpenAI-compatible HTTP server for tests, speaking the Chat Completions
streaming wire format (`chat.completion.chunk` frames, then `data: [DONE]`).

Each request takes the next queued Script (or the default one); every request body
received is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web


@dataclass
class Script:
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    #: seconds before the first chunk, and between chunks
    first_delay: float = 0.0
    delay: float = 0.0
    #: answer with this HTTP status (and an OpenAI-style error body) instead of a stream
    status: int = 200
    #: with an error status: a `retry-after-ms` header (the SDK waits this long before retrying)
    retry_after_ms: int | None = None
    #: close the connection abruptly after this many chunks
    drop_after: int | None = None
    #: stop sending (but keep the connection open) after this many chunks
    stall_after: int | None = None
    #: never send response headers at all
    never_answer: bool = False
    usage: dict[str, int] | None = field(default_factory=lambda: {"prompt_tokens": 7, "completion_tokens": 4,
                                                                  "total_tokens": 11})
    #: send chunks with an empty delta / role-only delta first, as real servers do
    role_chunk: bool = True
    #: omit `data: [DONE]` and the finish_reason (a truncated stream)
    truncate: bool = False
    #: send exactly these bytes as the body instead, each piece flushed on its own after `delay`
    raw: list[bytes] | None = None


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


async def _hang() -> None:
    """Keep the request open, quietly, until the test ends."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass


class _CompletionsHandler(tornado.web.RequestHandler):
    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def post(self) -> None:
        body = json.loads(self.request.body)
        self.upstream.requests.append(
            ReceivedRequest(self.request.path, dict(self.request.headers), body, time.monotonic())
        )
        script = self.upstream.scripts.pop(0) if self.upstream.scripts else self.upstream.default
        if script.never_answer:
            await _hang()
            return
        if script.status != 200:
            self.set_status(script.status)
            if script.retry_after_ms is not None:
                self.set_header("retry-after-ms", str(script.retry_after_ms))
            self.set_header("Content-Type", "application/json")
            self.finish({"error": {"message": "fake upstream failure", "type": "server_error", "code": None}})
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        ident = f"chatcmpl-{len(self.upstream.requests)}"

        def frame(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
            }
            if usage is not None:
                chunk["usage"] = usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        try:
            await self._send_chunks(script, body, frame)
        except tornado.iostream.StreamClosedError:
            return  # the product hung up (a stop, a cancelled answer): the real API just stops too

    async def _send_chunks(self, script: Script, body: dict[str, Any], frame: Callable[..., bytes]) -> None:
        if script.raw is not None:
            for piece in script.raw:
                await asyncio.sleep(script.delay)
                self.write(piece)
                await self.flush()
            self.finish()
            return
        if script.role_chunk:
            self.write(frame({"role": "assistant", "content": ""}))
            await self.flush()
        if script.first_delay:
            await asyncio.sleep(script.first_delay)
        for index, text in enumerate(script.chunks):
            if script.drop_after is not None and index >= script.drop_after:
                self.request.connection.stream.close()  # type: ignore[union-attr]
                return
            if script.stall_after is not None and index >= script.stall_after:
                await _hang()
                return
            if index and script.delay:
                await asyncio.sleep(script.delay)
            self.write(frame({"content": text}))
            await self.flush()
        if script.truncate:
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return
        self.write(frame({}, finish="stop"))
        stream_options = body.get("stream_options") or {}
        if script.usage and stream_options.get("include_usage"):
            self.write(frame({}, usage=script.usage))
        self.write(b"data: [DONE]\n\n")
        self.finish()


class FakeUpstream:
    def __init__(self) -> None:
        self.default = Script()
        self.scripts: list[Script] = []
        self.requests: list[ReceivedRequest] = []
        self._server: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    async def start(self) -> None:
        app = tornado.web.Application([(r"/v1/chat/completions", _CompletionsHandler, {"upstream": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
