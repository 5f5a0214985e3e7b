"""Cluster mode end to end: real product processes (`python run.py`) sharing one redis-server
and one SQLite file, the fake OpenAI upstream, and real SSE / Socket.IO clients.

Three nodes serve the module's shared tests (limits, busy, stop, resume); the tests that
kill, pause or cut a node's Redis start their own nodes (and Redis). The lock TTL is 1 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import SocketClient, read_sse, sse_post, streamed_text
from tests.fake_upstream import FakeUpstream, Script
from tests.redis_server import RedisProcess, free_port, new_key_prefix, redis_url  # noqa: F401  (fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "cluster-test-secret-0123456789-abcdefghij"
USER_LIMIT = 4
START_TIMEOUT_S = 30.0
#: a slow answer (40 deltas, 2 s): long enough to stop, resume, kill or pause it midway
SLOW = ["Ünïcode ", "😀 ", "déjà ", "vu, "] * 10
FAST = ["Hello", ", ", "world", "!"]


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


class ThreadedUpstream:
    """The fake upstream on its own thread and event loop, so it outlives each test's loop."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def answer_with(self, chunks: list[str], delay: float = 0.0) -> str:
        """Every request from now on gets this answer; returns its whole text."""
        self.fake.scripts.clear()
        self.fake.default = Script(chunks=list(chunks), delay=delay)
        return "".join(chunks)


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


