"""Embedding (API.md, "Embedding"): the chat mounted at /chat in a host Tornado application
with its own signed-cookie login (examples/tornado_host.py), and two ChatServers side by side."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
import tornado.httpserver
import tornado.netutil
import tornado.web
import yarl

from examples.tornado_host import build_host_app, cookie_identify
from server.embedding import ChatServer
from server.settings import load_settings
from tests.conftest import SseResponse, make_settings, read_sse
from tests.fake_upstream import FakeUpstream, Script

COOKIE_SECRET = "test-cookie-secret"


class Host:
    """A host application served on a free port, with an aiohttp session per user."""

    def __init__(self, app: tornado.web.Application) -> None:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.http = tornado.httpserver.HTTPServer(app)
        self.http.add_sockets(sockets)
        self.base = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def login(self, name: str) -> aiohttp.ClientSession:
        """Log in through the host's own form (xsrf token and all); the session keeps the cookie."""
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with session.get(self.base + "/login") as response:
            form = await response.text()
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form).group(1)
        async with session.post(self.base + "/login", data={"name": name, "_xsrf": xsrf},
                                allow_redirects=False) as response:
            assert response.status == 302
        return session

    def cookie_header(self, session: aiohttp.ClientSession) -> str:
        cookies = session.cookie_jar.filter_cookies(yarl.URL(self.base))
        return "; ".join(f"{key}={morsel.value}" for key, morsel in cookies.items())


async def chat_sse(host: Host, session: aiohttp.ClientSession, payload: dict[str, Any],
                   prefix: str = "/chat", headers: dict[str, str] | None = None) -> SseResponse:
    async with session.post(f"{host.base}{prefix}/api/v2/ai/chat/stream", json=payload,
                            headers=headers or {}) as response:
        result = SseResponse(response.status, dict(response.headers))
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            await read_sse(response, result)
        else:
            result.body = await response.json()
        return result


async def get_json(session: aiohttp.ClientSession, address: str) -> tuple[int, Any]:
    async with session.get(address) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


@pytest.fixture
async def host_factory(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Host, list[ChatServer]]] = []

    async def factory(prefixes: tuple[str, ...] = ("/chat",), **overrides: Any) -> tuple[Host, list[ChatServer]]:
        chats = []
        routes: list[Any] = []
        for index, prefix in enumerate(prefixes):
            settings = make_settings(tmp_path, upstream, storage__sqlite_path=tmp_path / f"chat{index}.sqlite3",
                                     **overrides)
            chat = ChatServer(settings, identify=cookie_identify(COOKIE_SECRET), environ={})
            await chat.start()
            chats.append(chat)
            if prefix == "/chat":
                app = build_host_app(chat, COOKIE_SECRET)
            else:
                routes += chat.routes(prefix)
        if prefixes != ("/chat",):
            app = tornado.web.Application(routes, cookie_secret=COOKIE_SECRET, xsrf_cookies=True)
        host = Host(app)
        made.append((host, chats))
        return host, chats

    yield factory
    for host, chats in made:
        host.http.stop()
        for chat in chats:
            await chat.stop(grace_seconds=0)


async def test_sse_history_and_sessions_follow_the_host_login(host_factory):
    host, _ = await host_factory()
    alice, bob = await host.login("alice"), await host.login("bob")
    try:
        result = await chat_sse(host, alice, {"message": "hi from alice", "sessionId": "alice-1"})
        assert result.status == 200 and result.last["done"] is True
        assert result.content == "Hello, world!"

        # the session belongs to the cookie's user: listed for her with no token at all
        status, body = await get_json(alice, host.base + "/chat/api/v2/ai/chat/sessions")
        assert status == 200 and [s["sessionId"] for s in body["sessions"]] == ["alice-1"]
        status, body = await get_json(bob, host.base + "/chat/api/v2/ai/chat/sessions")
        assert status == 200 and body["sessions"] == []

        # another user can neither read nor write it
        status, body = await get_json(bob, host.base + "/chat/api/v2/ai/chat/sessions/alice-1")
        assert status == 404 and body["code"] == "not_found"
        refused = await chat_sse(host, bob, {"message": "let me in", "sessionId": "alice-1"})
        assert refused.status == 404 and refused.body["code"] == "not_found"
        status, body = await get_json(alice, host.base + "/chat/api/v2/ai/chat/sessions/alice-1")
        assert [m["content"] for m in body["messages"]] == ["hi from alice", "Hello, world!"]
    finally:
        await alice.close()
        await bob.close()


