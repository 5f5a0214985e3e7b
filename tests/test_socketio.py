"""Socket.IO transport end to end (API.md, section Socket.IO).

Real server in-process, the fake OpenAI upstream, and real python-socketio clients over
both transports: nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest
import socketio

from tests.conftest import SocketClient, http_json, streamed_text, url
from tests.fake_upstream import Script

TRANSPORTS = pytest.mark.parametrize("transport", ["websocket", "polling"])
DEFAULT_ANSWER = "Hello, world!"
Events = list[tuple[str, dict[str, Any]]]


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def check_answer(events: Events, expected: str, session_id: str | None = None) -> dict[str, Any]:
    """One whole answer: ai:stream frames then ai:complete, ids on every event, seq rising."""
    names = [name for name, _ in events]
    assert names and names[-1] == "ai:complete", events
    assert set(names[:-1]) <= {"ai:stream"}, events
    complete = events[-1][1]
    assert streamed_text(events) == expected
    assert complete["response"] == expected
    session, message = complete["sessionId"], complete["messageId"]
    if session_id is not None:
        assert session == session_id
    assert isinstance(message, str) and message
    length = 0
    for name, data in events:
        assert data["sessionId"] == session and data["messageId"] == message, (name, data)
        if name == "ai:stream":
            assert data["content"], data  # only non-empty deltas
            length += len(data["content"])
            # seq is the answer's length once this frame is added: rising, never skipping
            assert data["seq"] == length, (data, length)
    return complete


def is_uuid4(value: str) -> bool:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, TypeError):
        return False
    return parsed.version == 4 and str(parsed) == value


def namespace(server: Any) -> Any:
    return server.app.sio.namespace_handlers["/"]


# --- streaming -------------------------------------------------------------------------


@TRANSPORTS
async def test_streams_exact_answer(server, upstream, socket_client, transport):
    chunks = ["Grüß", " dich", ", 世界", " 🎉", "!", " tail"]
    upstream.default = Script(chunks=chunks)
    client = await socket_client(server, transport=transport)

    first = check_answer(await client.chat({"message": "Hi there"}), "".join(chunks))
    assert is_uuid4(first["sessionId"]), first
    assert upstream.requests[-1].body["messages"][-1] == {"role": "user", "content": "Hi there"}

    second = check_answer(await client.chat({"message": "Again", "sessionId": "my_session-1"}), "".join(chunks),
                          session_id="my_session-1")
    assert second["messageId"] != first["messageId"]
    # the same session continues with its history as context
    third = check_answer(await client.chat({"message": "More", "sessionId": "my_session-1"}), "".join(chunks),
                         session_id="my_session-1")
    sent = [m["content"] for m in upstream.requests[-1].body["messages"]]
    assert sent[-3:] == ["Again", "".join(chunks), "More"]
    assert third["messageId"] not in (first["messageId"], second["messageId"])
    assert client.client.connected


@TRANSPORTS
@pytest.mark.parametrize("failure", ["drop", "http500"])
async def test_upstream_failure_is_upstream_error(make_server, upstream, socket_client, transport, failure):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(drop_after=2) if failure == "drop" else Script(status=500))
    client = await socket_client(server, transport=transport)

    events = await client.chat({"message": "Hi", "sessionId": "fails"})
    name, error = events[-1]
    assert name == "ai:error", events
    assert error["code"] == "upstream_error"
    assert error["sessionId"] == "fails" and error["messageId"]
    assert isinstance(error["error"], str) and error["error"]
    assert all(n == "ai:stream" for n, _ in events[:-1])
    assert "Hello, world!".startswith(streamed_text(events))
    if failure == "drop":
        assert streamed_text(events) == "Hello, "  # what came before the drop was streamed
    else:
        assert streamed_text(events) == ""
    rendered = json.dumps(events)
    for secret in ("127.0.0.1", "Traceback", "sk-test-secret-key", "http://", "/v1", str(upstream.port),
                   "fake upstream failure", "Exception", "Error("):
        assert secret not in rendered, (secret, rendered)

    assert client.client.connected
    check_answer(await client.chat({"message": "Again", "sessionId": "fails"}), DEFAULT_ANSWER, "fails")


# --- bad input -------------------------------------------------------------------------

NO_PAYLOAD = object()
BAD_PAYLOADS: list[tuple[str, Any, str]] = [
    ("no payload", NO_PAYLOAD, "invalid_request"),
    ("string", "hello", "invalid_request"),
    ("list", ["hello"], "invalid_request"),
    ("number", 42, "invalid_request"),
    ("empty object", {}, "invalid_request"),
    ("message null", {"message": None}, "invalid_request"),
    ("message number", {"message": 123}, "invalid_request"),
    ("message object", {"message": {"text": "hi"}}, "invalid_request"),
    ("message empty", {"message": ""}, "invalid_request"),
    ("message blank", {"message": "   \n"}, "invalid_request"),
    ("message too long", {"message": "x" * 11}, "invalid_request"),
    ("sessionId bad chars", {"message": "hi", "sessionId": "bad id!"}, "invalid_request"),
    ("sessionId too long", {"message": "hi", "sessionId": "s" * 129}, "invalid_request"),
    ("sessionId number", {"message": "hi", "sessionId": 7}, "invalid_request"),
    ("sessionId empty", {"message": "hi", "sessionId": ""}, "invalid_request"),
    ("token number", {"message": "hi", "token": 123}, "invalid_request"),
    ("token object", {"message": "hi", "token": {"a": 1}}, "invalid_request"),
    ("token without auth", {"message": "hi", "token": "abc"}, "invalid_token"),
    ("token empty", {"message": "hi", "token": ""}, "invalid_token"),
]


@TRANSPORTS
async def test_bad_payloads_get_errors_and_keep_the_connection(make_server, upstream, socket_client, transport):
    server = await make_server(ai__max_message_chars=10)
    client = await socket_client(server, transport=transport)
    bystander = await socket_client(server, transport=transport)
    for label, payload, code in BAD_PAYLOADS:
        before = len(upstream.requests)
        start = len(client.events)
        if payload is NO_PAYLOAD:
            await client.client.emit("ai:chat")
        else:
            await client.client.emit("ai:chat", payload)
        await client.wait_for(lambda events, start=start: len(events) > start)
        # a good message right behind it must work on the same connection
        events = await client.chat({"message": "ok"})
        bad, good = client.events[start], events
        assert bad[0] == "ai:error", (label, bad)
        assert bad[1]["code"] == code, (label, bad)
        assert isinstance(bad[1]["error"], str) and bad[1]["error"], label
        assert "messageId" not in bad[1], label  # nothing was started
        assert client.events[start + 1:] == good, label  # exactly one error for the bad one
        assert len(upstream.requests) == before + 1, label  # the bad one never reached the model
        check_answer(good, DEFAULT_ANSWER)
        assert client.client.connected, label
    assert bystander.events == []  # nothing leaked to another client
    assert bystander.client.connected


@TRANSPORTS
async def test_large_frames(make_server, socket_client, transport):
    # python-engineio answers an oversized polling POST with 400 but keeps the session until the
    # ping timeout (JS engine.io closes it at once): keep that short to see the server drop it
    server = await make_server(server__socketio_ping_interval_seconds=2, server__socketio_ping_timeout_seconds=4)
    client = await socket_client(server, transport=transport)
    # over engine.io's old 1 MB default but within the 2 MB the API promises
    events = await client.chat({"message": "x" * (1536 * 1024), "sessionId": "big"}, timeout=30)
    assert [name for name, _ in events] == ["ai:error"], events
    assert events[0][1]["code"] == "invalid_request"
    assert events[0][1]["sessionId"] == "big"
    assert client.client.connected
    check_answer(await client.chat({"message": "small", "sessionId": "big"}), DEFAULT_ANSWER, "big")

    # beyond 2 MB the transport closes the connection; the server carries on
    start = len(client.events)
    await client.client.emit("ai:chat", {"message": "y" * (2560 * 1024)})
    await eventually(lambda: not client.client.connected, timeout=30, what="the oversized frame to disconnect")
    await eventually(lambda: namespace(server).connections == {}, timeout=30, what="the server to drop the client")
    assert client.events[start:] == []
    other = await socket_client(server, transport=transport)
    check_answer(await other.chat({"message": "still there?"}), DEFAULT_ANSWER)


# --- concurrency -----------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize("count", [2, 50])
async def test_concurrent_clients(make_server, upstream, socket_client, transport, count):
    server = await make_server(rate_limit__anonymous_limit=1000)
    chunks = [f"part{i} " for i in range(10)]
    upstream.default = Script(chunks=chunks, delay=0.01)
    clients = await asyncio.gather(*(socket_client(server, transport=transport) for _ in range(count)))

    results = await asyncio.gather(*(
        client.chat({"message": f"question {i}", "sessionId": f"client-{i}"}, timeout=90)
        for i, client in enumerate(clients)
    ))
    for i, (client, events) in enumerate(zip(clients, results, strict=True)):
        check_answer(events, "".join(chunks), f"client-{i}")
        # everything this client ever received belongs to its own session
        assert {data["sessionId"] for _, data in client.events} == {f"client-{i}"}
        assert client.events == events
    asked = sorted(r.body["messages"][-1]["content"] for r in upstream.requests)
    assert asked == sorted(f"question {i}" for i in range(count))
    assert server.app.chat.active_count == 0


@TRANSPORTS
async def test_several_chats_on_one_connection(make_server, upstream, socket_client, transport):
    server = await make_server()
    chunks = [f"w{i} " for i in range(10)]
    upstream.default = Script(chunks=chunks, delay=0.02)
    client = await socket_client(server, transport=transport)
    sessions = ["one", "two", "three"]
    for session in sessions:
        await client.client.emit("ai:chat", {"message": f"about {session}", "sessionId": session})

    def all_done(events: Events) -> bool:
        return sum(name == "ai:complete" for name, _ in events) == len(sessions)

    await client.wait_for(all_done, timeout=60)
    assert not any(name == "ai:error" for name, _ in client.events), client.events
    message_ids = set()
    for session in sessions:
        mine = [(name, data) for name, data in client.events if data["sessionId"] == session]
        complete = check_answer(mine, "".join(chunks), session)
        message_ids.add(complete["messageId"])
        # the messageId alone separates the answers too
        assert [e for e in client.events if e[1]["messageId"] == complete["messageId"]] == mine
    assert len(message_ids) == len(sessions)
    assert sum(len([e for e in client.events if e[1]["sessionId"] == s]) for s in sessions) == len(client.events)


@TRANSPORTS
async def test_same_session_twice_at_once_is_busy(server, upstream, socket_client, transport):
    upstream.default = Script(chunks=[f"w{i} " for i in range(10)], delay=0.05)
    client = await socket_client(server, transport=transport)
    await client.client.emit("ai:chat", {"message": "first", "sessionId": "dup"})
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events))
    await client.client.emit("ai:chat", {"message": "second", "sessionId": "dup"})
    await client.wait_for(lambda events: any(name == "ai:complete" for name, _ in events), timeout=60)
    errors = [data for name, data in client.events if name == "ai:error"]
    assert errors == [{"error": errors[0]["error"], "code": "busy", "sessionId": "dup"}]
    answer = [(name, data) for name, data in client.events if name != "ai:error"]
    check_answer(answer, "".join(f"w{i} " for i in range(10)), "dup")


@TRANSPORTS
async def test_rate_limited(make_server, socket_client, transport):
    server = await make_server(rate_limit__anonymous_limit=2)
    client = await socket_client(server, transport=transport)
    for _ in range(2):
        check_answer(await client.chat({"message": "hi"}), DEFAULT_ANSWER)
    bad = await client.chat({"message": "hi"})
    # rejected input does not use up the budget, and is reported before the limit
    assert [name for name, _ in bad] == ["ai:error"]
    assert bad[0][1]["code"] == "rate_limited"
    assert isinstance(bad[0][1]["retryAfter"], int) and bad[0][1]["retryAfter"] > 0
    assert client.client.connected


# --- tokens ----------------------------------------------------------------------------


@TRANSPORTS
async def test_handshake_token_null_is_anonymous(server, upstream, socket_client, transport):
    client = await socket_client(server, transport=transport, auth={"token": None})
    complete = check_answer(await client.chat({"message": "hi", "token": None}), DEFAULT_ANSWER)
    check_answer(await client.chat({"message": "hi", "sessionId": complete["sessionId"]}), DEFAULT_ANSWER)
    # anonymous sessions are readable by anyone holding the id
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{complete['sessionId']}")
    assert status == 200 and len(body["messages"]) == 4


@TRANSPORTS
async def test_handshake_garbage_token_is_invalid_token(server, upstream, socket_client, transport):
    client = await socket_client(server, transport=transport, auth={"token": "garbage"})
    events = await client.chat({"message": "hi"})  # no token in the message: the handshake's counts
    assert [name for name, _ in events] == ["ai:error"], events
    assert events[0][1]["code"] == "invalid_token"
    assert client.client.connected
    assert upstream.requests == []
    # `token: null` in the message wins over the handshake: anonymous (API.md)
    check_answer(await client.chat({"message": "hi", "token": None}), DEFAULT_ANSWER)


@TRANSPORTS
async def test_tokens_with_auth_configured(make_server, socket_client, transport):
    secret = "a-test-secret-that-is-long-enough-for-hs256"
    server = await make_server(auth__jwt_secret=secret)
    expiry = int(time.time()) + 3600  # a token without `exp` is refused (jwt_require_exp)
    alice = jwt.encode({"sub": "alice", "exp": expiry}, secret, algorithm="HS256")
    bob = jwt.encode({"sub": "bob", "exp": expiry}, secret, algorithm="HS256")

    client = await socket_client(server, transport=transport, auth={"token": alice})
    check_answer(await client.chat({"message": "mine", "sessionId": "alice-1"}), DEFAULT_ANSWER, "alice-1")
    path = "/api/v2/ai/chat/sessions/alice-1"
    assert (await http_json(server, "GET", path))[0] == 404
    assert (await http_json(server, "GET", path, headers={"Authorization": f"Bearer {alice}"}))[0] == 200

    # the payload token wins over the handshake's
    events = await client.chat({"message": "intruding", "sessionId": "alice-1", "token": bob})
    assert [(name, data["code"]) for name, data in events] == [("ai:error", "not_found")]
    garbage = await socket_client(server, transport=transport, auth={"token": "garbage"})
    check_answer(await garbage.chat({"message": "again", "sessionId": "alice-1", "token": alice}), DEFAULT_ANSWER,
                 "alice-1")
    events = await garbage.chat({"message": "x", "token": alice + "tampered"})
    assert [(name, data["code"]) for name, data in events] == [("ai:error", "invalid_token")]


# --- client address --------------------------------------------------------------------


class BoundSocketClient(SocketClient):
    """A SocketClient whose TCP connections leave from ``local_ip``."""

    def __init__(self, local_ip: str) -> None:
        super().__init__()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(local_ip, 0)))
        self.client = socketio.AsyncClient(reconnection=False, http_session=self.http)
        for name in ("ai:stream", "ai:complete", "ai:error"):
            self.client.on(name, self._recorder(name))

    async def close(self) -> None:
        await super().close()
        await self.http.close()


@TRANSPORTS
@pytest.mark.parametrize("trust", [False, True])
async def test_client_ip_is_the_real_peer(make_server, transport, trust):
    server = await make_server(server__trust_proxy_headers=str(trust).lower())
    client = BoundSocketClient("127.0.0.2")
    try:
        await client.connect(server, transport=transport, headers={"X-Forwarded-For": "203.0.113.7"})
        check_answer(await client.chat({"message": "hi"}), DEFAULT_ANSWER)
        connection = namespace(server).connections[client.client.get_sid("/")]
        assert connection.client_ip == ("203.0.113.7" if trust else "127.0.0.2")
    finally:
        await client.close()


# --- disconnects -----------------------------------------------------------------------

SLOW_CHUNKS = [f"word{i} " for i in range(30)]


async def disconnect_after_first_frame(server: Any, socket_client: Any, transport: str, session: str) -> None:
    client = await socket_client(server, transport=transport)
    await client.client.emit("ai:chat", {"message": "long answer please", "sessionId": session})
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events), timeout=30)
    await client.close()
    await eventually(lambda: namespace(server).connections == {}, what="the server to see the disconnect")


@TRANSPORTS
async def test_disconnect_with_cancel_stops_the_answer(make_server, upstream, socket_client, transport):
    server = await make_server(ai__on_client_disconnect="cancel")
    upstream.default = Script(chunks=SLOW_CHUNKS, delay=0.1)  # about 3 s in all
    await disconnect_after_first_frame(server, socket_client, transport, "cancelled")
    await eventually(lambda: server.app.chat.active_count == 0, what="the generation to end")
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions/cancelled")
    assert status == 200
    answer = body["messages"][-1]
    assert answer["role"] == "assistant"
    # stopped early: what was generated up to the disconnect is kept, marked partial
    assert answer["status"] == "partial", answer
    assert answer["content"] and "".join(SLOW_CHUNKS).startswith(answer["content"])
    assert len(answer["content"]) < len("".join(SLOW_CHUNKS))


@TRANSPORTS
async def test_disconnect_with_finish_completes_the_answer(server, upstream, socket_client, transport):
    upstream.default = Script(chunks=SLOW_CHUNKS, delay=0.1)
    await disconnect_after_first_frame(server, socket_client, transport, "finished")
    await asyncio.sleep(0.2)
    assert server.app.chat.active_count == 1  # still generating for nobody
    await eventually(lambda: server.app.chat.active_count == 0, timeout=60, what="the generation to end")
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions/finished")
    assert status == 200
    answer = body["messages"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"] == "".join(SLOW_CHUNKS)
    assert answer["status"] == "complete"


# --- CORS and engine.io settings -------------------------------------------------------


@TRANSPORTS
async def test_default_cors_is_same_origin(server, socket_client, transport):
    with pytest.raises(socketio.exceptions.ConnectionError):
        await socket_client(server, transport=transport, headers={"Origin": "https://evil.example"})
    same = await socket_client(server, transport=transport, headers={"Origin": url(server, "")})
    check_answer(await same.chat({"message": "hi"}), DEFAULT_ANSWER)


@TRANSPORTS
async def test_configured_cors_origin_connects(make_server, socket_client, transport):
    server = await make_server(server__cors_origins="https://app.example")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await socket_client(server, transport=transport, headers={"Origin": "https://evil.example"})
    client = await socket_client(server, transport=transport, headers={"Origin": "https://app.example"})
    check_answer(await client.chat({"message": "hi"}), DEFAULT_ANSWER)


async def test_engineio_settings(make_server, socket_client):
    server = await make_server(server__socketio_ping_interval_seconds=7, server__socketio_ping_timeout_seconds=9)
    eio = server.app.sio.eio
    assert eio.max_http_buffer_size == 2 * 1024 * 1024
    assert eio.ping_interval == 7
    assert eio.ping_timeout == 9
    # and the client is told so in the handshake
    client = await socket_client(server, transport="polling")
    assert client.client.eio.ping_interval == 7
    assert client.client.eio.ping_timeout == 9


@TRANSPORTS
@pytest.mark.parametrize("event", ["disconnect", "connect"])
async def test_client_cannot_fake_reserved_events(make_server, upstream, socket_client, transport, event):
    # the official clients refuse to emit these names, but the protocol carries them like any event
    server = await make_server(ai__on_client_disconnect="cancel")
    upstream.default = Script(chunks=SLOW_CHUNKS[:10], delay=0.05)
    client = await socket_client(server, transport=transport)
    sid = client.client.get_sid("/")
    await client.client.emit("ai:chat", {"message": "long answer please", "sessionId": "reserved"})
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events), timeout=30)
    await client.client.emit(event, {"token": "forged", "tornado.handler": None})
    await client.wait_for(lambda events: any(name != "ai:stream" for name, _ in events), timeout=30)
    # the answer in flight was neither cancelled nor detached, and the connection is intact
    check_answer(client.events, "".join(SLOW_CHUNKS[:10]), "reserved")
    connection = namespace(server).connections[sid]
    assert connection.token is None and connection.client_ip == "127.0.0.1"
    check_answer(await client.chat({"message": "again", "sessionId": "reserved"}), "".join(SLOW_CHUNKS[:10]))
