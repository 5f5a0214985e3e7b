"""Edge cases of the answer lifecycle: cancels at awkward moments, failing parts, lost clients."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from services.generation import Generation, Outcome
from services.store.base import FinishedMessage, NewTurn, SessionContext
from services.store.sqlite_store import SqliteStore
from tests.conftest import http_json, sse_post, url
from tests.fake_upstream import Script


class SlowStore(SqliteStore):
    """The embedded store with chosen operations made slow, or failing with a non-store error."""

    def __init__(self, path: str, *, begin=0.0, finish=0.0, context=0.0, context_error=False) -> None:
        super().__init__(path)
        self.delays = {"begin": begin, "finish": finish, "context": context}
        self.context_error = context_error

    async def begin_turn(self, turn: NewTurn) -> None:
        await asyncio.sleep(self.delays["begin"])
        await super().begin_turn(turn)

    async def finish_message(self, finished: FinishedMessage) -> None:
        await asyncio.sleep(self.delays["finish"])
        await super().finish_message(finished)

    async def load_context(self, session_id: str, limit: int) -> SessionContext | None:
        await asyncio.sleep(self.delays["context"])
        if self.context_error:
            raise ValueError("a bug, not a store outage")
        return await super().load_context(session_id, limit)


async def messages_of(server, session_id):
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}")
    assert status == 200, body
    return [(m["role"], m["content"], m["status"]) for m in body["messages"]]


async def test_cancel_while_the_answer_is_being_stored_changes_nothing(make_server, upstream, tmp_path):
    server = await make_server(store=SlowStore(str(tmp_path / "s.sqlite3"), finish=0.5))
    storing = asyncio.Event()

    def on_event(event):
        if event.get("content") == "!":  # the last chunk: the final write starts now
            storing.set()
        return True

    stream = asyncio.create_task(sse_post(server, {"message": "go", "sessionId": "late-cancel"}, on_event=on_event))
    await asyncio.wait_for(storing.wait(), 10)
    status, _, _ = await http_json(server, "POST", "/api/v2/ai/chat/sessions/late-cancel/cancel")
    assert status == 202
    result = await stream
    assert result.last == {"done": True, "sessionId": "late-cancel", "messageId": result.last["messageId"]}
    assert server.app.chat.active_count == 0  # not stuck busy
    assert (await messages_of(server, "late-cancel"))[1] == ("assistant", "Hello, world!", "complete")
    again = await sse_post(server, {"message": "again", "sessionId": "late-cancel"})
    assert again.last["done"] is True


async def test_cancel_while_the_question_is_being_stored_keeps_the_question(make_server, upstream, tmp_path):
    server = await make_server(store=SlowStore(str(tmp_path / "s.sqlite3"), begin=0.5))
    upstream.queue(Script(first_delay=0.1))
    stream = asyncio.create_task(sse_post(server, {"message": "keep me", "sessionId": "early-cancel"}))
    await asyncio.sleep(0.2)  # the upstream has answered; the question's write is still going
    status, _, _ = await http_json(server, "POST", "/api/v2/ai/chat/sessions/early-cancel/cancel")
    assert status == 202
    result = await stream
    assert result.content == ""
    assert result.last["done"] is True and result.last["cancelled"] is True
    assert await messages_of(server, "early-cancel") == [("user", "keep me", "complete"),
                                                         ("assistant", "", "error")]


async def test_client_gone_during_set_up_is_detached(make_server, upstream, tmp_path):
    store = SlowStore(str(tmp_path / "s.sqlite3"), context=0.5)
    server = await make_server(store=store, ai__on_client_disconnect="cancel")
    upstream.queue(Script(chunks=[f"w{i} " for i in range(40)], delay=0.05))  # 2 s of answer
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(url(server, "/api/v2/ai/chat/stream"),
                                                   json={"message": "go", "sessionId": "gone-early"}))
        await asyncio.sleep(0.2)
        request.cancel()  # the client leaves while the context is being read
        await asyncio.gather(request, return_exceptions=True)
    deadline = time.monotonic() + 10
    while server.app.chat.active_count or (await server.app.store.get_session("gone-early")) is None:
        assert time.monotonic() < deadline, "the answer was not stopped"
        await asyncio.sleep(0.02)
    # stopped before it asked the model: the question is kept, the answer is an `error`
    assert await messages_of(server, "gone-early") == [("user", "go", "complete"), ("assistant", "", "error")]
    assert upstream.requests == []


async def test_unexpected_failures_become_internal_error_on_both_transports(
        make_server, upstream, socket_client, tmp_path):
    server = await make_server(store=SlowStore(str(tmp_path / "s.sqlite3"), context_error=True))
    result = await sse_post(server, {"message": "go", "sessionId": "buggy"})
    assert (result.status, result.body) == (500, {"error": "Internal server error.", "code": "internal_error"})
    assert "RateLimit-Limit" in {k.title() for k in result.headers} or "Ratelimit-Limit" in result.headers
    client = await socket_client(server)
    events = await client.chat({"message": "go", "sessionId": "buggy"})
    assert events == [("ai:error", {"error": "Internal server error.", "code": "internal_error",
                                    "sessionId": "buggy"})]
    assert client.client.connected
    assert upstream.requests == []


async def test_refused_requests_still_carry_the_rate_limit_headers(server):
    for raw, content_type in ((b"not json", "application/json"), (b"{}", "text/plain")):
        result = await sse_post(server, None, raw=raw, headers={"Content-Type": content_type})
        headers = {k.lower(): v for k, v in result.headers.items()}
        assert result.status in (400, 415)
        assert headers["ratelimit-limit"] == "20" and headers["ratelimit-remaining"] == "20"


class Recorder:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.ended: list[Outcome] = []

    def on_delta(self, generation, seq, text):
        self.deltas.append(text)

    def on_end(self, generation, outcome):
        self.ended.append(outcome)


class Broken:
    def on_delta(self, generation, seq, text):
        raise RuntimeError("transport gone")

    def on_end(self, generation, outcome):
        raise RuntimeError("transport gone")


def test_a_failing_listener_does_not_disturb_the_others():
    generation = Generation("s", "m", None, 0.0)
    good, broken, late = Recorder(), Broken(), Recorder()
    generation.attach(good)
    generation.attach(broken)
    generation.attach(late)
    generation.publish("a")
    generation.publish("b")
    generation.end(Outcome(status="complete", text="ab"))
    assert good.deltas == late.deltas == ["a", "b"]
    assert len(good.ended) == len(late.ended) == 1
    assert broken not in generation.listeners
