"""The BARE RELAY: the thinnest correct Tornado relay of an OpenAI-compatible upstream.

Same wire formats as the product (SSE `data: {"content"...}` frames ending with a
`done` frame; Socket.IO `ai:stream` events ending with `ai:complete`), same port for
both, but no auth, no limits, no storage, no history, no fairness slicing. The upstream is
read the cheap way: aiohttp streaming, `data:` lines parsed here (no SDK objects).
It is the yardstick every product figure is divided by.

    python -m bench.relay --port 7100 --upstream http://127.0.0.1:7200/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator

import aiohttp
import socketio
import tornado.httpserver
import tornado.netutil
import tornado.web

from bench.common import new_event_loop, raise_nofile


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Upstream:
    def __init__(self, base_url: str) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.session: aiohttp.ClientSession | None = None

    async def deltas(self, message: str) -> AsyncIterator[str]:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": message}]}
        async with self.session.post(self.url, json=body, headers={"Authorization": "Bearer x"}) as response:
            if response.status != 200:
                raise RuntimeError(f"upstream HTTP {response.status}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                choices = json.loads(data).get("choices")
                if choices:
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        yield content
        raise RuntimeError("upstream ended without [DONE]")


class SseRelay(tornado.web.RequestHandler):
    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def post(self) -> None:
        payload = json.loads(self.request.body)
        session_id = payload.get("sessionId") or str(uuid.uuid4())
        message_id = str(uuid.uuid4())
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache, no-transform")
        self.request.connection.stream.set_nodelay(True)  # type: ignore[union-attr]
        self.flush()
        suffix = f',"sessionId":{_dumps(session_id)},"messageId":{_dumps(message_id)}}}\n\n'
        seq = 0
        try:
            async for delta in self.upstream.deltas(payload["message"]):
                seq += len(delta)
                self.write(f'id: {message_id}:{seq}\ndata: {{"content":{_dumps(delta)}{suffix}'.encode())
                self.flush()
            end = {"done": True, "sessionId": session_id, "messageId": message_id}
        except Exception as exc:  # noqa: BLE001 - the bench wants to see it
            end = {"error": str(exc), "code": "upstream_error", "sessionId": session_id}
        self.write(f"id: {message_id}:{seq}\ndata: {_dumps(end)}\n\n".encode())
        self.finish()


def build(upstream: Upstream) -> tornado.web.Application:
    sio = socketio.AsyncServer(async_mode="tornado", cors_allowed_origins="*", http_compression=False,
                               max_http_buffer_size=2 * 1024 * 1024)

    @sio.on("ai:chat")
    async def chat(sid: str, data: dict) -> None:
        session_id = data.get("sessionId") or str(uuid.uuid4())
        message_id = str(uuid.uuid4())
        parts: list[str] = []
        seq = 0
        try:
            async for delta in upstream.deltas(data["message"]):
                parts.append(delta)
                seq += len(delta)
                await sio.emit("ai:stream", {"content": delta, "sessionId": session_id, "messageId": message_id,
                                             "seq": seq}, to=sid)
        except Exception as exc:  # noqa: BLE001
            await sio.emit("ai:error", {"error": str(exc), "code": "upstream_error", "sessionId": session_id},
                           to=sid)
            return
        await sio.emit("ai:complete", {"response": "".join(parts), "sessionId": session_id,
                                       "messageId": message_id}, to=sid)

    base = socketio.get_tornado_handler(sio)

    class SocketIOHandler(base):  # type: ignore[misc, valid-type]
        def get_compression_options(self) -> None:
            return None

        async def open(self, *args: object, **kwargs: object) -> None:
            self.set_nodelay(True)  # small frames leave at once, as the SSE side does
            await super().open(*args, **kwargs)

    return tornado.web.Application(
        [(r"/api/v2/ai/chat/stream", SseRelay, {"upstream": upstream}), (r"/socket.io/", SocketIOHandler)],
        websocket_max_message_size=2 * 1024 * 1024,
    )


async def main(port: int, upstream_url: str) -> None:
    raise_nofile()
    server = tornado.httpserver.HTTPServer(build(Upstream(upstream_url)))
    server.add_sockets(tornado.netutil.bind_sockets(port, "127.0.0.1"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:7200/v1")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(args.port, args.upstream))
    os._exit(0)
