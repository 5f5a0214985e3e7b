"""Shared fixtures: a fake OpenAI upstream, the real server in-process, and real clients."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from server.lifecycle import RunningServer, start_server
from server.settings import Settings, load_settings
from services.store.base import ChatStore
from tests.fake_upstream import FakeUpstream
from tests.mongo_server import mongodb_uri  # noqa: F401  (session fixture)

TEST_SYSTEM_PROMPT = "You are a test assistant."


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


def make_settings(tmp_path: Path, upstream: FakeUpstream | None, **overrides: Any) -> Settings:
    """Settings for a test server; overrides are `section__key=value`."""
    values: dict[tuple[str, str], str] = {
        ("server", "host"): "127.0.0.1",
        ("server", "port"): "0",
        ("server", "shutdown_grace_seconds"): "2",
        ("ai", "system_prompt"): TEST_SYSTEM_PROMPT,
        ("ai", "request_timeout_seconds"): "5",
        ("storage", "sqlite_path"): str(tmp_path / "chat.sqlite3"),
    }
    if upstream is not None:
        values[("ai", "provider")] = "openai"
        values[("ai", "base_url")] = upstream.base_url
        values[("ai", "api_key")] = "sk-test-secret-key"
    for name, value in overrides.items():
        section, key = name.split("__")
        values[(section, key)] = str(value)
    return load_settings(None, environ={}, overrides=values)


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def make_server(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[ServerFactory]:
    started: list[RunningServer] = []

    async def factory(store: ChatStore | None = None, **overrides: Any) -> RunningServer:
        running = await start_server(make_settings(tmp_path, upstream, **overrides), store)
        started.append(running)
        return running

    yield factory
    for running in started:
        await shutdown_or_explain(running)


#: a test server's shutdown(0) takes well under a second; past this, something hangs
SHUTDOWN_WATCHDOG_SECONDS = 30.0


async def shutdown_or_explain(running: RunningServer) -> None:
    """shutdown(0), and if it hangs, fail with every asyncio task's stack (pytest-timeout
    shows only threads, where a hung coroutine is invisible)."""
    shutting = asyncio.ensure_future(running.shutdown(0))
    done, _ = await asyncio.wait({shutting}, timeout=SHUTDOWN_WATCHDOG_SECONDS)
    if done:
        shutting.result()
        return
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=stacks)
    shutting.cancel()
    pytest.fail(f"server shutdown hung for {SHUTDOWN_WATCHDOG_SECONDS:.0f}s; tasks:\n{stacks.getvalue()}")


@pytest.fixture
async def server(make_server: ServerFactory) -> RunningServer:
    return await make_server()


def url(server: RunningServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


@dataclass
class SseResponse:
    status: int
    headers: dict[str, str]
    #: data frames, decoded
    events: list[dict[str, Any]] = field(default_factory=list)
    #: the `id:` of each data frame, in order (None when absent)
    ids: list[str | None] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    body: Any = None

    @property
    def content(self) -> str:
        return "".join(e.get("content", "") for e in self.events)

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]


async def read_sse(response: aiohttp.ClientResponse, result: SseResponse,
                   on_event: Callable[[dict[str, Any]], Any] | None = None) -> None:
    event_id: str | None = None
    data_lines: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            result.comments.append(line)
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data_lines.append(line[5:].strip())
        elif line == "" and data_lines:
            event = json.loads("\n".join(data_lines))
            result.events.append(event)
            result.ids.append(event_id)
            event_id, data_lines = None, []
            if on_event is not None and on_event(event) is False:
                return


async def sse_post(
    server: RunningServer,
    payload: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    on_event: Callable[[dict[str, Any]], Any] | None = None,
    path: str = "/api/v2/ai/chat/stream",
) -> SseResponse:
    """POST a chat message and read the whole answer (or the JSON error)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else json.dumps(payload).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, path), data=data, headers=all_headers) as response:
            result = SseResponse(response.status, dict(response.headers))
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                await read_sse(response, result, on_event)
            else:
                text = await response.text()
                result.body = json.loads(text) if text else None
            return result


async def read_then_leave(server: RunningServer, payload: Any, frames: int) -> SseResponse:
    """POST a chat message, read its first ``frames`` frames, then drop the connection."""
    result = SseResponse(0, {})
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/api/v2/ai/chat/stream"), json=payload) as response:
            result.status = response.status
            await read_sse(response, result, lambda _: len(result.events) < frames)
    return result


async def http_json(server: RunningServer, method: str, path: str, *,
                    headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(server, path), headers=headers or {}) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None), dict(response.headers)


class SocketClient:
    """A python-socketio AsyncClient that records every ai:* event it receives."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        for name in ("ai:stream", "ai:complete", "ai:error"):
            self.client.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[[Any], Awaitable[None]]:
        async def record(data: Any) -> None:
            self.events.append((name, data))
            self._changed.set()

        return record

    async def connect(self, server: RunningServer, *, transport: str = "websocket",
                      auth: Any = None, headers: dict[str, str] | None = None) -> SocketClient:
        await self.client.connect(url(server, ""), transports=[transport], auth=auth, headers=headers or {},
                                  wait_timeout=5)
        return self

    async def wait_for(self, predicate: Callable[[list[tuple[str, dict[str, Any]]]], bool],
                       timeout: float = 10) -> None:
        async def waiter() -> None:
            while not predicate(self.events):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(waiter(), timeout)

    async def chat(self, payload: Any, timeout: float = 10) -> list[tuple[str, dict[str, Any]]]:
        """Emit ai:chat and return the events up to its ai:complete or ai:error."""
        start = len(self.events)
        await self.client.emit("ai:chat", payload)

        def ended(events: list[tuple[str, dict[str, Any]]]) -> bool:
            return any(name in ("ai:complete", "ai:error") for name, _ in events[start:])

        await self.wait_for(ended, timeout)
        return self.events[start:]

    async def close(self) -> None:
        await self.client.disconnect()


@pytest.fixture
async def socket_client() -> AsyncIterator[Callable[..., Awaitable[SocketClient]]]:
    clients: list[SocketClient] = []

    async def factory(server: RunningServer, **kwargs: Any) -> SocketClient:
        client = SocketClient()
        clients.append(client)
        return await client.connect(server, **kwargs)

    yield factory
    for client in clients:
        await client.close()


def streamed_text(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(data["content"] for name, data in events if name == "ai:stream")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (`item.report_call`...), for fixtures that
    save evidence on failure (the browser tests' screenshots)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
