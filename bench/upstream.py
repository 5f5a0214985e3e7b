"""A cheap OpenAI-compatible streaming upstream for the bench, in its own process.

A raw asyncio protocol (no framework): HTTP/1.1 keep-alive, chunked responses made of
pre-encoded `data: {chat.completion.chunk}` frames, then `data: [DONE]`.

How to answer is read from the request body: `[bench n=<chunks> ms=<gap>]` (see
bench.common.bench_message). ``ms=0`` is bursty: the whole answer in one write. ``ms>0``
is paced: the first chunk at once, then one chunk every ``ms`` milliseconds.

    python -m bench.upstream --port 0     # prints "PORT <n>" when listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from functools import lru_cache

from bench.common import DIRECTIVE, chunk_text, new_event_loop

HEADERS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
DEFAULT_CHUNKS = 20
MAX_CHUNKS = 100_000
MAX_HEADER_BYTES = 64 * 1024


def _frame(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _base(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@lru_cache(maxsize=64)
def frames(chunks: int) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """(role frame, content frames, ending: finish + usage + [DONE] + last chunk), chunked-encoded."""
    role = _chunked(_frame(_base({"role": "assistant", "content": ""})))
    content = tuple(_chunked(_frame(_base({"content": chunk_text(i)}))) for i in range(chunks))
    usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench",
             "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": chunks,
                                      "total_tokens": 10 + chunks}}
    ending = _chunked(_frame(_base({}, "stop")) + _frame(usage) + b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return role, content, ending


@lru_cache(maxsize=64)
def bursty(chunks: int) -> bytes:
    role, content, ending = frames(chunks)
    return HEADERS + role + _chunked(b"".join(c[c.index(b"\r\n") + 2:-2] for c in content)) + ending


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_needed = -1  # -1: reading headers
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._parse()

    def _parse(self) -> None:
        while self.transport is not None and not self.busy:
            if self.body_needed < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEADER_BYTES:
                        self.transport.close()
                    return
                head = bytes(self.buffer[:end]).decode("latin-1")
                del self.buffer[: end + 4]
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                self.request_line = head.split("\r\n", 1)[0]
                self.body_needed = length
            if len(self.buffer) < self.body_needed:
                return
            body = bytes(self.buffer[: self.body_needed])
            del self.buffer[: self.body_needed]
            self.body_needed = -1
            self._answer(body)

    def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        if not self.request_line.startswith("POST ") or "/chat/completions" not in self.request_line:
            self.transport.write(NOT_FOUND)
            return
        found = DIRECTIVE.search(body)
        chunks = min(int(found.group(1)), MAX_CHUNKS) if found else DEFAULT_CHUNKS
        gap_ms = int(found.group(2)) if found else 0
        if gap_ms <= 0:
            self.transport.write(bursty(chunks))
            return
        role, content, ending = frames(chunks)
        self.transport.write(HEADERS + role + (content[0] if content else b""))
        self.busy = True  # answer pipelined requests only after this one
        self._next(content, 1, ending, gap_ms / 1000)

    def _next(self, content: tuple[bytes, ...], index: int, ending: bytes, gap: float) -> None:
        if index >= len(content):
            self.timer = asyncio.get_running_loop().call_later(gap, self._end, ending)
            return
        self.timer = asyncio.get_running_loop().call_later(gap, self._send, content, index, ending, gap)

    def _send(self, content: tuple[bytes, ...], index: int, ending: bytes, gap: float) -> None:
        if self.transport is None:
            return
        self.transport.write(content[index])
        self._next(content, index + 1, ending, gap)

    def _end(self, ending: bytes) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(ending)
        self.busy = False
        self._parse()


async def main(port: int, host: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    # Bounded: the orchestrator stops us, but never outlive it by more than this.
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), timeout=3600)
    except TimeoutError:
        pass
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(args.port, args.host))
    os._exit(0)  # do not wait for the stdin reader thread
