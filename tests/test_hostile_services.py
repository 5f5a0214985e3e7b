"""Hostile clients against the chat service (issue #10, service items), through real clients.

Each test reproduces an attack a security review found and fails on the code before its fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import jwt
import pytest

from services.errors import ChatError
from services.generation import MAX_LISTENERS, Generation, Outcome
from services.rate_limiter import RateLimiter
from tests.conftest import SseResponse, http_json, read_sse, sse_post, streamed_text, url
from tests.fake_upstream import Script
from tests.test_rate_limit import header

SECRET = "hostile-services-test-secret-0123456789"
SESSIONS = "/api/v2/ai/chat/sessions"
DEFAULT_ANSWER = "Hello, world!"


def token(user: Any, *, expires: bool = True) -> str:
    claims: dict[str, Any] = {"sub": user, "iat": int(time.time())}
    if expires:
        claims["exp"] = int(time.time()) + 3600
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(user: Any, *, expires: bool = True) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, expires=expires)}"}


async def wait_idle(server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.app.chat.active_count:
        assert time.monotonic() < deadline, "the answer is still being generated"
        await asyncio.sleep(0.02)


async def stored_messages(server, session_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, body, _ = await http_json(server, "GET", f"{SESSIONS}/{session_id}", headers=headers)
    assert status == 200, body
    return body["messages"]


async def round_trip(client) -> None:
    """An `ai:resume` of an unknown message, answered by ai:error after what was queued before it."""
    errors = sum(1 for name, _ in client.events if name == "ai:error")
    await client.client.emit("ai:resume", {"messageId": "no-such-message", "afterSeq": 0})
    await client.wait_for(lambda events: sum(1 for name, _ in events if name == "ai:error") > errors)


async def first_stream_event(client, payload: dict[str, Any]) -> dict[str, Any]:
    await client.client.emit("ai:chat", payload)
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events))
    return next(data for name, data in client.events if name == "ai:stream")


# --- 1. listener fan-out through ai:resume ------------------------------------------------


async def test_repeated_resume_on_one_connection_replaces_the_earlier_one(server, upstream, socket_client):
    # the first resume replaces the stream ai:chat opened, each later one the one before
    upstream.queue(Script(chunks=["one ", "two ", "three ", "four"], delay=0.2))
    client = await socket_client(server)
    first = await first_stream_event(client, {"message": "hi", "sessionId": "fan-out"})
    for _ in range(5):
        await client.client.emit("ai:resume", {"messageId": first["messageId"], "afterSeq": first["seq"]})
    await client.wait_for(lambda events: any(name == "ai:complete" for name, _ in events))
    await round_trip(client)  # anything else queued for this answer has arrived by now

    completes = [data for name, data in client.events if name == "ai:complete"]
    assert len(completes) == 1, completes
    assert completes[0]["response"] == "one two three four"
    seqs = [data["seq"] for name, data in client.events if name == "ai:stream"]
    assert seqs == sorted(set(seqs)), seqs  # every delta once
    assert streamed_text(client.events) == "one two three four"


async def test_disconnect_after_repeated_resumes_cancels_under_cancel_policy(make_server, upstream, socket_client):
    # a long upstream timeout: only the cancel can end the stalled answer within wait_idle
    server = await make_server(ai__on_client_disconnect="cancel", ai__request_timeout_seconds="60")
    upstream.queue(Script(chunks=["first ", "never"], stall_after=1))
    client = await socket_client(server)
    first = await first_stream_event(client, {"message": "hi", "sessionId": "fan-out-cancel"})
    for _ in range(5):
        await client.client.emit("ai:resume", {"messageId": first["messageId"], "afterSeq": first["seq"]})
    await round_trip(client)
    await client.close()

    await wait_idle(server, timeout=10)  # the last listener left: the answer was cancelled, not left running
    messages = await stored_messages(server, "fan-out-cancel")
    assert (messages[1]["content"], messages[1]["status"]) == ("first ", "partial")


async def test_listeners_per_answer_are_capped(server, upstream):
    upstream.queue(Script(chunks=["first ", "never"], stall_after=1))
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    chat = asyncio.create_task(sse_post(server, {"message": "hi", "sessionId": "capped"},
                                        on_event=lambda e: started.done() or started.set_result(e["messageId"])))
    message_id = await asyncio.wait_for(started, 10)

    statuses: list[int] = []
    codes: list[str] = []
    async with aiohttp.ClientSession() as session:
        open_streams: list[aiohttp.ClientResponse] = []
        for _ in range(MAX_LISTENERS + 5):
            response = await session.get(url(server, f"/api/v2/ai/chat/stream/{message_id}"))
            statuses.append(response.status)
            if response.status == 200:
                open_streams.append(response)
            else:
                codes.append((await response.json())["code"])
                response.release()
        # the chat's own stream is one of the MAX_LISTENERS
        assert statuses == [200] * (MAX_LISTENERS - 1) + [409] * 6
        assert set(codes) == {"busy"}

        status, body, _ = await http_json(server, "POST", f"{SESSIONS}/capped/cancel")
        assert status == 202, body
        for response in open_streams:  # every follower gets the end of the answer
            result = SseResponse(response.status, dict(response.headers))
            await asyncio.wait_for(read_sse(response, result), 10)
            assert result.last["cancelled"] is True
    assert (await chat).last["cancelled"] is True

    # an answer that ended is replayed from the store, whatever the count was
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, f"/api/v2/ai/chat/stream/{message_id}")) as response:
            assert response.status == 200


# --- 2. session squatting -----------------------------------------------------------------


async def test_authenticated_caller_cannot_write_into_an_anonymous_session(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET)
    created = await sse_post(server, {"message": "anonymous question", "sessionId": "my-chat-1"})
    assert created.status == 200 and created.last["done"] is True

    squat = await sse_post(server, {"message": "my secret", "sessionId": "my-chat-1"}, headers=bearer("alice"))
    assert (squat.status, squat.body["code"]) == (404, "not_found")
    client = await socket_client(server, auth={"token": token("bob")})
    name, data = (await client.chat({"message": "my secret", "sessionId": "my-chat-1"}))[-1]
    assert (name, data["code"]) == ("ai:error", "not_found")
    assert len(upstream.requests) == 1

    # reading it stays open to anyone holding the id, and nobody's words were added
    for headers in (None, bearer("alice")):
        messages = await stored_messages(server, "my-chat-1", headers)
        assert [m["content"] for m in messages] == ["anonymous question", DEFAULT_ANSWER]
    # an anonymous caller still continues it
    again = await sse_post(server, {"message": "anonymous again", "sessionId": "my-chat-1"})
    assert again.status == 200 and again.last["done"] is True


async def test_authenticated_caller_cannot_write_into_a_running_anonymous_session(make_server, upstream,
                                                                                   socket_client):
    server = await make_server(auth__jwt_secret=SECRET)
    upstream.queue(Script(chunks=["first ", "never"], stall_after=1))
    started = asyncio.Event()
    anonymous = asyncio.create_task(sse_post(server, {"message": "hi", "sessionId": "my-chat-2"},
                                             on_event=lambda e: started.set()))
    await asyncio.wait_for(started.wait(), 10)

    # not `busy` (which would reveal the session and invite a retry): not yours to write into
    squat = await sse_post(server, {"message": "my secret", "sessionId": "my-chat-2"}, headers=bearer("alice"))
    assert (squat.status, squat.body["code"]) == (404, "not_found")
    client = await socket_client(server, auth={"token": token("alice")})
    name, data = (await client.chat({"message": "my secret", "sessionId": "my-chat-2"}))[-1]
    assert (name, data["code"]) == ("ai:error", "not_found")
    # another anonymous caller is told it is busy, as before
    busy = await sse_post(server, {"message": "me too", "sessionId": "my-chat-2"})
    assert (busy.status, busy.body["code"]) == (409, "busy")

    status, _, _ = await http_json(server, "POST", f"{SESSIONS}/my-chat-2/cancel")
    assert status == 202
    assert (await anonymous).last["cancelled"] is True
    assert [m["content"] for m in await stored_messages(server, "my-chat-2")] == ["hi", "first "]


# --- 6. store write failures --------------------------------------------------------------


async def set_max_pages(store, pages: int | None) -> None:
    """Cap the real SQLite file at its current size (a full disk), or lift the cap."""

    def apply(db) -> None:
        limit = db.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
        db.execute(f"PRAGMA max_page_count = {int(limit)}")

    await store._run(apply)


async def test_store_write_failures_are_logged_fail_readiness_and_spare_the_upstream(make_server, upstream,
                                                                                      caplog):
    server = await make_server()
    status, _, _ = await http_json(server, "GET", "/readyz")
    assert status == 200
    await set_max_pages(server.app.store, None)
    big = "a question too big for the pages left " * 150  # needs new pages: SQLITE_FULL

    with caplog.at_level(logging.INFO, logger="aichat"):
        first = await sse_post(server, {"message": big})
        assert first.last["code"] == "internal_error"
        await asyncio.sleep(0.2)  # an upstream call made concurrently has landed by now
        calls = len(upstream.requests)

        # the store failed lately: the question is stored first, so the upstream is spared
        second = await sse_post(server, {"message": big})
        assert second.last["code"] == "internal_error"
        assert "full" not in json.dumps(second.events)  # the detail is for the log only
        await asyncio.sleep(0.2)
        assert len(upstream.requests) == calls

        status, body, _ = await http_json(server, "GET", "/readyz")
        assert (status, body["status"]) == (503, "unavailable")
        status, _, _ = await http_json(server, "GET", "/healthz")
        assert status == 200

    failures = [r for r in caplog.records if "could not store the user message" in r.getMessage()]
    assert len(failures) == 2  # once per failure
    assert all(r.levelno == logging.ERROR and r.exc_info is None for r in failures)  # no traceback
    assert "full" in failures[0].getMessage()

    # room again: the next write succeeds and readiness comes back at once
    await set_max_pages(server.app.store, 1_000_000)
    third = await sse_post(server, {"message": big})
    assert third.last["done"] is True and third.content == DEFAULT_ANSWER
    status, _, _ = await http_json(server, "GET", "/readyz")
    assert status == 200


# --- 7. lone surrogates -------------------------------------------------------------------


async def test_lone_surrogate_in_a_message_is_an_invalid_request(server, upstream, socket_client):
    result = await sse_post(server, None, raw=b'{"message": "hi \\ud800 there"}')
    assert (result.status, result.body["code"]) == (400, "invalid_request")
    client = await socket_client(server)
    name, data = (await client.chat({"message": "hi \ud800 there"}))[-1]
    assert (name, data["code"]) == ("ai:error", "invalid_request")
    assert client.client.connected
    assert upstream.requests == []
    # a proper surrogate pair (an emoji) is ordinary text
    ok = await sse_post(server, None, raw=b'{"message": "hi \\ud83d\\ude00"}')
    assert ok.status == 200 and ok.last["done"] is True


async def test_lone_surrogate_from_the_model_becomes_a_replacement_character(server, upstream, socket_client):
    # the fake upstream JSON-encodes this as the escape "\ud800" in the SSE data line
    upstream.queue(Script(chunks=["bad \ud800 char", ", pair \U0001f600", " end \udfff"]))
    expected = "bad \ufffd char, pair \U0001f600 end \ufffd"
    result = await asyncio.wait_for(sse_post(server, {"message": "hi", "sessionId": "surrogate-sse"}), 10)
    assert result.content == expected
    assert result.last["done"] is True
    assert [m["content"] for m in await stored_messages(server, "surrogate-sse")] == ["hi", expected]

    upstream.queue(Script(chunks=["\ud800"]))
    client = await socket_client(server)
    events = await client.chat({"message": "hi", "sessionId": "surrogate-sio"})
    assert events[-1][0] == "ai:complete" and events[-1][1]["response"] == "\ufffd"
    assert streamed_text(events) == "\ufffd"
    assert (await stored_messages(server, "surrogate-sio"))[1]["content"] == "\ufffd"


class BrokenTransport:
    """A GenerationListener whose transport fails on every delta."""

    def __init__(self) -> None:
        self.aborted = 0
        self.ended: list[Outcome] = []

    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        raise RuntimeError("the transport broke")

    def on_end(self, generation: Generation, outcome: Outcome) -> None:
        self.ended.append(outcome)

    def abort(self, generation: Generation) -> None:
        self.aborted += 1


class Recorder(BrokenTransport):
    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def on_delta(self, generation: Generation, seq: int, text: str) -> None:
        self.text += text


def test_a_dropped_listener_is_told_to_end_its_response():
    generation = Generation("s", "m", None, 0.0)
    broken, healthy = BrokenTransport(), Recorder()
    generation.attach(broken)
    generation.attach(healthy)
    generation.publish("one")
    generation.publish("two")
    assert broken.aborted == 1  # dropped once, and told so: its client is not left waiting
    assert generation.listeners == [healthy]
    generation.end(Outcome(status="complete", text="onetwo"))
    assert healthy.text == "onetwo" and len(healthy.ended) == 1
    assert broken.ended == []


def test_attach_refuses_past_the_listener_cap():
    generation = Generation("s", "m", None, 0.0)
    for _ in range(MAX_LISTENERS):
        generation.attach(Recorder())
    with pytest.raises(ChatError) as refused:
        generation.attach(Recorder())
    assert refused.value.code == "busy"
    assert len(generation.listeners) == MAX_LISTENERS


# --- 8. anonymous limits per IPv6 /64; users' budgets apart ---------------------------------


async def test_anonymous_limit_applies_per_ipv6_slash_64(make_server, upstream):
    server = await make_server(server__trust_proxy_headers="true", rate_limit__anonymous_limit=3)

    async def from_address(address: str) -> SseResponse:
        return await sse_post(server, {"message": "hi"}, headers={"X-Forwarded-For": address})

    for host in range(1, 4):
        assert (await from_address(f"2001:db8:1:2::{host:x}")).status == 200
    rotated = await from_address("2001:db8:1:2:abcd:1234:5678:9abc")  # same /64, new address
    assert (rotated.status, rotated.body["code"]) == (429, "rate_limited")
    assert (await from_address("2001:db8:1:3::1")).status == 200  # the next /64 is someone else


async def test_ipv4_mapped_ipv6_counts_as_the_ipv4_address(make_server, upstream):
    server = await make_server(server__trust_proxy_headers="true", rate_limit__anonymous_limit=2)
    assert (await sse_post(server, {"message": "hi"}, headers={"X-Forwarded-For": "203.0.113.5"})).status == 200
    mapped = await sse_post(server, {"message": "hi"}, headers={"X-Forwarded-For": "::ffff:203.0.113.5"})
    assert mapped.status == 200
    assert header(mapped, "RateLimit-Remaining") == "0"  # one budget for both spellings
    again = await sse_post(server, {"message": "hi"}, headers={"X-Forwarded-For": "203.0.113.5"})
    assert again.status == 429


async def test_a_flood_of_anonymous_addresses_never_evicts_a_users_budget():
    now = [0.0]
    limiter = RateLimiter(900, max_keys=50, max_user_keys=50, clock=lambda: now[0])
    assert (await limiter.acquire("user:alice", 3)).remaining == 2
    assert (await limiter.acquire("user:alice", 3)).remaining == 1
    for n in range(500):  # ten times the address cache
        now[0] += 0.001
        await limiter.acquire(f"ip:198.51.{n // 256}.{n % 256}", 20)
    status = await limiter.peek("user:alice", 3)
    assert (status.remaining, status.allowed) == (1, True)  # not a fresh budget
    assert (await limiter.acquire("user:alice", 3)).remaining == 0
    assert not (await limiter.acquire("user:alice", 3)).allowed
    assert len(limiter) <= 51  # the flood itself stays bounded


# --- 13. tokens without exp ---------------------------------------------------------------


async def test_a_token_without_exp_is_refused_by_default(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET)
    result = await sse_post(server, {"message": "hi"}, headers=bearer("alice", expires=False))
    assert (result.status, result.body["code"]) == (401, "invalid_token")
    client = await socket_client(server, auth={"token": token("alice", expires=False)})
    name, data = (await client.chat({"message": "hi"}))[-1]
    assert (name, data["code"]) == ("ai:error", "invalid_token")
    assert upstream.requests == []
    assert (await sse_post(server, {"message": "hi"}, headers=bearer("alice"))).status == 200


async def test_jwt_require_exp_false_accepts_a_token_without_exp(make_server, upstream):
    server = await make_server(auth__jwt_secret=SECRET, auth__jwt_require_exp="false")
    result = await sse_post(server, {"message": "hi", "sessionId": "no-exp"}, headers=bearer("alice", expires=False))
    assert result.status == 200 and result.last["done"] is True
    status, _, _ = await http_json(server, "GET", f"{SESSIONS}/no-exp", headers=bearer("alice"))
    assert status == 200


async def test_an_integer_sub_is_refused_as_the_readme_says(make_server, upstream):
    # PyJWT refuses a non-string `sub`; the README says so rather than promising otherwise
    server = await make_server(auth__jwt_secret=SECRET)
    result = await sse_post(server, {"message": "hi"}, headers=bearer(12345))
    assert (result.status, result.body["code"]) == (401, "invalid_token")


# --- also: max_tokens ---------------------------------------------------------------------


async def test_max_tokens_is_sent_to_the_model_when_set(make_server, upstream):
    server = await make_server(ai__max_tokens="64")
    assert (await sse_post(server, {"message": "hi"})).status == 200
    assert upstream.requests[-1].body["max_tokens"] == 64


async def test_max_tokens_is_not_sent_when_unset(server, upstream):
    assert (await sse_post(server, {"message": "hi"})).status == 200
    assert "max_tokens" not in upstream.requests[-1].body
