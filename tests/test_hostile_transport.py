"""Issue #10, the transport items: attacks by hostile clients through real sockets and clients."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from server.lifecycle import RunningServer
from server.socketio_server import MAX_POLLING_SESSIONS_PER_ADDRESS, MAX_UNSENT_BYTES
from services.host_filter import HostFilter
from tests.conftest import http_json, sse_post, url
from tests.fake_upstream import Script

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/api/v2/ai/chat/stream"


# --- helpers -----------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return status, headers, body


async def raw_exchange(server: RunningServer, head: str, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """Send a hand-written request head (and body), read one response: status, headers, JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        status, headers, raw = await read_response(reader)
        return status, headers, json.loads(raw) if raw else None
    finally:
        writer.close()


def tracebacks(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.exc_info or "Traceback" in r.getMessage()]


# --- 3. bodies: 413 on every route before the body is read --------------------------------

ROUTES = [
    ("POST", "/no/such/route"),
    ("GET", "/healthz"),
    ("GET", "/api/v2/ai/chat/sessions"),
    ("POST", "/api/v2/ai/chat/sessions/s1/cancel"),
    ("GET", "/api/v2/ai/chat/stream/m1"),
    ("POST", CHAT),
    # the routes that are not API handlers take no body at all
    ("POST", "/"),
    ("GET", "/web/app.js"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize("declared", [1_000_000, 10_000_000])
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_declared_body_over_the_limit_is_refused_before_it_is_sent(server, method, path, declared, caplog):
    caplog.set_level(logging.INFO)
    # only the head is sent: a server that waits for the 1 MB body (as Tornado did for every
    # route up to its 2 MB cap) never answers; past that cap Tornado answered a bare 400
    status, headers, body = await raw_exchange(
        server, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n")
    assert status == 413
    assert body["code"] == "too_large"
    assert headers["content-type"].startswith("application/json")
    # and no "400 Bad Request" (with its log line) from Tornado's own cap after our answer
    assert [r.getMessage() for r in caplog.records if r.name == "tornado.general"] == []


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_chunked_body_over_the_limit_is_refused_as_it_streams(make_server, method, path):
    server = await make_server(server__max_body_bytes=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(5):  # 1,500 bytes in 300-byte chunks, then the end
            writer.write(b"12c\r\n" + b"[" * 300 + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        status, _, raw = await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the rest is not read: closed
    finally:
        writer.close()
    # an unknown route answers at once, before any of the body; the others count it
    expected = (404, "not_found") if path == "/no/such/route" else (413, "too_large")
    assert (status, json.loads(raw)["code"]) == expected
    assert (await http_json(server, "GET", "/healthz"))[0] == 200


async def test_socketio_still_reads_frames_over_max_body_bytes(make_server, socket_client):
    server = await make_server(server__max_body_bytes=1000)
    client = await socket_client(server, transport="polling")
    events = await client.chat({"message": "x" * 5000})  # a 5 KB polling POST
    assert events[-1][0] == "ai:complete"


# --- 4. file descriptors ---------------------------------------------------------------------


async def test_connections_past_max_connections_are_closed_at_once(make_server):
    server = await make_server(server__max_connections=5)
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, unanswered
    writer.close()
    assert server.http.open_connections == 5  # type: ignore[attr-defined]
    for _, idle_writer in idle:
        idle_writer.close()
    for _ in range(100):
        if server.http.open_connections == 0:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    assert server.http.open_connections == 0  # type: ignore[attr-defined]
    assert (await http_json(server, "GET", "/healthz"))[0] == 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.parametrize("max_connections", ["0", "1000"])
def test_running_out_of_file_descriptors_logs_a_few_lines_and_recovers(tmp_path, max_connections):
    # 0: 80% of the 64-descriptor limit, connections past it are closed; 1000: past the limit,
    # accept() itself fails with EMFILE (which Tornado re-raised: one traceback per attempt)
    port = _free_port()
    config = tmp_path / "settings.ini"
    config.write_text(f"[server]\nhost = 127.0.0.1\nport = {port}\nmax_connections = {max_connections}\n"
                      f"[ai]\nprovider = demo\n[storage]\nsqlite_path = {tmp_path / 'chat.sqlite3'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICHAT_", "OPENAI_"))}
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(config)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: _limit_open_files(64))
    try:
        _wait_for_health(port, process)
        idle = []
        for _ in range(150):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(1.5)  # the server works through its backlog meanwhile
        for connection in idle:
            connection.close()
        _wait_for_health(port, process)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    log = stderr.decode()
    assert "connections closed at once" in log, log[:3000]  # some were refused...
    assert "Traceback" not in log, log[:3000]  # ...quietly
    assert len(log.splitlines()) < 15, log[:3000]


def _wait_for_health(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if connection.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not answer /healthz")


# --- 5. log amplification ---------------------------------------------------------------------


async def open_raw_socketio(server: RunningServer, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url(server, "/socket.io/?EIO=4&transport=websocket"))
    assert (await ws.receive_str()).startswith("0{")
    await ws.send_str("40")
    assert (await ws.receive_str()).startswith("40")
    return ws


async def test_bad_socketio_packets_write_no_traceback(server, caplog):
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession() as session:
        ws = await open_raw_socketio(server, session)
        for index in range(2000):
            await ws.send_str(("42[123]", "42[]", '42["ai:chat"', "42{}", "4", "49")[index % 6])
        # the connection still works: a good event after the bad ones is answered
        await ws.send_str('42["ai:chat",{"message":"hi"}]')
        while '"ai:complete"' not in (frame := await asyncio.wait_for(ws.receive_str(), 10)):
            assert frame.startswith(("42", "2")), frame
        await ws.close()
        for _ in range(10):  # frames engine.io itself cannot decode end their connection
            ws = await open_raw_socketio(server, session)
            await ws.send_str("x")
            await asyncio.wait_for(ws.receive(), 10)
        # a long-polling session posting garbage
        async with session.get(url(server, "/socket.io/?EIO=4&transport=polling")) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        for _ in range(20):
            async with session.post(url(server, f"/socket.io/?EIO=4&transport=polling&sid={sid}"),
                                    data="x\x1e") as response:
                await response.read()
    await asyncio.sleep(0.1)
    gc.collect()  # "Task exception was never retrieved" is written when the task is collected
    await asyncio.sleep(0)
    assert tracebacks(caplog.records) == []
    noisy = [r for r in caplog.records if r.name != "tornado.access"]
    assert len(noisy) < 15, [r.getMessage()[:200] for r in noisy]
    assert sum(len(r.getMessage()) for r in noisy) < 5000


async def test_deeply_nested_json_body_is_invalid_json(make_server, upstream, caplog):
    server = await make_server(server__max_body_bytes=300_000)
    result = await sse_post(server, None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert result.status == 400
    assert result.body["code"] == "invalid_json"
    nested_in_object = b'{"message":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    result = await sse_post(server, None, raw=nested_in_object)
    assert result.status == 400
    assert tracebacks(caplog.records) == []
    assert upstream.requests == []


@pytest.mark.parametrize("seq", ["\u00b2", "1" * 5000, "\u0663"])
async def test_odd_last_event_ids_are_invalid_requests(server, caplog, seq):
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/stream/m1?lastEventId=m1:{seq}")
    assert (status, body["code"]) == (400, "invalid_request")
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/stream/m1",
                                      headers={"Last-Event-ID": f"m1:{seq}".encode().decode("latin-1")})
    assert (status, body["code"]) == (400, "invalid_request")
    assert tracebacks(caplog.records) == []


# --- 9. Engine.IO long-polling ------------------------------------------------------------------


async def test_engineio_sessions_per_address_are_capped(server):
    handshake = url(server, "/socket.io/?EIO=4&transport=polling")
    sids = []
    async with aiohttp.ClientSession() as session:
        for _ in range(MAX_POLLING_SESSIONS_PER_ADDRESS):
            async with session.get(handshake) as response:
                assert response.status == 200
                sids.append(json.loads((await response.text())[1:])["sid"])
        async with session.get(handshake) as response:
            assert response.status == 429
            assert (await response.json())["code"] == "rate_limited"
        assert len(server.app.sio.eio.sockets) == MAX_POLLING_SESSIONS_PER_ADDRESS
        # a session that ends frees its place
        async with session.post(url(server, f"/socket.io/?EIO=4&transport=polling&sid={sids[0]}"),
                                data="1") as response:
            assert response.status == 200
        async with session.get(handshake) as response:
            assert response.status == 200
        # websocket sessions hold a connection each (bounded by max_connections): not counted
        ws = await session.ws_connect(url(server, "/socket.io/?EIO=4&transport=websocket"))
        assert (await ws.receive_str()).startswith("0{")
        await ws.close()
        # nor a session once it has upgraded from polling to websocket
        async with session.post(url(server, f"/socket.io/?EIO=4&transport=polling&sid={sids[1]}"),
                                data="1") as response:
            assert response.status == 200
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(url(server, ""), transports=["polling", "websocket"], wait_timeout=5)
        try:
            for _ in range(100):
                if client.transport() == "websocket":
                    break
                await asyncio.sleep(0.05)
            assert client.transport() == "websocket"
            async with session.get(handshake) as response:
                assert response.status == 200
        finally:
            await client.disconnect()


async def test_a_polling_client_that_stops_polling_is_closed_past_the_bound(server, upstream):
    upstream.queue(Script(chunks=["x" * 1000] * 400))  # 400 KB of answer, never fetched
    sio = server.app.sio
    async with aiohttp.ClientSession() as session:
        base = url(server, "/socket.io/?EIO=4&transport=polling")
        async with session.get(base) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        polled = f"{base}&sid={sid}"
        async with session.post(polled, data="40") as response:
            assert response.status == 200
        async with session.get(polled) as response:  # the CONNECT answer
            assert (await response.text()).startswith("40")
        async with session.post(polled, data='42["ai:chat",{"message":"long"}]') as response:
            assert response.status == 200
        # no more polling: the server must not keep queueing the answer for this client
        for _ in range(200):
            if sid not in sio.eio.sockets:
                break
            queued = [getattr(item, "data", "") for item in sio.eio.sockets[sid].queue._queue]
            assert sum(len(data) for data in queued if isinstance(data, str)) <= MAX_UNSENT_BYTES
            await asyncio.sleep(0.05)
        assert sid not in sio.eio.sockets
        async with session.get(polled) as response:
            assert response.status == 400


# --- 10. CORS ------------------------------------------------------------------------------------


async def test_any_origin_gets_no_credentials_on_socketio(make_server):
    server = await make_server(server__cors_origins="*")
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/socket.io/?EIO=4&transport=polling"),
                               headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 200
            assert response.headers.get("Access-Control-Allow-Credentials") != "true"


# --- 11. DNS rebinding ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/no/such/route", "/api/v2/ai/chat/sessions/s1",
                                  "/socket.io/?EIO=4&transport=polling", "/metrics", "/", "/web/app.js"])
async def test_a_foreign_host_is_refused_by_a_loopback_server(server, path):
    status, body, _ = await http_json(server, "GET", path, headers={"Host": "rebind.evil.example:7000"})
    assert (status, body["code"]) == (400, "invalid_host")
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, path), headers={"Host": "localhost:7000"}) as response:
            assert response.status in (200, 404)


