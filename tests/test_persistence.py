"""Every conversation is stored, whatever the transport, and the model sees its context."""

from __future__ import annotations

import asyncio
import time

import pytest
from pymongo import uri_parser

from services.store.base import NewTurn, StoreError
from services.store.sqlite_store import SqliteStore
from tests.conftest import TEST_SYSTEM_PROMPT, http_json, read_then_leave, sse_post, streamed_text
from tests.fake_upstream import Script
from tests.mongo_server import new_database_name
from tests.tcp_relay import Relay, relayed_uri

ANSWER = "Hello, world!"


async def history(server, session_id, headers=None):
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}", headers=headers)
    assert status == 200, body
    return body["messages"]


async def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while server.app.chat.active_count:
        assert time.monotonic() < deadline, "generation did not end"
        await asyncio.sleep(0.02)


async def test_mixed_transport_history_and_context(server, upstream, socket_client):
    first = await sse_post(server, {"message": "first question"})
    session_id = first.last["sessionId"]
    client = await socket_client(server)
    upstream.queue(Script(chunks=["Second", " answer"]))
    events = await client.chat({"message": "second question", "sessionId": session_id})
    assert events[-1][0] == "ai:complete"
    third = await sse_post(server, {"message": "third question", "sessionId": session_id})
    assert third.status == 200

    messages = await history(server, session_id)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "first question", "complete"),
        ("assistant", ANSWER, "complete"),
        ("user", "second question", "complete"),
        ("assistant", "Second answer", "complete"),
        ("user", "third question", "complete"),
        ("assistant", ANSWER, "complete"),
    ]
    assert all(m["id"] and m["createdAt"].endswith("Z") for m in messages)
    assert messages[1]["id"] == first.last["messageId"]

    # the third turn's upstream call carried the whole conversation, in order
    assert upstream.requests[2].body["messages"] == [
        {"role": "system", "content": TEST_SYSTEM_PROMPT},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "Second answer"},
        {"role": "user", "content": "third question"},
    ]


async def test_context_is_limited_to_max_history_messages(make_server, upstream):
    server = await make_server(ai__max_history_messages=2)
    session_id = (await sse_post(server, {"message": "one"})).last["sessionId"]
    await sse_post(server, {"message": "two", "sessionId": session_id})
    await sse_post(server, {"message": "three", "sessionId": session_id})
    assert upstream.requests[2].body["messages"] == [
        {"role": "system", "content": TEST_SYSTEM_PROMPT},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "three"},
    ]


async def test_history_survives_a_restart_on_the_same_store(make_server, upstream):
    server = await make_server()
    session_id = (await sse_post(server, {"message": "remember me"})).last["sessionId"]
    await server.shutdown(0)

    restarted = await make_server()
    messages = await history(restarted, session_id)
    assert [m["content"] for m in messages] == ["remember me", ANSWER]
    await sse_post(restarted, {"message": "and now?", "sessionId": session_id})
    assert upstream.requests[-1].body["messages"][1:] == [
        {"role": "user", "content": "remember me"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "and now?"},
    ]


async def test_upstream_failure_mid_stream_is_stored_partial(server, upstream):
    upstream.queue(Script(chunks=["Part", "ial", " never"], drop_after=2))
    result = await sse_post(server, {"message": "go"})
    assert result.last["code"] == "upstream_error"
    messages = await history(server, result.last["sessionId"])
    assert (messages[1]["content"], messages[1]["status"]) == ("Partial", "partial")
    assert result.content == "Partial"


async def test_upstream_failure_before_any_text_is_stored_error(make_server, upstream):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(status=500))
    result = await sse_post(server, {"message": "go"})
    assert result.last["code"] == "upstream_error"
    messages = await history(server, result.last["sessionId"])
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "go", "complete"), ("assistant", "", "error")]


