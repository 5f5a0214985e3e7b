"""The load generator, in its own process: SSE and Socket.IO clients, or idle Socket.IO connections.

Speaks to the orchestrator (bench.run) over stdin/stdout, one line each way:

    python -m bench.loadgen '<json config>'
    -> "READY {...}"    connections are open (warm-up done): measure the server now
    <- "GO"             (streams) start the timed load    | (idle) "STOP": close everything
    -> "RESULT {...}"

Socket.IO is spoken raw over aiohttp websockets (Engine.IO v4: "0" open, "40" connect,
"2"/"3" ping/pong, "42[...]" events) so that one process can drive thousands of
clients cheaply; python-socketio's client costs far more per connection than the
servers under test. Every answer is checked against the expected text.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

from bench.common import bench_message, expected_text, new_event_loop, raise_nofile

CONNECT_CONCURRENCY = 64
MAX_ERROR_SAMPLES = 5


class Stats:
    def __init__(self) -> None:
        self.completed = 0
        self.failures = 0
        self.errors: list[str] = []
        self.ttfc_ms: list[float] = []
        self.frames = 0

    def fail(self, why: str) -> None:
        self.failures += 1
        if len(self.errors) < MAX_ERROR_SAMPLES:
            self.errors.append(why[:300])


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_line(timeout: float) -> str:
    line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline),
                                  timeout=timeout)
    return line.strip()


# --- SSE ----------------------------------------------------------------------------


async def sse_request(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes,
                      expected: str, stats: Stats | None) -> None:
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    frames = 0
    done = False
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise AssertionError(f"HTTP {response.status}: {(await response.text())[:200]}")
        pending = b""
        async for data in response.content.iter_any():
            pieces = (pending + data).split(b"\n\n")
            pending = pieces.pop()
            for frame in pieces:
                for line in frame.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "content" in event:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(event["content"])
                        frames += 1
                    elif event.get("done"):
                        done = True
                    elif "error" in event:
                        raise AssertionError(f"error frame: {event}")
    text = "".join(parts)
    if not done:
        raise AssertionError("stream ended without a done frame")
    if text != expected:
        raise AssertionError(f"content mismatch: got {len(text)} chars, expected {len(expected)}: {text[:80]!r}")
    if stats is not None:
        stats.completed += 1
        stats.frames += frames
        stats.ttfc_ms.append(((first or time.perf_counter()) - started) * 1000)


# --- Socket.IO (raw Engine.IO v4 over websocket) ------------------------------------


class RawSocketIO:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, base: str, token: str | None) -> RawSocketIO:
        ws = await session.ws_connect(base.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket",
                                      autoping=True, max_msg_size=0)
        client = cls(ws)
        opened = await client._next_text()
        if not opened.startswith("0"):
            raise AssertionError(f"no engine.io open packet: {opened[:100]!r}")
        await ws.send_str("40" + (json.dumps({"token": token}) if token else ""))
        connected = await client._next_text()
        if not connected.startswith("40"):
            raise AssertionError(f"namespace connect refused: {connected[:200]!r}")
        return client

    async def _next_text(self) -> str:
        while True:
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"websocket closed or non-text frame: {message.type!r}")
            if message.data == "2":
                await self.ws.send_str("3")
                continue
            return message.data

    async def chat(self, message: str, expected: str, stats: Stats | None) -> None:
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        frames = 0
        await self.ws.send_str('42["ai:chat",' + json.dumps({"message": message}) + "]")
        while True:
            packet = await self._next_text()
            if not packet.startswith("42"):
                if packet.startswith("41"):
                    raise AssertionError("disconnected by the server")
                continue
            event, data = json.loads(packet[2:])[:2]
            if event == "ai:stream":
                if first is None:
                    first = time.perf_counter()
                parts.append(data["content"])
                frames += 1
            elif event == "ai:complete":
                break
            elif event == "ai:error":
                raise AssertionError(f"ai:error {data}")
        text = "".join(parts)
        if text != expected or data.get("response") != expected:
            raise AssertionError(f"content mismatch: streamed {len(text)} chars, complete "
                                 f"{len(data.get('response') or '')}, expected {len(expected)}: {text[:80]!r}")
        if stats is not None:
            stats.completed += 1
            stats.frames += frames
            stats.ttfc_ms.append(((first or time.perf_counter()) - started) * 1000)

    async def idle(self) -> None:
        """Answer pings until the connection closes (or the task is cancelled)."""
        while True:
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            if message.data == "2":
                await self.ws.send_str("3")


# --- scenarios --------------------------------------------------------------------------


async def run_streams(config: dict[str, Any]) -> dict[str, Any]:
    base = config["url"]
    transport = config["transport"]
    clients = int(config["concurrency"])
    per_client = int(config["requests"])
    chunks = int(config["chunks"])
    gap_ms = int(config["gap_ms"])
    token = config.get("token")
    deadline_seconds = float(config.get("deadline", 300))
    expected = expected_text(chunks)
    message = bench_message(chunks, gap_ms)
    warm_expected = expected_text(1)
    warm_message = bench_message(1, 0)
    stats = Stats()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=600)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = base + "/api/v2/ai/chat/stream"
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"

        def body(text: str) -> bytes:
            return json.dumps({"message": text}).encode()

        # Warm-up: open every connection (a few at a time: the listen backlog is small) and
        # check one short answer on each, outside the measured window.
        sockets: list[RawSocketIO] = []
        warm_errors: list[str] = []

        async def warm_sse() -> None:
            async with gate:
                await sse_request(session, url, headers, body(warm_message), warm_expected, None)

        async def warm_sio() -> None:
            async with gate:
                client = await RawSocketIO.connect(session, base, token)
                await client.chat(warm_message, warm_expected, None)
                sockets.append(client)

        warm = warm_sse if transport == "sse" else warm_sio
        results = await asyncio.wait_for(asyncio.gather(*(warm() for _ in range(clients)), return_exceptions=True),
                                         timeout=deadline_seconds)
        warm_errors = [repr(r) for r in results if isinstance(r, BaseException)]
        _say("READY " + json.dumps({"clients": clients, "warmup_errors": len(warm_errors)}))
        if await _read_line(600) != "GO":
            return {"aborted": True}

        async def sse_client() -> None:
            for _ in range(per_client):
                try:
                    await sse_request(session, url, headers, body(message), expected, stats)
                except Exception as exc:  # noqa: BLE001 - counted, and sampled for the report
                    stats.fail(f"sse: {exc!r}")

        async def sio_client(client: RawSocketIO) -> None:
            for _ in range(per_client):
                try:
                    await client.chat(message, expected, stats)
                except Exception as exc:  # noqa: BLE001
                    stats.fail(f"socketio: {exc!r}")
                    return

        if transport == "sse":
            tasks = [sse_client() for _ in range(clients)]
        else:
            tasks = [sio_client(client) for client in sockets]
            for _ in range(clients - len(sockets)):
                stats.fail("socketio: client could not connect")
        began = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=deadline_seconds)
        except TimeoutError:
            stats.fail(f"deadline of {deadline_seconds}s passed")
        wall = time.perf_counter() - began
        for client in sockets:
            await client.ws.close()
    missing = clients * per_client - stats.completed - stats.failures
    if missing > 0:
        stats.failures += missing
    return {"completed": stats.completed, "failures": stats.failures, "errors": stats.errors + warm_errors[:3],
            "ttfc_ms": stats.ttfc_ms, "frames": stats.frames, "chunks": stats.completed * chunks, "wall": wall}


async def run_idle(config: dict[str, Any]) -> dict[str, Any]:
    base = config["url"]
    count = int(config["connections"])
    hold_seconds = float(config.get("hold", 600))
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients: list[RawSocketIO] = []
    failures: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def open_one() -> None:
            async with gate:
                try:
                    clients.append(await asyncio.wait_for(RawSocketIO.connect(session, base, None), 30))
                except Exception as exc:  # noqa: BLE001
                    failures.append(repr(exc))

        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(count))), timeout=300)
        readers = [asyncio.ensure_future(client.idle()) for client in clients]
        _say("READY " + json.dumps({"connected": len(clients), "failures": len(failures),
                                    "seconds": round(time.perf_counter() - began, 2)}))
        try:
            await _read_line(hold_seconds)
        except TimeoutError:
            pass
        alive = sum(1 for reader in readers if not reader.done())
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*(client.ws.close() for client in clients), return_exceptions=True)
    return {"connected": len(clients), "alive_at_end": alive, "failures": len(failures), "errors": failures[:3]}


async def main(config: dict[str, Any]) -> None:
    raise_nofile()
    if config["mode"] == "idle":
        result = await run_idle(config)
    else:
        result = await run_streams(config)
    _say("RESULT " + json.dumps(result))


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(json.loads(sys.argv[1])))
    sys.stdout.flush()
    os._exit(0)