async def test_cancel_and_resume_follow_the_host_login(host_factory, upstream):
    host, _ = await host_factory()
    alice, bob = await host.login("alice"), await host.login("bob")
    chunks = [f"w{i} " for i in range(40)]
    upstream.default = Script(chunks=chunks, delay=0.05)  # about 2 s
    try:
        first: dict[str, Any] = {}
        async with alice.post(host.base + "/chat/api/v2/ai/chat/stream",
                              json={"message": "long one", "sessionId": "alice-long"}) as response:
            async for raw in response.content:  # the first frame, then the connection is dropped
                if raw.startswith(b"id: "):
                    first["id"] = raw[4:].decode().strip()
                    break
        message_id = first["id"].rpartition(":")[0]
        resume = f"{host.base}/chat/api/v2/ai/chat/stream/{message_id}"
        cancel = host.base + "/chat/api/v2/ai/chat/sessions/alice-long/cancel"
        # bob's cookie reaches neither her answer nor its stop
        async with bob.get(resume) as response:
            assert response.status == 404 and (await response.json())["code"] == "not_found"
        async with bob.post(cancel) as response:
            assert response.status == 404
        # hers does: resume from the start, then stop it
        async with alice.get(resume) as response:
            assert response.status == 200
            result = SseResponse(200, {})
            stopping: list[asyncio.Task[None]] = []

            async def stop() -> None:
                async with alice.post(cancel) as stopped:
                    assert stopped.status == 202 and (await stopped.json())["messageId"] == message_id

            def on_event(_: dict[str, Any]) -> None:  # stop the answer once it is being replayed
                if not stopping:
                    stopping.append(asyncio.ensure_future(stop()))

            await read_sse(response, result, on_event)
            await stopping[0]
        assert result.last["done"] is True and result.last["cancelled"] is True
        status, body = await get_json(alice, host.base + "/chat/api/v2/ai/chat/sessions/alice-long")
        assert body["messages"][-1]["status"] == "partial"
        assert body["messages"][-1]["content"] == result.content
    finally:
        await alice.close()
        await bob.close()


