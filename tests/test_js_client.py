"""The official socket.io-client (4.x, Node) running the documented example against the server.

`make test` installs it with `npm ci` in tests/js; run alone, this module does that itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import url
from tests.fake_upstream import Script

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "client_example.mjs"
CHUNKS = ["Grüß", " dich", " from", " the", " fake", " model", " 🎉"]
ANSWER = "".join(CHUNKS)


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    assert found, "Node.js is required for the socket.io-client tests"
    if not (JS_DIR / "node_modules" / "socket.io-client" / "package.json").is_file():
        import subprocess

        npm = shutil.which("npm")
        assert npm, "npm is required to install tests/js"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR, check=True,
                       timeout=300)
    return found


async def run_example(node: str, server: Any, *args: str) -> tuple[int, str, dict[str, Any]]:
    """Run the example as a subprocess; awaiting it keeps this event loop (and the server) running."""
    process = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), url(server, ""), "--timeout", "60000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=JS_DIR,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = stdout.decode()
    streamed, _, summary = text.rstrip("\n").rpartition("\n")
    assert summary.startswith("{"), (text, stderr.decode())
    return process.returncode, streamed, json.loads(summary)


@pytest.mark.parametrize(
    ("label", "options", "transport"),
    [
        ("documented default", [], "websocket"),  # starts on polling, then upgrades
        ("polling only, auth token null", ["--transport", "polling", "--auth-null"], "polling"),
        ("websocket only", ["--transport", "websocket"], "websocket"),
    ],
)
async def test_documented_example(node, server, upstream, label, options, transport):
    upstream.default = Script(chunks=CHUNKS, delay=0.01)
    code, streamed, result = await run_example(node, server, "--message", "Hi from Node",
                                               "--session-id", "node-session_1", *options)
    assert code == 0, result
    assert streamed == ANSWER  # what the example wrote to stdout as it arrived
    assert result["content"] == ANSWER
    assert result["response"] == ANSWER
    assert result["sessionId"] == "node-session_1"
    names = [e["event"] for e in result["events"]]
    assert names[-1] == "ai:complete" and set(names[:-1]) == {"ai:stream"}, names
    message_id = result["events"][-1]["data"]["messageId"]
    assert all(e["data"]["sessionId"] == "node-session_1" and e["data"]["messageId"] == message_id
               for e in result["events"])
    if transport == "polling":
        assert result["transport"] == "polling"
    elif options:
        assert result["transport"] == "websocket"
    assert upstream.requests[-1].body["messages"][-1] == {"role": "user", "content": "Hi from Node"}


async def test_session_id_is_made_when_absent(node, server, upstream):
    code, streamed, result = await run_example(node, server)
    assert code == 0, result
    assert streamed == result["response"] == "Hello, world!"
    assert str(uuid.UUID(result["sessionId"])) == result["sessionId"]
    assert uuid.UUID(result["sessionId"]).version == 4


async def test_errors_reach_the_example(node, server, upstream):
    # a token while authentication is not configured: ai:error, and exit 1 unless expected
    code, streamed, result = await run_example(node, server, "--token", "garbage")
    assert code == 1
    assert streamed == ""
    assert result["error"]["code"] == "invalid_token"
    code, _, result = await run_example(node, server, "--token", "garbage", "--expect-error",
                                        "--transport", "polling")
    assert code == 0
    assert result["error"]["code"] == "invalid_token"
    assert [e["event"] for e in result["events"]] == ["ai:error"]
    assert upstream.requests == []
