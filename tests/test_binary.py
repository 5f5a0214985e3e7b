"""The one-file executable (`make binary`, API.md "Single binary"), run from an empty folder.

`make test` builds dist/aichat first (a make dependency), so this runs what ships: the demo
chat over SSE and Socket.IO, one chat through the OpenAI path (a lost lazy import would
only show there), and one SIGTERM to the process group draining a running answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import socketio

from tests.fake_upstream import FakeUpstream, Script
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / "dist" / "aichat"



class Executable:
    """dist/aichat copied alone into a folder, started from another, empty one."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        assert BINARY.is_file(), "dist/aichat is missing: run `make binary` (make test builds it)"
        self.folder = tmp_path / "opt"
        self.folder.mkdir()
        self.path = self.folder / "aichat"
        shutil.copy2(BINARY, self.path)
        self.cwd = tmp_path / "empty"
        self.cwd.mkdir()
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AICHAT_", "OPENAI_")) and k not in ("MONGODB_URI", "JWT_SECRET")}
        self.env.update(env)
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        # its own session and process group, as systemd or a terminal would give it
        self.process = await asyncio.create_subprocess_exec(
            str(self.path), "--port", str(self.port), cwd=str(self.cwd), env=self.env,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60  # a cold start unpacks ~45 MB
        while time.monotonic() < deadline:
            line = (await asyncio.wait_for(self.process.stderr.readline(), 60)).decode()
            assert line, f"the executable exited during start-up: {self.log}"
            self.log.append(line)
            if "listening on" in line:
                asyncio.get_running_loop().create_task(self._read_log())
                return
        raise AssertionError("the executable did not start")

    async def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode())

    async def stop_group(self) -> int:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()


async def sse_chat(base: str, message: str, on_first: asyncio.Event | None = None) -> list[dict]:
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/v2/ai/chat/stream", json={"message": message}) as response:
            assert response.status == 200, await response.text()
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if on_first is not None:
                        on_first.set()
    return events


async def socketio_chat(base: str, message: str) -> dict:
    client = socketio.AsyncClient(reconnection=False)
    ended: asyncio.Future[tuple[str, dict]] = asyncio.get_running_loop().create_future()
    for name in ("ai:complete", "ai:error"):
        client.on(name, lambda data, name=name: ended.done() or ended.set_result((name, data)))
    await client.connect(base, transports=["websocket"], wait_timeout=10)
    try:
        await client.emit("ai:chat", {"message": message})
        name, data = await asyncio.wait_for(ended, 30)
    finally:
        await client.disconnect()
    assert name == "ai:complete", data
    return data


async def test_demo_chat_from_an_empty_folder(tmp_path: Path):
    server = Executable(tmp_path)
    await server.start()
    try:
        startup = "".join(server.log)
        assert "built-in defaults (no settings.ini)" in startup
        database = server.folder / "data" / "chat.sqlite3"  # beside the executable, logged absolute
        assert f"sqlite at {database}" in startup and "event loop uvloop" in startup
        async with aiohttp.ClientSession() as session:  # the page and its files are bundled
            for path, kind in (("/", "text/html"), ("/web/app.js", "text/javascript"),
                               ("/web/vendor/socket.io.min.js", "text/javascript")):
                async with session.get(server.url + path) as response:
                    assert response.status == 200 and response.headers["Content-Type"].startswith(kind), path
        events = await sse_chat(server.url, "hello")
        assert events[-1]["done"] is True
        streamed = "".join(e.get("content", "") for e in events)
        assert len(streamed) > 50
        complete = await socketio_chat(server.url, "hello again")
        # the demo answers every message alike, quoting it at the end
        assert complete["response"] == streamed.replace("“hello”", "“hello again”")
        assert await server.stop_group() == 0
        assert database.is_file()
        assert list(server.cwd.iterdir()) == []  # nothing written where it was started
    finally:
        await server.kill()


async def test_openai_path_and_one_group_sigterm_drains(tmp_path: Path, upstream: FakeUpstream):
    server = Executable(tmp_path, OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-test",
                        AICHAT_SERVER_SHUTDOWN_GRACE_SECONDS="30")
    await server.start()
    try:
        assert "AI provider openai" in "".join(server.log)
        events = await sse_chat(server.url, "through the SDK")
        assert "".join(e.get("content", "") for e in events) == "Hello, world!"
        assert upstream.requests[-1].body["messages"][-1]["content"] == "through the SDK"

        # systemd and Ctrl-C signal the whole group; the launcher forwards a second copy,
        # which must not count as "signal again": the answer is drained, not cut
        chunks = [f"word{i} " for i in range(20)]
        upstream.default = Script(chunks=chunks, delay=0.15)  # about 3 s
        first = asyncio.Event()
        running = asyncio.create_task(sse_chat(server.url, "a long one", first))
        await asyncio.wait_for(first.wait(), 30)
        assert await server.stop_group() == 0
        events = await running
        assert events[-1]["done"] is True and "cancelled" not in events[-1]
        assert "".join(e.get("content", "") for e in events) == "".join(chunks)
        assert not any("signalled again" in line for line in server.log)
    finally:
        await server.kill()
