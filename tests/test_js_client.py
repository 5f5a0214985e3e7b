"""The official socket.io-client (4.x, Node) running the documented example against the server.

`make test` installs it with `npm ci` in tests/js; run alone, this module does that itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
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


README = JS_DIR.parent.parent / "README.md"


def readme_node_example() -> str:
    """The README's Node example (the first js block under "### Node"), verbatim."""
    text = README.read_text()
    section = text[text.index("\n### Node\n"):]
    start = section.index("```js\n") + len("```js\n")
    return section[start:section.index("\n```", start)]


async def run_readme_example(node: str, tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    script = tmp_path / "chat.mjs"
    script.write_text(readme_node_example())
    if not (tmp_path / "node_modules").exists():
        (tmp_path / "node_modules").symlink_to(JS_DIR / "node_modules")
    process = await asyncio.create_subprocess_exec(
        node, str(script), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path, env={"PATH": os.environ.get("PATH", ""), **env},
    )
    try:  # it must exit by itself: a hang is a failure
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, stdout.decode(), stderr.decode()


async def test_readme_node_example_runs_and_exits(node, server, upstream, tmp_path):
    upstream.default = Script(chunks=CHUNKS, delay=0.01)
    code, out, err = await run_readme_example(node, tmp_path, {"CHAT_URL": url(server, "")}, "Hi from the README")
    assert code == 0, err
    answer, _, tail = out.rpartition("\n[session ")
    assert answer == ANSWER
    session_id = tail.removesuffix("]\n")
    assert str(uuid.UUID(session_id)) == session_id
    assert upstream.requests[-1].body["messages"][-1] == {"role": "user", "content": "Hi from the README"}

    # continuing that conversation
    code, out, err = await run_readme_example(
        node, tmp_path, {"CHAT_URL": url(server, ""), "CHAT_SESSION": session_id}, "And again")
    assert (code, out.rpartition("\n[session ")[2]) == (0, f"{session_id}]\n"), err
    assert [m["content"] for m in upstream.requests[-1].body["messages"][-3:]] == [
        "Hi from the README", ANSWER, "And again"]


async def test_readme_node_example_reports_errors_and_exits(node, server, upstream, tmp_path):
    code, out, err = await run_readme_example(node, tmp_path, {"CHAT_URL": url(server, ""), "CHAT_TOKEN": "garbage"})
    assert (code, out) == (1, "")
    assert err.startswith("invalid_token: ")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    code, out, err = await run_readme_example(node, tmp_path, {"CHAT_URL": f"http://127.0.0.1:{port}"})
    assert (code, out) == (2, "")
    assert err.startswith("cannot connect: ")
    assert upstream.requests == []