def start_nodes(count: int, directory: Path, upstream: ThreadedUpstream, redis: str, prefix: str,
                **settings: str) -> list[Node]:
    """``count`` product processes on free ports, sharing Redis, the SQLite file and the upstream."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AICHAT_", "OPENAI_", "JWT_", "MONGODB_"))}
    config = directory / "empty.ini"
    config.write_text("")
    nodes: list[Node] = []
    for number in range(count):
        port = free_port()
        name = f"node{number}"
        env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            "AICHAT_SERVER_HOST": "127.0.0.1",
            "AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS": "1",
            "AICHAT_AI_PROVIDER": "openai",
            "OPENAI_BASE_URL": upstream.fake.base_url,
            "OPENAI_API_KEY": "sk-test-secret-key",
            "OPENAI_MODEL": "test-model",
            "AICHAT_AI_REQUEST_TIMEOUT_SECONDS": "10",
            "AICHAT_AI_SYSTEM_PROMPT": "You are a test assistant.",
            "AICHAT_STORAGE_SQLITE_PATH": str(directory / "chat.sqlite3"),
            "AICHAT_STORAGE_CHECKPOINT_SECONDS": "0.2",
            "AICHAT_AUTH_JWT_SECRET": SECRET,
            "AICHAT_RATE_LIMIT_AUTHENTICATED_LIMIT": str(USER_LIMIT),
            "AICHAT_RATE_LIMIT_ANONYMOUS_LIMIT": "1000",
            "AICHAT_CLUSTER_REDIS_URL": redis,
            "AICHAT_CLUSTER_KEY_PREFIX": prefix,
            "AICHAT_CLUSTER_NODE_ID": name,
            "AICHAT_CLUSTER_LOCK_TTL_SECONDS": "1",
            **settings,
        }
        log_path = directory / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "run.py"), "--config", str(config), "--port", str(port)],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        nodes.append(Node(name, port, process, log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    for node in nodes:
        while node.readyz() != 200:
            if node.process.poll() is not None or time.monotonic() > deadline:
                for other in nodes:
                    other.stop()
                raise RuntimeError(f"{node.name} did not become ready:\n{node.log()[-3000:]}")
            time.sleep(0.1)
    return nodes


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[ThreadedUpstream]:
    upstream = ThreadedUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream,
          redis_url: str) -> Iterator[list[Node]]:  # noqa: F811
    started = start_nodes(3, tmp_path_factory.mktemp("cluster"), upstream_thread, redis_url, new_key_prefix())
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def upstream(upstream_thread: ThreadedUpstream) -> ThreadedUpstream:
    upstream_thread.answer_with(FAST)
    return upstream_thread


SocketFactory = Callable[..., Awaitable[SocketClient]]


def url(node: Node, path: str) -> str:
    return f"http://127.0.0.1:{node.port}{path}"


async def http(node: Node, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(node, path), headers=headers or {}) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)


class SseStream:
    """An SSE chat read in the background, so the test can act while it streams."""

    def __init__(self, node: Node, payload: dict[str, Any], headers: dict[str, str] | None = None,
                 path: str = "/api/v2/ai/chat/stream", method: str = "POST") -> None:
        self.events: list[dict[str, Any]] = []
        self.ids: list[str | None] = []
        self.status = 0
        self.body: Any = None
        self.first = asyncio.Event()
        self._task = asyncio.create_task(self._run(node, payload, headers or {}, path, method))

    async def _run(self, node: Node, payload: dict[str, Any], headers: dict[str, str], path: str,
                   method: str) -> None:
        from tests.conftest import SseResponse

        result = SseResponse(0, {})
        try:
            async with aiohttp.ClientSession() as session:
                async with session.request(method, url(node, path), json=payload if method == "POST" else None,
                                           headers=headers) as response:
                    self.status = response.status
                    if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                        self.body = await response.json()
                        return

                    def seen(event: dict[str, Any]) -> None:
                        self.events.append(event)
                        self.ids.append(result.ids[-1])
                        self.first.set()

                    await read_sse(response, result, seen)
        except aiohttp.ClientError:
            pass  # the node went away
        finally:
            self.first.set()

    @property
    def content(self) -> str:
        return "".join(e.get("content", "") for e in self.events)

    async def frames(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while len(self.events) < count and not self._task.done():
                await asyncio.sleep(0.01)
        assert len(self.events) >= count, (self.status, self.body, self.events)

    async def done(self, timeout: float = 15) -> None:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def cancel(self) -> None:
        self._task.cancel()


@pytest.fixture
async def sockets() -> Any:
    clients: list[SocketClient] = []

    async def factory(node: Node, **kwargs: Any) -> SocketClient:
        client = SocketClient()
        clients.append(client)
        return await client.connect(node, **kwargs)  # type: ignore[arg-type]

    yield factory
    for client in clients:
        try:
            await client.close()
        except Exception:
            pass


def header(result: Any, name: str) -> str:
    """A response header, looked up case-insensitively (Tornado sends `Ratelimit-Limit`)."""
    found = [value for key, value in result.headers.items() if key.lower() == name.lower()]
    assert len(found) == 1, (name, result.headers)
    return found[0]


def ending(events: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    ends = [(name, data) for name, data in events if name in ("ai:complete", "ai:error")]
    assert len(ends) == 1, events
    return ends[0]


async def stored_session(node: Node, session_id: str, user: str | None = None) -> dict[str, Any]:
    status, body = await http(node, "GET", f"/api/v2/ai/chat/sessions/{session_id}",
                              bearer(user) if user else None)
    assert status == 200, body
    return body


# --- the shared three-node cluster --------------------------------------------------------


async def test_each_node_answers_and_sees_the_others_sessions(nodes: list[Node], upstream: ThreadedUpstream,
                                                              sockets: SocketFactory) -> None:
    first = await sse_post(nodes[0], {"message": "hi", "sessionId": "c-shared"})  # type: ignore[arg-type]
    assert first.status == 200 and first.content == "Hello, world!" and first.last["done"] is True
    client = await sockets(nodes[1])
    events = await client.chat({"message": "again", "sessionId": "c-shared"})
    assert streamed_text(events) == "Hello, world!" and ending(events)[0] == "ai:complete"
    session = await stored_session(nodes[2], "c-shared")
    assert [m["content"] for m in session["messages"]] == ["hi", "Hello, world!", "again", "Hello, world!"]


async def test_one_budget_across_nodes_and_transports(nodes: list[Node], upstream: ThreadedUpstream,
                                                      sockets: SocketFactory) -> None:
    user = "limit-user"
    sse = [await sse_post(nodes[i], {"message": f"m{i}"}, headers=bearer(user)) for i in (0, 2)]  # type: ignore[arg-type]
    socket_events = [await (await sockets(nodes[i])).chat({"message": "s", "token": token(user)}) for i in (1, 0)]
    assert [r.status for r in sse] == [200, 200]
    assert [header(r, "RateLimit-Remaining") for r in sse] == [str(USER_LIMIT - 1), str(USER_LIMIT - 2)]
    assert all(ending(events)[0] == "ai:complete" for events in socket_events)
    # four used, on three nodes and both transports: the fifth is refused everywhere
    refused = await sse_post(nodes[1], {"message": "five"}, headers=bearer(user))  # type: ignore[arg-type]
    assert refused.status == 429 and refused.body["code"] == "rate_limited"
    assert header(refused, "RateLimit-Remaining") == "0" and int(header(refused, "Retry-After")) > 0
    events = await (await sockets(nodes[2])).chat({"message": "six", "token": token(user)})
    assert ending(events)[0] == "ai:error" and ending(events)[1]["code"] == "rate_limited"
    other = await sse_post(nodes[1], {"message": "other"}, headers=bearer("another-user"))  # type: ignore[arg-type]
    assert other.status == 200


async def test_a_session_is_busy_on_every_node_while_one_answers(nodes: list[Node], upstream: ThreadedUpstream,
                                                                 sockets: SocketFactory) -> None:
    text = upstream.answer_with(SLOW, delay=0.05)
    user = "busy-user"
    running = SseStream(nodes[0], {"message": "long", "sessionId": "c-busy"}, bearer(user))
    await running.frames(2)
    busy = await sse_post(nodes[1], {"message": "x", "sessionId": "c-busy"}, headers=bearer(user))  # type: ignore[arg-type]
    assert busy.status == 409 and busy.body["code"] == "busy"
    events = await (await sockets(nodes[2])).chat({"message": "y", "sessionId": "c-busy", "token": token(user)})
    assert ending(events)[1]["code"] == "busy"
    stranger = await sse_post(nodes[2], {"message": "z", "sessionId": "c-busy"}, headers=bearer("intruder"))  # type: ignore[arg-type]
    assert stranger.status == 404 and stranger.body["code"] == "not_found"
    await running.done()
    assert running.content == text and running.events[-1]["done"] is True
    upstream.answer_with(FAST)
    after = await sse_post(nodes[1], {"message": "now", "sessionId": "c-busy"}, headers=bearer(user))  # type: ignore[arg-type]
    assert after.status == 200 and after.content == "Hello, world!"  # released at the end


async def test_stop_from_another_node_on_both_transports(nodes: list[Node], upstream: ThreadedUpstream,
                                                         sockets: SocketFactory) -> None:
    upstream.answer_with(SLOW, delay=0.05)
    user = "stop-user"
    running = SseStream(nodes[0], {"message": "long", "sessionId": "c-stop-1"}, bearer(user))
    await running.frames(3)
    assert (await http(nodes[1], "POST", "/api/v2/ai/chat/sessions/c-stop-1/cancel", bearer("intruder")))[0] == 404
    status, body = await http(nodes[1], "POST", "/api/v2/ai/chat/sessions/c-stop-1/cancel", bearer(user))
    assert status == 202 and body["cancelled"] is True and body["messageId"] == running.events[0]["messageId"]
    await running.done()
    assert running.events[-1].get("done") is True and running.events[-1].get("cancelled") is True
    session = await stored_session(nodes[2], "c-stop-1", user)
    assert session["messages"][-1]["status"] == "partial"
    assert session["messages"][-1]["content"] == running.content and 0 < len(running.content) < len("".join(SLOW))

    # Socket.IO: the answer on node 1, ai:cancel from a connection on node 2
    watcher = await sockets(nodes[1])
    await watcher.client.emit("ai:chat", {"message": "long", "sessionId": "c-stop-2", "token": token(user)})
    await watcher.wait_for(lambda events: len(events) >= 3)
    stopper = await sockets(nodes[2])
    await stopper.client.emit("ai:cancel", {"sessionId": "c-stop-2", "token": token(user)})
    await watcher.wait_for(lambda events: any(name != "ai:stream" for name, _ in events))
    name, data = ending(watcher.events)
    assert name == "ai:complete" and data["cancelled"] is True
    assert stopper.events == []  # no error for the stopper
    session = await stored_session(nodes[0], "c-stop-2", user)
    assert session["messages"][-1]["content"] == streamed_text(watcher.events) == data["response"]


async def test_deleting_a_session_on_another_node_waits_for_its_answer_to_end(
        nodes: list[Node], upstream: ThreadedUpstream) -> None:
    upstream.answer_with(SLOW, delay=0.05)
    user = "delete-user"
    running = SseStream(nodes[0], {"message": "long", "sessionId": "c-delete"}, bearer(user))
    await running.frames(3)
    upstream.answer_with(["fresh"])
    status, _ = await http(nodes[1], "DELETE", "/api/v2/ai/chat/sessions/c-delete", bearer(user))
    assert status == 204
    # by the time the delete returned, node 0 had stopped the answer, written it and freed the
    # session: a new turn in the same session id is not busy, and nothing of the old one is back
    again = await sse_post(nodes[2], {"message": "start over", "sessionId": "c-delete"},  # type: ignore[arg-type]
                           headers=bearer(user))
    assert again.status == 200 and again.content == "fresh", again.events
    await running.done()
    assert running.events[-1].get("done") is True and running.events[-1].get("cancelled") is True
    session = await stored_session(nodes[1], "c-delete", user)
    assert [m["content"] for m in session["messages"]] == ["start over", "fresh"]
    assert "session moved on" not in nodes[0].log()


async def test_resume_on_other_nodes_is_byte_exact_on_both_transports(
    nodes: list[Node], upstream: ThreadedUpstream, sockets: SocketFactory
) -> None:
    text = upstream.answer_with(SLOW, delay=0.05)
    user = "resume-user"
    origin = SseStream(nodes[0], {"message": "long", "sessionId": "c-resume"}, bearer(user))
    await origin.frames(4)
    origin.cancel()  # the client drops; the answer goes on (on_client_disconnect = finish)
    message_id = origin.events[0]["messageId"]
    last_id = next(i for i in reversed(origin.ids) if i)
    seen = origin.content[: int(last_id.rpartition(":")[2])]

    # SSE on node 1, from the last event id; Socket.IO on node 2, from a position of its own
    resumed = SseStream(nodes[1], {}, {**bearer(user), "Last-Event-ID": last_id},
                        path=f"/api/v2/ai/chat/stream/{message_id}", method="GET")
    follower = await sockets(nodes[2])
    await follower.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 3, "token": token(user)})
    await resumed.done()
    await follower.wait_for(lambda events: any(name != "ai:stream" for name, _ in events))

    assert resumed.status == 200 and resumed.events[-1]["done"] is True
    assert seen + resumed.content == text
    assert resumed.ids[0] is not None and resumed.ids[-1] == f"{message_id}:{len(text)}"
    name, data = ending(follower.events)
    assert name == "ai:complete" and data["response"] == text
    assert text[:3] + streamed_text(follower.events) == text
    session = await stored_session(nodes[0], "c-resume", user)
    assert session["messages"][-1] == {**session["messages"][-1], "content": text, "status": "complete"}
    # a stranger cannot follow it, from any node
    status, body = await http(nodes[1], "GET", f"/api/v2/ai/chat/stream/{message_id}", bearer("intruder"))
    assert status == 404


async def test_resume_of_a_live_answer_by_another_node_while_it_is_followed_twice(
    nodes: list[Node], upstream: ThreadedUpstream, sockets: SocketFactory
) -> None:
    text = upstream.answer_with(SLOW, delay=0.05)
    origin = SseStream(nodes[2], {"message": "long", "sessionId": "c-follow-2"})
    await origin.frames(2)
    message_id = origin.events[0]["messageId"]
    first, second = await sockets(nodes[0]), await sockets(nodes[0])  # two followers share one relay
    await first.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 0})
    await second.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 0})
    for client in (first, second):
        await client.wait_for(lambda events: any(name != "ai:stream" for name, _ in events))
        assert streamed_text(client.events) == text and ending(client.events)[1]["response"] == text
    await origin.done()
    assert origin.content == text


# --- nodes that die, pause, or lose Redis ---------------------------------------------------


async def test_kill_9_of_the_generating_node(tmp_path: Path, upstream: ThreadedUpstream,
                                             redis_url: str, sockets: SocketFactory) -> None:  # noqa: F811
    upstream.answer_with(SLOW * 3, delay=0.05)
    generating, other = start_nodes(2, tmp_path, upstream, redis_url, new_key_prefix())
    try:
        origin = SseStream(generating, {"message": "long", "sessionId": "c-kill"})
        await origin.frames(3)
        message_id = origin.events[0]["messageId"]
        follower = await sockets(other)
        await follower.client.emit("ai:resume", {"messageId": message_id, "afterSeq": 0})
        await follower.wait_for(lambda events: len(events) >= 2)
        await asyncio.sleep(0.5)  # a checkpoint or two
        generating.process.kill()
        # the follower gets the stored partial and an ending once the dead node's lock expires
        await follower.wait_for(lambda events: any(name != "ai:stream" for name, _ in events), timeout=15)
        name, data = ending(follower.events)
        stored = (await stored_session(other, "c-kill"))["messages"][-1]
        assert name == "ai:complete" and stored["status"] == "partial" and stored["content"]
        assert streamed_text(follower.events).startswith(stored["content"])
        # the session is free again
        upstream.answer_with(FAST)
        after = await sse_post(other, {"message": "again", "sessionId": "c-kill"})  # type: ignore[arg-type]
        assert after.status == 200 and after.content == "Hello, world!"
    finally:
        generating.stop()
        other.stop()


def pause_outside_a_write(node: Node, database: Path) -> None:
    """SIGSTOP the node, but not in the middle of one of its SQLite transactions (it checkpoints
    every 0.2 s): a node frozen holding the file's write lock would stall every other node's
    writes until it resumes, which is not what the test is about."""
    for _ in range(50):
        node.process.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # stopped inside a write: let it finish, and try again
            node.process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        finally:
            probe.close()
    raise AssertionError("the node was inside a write at every attempt")


async def test_a_node_paused_past_the_ttl_does_not_store_over_the_newer_answer(
    tmp_path: Path, upstream: ThreadedUpstream, redis_url: str  # noqa: F811
) -> None:
    upstream.answer_with(SLOW, delay=0.05)
    paused, other = start_nodes(2, tmp_path, upstream, redis_url, new_key_prefix())
    try:
        origin = SseStream(paused, {"message": "first", "sessionId": "c-pause"})
        await origin.frames(3)
        await asyncio.sleep(0.4)  # a checkpoint
        pause_outside_a_write(paused, tmp_path / "chat.sqlite3")
        await asyncio.sleep(2.5)  # past the 1 s TTL: the session is free for another node
        upstream.answer_with(FAST)
        newer = await sse_post(other, {"message": "second", "sessionId": "c-pause"})  # type: ignore[arg-type]
        assert newer.status == 200 and newer.content == "Hello, world!", newer.body
        paused.process.send_signal(signal.SIGCONT)
        await origin.done()
        # the paused node finished its answer but the store refused it (older fencing number)
        assert origin.events[-1].get("code") == "internal_error", origin.events[-1]
        messages = (await stored_session(other, "c-pause"))["messages"]
        assert [m["content"] for m in messages[2:]] == ["second", "Hello, world!"]
        assert messages[3]["status"] == "complete"
        assert messages[1]["status"] == "partial" and origin.content.startswith(messages[1]["content"])
        assert messages[1]["content"] != origin.content
        assert "the session moved on" in paused.log()
    finally:
        paused.stop()
        other.stop()


async def test_redis_down_refuses_new_chats_finishes_running_ones_and_recovers(
    tmp_path: Path, upstream: ThreadedUpstream, sockets: SocketFactory
) -> None:
    redis = RedisProcess()
    redis.start()
    text = upstream.answer_with(SLOW, delay=0.05)
    first, second = start_nodes(2, tmp_path, upstream, redis.url, new_key_prefix())
    try:
        running = SseStream(first, {"message": "long", "sessionId": "c-redis"})
        await running.frames(2)
        redis.stop()
        refused = await sse_post(second, {"message": "new"})  # type: ignore[arg-type]
        assert refused.status == 503 and refused.body["code"] == "unavailable"
        client = await sockets(first)
        events = await client.chat({"message": "new"})
        assert ending(events)[1]["code"] == "unavailable"
        assert first.readyz() == 503 and second.readyz() == 503
        await running.done()  # the answer in flight finishes and is stored
        assert running.content == text and running.events[-1]["done"] is True
        assert (await stored_session(second, "c-redis"))["messages"][-1]["content"] == text

        redis.start()
        deadline = time.monotonic() + 15
        while not (first.readyz() == 200 and second.readyz() == 200):
            assert time.monotonic() < deadline, "the nodes did not recover"
            await asyncio.sleep(0.2)
        # everything works again without a restart, stop across nodes included
        running = SseStream(first, {"message": "long", "sessionId": "c-redis-2"})
        await running.frames(2)
        status, _ = await http(second, "POST", "/api/v2/ai/chat/sessions/c-redis-2/cancel")
        assert status == 202
        await running.done()
        assert running.events[-1].get("cancelled") is True
    finally:
        first.stop()
        second.stop()
        redis.close()
