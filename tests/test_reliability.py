"""Stop, resume, graceful shutdown, crash safety and slow clients, on both transports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SseResponse, http_json, read_sse, read_then_leave, sse_post, streamed_text, url
from tests.fake_upstream import Script
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SLOW_CHUNKS = [f"word{i} " for i in range(30)]
SLOW_ANSWER = "".join(SLOW_CHUNKS)


async def wait_until(predicate, timeout=10.0, message="condition not reached"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.02)


async def history(server, session_id):
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}")
    assert status == 200, body
    return body["messages"]


# --- stop generating -------------------------------------------------------------------


async def test_cancel_over_http_ends_the_sse_stream_with_cancelled_done(server, upstream):
    upstream.queue(Script(chunks=SLOW_CHUNKS, delay=0.05))
    cancelled: list[tuple[int, dict]] = []

    def on_event(event):
        if len(cancelled) == 0 and event.get("content"):
            cancelled.append(None)  # type: ignore[arg-type]
            asyncio.get_running_loop().create_task(cancel())
        return True

    async def cancel():
        status, body, _ = await http_json(server, "POST", "/api/v2/ai/chat/sessions/stop-me/cancel")
        cancelled[0] = (status, body)  # type: ignore[call-overload]

    started = time.monotonic()
    result = await sse_post(server, {"message": "go", "sessionId": "stop-me"}, on_event=on_event)
    assert time.monotonic() - started < 1.4  # the whole answer would take 1.5 s
    status, body = cancelled[0]
    assert status == 202 and body["sessionId"] == "stop-me"
    assert result.last == {"done": True, "cancelled": True, "sessionId": "stop-me",
                           "messageId": result.last["messageId"]}
    assert 0 < len(result.content) < len(SLOW_ANSWER)
    stored = (await history(server, "stop-me"))[1]
    assert (stored["status"], stored["content"]) == ("partial", result.content)
    assert server.app.chat.active_count == 0


async def test_cancel_over_socketio(server, upstream, socket_client):
    upstream.queue(Script(chunks=SLOW_CHUNKS, delay=0.05))
    client = await socket_client(server)
    await client.client.emit("ai:chat", {"message": "go", "sessionId": "sio-stop"})
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events))
    await client.client.emit("ai:cancel", {"sessionId": "sio-stop"})
    await client.wait_for(lambda events: events[-1][0] == "ai:complete", timeout=1.4)
    name, complete = client.events[-1]
    assert complete["cancelled"] is True
    assert complete["response"] == streamed_text(client.events)
    assert 0 < len(complete["response"]) < len(SLOW_ANSWER)
    stored = (await history(server, "sio-stop"))[1]
    assert (stored["status"], stored["content"]) == ("partial", complete["response"])


async def test_cancel_with_nothing_running_is_not_found(server, socket_client):
    status, body, _ = await http_json(server, "POST", "/api/v2/ai/chat/sessions/idle-session/cancel")
    assert (status, body["code"]) == (404, "not_found")
    client = await socket_client(server)
    await client.client.emit("ai:cancel", {"sessionId": "idle-session"})
    await client.wait_for(lambda events: bool(events))
    assert client.events[-1][0] == "ai:error" and client.events[-1][1]["code"] == "not_found"


# --- resume ----------------------------------------------------------------------------


async def resume_sse(server, message_id, last_event_id, *, as_query=False):
    result = SseResponse(0, {})
    path = f"/api/v2/ai/chat/stream/{message_id}"
    headers = {}
    if as_query:
        path += f"?lastEventId={last_event_id}"
    else:
        headers["Last-Event-ID"] = last_event_id
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, path), headers=headers) as response:
            result.status = response.status
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                await read_sse(response, result)
            else:
                result.body = await response.json()
    return result


@pytest.mark.parametrize("as_query", [False, True])
async def test_sse_resume_while_generating_gets_the_rest_exactly_once(server, upstream, as_query):
    upstream.queue(Script(chunks=SLOW_CHUNKS, delay=0.03))
    first = await read_then_leave(server, {"message": "go"}, frames=3)
    assert server.app.chat.active_count == 1
    message_id = first.events[0]["messageId"]
    rest = await resume_sse(server, message_id, first.ids[-1], as_query=as_query)
    assert rest.status == 200
    assert first.content + rest.content == SLOW_ANSWER
    assert rest.last["done"] is True
    seqs = [int(i.rsplit(":", 1)[1]) for i in first.ids + rest.ids]
    assert seqs == sorted(seqs) and len(set(seqs[:-1])) == len(seqs) - 1


async def test_sse_resume_after_the_answer_ended_comes_from_the_store(server, upstream):
    upstream.queue(Script(chunks=SLOW_CHUNKS, delay=0.01))
    first = await read_then_leave(server, {"message": "go"}, frames=2)
    await wait_until(lambda: server.app.chat.active_count == 0)
    message_id = first.events[0]["messageId"]
    rest = await resume_sse(server, message_id, first.ids[-1])
    assert first.content + rest.content == SLOW_ANSWER
    assert rest.last["done"] is True
    whole = await resume_sse(server, message_id, "")
    assert whole.content == SLOW_ANSWER


async def test_resume_rules(server, upstream):
    result = await sse_post(server, {"message": "go"})
    message_id = result.last["messageId"]
    missing = await resume_sse(server, "no-such-message", "")
    assert (missing.status, missing.body["code"]) == (404, "not_found")
    mismatched = await resume_sse(server, message_id, "other-message:3")
    assert (mismatched.status, mismatched.body["code"]) == (400, "invalid_request")
    at_end = await resume_sse(server, message_id, result.ids[-1])
    assert at_end.content == "" and at_end.last["done"] is True


async def test_socketio_resume_after_a_disconnect(server, upstream, socket_client):
    upstream.queue(Script(chunks=SLOW_CHUNKS, delay=0.03))
    first = await socket_client(server)
    await first.client.emit("ai:chat", {"message": "go", "sessionId": "sio-resume"})
    await first.wait_for(lambda events: sum(name == "ai:stream" for name, _ in events) >= 2)
    await first.close()
    got = [data for name, data in first.events if name == "ai:stream"]
    message_id, after_seq = got[-1]["messageId"], got[-1]["seq"]
    assert server.app.chat.active_count == 1  # `finish` policy: still generating

    second = await socket_client(server, transport="polling")
    await second.client.emit("ai:resume", {"messageId": message_id, "afterSeq": after_seq})
    await second.wait_for(lambda events: events and events[-1][0] == "ai:complete")
    assert "".join(d["content"] for d in got) + streamed_text(second.events) == SLOW_ANSWER
    assert second.events[-1][1]["response"] == SLOW_ANSWER

    third = await socket_client(server)  # after the end: from the store
    await third.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 5})
    await third.wait_for(lambda events: events and events[-1][0] == "ai:complete")
    assert streamed_text(third.events) == SLOW_ANSWER[5:]


# --- graceful shutdown and crash safety (server as a subprocess) ------------------------



class ServerProcess:
    def __init__(self, tmp_path: Path, upstream, **settings: str) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AICHAT_", "OPENAI_")) and k not in ("MONGODB_URI", "JWT_SECRET")}
        self.env.update({
            "OPENAI_BASE_URL": upstream.base_url,
            "OPENAI_API_KEY": "sk-test",
            "AICHAT_STORAGE_SQLITE_PATH": str(tmp_path / "chat.sqlite3"),
            **settings,
        })
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "run.py"), "--port", str(self.port), "--config", str(REPO / "settings.ini"),
            env=self.env, cwd=str(REPO), stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(self.process.stderr.readline(), 20)
            assert line, "server exited during start-up"
            if b"listening on" in line:
                asyncio.get_running_loop().create_task(self._drain())
                return
        raise AssertionError("server did not start")

    async def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while await self.process.stderr.readline():
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), 30)


class Remote:
    """Enough of RunningServer for the URL-based helpers."""

    def __init__(self, port: int) -> None:
        self.port = port


async def stream_from(base: str, payload: dict, events: list, first: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/v2/ai/chat/stream", json=payload) as response:
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    first.set()


async def test_sigterm_lets_20_streams_finish_within_grace_and_refuses_new_chats(tmp_path, upstream):
    server = ServerProcess(tmp_path, upstream, AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS="15")
    await server.start()
    upstream.default = Script(chunks=SLOW_CHUNKS[:20], delay=0.1)  # about 2 s each
    streams = []
    for n in range(20):
        events: list = []
        first = asyncio.Event()
        task = asyncio.create_task(stream_from(server.url, {"message": "go", "sessionId": f"s{n}"}, events, first))
        streams.append((events, first, task))
    await asyncio.wait_for(asyncio.gather(*(first.wait() for _, first, _ in streams)), 20)

    server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    refused = await sse_post(Remote(server.port), {"message": "too late"})
    assert (refused.status, refused.body["code"]) == (503, "unavailable")
    started = time.monotonic()
    assert await asyncio.wait_for(server.process.wait(), 30) == 0
    assert time.monotonic() - started < 15
    await asyncio.gather(*(task for _, _, task in streams))
    expected = "".join(SLOW_CHUNKS[:20])
    for events, _, _ in streams:
        assert "".join(e.get("content", "") for e in events) == expected
        assert events[-1]["done"] is True

    restarted = ServerProcess(tmp_path, upstream)
    await restarted.start()
    try:
        for n in range(20):
            messages = await history(Remote(restarted.port), f"s{n}")
            assert (messages[1]["status"], messages[1]["content"]) == ("complete", expected)
    finally:
        await restarted.stop(signal.SIGTERM)


async def test_sigterm_past_grace_cancels_and_stores_partial(tmp_path, upstream):
    server = ServerProcess(tmp_path, upstream, AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS="0.5")
    await server.start()
    upstream.default = Script(chunks=SLOW_CHUNKS, delay=0.2)  # about 6 s
    events: list = []
    first = asyncio.Event()
    task = asyncio.create_task(stream_from(server.url, {"message": "go", "sessionId": "late"}, events, first))
    await asyncio.wait_for(first.wait(), 20)
    started = time.monotonic()
    assert await server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    await task
    received = "".join(e.get("content", "") for e in events)
    assert events[-1] == {"done": True, "cancelled": True, "sessionId": "late", "messageId": events[0]["messageId"]}

    restarted = ServerProcess(tmp_path, upstream)
    await restarted.start()
    try:
        stored = (await history(Remote(restarted.port), "late"))[1]
        assert (stored["status"], stored["content"]) == ("partial", received)
    finally:
        await restarted.stop(signal.SIGTERM)


async def test_sigkill_loses_at_most_one_checkpoint_of_text(tmp_path, upstream):
    server = ServerProcess(tmp_path, upstream, AICHAT_STORAGE_CHECKPOINT_SECONDS="0.3")
    await server.start()
    upstream.default = Script(chunks=SLOW_CHUNKS, delay=0.1)  # about 3 s
    events: list = []
    first = asyncio.Event()
    task = asyncio.create_task(stream_from(server.url, {"message": "go", "sessionId": "crash"}, events, first))
    await asyncio.wait_for(first.wait(), 20)
    await asyncio.sleep(1.2)
    received = "".join(e.get("content", "") for e in events)
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    await asyncio.gather(task, return_exceptions=True)

    restarted = ServerProcess(tmp_path, upstream)
    await restarted.start()
    try:
        stored = (await history(Remote(restarted.port), "crash"))[1]
        assert stored["status"] == "partial"
        assert received.startswith(stored["content"])
        # at 0.1 s per chunk, one 0.3 s checkpoint interval is about 3 chunks; allow 6
        assert len(received) - len(stored["content"]) <= len("".join(SLOW_CHUNKS[:6]))
        assert stored["content"]
    finally:
        await restarted.stop(signal.SIGTERM)


# --- upstream faults -------------------------------------------------------------------


async def test_upstream_429_then_success_is_retried(make_server, upstream):
    server = await make_server(ai__max_retries=2)
    upstream.queue(Script(status=429), Script(status=503))
    result = await sse_post(server, {"message": "go"})
    assert result.content == "Hello, world!" and result.last["done"] is True
    assert len(upstream.requests) == 3


async def test_failure_after_first_token_is_not_retried_and_partial_is_kept(make_server, upstream, socket_client):
    server = await make_server(ai__max_retries=2)
    upstream.queue(Script(chunks=["A", "B", "C"], drop_after=1))
    client = await socket_client(server)
    events = await client.chat({"message": "go", "sessionId": "drop"})
    assert streamed_text(events) == "A"
    assert events[-1][0] == "ai:error" and events[-1][1]["code"] == "upstream_error"
    assert len(upstream.requests) == 1
    stored = (await history(server, "drop"))[1]
    assert (stored["status"], stored["content"]) == ("partial", "A")


async def test_stall_ends_with_timeout_on_socketio(make_server, upstream, socket_client):
    server = await make_server(ai__request_timeout_seconds=1, ai__max_retries=0)
    upstream.queue(Script(chunks=["A", "B"], stall_after=1))
    client = await socket_client(server)
    events = await client.chat({"message": "go", "sessionId": "stall"})
    assert events[-1][0] == "ai:error" and events[-1][1]["code"] == "timeout"
    stored = (await history(server, "stall"))[1]
    assert (stored["status"], stored["content"]) == ("partial", "A")


# --- slow and dead clients -------------------------------------------------------------


async def test_sse_client_that_never_reads_is_dropped_and_the_answer_still_stored(server, upstream):
    big = ["x" * 2000] * 400  # 800 kB of text, ~850 kB of frames: more than the socket buffers hold
    upstream.queue(Script(chunks=big))
    loop = asyncio.get_running_loop()
    # Small kernel buffers on both ends (accepted sockets inherit the listener's), so what
    # piles up is the server's own buffer, not the kernel's (which autotunes up to 4 MB).
    for listener in server.http._sockets.values():
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    body = json.dumps({"message": "flood", "sessionId": "never-reads"}).encode()
    await loop.sock_sendall(sock, b"POST /api/v2/ai/chat/stream HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        await wait_until(lambda: upstream.requests, timeout=10)
        await wait_until(lambda: server.app.chat.active_count == 0, timeout=20)
        stored = (await history(server, "never-reads"))[1]
        assert (stored["status"], len(stored["content"])) == ("complete", 800_000)
        # the server gave up on the client: draining the socket ends in EOF, not a finished stream
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            received += chunk
        assert b'"done":true' not in received
        assert len(received) < 400_000  # kernel buffers plus the server's 256 kB bound
    finally:
        sock.close()


def ws_frame(text: str) -> bytes:
    """One masked websocket text frame, as a client must send it."""
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def connect_raw_socketio(sock: socket.socket, namespace) -> None:
    """Open a Socket.IO session by hand over a connected socket: websocket upgrade, then `40`."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, (
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ))
    handshake = bytearray()
    while b"101" not in handshake or b'"sid"' not in handshake:
        handshake += await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
    await loop.sock_sendall(sock, ws_frame("40"))
    await wait_until(lambda: len(namespace.connections) == 1)