async def test_a_foreign_host_is_refused_on_chat_and_websocket(server, upstream):
    result = await sse_post(server, {"message": "hi"}, headers={"Host": "rebind.evil.example"})
    assert (result.status, result.body["code"]) == (400, "invalid_host")
    assert upstream.requests == []
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url(server, "/socket.io/?EIO=4&transport=websocket"),
                                     headers={"Host": "rebind.evil.example"})
        assert refused.value.status == 400
        for host in ("127.0.0.1", "localhost", "[::1]:80", "app.localhost"):
            ws = await session.ws_connect(url(server, "/socket.io/?EIO=4&transport=websocket"),
                                          headers={"Host": host})
            assert (await ws.receive_str()).startswith("0{")
            await ws.close()


async def test_allowed_hosts_lists_the_names_served(make_server):
    server = await make_server(server__allowed_hosts="chat.example.com, *.corp.example")
    for host, expected in [("chat.example.com:443", 200), ("CHAT.example.com.", 200), ("a.corp.example", 200),
                           ("localhost", 400), ("evil.example", 400), ("chat.example.com.evil", 400)]:
        status, _, _ = await http_json(server, "GET", "/healthz", headers={"Host": host})
        assert status == expected, host


def test_host_filter_rules():
    loopback = HostFilter((), "127.0.0.1")
    assert all(loopback.allows(h) for h in ("localhost", "127.0.0.1:7000", "127.1.2.3", "[::1]:7000", "::1"))
    assert not any(loopback.allows(h) for h in ("evil.example", "10.0.0.1", "localhost.evil.example"))
    assert HostFilter((), "0.0.0.0").allows("anything.example")
    assert HostFilter((), "localhost").allows("localhost") and not HostFilter((), "::1").allows("a.example")