async def test_error_turns_are_not_sent_as_context(make_server, upstream):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(status=500))
    session_id = (await sse_post(server, {"message": "lost"})).last["sessionId"]
    await sse_post(server, {"message": "again", "sessionId": session_id})
    # the empty failed answer is not context; the user's words are
    assert upstream.requests[-1].body["messages"][1:] == [
        {"role": "user", "content": "lost"}, {"role": "user", "content": "again"}]


async def test_client_leaving_under_finish_policy_still_stores_whole_answer(server, upstream):
    chunks = [f"w{i} " for i in range(10)]
    upstream.queue(Script(chunks=chunks, delay=0.05))
    seen = await read_then_leave(server, {"message": "go"}, frames=1)
    assert server.app.chat.active_count == 1  # still generating without the client
    await wait_idle(server)
    messages = await history(server, seen.events[0]["sessionId"])
    assert (messages[1]["content"], messages[1]["status"]) == ("".join(chunks), "complete")


async def test_client_leaving_under_cancel_policy_stores_partial(make_server, upstream):
    server = await make_server(ai__on_client_disconnect="cancel")
    chunks = [f"w{i} " for i in range(40)]
    upstream.queue(Script(chunks=chunks, delay=0.05))
    seen = await read_then_leave(server, {"message": "go"}, frames=2)
    await wait_idle(server, timeout=1.5)  # well before the 2 s the whole answer takes
    messages = await history(server, seen.events[0]["sessionId"])
    stored = messages[1]
    assert stored["status"] == "partial"
    assert stored["content"].startswith(seen.content)
    assert len(stored["content"]) < len("".join(chunks))


async def test_socketio_disconnect_under_cancel_policy_stores_partial(make_server, upstream, socket_client):
    server = await make_server(ai__on_client_disconnect="cancel")
    upstream.queue(Script(chunks=[f"w{i} " for i in range(40)], delay=0.05))
    client = await socket_client(server)
    await client.client.emit("ai:chat", {"message": "go", "sessionId": "sio-cancel"})
    await client.wait_for(lambda events: any(name == "ai:stream" for name, _ in events))
    await client.close()
    await wait_idle(server, timeout=1.5)
    stored = (await history(server, "sio-cancel"))[1]
    assert stored["status"] == "partial" and stored["content"].startswith("w0 ")


async def test_busy_session_is_refused_on_both_transports(server, upstream, socket_client):
    upstream.queue(Script(chunks=["slow"] * 5, delay=0.2))
    running = asyncio.create_task(sse_post(server, {"message": "long", "sessionId": "busy-one"}))
    while server.app.chat.active_count == 0:
        await asyncio.sleep(0.01)
    second = await sse_post(server, {"message": "again", "sessionId": "busy-one"})
    assert (second.status, second.body["code"]) == (409, "busy")
    client = await socket_client(server)
    events = await client.chat({"message": "again", "sessionId": "busy-one"})
    assert events[-1] == ("ai:error", {"error": events[-1][1]["error"], "code": "busy", "sessionId": "busy-one"})
    assert (await running).content == "slow" * 5
    assert len(await history(server, "busy-one")) == 2  # the refused messages were not stored
    assert len(upstream.requests) == 1


async def test_delete_session(server, upstream):
    session_id = (await sse_post(server, {"message": "forget me"})).last["sessionId"]
    status, _, _ = await http_json(server, "DELETE", f"/api/v2/ai/chat/sessions/{session_id}")
    assert status == 204
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}")
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = await http_json(server, "DELETE", f"/api/v2/ai/chat/sessions/{session_id}")
    assert (status, body["code"]) == (404, "not_found")
    # the id can start a new conversation, with no old context
    await sse_post(server, {"message": "fresh", "sessionId": session_id})
    assert upstream.requests[-1].body["messages"][1:] == [{"role": "user", "content": "fresh"}]


class SlowBeginStore(SqliteStore):
    """The embedded store, with the user-message write taking a while."""

    def __init__(self, path, delay):
        super().__init__(path)
        self.delay = delay
        self.begun_at: float | None = None

    async def begin_turn(self, turn: NewTurn) -> None:
        await asyncio.sleep(self.delay)
        await super().begin_turn(turn)
        self.begun_at = time.monotonic()