async def test_socketio_client_that_never_reads_is_dropped_and_the_answer_still_stored(server, upstream):
    upstream.queue(Script(chunks=["y" * 2000] * 400))
    loop = asyncio.get_running_loop()
    for listener in server.http._sockets.values():  # small kernel buffers, as in the SSE case
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    namespace = server.app.sio.namespace_handlers["/"]
    try:
        await connect_raw_socketio(sock, namespace)
        await loop.sock_sendall(sock, ws_frame('42["ai:chat",{"message":"flood","sessionId":"sio-never-reads"}]'))
        # the server gives up on the client (the namespace forgets it) and finishes the answer anyway
        await wait_until(lambda: len(namespace.connections) == 0, timeout=20)
        await wait_until(lambda: server.app.chat.active_count == 0, timeout=20)
        stored = (await history(server, "sio-never-reads"))[1]
        assert (stored["status"], len(stored["content"])) == ("complete", 800_000)
    finally:
        sock.close()


# --- idle and half-open connections are reaped -------------------------------------------


async def recv_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``timeout``)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return bytes(received)


async def raw_connection(server) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    return sock


async def test_idle_keep_alive_connection_is_closed(make_server):
    server = await make_server(server__idle_connection_timeout_seconds=0.5)
    sock = await raw_connection(server)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = await recv_until_closed(sock, timeout=5)
        assert received.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in received
    finally:
        sock.close()