# --- 12. logs -------------------------------------------------------------------------------------


async def test_the_access_log_has_no_query_string(server, caplog, upstream):
    caplog.set_level(logging.INFO)
    status, _, _ = await http_json(server, "GET", "/healthz?token=very-secret-token")
    assert status == 200
    await http_json(server, "GET", "/nope/%0d%0aFAKE%20LINE?token=very-secret-token")
    access = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert any("/healthz" in line and "200" in line for line in access), access
    assert not any("very-secret-token" in r.getMessage() for r in caplog.records)
    assert not any("\n" in line or "\r" in line for line in access)
    # the upstream HTTP client writes no INFO line (with its URL) per request
    caplog.clear()
    result = await sse_post(server, {"message": "hi"})
    assert result.status == 200
    assert [r.name for r in caplog.records if r.name.startswith(("httpx", "httpcore", "openai"))
            and r.levelno < logging.WARNING] == []


# --- 14. line separators in SSE ------------------------------------------------------------------


async def test_unicode_line_separators_are_escaped_in_sse(server, upstream):
    chunks = ["one\u2028two", "\u2029", "three\u0085four", "\r\nfive"]
    upstream.queue(Script(chunks=chunks))
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, CHAT), json={"message": "hi", "sessionId": "seps-1"}) as response:
            raw = await response.read()
    text = raw.decode("utf-8")
    for char in ("\u2028", "\u2029", "\u0085"):
        assert char not in text
    content = ""
    for block in text.split("\n\n"):
        for line in block.splitlines():  # str.splitlines cuts at U+2028 too: none is left
            if line.startswith("data: "):
                content += json.loads(line[6:]).get("content", "")
    assert content == "".join(chunks)
    status, session_body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions/seps-1")
    assert status == 200
    assert session_body["messages"][-1]["content"] == content
