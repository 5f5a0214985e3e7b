"""Session ownership across users A and B and anonymous callers, on every endpoint.

An owned session is reachable only with its owner's token (others get `not_found`, as if
it did not exist); an anonymous session, by anyone holding its id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import SseResponse, http_json, read_sse, sse_post, url
from tests.fake_upstream import Script

SECRET = "ownership-test-secret-0123456789-abcdefgh"
SESSIONS = "/api/v2/ai/chat/sessions"


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


A = {"Authorization": f"Bearer {token('user-a')}"}
B = {"Authorization": f"Bearer {token('user-b')}"}
NOBODY: dict[str, str] = {}


@pytest.fixture
async def server(make_server):
    return await make_server(auth__jwt_secret=SECRET)


async def chat(server, session_id: str | None, headers: dict[str, str], message: str = "Hello") -> Any:
    payload: dict[str, Any] = {"message": message}
    if session_id is not None:
        payload["sessionId"] = session_id
    return await sse_post(server, payload, headers=headers)


async def create(server, session_id: str, headers: dict[str, str], message: str = "Hello") -> None:
    result = await chat(server, session_id, headers, message)
    assert result.status == 200, result.body
    assert result.last == {"done": True, "sessionId": session_id, "messageId": result.last["messageId"]}


async def history(server, session_id: str, headers: dict[str, str]) -> tuple[int, Any]:
    status, body, _ = await http_json(server, "GET", f"{SESSIONS}/{session_id}", headers=headers)
    return status, body


async def listed(server, headers: dict[str, str]) -> list[str]:
    status, body, _ = await http_json(server, "GET", SESSIONS, headers=headers)
    assert status == 200, body
    return [s["sessionId"] for s in body["sessions"]]


# --- stream ----------------------------------------------------------------------------


async def test_others_cannot_post_to_an_owned_session(server, upstream, socket_client):
    await create(server, "a-session", A, "A's secret question")
    before = len(upstream.requests)

    for headers in (B, NOBODY):
        result = await chat(server, "a-session", headers, "let me in")
        assert result.status == 404, result.body
        assert result.body["code"] == "not_found"
        assert "a-session" not in result.body["error"]

    for auth in ({"token": token("user-b")}, None):
        client = await socket_client(server, auth=auth)
        name, data = (await client.chat({"message": "let me in", "sessionId": "a-session"}))[-1]
        assert name == "ai:error"
        assert data["code"] == "not_found"
        assert data["sessionId"] == "a-session"
    # B's payload token on a connection with no handshake token
    client = await socket_client(server)
    name, data = (await client.chat({"message": "x", "sessionId": "a-session", "token": token("user-b")}))[-1]
    assert (name, data["code"]) == ("ai:error", "not_found")

    assert len(upstream.requests) == before
    # nothing was added to A's session
    status, body = await history(server, "a-session", A)
    assert status == 200
    assert [m["content"] for m in body["messages"]] == ["A's secret question", "Hello, world!"]

    # A still can continue it, on both transports, with the earlier turn as context
    await create(server, "a-session", A, "follow-up")
    assert upstream.requests[-1].body["messages"][-3]["content"] == "A's secret question"
    client = await socket_client(server, auth={"token": token("user-a")})
    name, data = (await client.chat({"message": "third", "sessionId": "a-session"}))[-1]
    assert name == "ai:complete", data
    status, body = await history(server, "a-session", A)
    assert len(body["messages"]) == 6


async def test_others_get_not_found_not_busy_for_a_running_owned_session(server, upstream):
    """Existence is not revealed: not even by `busy` while A's answer is being generated."""
    upstream.scripts.append(Script(chunks=["slow ", "answer"], stall_after=1))
    started = asyncio.Event()
    a_stream = asyncio.create_task(sse_post(server, {"message": "Hi", "sessionId": "a-running"}, headers=A,
                                            on_event=lambda e: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    try:
        for headers in (B, NOBODY):
            result = await chat(server, "a-running", headers)
            assert (result.status, result.body["code"]) == (404, "not_found")
        # A itself is told the session is busy
        result = await chat(server, "a-running", A)
        assert (result.status, result.body["code"]) == (409, "busy")
    finally:
        status, _, _ = await http_json(server, "POST", f"{SESSIONS}/a-running/cancel", headers=A)
        assert status == 202
        await asyncio.wait_for(a_stream, 10)


# --- history ---------------------------------------------------------------------------


async def test_history_is_only_for_the_owner(server):
    await create(server, "a-history", A, "question")
    status, body = await history(server, "a-history", A)
    assert status == 200
    assert body["sessionId"] == "a-history"
    assert [(m["role"], m["content"], m["status"]) for m in body["messages"]] == [
        ("user", "question", "complete"), ("assistant", "Hello, world!", "complete")]

    for headers in (B, NOBODY):
        status, body = await history(server, "a-history", headers)
        assert (status, body["code"]) == (404, "not_found")
        # indistinguishable from a session that does not exist
        missing_status, missing = await history(server, "no-such-session", headers)
        assert (missing_status, missing) == (status, body)

    bad = {"Authorization": "Bearer abc.def"}
    status, body = await history(server, "a-history", bad)
    assert (status, body["code"]) == (401, "invalid_token")


# --- list ------------------------------------------------------------------------------


async def test_list_shows_only_the_callers_sessions_newest_first(server):
    await create(server, "a-first", A)
    await create(server, "b-only", B)
    await create(server, "anon-one", NOBODY)
    await create(server, "a-second", A)

    assert await listed(server, A) == ["a-second", "a-first"]
    assert await listed(server, B) == ["b-only"]

    # a new message moves a session to the top
    await create(server, "a-first", A, "again")
    status, body, _ = await http_json(server, "GET", SESSIONS, headers=A)
    assert [s["sessionId"] for s in body["sessions"]] == ["a-first", "a-second"]
    first = body["sessions"][0]
    assert first["messageCount"] == 4
    assert set(first) == {"sessionId", "title", "updatedAt", "messageCount"}
    assert body["sessions"][0]["updatedAt"] >= body["sessions"][1]["updatedAt"]

    status, body, _ = await http_json(server, "GET", SESSIONS)
    assert (status, body["code"]) == (401, "invalid_token")
    status, body, _ = await http_json(server, "GET", SESSIONS, headers={"Authorization": "Bearer abc.def"})
    assert (status, body["code"]) == (401, "invalid_token")


# --- delete ----------------------------------------------------------------------------


async def test_delete_is_only_for_the_owner(server):
    await create(server, "a-delete", A)

    for headers in (B, NOBODY):
        status, body, _ = await http_json(server, "DELETE", f"{SESSIONS}/a-delete", headers=headers)
        assert (status, body["code"]) == (404, "not_found")
    status, _ = await history(server, "a-delete", A)
    assert status == 200  # still there

    status, body, _ = await http_json(server, "DELETE", f"{SESSIONS}/a-delete", headers=A)
    assert (status, body) == (204, None)
    status, body = await history(server, "a-delete", A)
    assert (status, body["code"]) == (404, "not_found")
    assert await listed(server, A) == []
    # deleting again: it is gone
    status, body, _ = await http_json(server, "DELETE", f"{SESSIONS}/a-delete", headers=A)
    assert (status, body["code"]) == (404, "not_found")


# --- anonymous sessions ----------------------------------------------------------------


async def test_anonymous_sessions_are_open_to_anyone_holding_the_id(server, upstream, socket_client):
    await create(server, "anon-open", NOBODY, "anonymous question")

    for headers in (NOBODY, A, B):
        status, body = await history(server, "anon-open", headers)
        assert status == 200
        assert body["messages"][0]["content"] == "anonymous question"

    # anyone anonymous continues it (Socket.IO); a logged-in user may not write into it
    # (tests/test_hostile_services.py: her words would be readable by anyone with the id)
    anonymous = await socket_client(server)
    name, data = (await anonymous.chat({"message": "anon again", "sessionId": "anon-open"}))[-1]
    assert name == "ai:complete", data
    # every turn saw the whole conversation so far
    assert [m["content"] for m in upstream.requests[-1].body["messages"] if m["role"] == "user"] == [
        "anonymous question", "anon again"]

    # it stays anonymous, in nobody's list
    status, body = await history(server, "anon-open", NOBODY)
    assert status == 200
    assert len(body["messages"]) == 4
    assert await listed(server, A) == []
    assert await listed(server, B) == []

    # and anyone may delete it
    status, _, _ = await http_json(server, "DELETE", f"{SESSIONS}/anon-open", headers=B)
    assert status == 204
    status, _ = await history(server, "anon-open", NOBODY)
    assert status == 404


# --- cancel ----------------------------------------------------------------------------


async def test_cancel_is_only_for_the_owner(server, upstream):
    upstream.scripts.append(Script(chunks=["first ", "never"], stall_after=1))
    started = asyncio.Event()
    a_stream = asyncio.create_task(sse_post(server, {"message": "Hi", "sessionId": "a-cancel"}, headers=A,
                                            on_event=lambda e: started.set()))
    await asyncio.wait_for(started.wait(), 10)

    for headers in (B, NOBODY):
        status, body, _ = await http_json(server, "POST", f"{SESSIONS}/a-cancel/cancel", headers=headers)
        assert (status, body["code"]) == (404, "not_found")
    await asyncio.sleep(0.2)
    assert not a_stream.done()  # B's attempt did not stop it

    status, body, _ = await http_json(server, "POST", f"{SESSIONS}/a-cancel/cancel", headers=A)
    assert status == 202, body
    assert body["sessionId"] == "a-cancel"
    assert body["cancelled"] is True
    result = await asyncio.wait_for(a_stream, 10)
    assert result.content == "first "
    assert result.last["done"] is True
    assert result.last.get("cancelled") is True
    status, history_body = await history(server, "a-cancel", A)
    assert [(m["content"], m["status"]) for m in history_body["messages"]][-1] == ("first ", "partial")


async def test_cancel_of_an_idle_session_is_not_found(server):
    await create(server, "a-idle", A)
    status, body, _ = await http_json(server, "POST", f"{SESSIONS}/a-idle/cancel", headers=A)
    assert (status, body["code"]) == (404, "not_found")


# --- resume ----------------------------------------------------------------------------


async def test_resume_is_only_for_the_owner(server, socket_client):
    result = await chat(server, "a-resume", A)
    assert result.status == 200
    message_id = result.last["messageId"]
    path = f"/api/v2/ai/chat/stream/{message_id}"

    for headers in (B, NOBODY):
        status, body, _ = await http_json(server, "GET", path, headers=headers)
        assert (status, body["code"]) == (404, "not_found")
    for auth in ({"token": token("user-b")}, None):
        client = await socket_client(server, auth=auth)
        await client.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 0})
        await client.wait_for(lambda events: bool(events))
        name, data = client.events[-1]
        assert (name, data["code"]) == ("ai:error", "not_found")
        assert "Hello" not in str(client.events)

    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, path), headers=A) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            replay = SseResponse(response.status, dict(response.headers))
            await read_sse(response, replay)
    assert replay.content == "Hello, world!"
    assert replay.last["done"] is True
    client = await socket_client(server, auth={"token": token("user-a")})
    await client.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 0})
    await client.wait_for(lambda events: any(name == "ai:complete" for name, _ in events))
    assert "".join(d["content"] for n, d in client.events if n == "ai:stream") == "Hello, world!"
