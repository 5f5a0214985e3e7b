"""Renders a generation as Server-Sent Events frames onto a Tornado response.

Per delta: one preformatted frame appended to the response buffer, and at most one
flush per event-loop turn, so a burst of deltas goes out in one write while a trickle
goes out frame by frame without delay.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import tornado.web

from services.errors import ChatError
from services.generation import Generation, Outcome
from services.store.base import STATUS_ERROR

# How a response ends when its listener failed (say, a frame could not be encoded).
ABORTED = Outcome(status=STATUS_ERROR, text="",
                  error=ChatError("internal_error", "The answer could not be delivered."))

# A client that reads slower than the answer is produced is dropped past this much
# unsent data (the `on_client_disconnect` policy then applies).
MAX_UNSENT_BYTES = 256 * 1024

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


# Line separators that JSON leaves raw but some SSE/line splitters (JS `split(/\r?\n|\u2028/)`,
# Python's str.splitlines) cut frames at: sent as \uXXXX escapes instead.
_LINE_BREAKERS = ("\u2028", "\u2029", "\u0085")


def _dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # three C-level scans of a short string: the replace only runs when one is present
    if "\u2028" in text or "\u2029" in text or "\u0085" in text:
        for char in _LINE_BREAKERS:
            text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def end_frame(session_id: str, message_id: str, seq: int, outcome: Outcome) -> bytes:
    body: dict[str, Any]
    if outcome.error is not None:
        body = {"error": outcome.error.message, "code": outcome.error.code,
                "sessionId": session_id, "messageId": message_id}
    else:
        body = {"done": True, "sessionId": session_id, "messageId": message_id}
        if outcome.cancelled:
            body["cancelled"] = True
    return f"id: {message_id}:{seq}\ndata: {_dumps(body)}\n\n".encode()


class SseWriter:
    """A GenerationListener that writes frames to one HTTP response."""

    def __init__(self, handler: tornado.web.RequestHandler, heartbeat_seconds: float) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._unsent = 0
        self._idle = True  # nothing written since the last heartbeat tick
        self._heartbeat_seconds = heartbeat_seconds
        self._heartbeat = self._loop.call_later(heartbeat_seconds, self._tick)
        self._prefix = ""
        self._suffix = ""
        #: resolved when the response is over (ended, or the client went away)
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # --- GenerationListener

    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        if not self._suffix:
            self._prefix = f"id: {generation.message_id}:"
            session_id, message_id = _dumps(generation.session_id), _dumps(generation.message_id)
            self._suffix = f',"sessionId":{session_id},"messageId":{message_id}}}\n\n'
        self._send(f'{self._prefix}{seq}\ndata: {{"content":{_dumps(text)}{self._suffix}'.encode())

    def on_end(self, generation: Generation, outcome: Outcome) -> None:
        self.finish(end_frame(generation.session_id, generation.message_id, generation.length, outcome))

    def abort(self, generation: Generation) -> None:
        try:
            self.finish(end_frame(generation.session_id, generation.message_id, generation.length, ABORTED))
        except Exception:  # the response cannot even take the error frame: cut the connection
            self.connection_lost()
            self._handler.request.connection.close()  # type: ignore[union-attr]

    # --- transport

    def finish(self, last_frame: bytes) -> None:
        if self.closed.done():
            return
        self._heartbeat.cancel()
        self._handler.write(last_frame)
        self._handler.finish()
        self.closed.set_result(None)

    def connection_lost(self) -> None:
        self._heartbeat.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def _send(self, frame: bytes) -> None:
        if self.closed.done():
            return
        self._handler.write(frame)
        self._unsent += len(frame)
        self._idle = False
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed.done():
            return
        if self._unsent > MAX_UNSENT_BYTES:
            # the client stopped reading: drop it rather than buffer without bound
            self._handler.request.connection.close()  # type: ignore[union-attr]
            return
        sent = self._unsent
        flushed = self._handler.flush()
        flushed.add_done_callback(lambda f, n=sent: self._flushed(f, n))

    def _flushed(self, future: asyncio.Future[None], sent: int) -> None:
        self._unsent -= sent
        if not future.cancelled():
            future.exception()  # a closed stream is handled by on_connection_close

    def _tick(self) -> None:
        if self.closed.done():
            return
        if self._idle:
            self._send(b": ping\n\n")
        self._idle = True
        self._heartbeat = self._loop.call_later(self._heartbeat_seconds, self._tick)