async def test_trickled_request_body_is_cut_off(make_server, upstream):
    server = await make_server(server__body_timeout_seconds=0.5)
    sock = await raw_connection(server)
    try:
        await asyncio.get_running_loop().sock_sendall(
            sock, b"POST /api/v2/ai/chat/stream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"message\":")
        received = await recv_until_closed(sock, timeout=5)
        assert b"text/event-stream" not in received
        assert upstream.requests == []
    finally:
        sock.close()


async def test_half_open_socketio_client_is_reaped(make_server):
    server = await make_server(server__socketio_ping_interval_seconds=0.3,
                               server__socketio_ping_timeout_seconds=0.3)
    sock = await raw_connection(server)
    namespace = server.app.sio.namespace_handlers["/"]
    try:
        await connect_raw_socketio(sock, namespace)
        # the client goes silent (never answers a ping): the server drops it
        await wait_until(lambda: len(namespace.connections) == 0, timeout=10)
        await recv_until_closed(sock, timeout=10)
    finally:
        sock.close()


async def test_upstream_failures_are_logged_with_the_answer_id_and_reach_the_client_as_a_code(
        make_server, upstream, caplog):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(status=500))
    with caplog.at_level("WARNING", logger="aichat"):
        result = await sse_post(server, {"message": "go"})
    message_id = result.last["messageId"]
    assert result.last == {"error": "The AI service failed.", "code": "upstream_error",
                           "sessionId": result.last["sessionId"], "messageId": message_id}
    logged = [r.getMessage() for r in caplog.records if message_id in r.getMessage()]
    assert logged and "upstream_error" in logged[0] and "HTTP 500" in logged[0]