async def test_host_routes_and_xsrf_keep_working(host_factory):
    host, _ = await host_factory()
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(host.base + "/", allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"].startswith("/login")
        # the host's own form POST still needs its xsrf token
        async with anonymous.post(host.base + "/login", data={"name": "mallory"}, allow_redirects=False) as response:
            assert response.status == 403
        # while the chat's JSON POST needs none (the chat routes take JSON under CORS rules)
        result = await chat_sse(host, anonymous, {"message": "anonymous hello"})
        assert result.status == 200 and result.last["done"] is True
    alice = await host.login("alice")
    try:
        async with alice.get(host.base + "/") as response:
            assert response.status == 200 and "Hello alice" in await response.text()
        async with alice.get(host.base + "/chat/") as response:  # the chat page, under the prefix
            assert response.status == 200 and 'id="message"' in await response.text()
        same_origin = await chat_sse(host, alice, {"message": "mine", "sessionId": "mine"},
                                     headers={"Origin": host.base})
        assert same_origin.status == 200
        # a cross-site page cannot use her login cookie to act on the chat
        session = host.base + "/chat/api/v2/ai/chat/sessions/mine"
        for method, address in (("DELETE", session), ("POST", session + "/cancel")):
            async with alice.request(method, address, headers={"Origin": "https://evil.example"}) as response:
                assert response.status == 403 and (await response.json())["code"] == "forbidden"
        # an Origin that is not even a URL is refused the same way, not a 500 with a traceback
        async with alice.post(session + "/cancel", headers={"Origin": "http://[::1"}) as response:
            assert response.status == 403 and (await response.json())["code"] == "forbidden"
        status, body = await get_json(alice, session)
        assert status == 200 and len(body["messages"]) == 2
    finally:
        await alice.close()


async def test_socketio_under_the_prefix_uses_the_handshake_cookie(host_factory):
    host, _ = await host_factory()
    alice = await host.login("alice")
    client = socketio.AsyncClient(reconnection=False)
    events: list[tuple[str, Any]] = []
    for name in ("ai:stream", "ai:complete", "ai:error"):
        client.on(name, lambda data, name=name: events.append((name, data)))
    try:
        for transport in ("websocket", "polling"):
            events.clear()
            await client.connect(host.base, socketio_path="/chat/socket.io", transports=[transport],
                                 headers={"Cookie": host.cookie_header(alice)}, wait_timeout=5)
            await client.emit("ai:chat", {"message": f"over {transport}", "sessionId": f"alice-{transport}"})
            for _ in range(200):
                if any(name != "ai:stream" for name, _ in events):
                    break
                await client.sleep(0.05)
            assert events[-1][0] == "ai:complete", events
            assert events[-1][1]["response"] == "Hello, world!"
            await client.disconnect()
        status, body = await get_json(alice, host.base + "/chat/api/v2/ai/chat/sessions")
        assert sorted(s["sessionId"] for s in body["sessions"]) == ["alice-polling", "alice-websocket"]
    finally:
        await alice.close()


async def test_two_chat_servers_in_one_process_do_not_interfere(host_factory):
    host, (first, second) = await host_factory(("/a", "/b"), rate_limit__anonymous_limit=1)
    async with aiohttp.ClientSession() as client:
        result = await chat_sse(host, client, {"message": "to a", "sessionId": "shared-id"}, prefix="/a")
        assert result.status == 200
        # a's budget is used up; b has its own limiter, store and sessions
        limited = await chat_sse(host, client, {"message": "again a"}, prefix="/a")
        assert limited.status == 429
        status, _ = await get_json(client, host.base + "/b/api/v2/ai/chat/sessions/shared-id")
        assert status == 404
        result = await chat_sse(host, client, {"message": "to b", "sessionId": "shared-id"}, prefix="/b")
        assert result.status == 200
        status, body = await get_json(client, host.base + "/b/api/v2/ai/chat/sessions/shared-id")
        assert [m["content"] for m in body["messages"]] == ["to b", "Hello, world!"]
    assert first.store is not second.store and first.chat is not second.chat
    assert (await first.store.get_session("shared-id")).messages[0].content == "to a"


async def test_identify_may_be_async_and_settings_may_be_a_path(tmp_path: Path, upstream: FakeUpstream):
    ini = tmp_path / "chat.ini"
    ini.write_text(f"[ai]\nprovider = openai\nbase_url = {upstream.base_url}\napi_key = sk-x\n"
                   f"[storage]\nsqlite_path = {tmp_path / 'c.sqlite3'}\n")

    async def identify(request: tornado.httputil.HTTPServerRequest) -> str | None:
        return request.headers.get("X-Test-User")

    chat = ChatServer(str(ini), identify=identify, environ={"AICHAT_RATE_LIMIT_AUTHENTICATED_LIMIT": "3"})
    assert chat.settings.rate_limit.authenticated_limit == 3  # the environment is laid over the file
    await chat.start()
    host = Host(tornado.web.Application(chat.routes("/x")))
    try:
        async with aiohttp.ClientSession() as client:
            result = await chat_sse(host, client, {"message": "hi", "sessionId": "carol-1"}, prefix="/x",
                                    headers={"X-Test-User": "carol"})
            assert result.status == 200 and result.headers["Ratelimit-Limit"] == "3"
            async with client.get(host.base + "/x/api/v2/ai/chat/sessions", headers={"X-Test-User": "carol"}) as r:
                assert [s["sessionId"] for s in (await r.json())["sessions"]] == ["carol-1"]
    finally:
        host.http.stop()
        await chat.stop(0)


async def test_host_names_when_embedded(tmp_path: Path, upstream: FakeUpstream):
    """Mounted in a host's app the listen address is the host's: any Host is served (the
    default host = 127.0.0.1 is run.py's bind address), until allowed_hosts names them."""
    for allowed, expected in (("", 200), ("chat.example.com", 400)):
        settings = make_settings(tmp_path, upstream, server__allowed_hosts=allowed)
        chat = ChatServer(settings, environ={})
        await chat.start()
        host = Host(tornado.web.Application(chat.routes("/chat")))
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(host.base + "/chat/healthz", headers={"Host": "www.example.org"}) as r:
                    assert r.status == expected
                async with client.get(host.base + "/chat/healthz", headers={"Host": "chat.example.com"}) as r:
                    assert r.status == 200
        finally:
            host.http.stop()
            await chat.stop(0)


def test_settings_object_gets_the_environment_too(tmp_path: Path):
    settings = load_settings(None, environ={})
    chat = ChatServer(settings, environ={"AICHAT_RATE_LIMIT_ANONYMOUS_LIMIT": "4", "PORT": "7123"})
    assert chat.settings.rate_limit.anonymous_limit == 4 and chat.settings.server.port == 7123
    assert settings.rate_limit.anonymous_limit == 20  # the host's object is not changed
    with pytest.raises(ValueError):
        chat.routes("chat")  # a prefix starts with "/"