async def test_user_message_is_stored_before_the_first_frame_and_overlaps_upstream(make_server, upstream, tmp_path):
    store = SlowBeginStore(str(tmp_path / "slow.sqlite3"), delay=0.4)
    server = await make_server(store=store)
    upstream.queue(Script(first_delay=0.3))
    first_frame_at: list[float] = []
    started = time.monotonic()
    result = await sse_post(server, {"message": "hi"},
                            on_event=lambda e: first_frame_at.append(time.monotonic()) or True)
    assert result.content == ANSWER
    assert store.begun_at is not None and store.begun_at <= first_frame_at[0]
    # the write and the upstream's 0.3 s overlapped rather than adding up to 0.7 s
    assert upstream.requests[0].at - started < 0.3


class FailingBeginStore(SqliteStore):
    async def begin_turn(self, turn: NewTurn) -> None:
        raise StoreError("disk full")


async def test_user_message_write_failure_cancels_upstream_and_reports_internal_error(make_server, upstream, tmp_path):
    server = await make_server(store=FailingBeginStore(str(tmp_path / "failing.sqlite3")))
    upstream.queue(Script(first_delay=5))
    started = time.monotonic()
    result = await sse_post(server, {"message": "hi"})
    assert result.content == ""
    assert result.last["code"] == "internal_error"
    assert "disk full" not in str(result.last)
    assert time.monotonic() - started < 4  # did not wait for the upstream's first token


async def test_readyz_follows_the_store(server):
    status, body, _ = await http_json(server, "GET", "/readyz")
    assert status == 200
    await server.app.store.close()
    status, body, _ = await http_json(server, "GET", "/readyz")
    assert status == 503
    status, body, _ = await http_json(server, "GET", "/healthz")
    assert status == 200


@pytest.mark.parametrize("driver", ["motor", "pymongo"])
async def test_mongodb_store_end_to_end_with_outage(make_server, upstream, socket_client, mongodb_uri, driver):
    host, port = uri_parser.parse_uri(mongodb_uri)["nodelist"][0]
    relay = Relay(host, port)
    await relay.start()
    try:
        server = await make_server(storage__mongodb_uri=relayed_uri(mongodb_uri, relay.port),
                                   storage__mongodb_database=new_database_name(), storage__mongodb_driver=driver)
        assert f"mongodb ({driver})" in server.app.store.description
        session_id = (await sse_post(server, {"message": "stored in mongo"})).last["sessionId"]
        client = await socket_client(server)
        events = await client.chat({"message": "second", "sessionId": session_id})
        assert streamed_text(events) == ANSWER
        messages = await history(server, session_id)
        assert [m["content"] for m in messages] == ["stored in mongo", ANSWER, "second", ANSWER]
        assert upstream.requests[1].body["messages"][1:3] == [
            {"role": "user", "content": "stored in mongo"}, {"role": "assistant", "content": ANSWER}]

        await relay.stop()  # the store goes away
        status, _, _ = await http_json(server, "GET", "/readyz")
        assert status == 503
        result = await sse_post(server, {"message": "during outage", "sessionId": session_id})
        assert (result.status, result.body["code"]) == (500, "internal_error")
        status, _, _ = await http_json(server, "GET", "/healthz")
        assert status == 200  # the server itself stays up

        await relay.start()
        deadline = time.monotonic() + 20
        while (await http_json(server, "GET", "/readyz"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        result = await sse_post(server, {"message": "after outage", "sessionId": session_id})
        assert result.content == ANSWER
    finally:
        await relay.stop()


async def test_answer_metadata_is_stored(server, upstream):
    result = await sse_post(server, {"message": "count my tokens"})
    session = await server.app.store.get_session(result.last["sessionId"])
    assistant = session.messages[1]
    assert assistant.model == "gpt-4o-mini"
    assert assistant.usage == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert assistant.ttft_ms is not None and assistant.ttft_ms >= 0
    assert session.messages[0].usage is None