async def test_a_copy_of_the_signal_within_a_second_still_drains(tmp_path, upstream):
    """One SIGTERM to a process group reaches the one-file executable's server twice (its
    launcher forwards a copy): that must drain like one signal, not cut the grace short."""
    server = ServerProcess(tmp_path, upstream, AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS="60")
    await server.start()
    upstream.default = Script(chunks=SLOW_CHUNKS[:15], delay=0.1)  # about 1.5 s
    events: list = []
    first = asyncio.Event()
    task = asyncio.create_task(stream_from(server.url, {"message": "go", "sessionId": "forwarded"}, events, first))
    await asyncio.wait_for(first.wait(), 20)
    server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)  # the launcher's copy, after the server has begun shutting down
    assert await server.stop(signal.SIGTERM) == 0
    await task
    assert events[-1]["done"] is True and "cancelled" not in events[-1]
    assert "".join(e.get("content", "") for e in events) == "".join(SLOW_CHUNKS[:15])


async def test_a_second_signal_cuts_the_grace_short(tmp_path, upstream):
    server = ServerProcess(tmp_path, upstream, AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS="60")
    await server.start()
    upstream.default = Script(chunks=SLOW_CHUNKS, delay=0.2)  # about 6 s
    events: list = []
    first = asyncio.Event()
    task = asyncio.create_task(stream_from(server.url, {"message": "go", "sessionId": "impatient"}, events, first))
    await asyncio.wait_for(first.wait(), 20)
    server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.2)  # a copy of the same signal within a second is not "again" (lifecycle.py)
    started = time.monotonic()
    assert await server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5  # not the 60 s grace, nor the 6 s answer
    await task
    assert events[-1]["done"] is True and events[-1]["cancelled"] is True

    restarted = ServerProcess(tmp_path, upstream)
    await restarted.start()
    try:
        stored = (await history(Remote(restarted.port), "impatient"))[1]
        assert stored["status"] == "partial"
        assert stored["content"] == "".join(e.get("content", "") for e in events)
    finally:
        await restarted.stop(signal.SIGTERM)
