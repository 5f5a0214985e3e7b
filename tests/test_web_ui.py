"""How the chat page's files are served (the page itself runs in tests/test_web_page.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from handlers.web_ui import web_root
from tests.conftest import http_json, url
from tests.test_js_client import node  # noqa: F401  (fixture: runs `npm ci` in tests/js when needed)

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
VENDORED = ROOT / "web" / "vendor" / "socket.io.min.js"


async def get(server, path: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, path), headers=headers, allow_redirects=False) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


@pytest.mark.parametrize(("path", "content_type", "marker"), [
    ("/", "text/html; charset=utf-8", b'<textarea id="message"'),
    ("/web/app.js", "text/javascript; charset=utf-8", b"'use strict';"),
    ("/web/style.css", "text/css; charset=utf-8", b":root"),
    ("/web/vendor/socket.io.min.js", "text/javascript; charset=utf-8", b"Socket.IO v"),
])
async def test_files_are_served_with_their_type_and_a_strict_policy(server, path, content_type, marker):
    status, headers, body = await get(server, path)
    assert status == 200
    assert headers["Content-Type"] == content_type
    assert marker in body
    policy = {part.strip().split(" ")[0]: part.strip() for part in headers["Content-Security-Policy"].split(";")}
    assert policy["default-src"] == "default-src 'self'"
    assert policy["script-src"] == "script-src 'self'"
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-cache"
    assert "ETag" in headers
    # revalidation is cheap
    again, _, body = await get(server, path, **{"If-None-Match": headers["ETag"]})
    assert (again, body) == (304, b"")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.in_script = False
        self.attributes: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes += [(tag, name, value) for name, value in attrs]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self.in_script = True

    def handle_endtag(self, tag: str) -> None:
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline.append(data)


def test_the_page_has_no_inline_script_or_style_and_no_other_origin():
    page = _Page()
    page.feed((ROOT / "web" / "index.html").read_text())
    assert page.scripts == [{"src": "web/app.js", "defer": None}]
    assert page.inline == []
    assert not [a for a in page.attributes if a[1].startswith("on") or a[1] == "style"]
    links = [value for _, name, value in page.attributes if name in ("src", "href")]
    assert links and not [link for link in links if "//" in (link or "")], links
    # the API is found relative to the script's own address, never at a fixed path
    script = (ROOT / "web" / "app.js").read_text()
    assert "'/api" not in script and '"/api' not in script and "innerHTML" not in script


async def test_the_page_can_be_turned_off(make_server):
    server = await make_server(server__web_ui="false")
    for path in ("/", "/web/app.js"):
        status, body, _ = await http_json(server, "GET", path)
        assert (status, body["code"]) == (404, "not_found")
    status, _, _ = await http_json(server, "GET", "/healthz")
    assert status == 200


@pytest.mark.parametrize("path", ["/web/../server/settings.py", "/web/%2e%2e/server/settings.py",
                                  "/web/..%2fserver/settings.py", "/web/nope.js", "/web/"])
async def test_only_the_web_folder_is_served(server, path):
    # by hand: an HTTP client would normalise the dots away
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status == 404, response
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["code"] == "not_found"
    assert b"settings" not in body


async def test_only_get_and_head(server):
    status, body, _ = await http_json(server, "POST", "/")
    assert (status, body["code"]) == (405, "method_not_allowed")
    async with aiohttp.ClientSession() as session:
        async with session.head(url(server, "/")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")


def test_web_root_is_found_beside_the_code_or_in_a_bundle(monkeypatch, tmp_path):
    assert web_root() == ROOT / "web"
    assert (web_root() / "index.html").is_file()
    # frozen by PyInstaller: the data files are unpacked under sys._MEIPASS
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert web_root() == tmp_path / "web"


@pytest.mark.usefixtures("node")
def test_vendored_socketio_client_is_the_pinned_one():
    """web/vendor/socket.io.min.js is the socket.io-client of tests/js/package-lock.json, byte
    for byte: bump the pin and the file together (cp tests/js/node_modules/socket.io-client/
    dist/socket.io.min.js web/vendor/ after `npm ci`)."""
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/socket.io-client"]["version"]
    vendored = VENDORED.read_bytes()
    assert vendored.startswith(b"/*!\n * Socket.IO v" + pinned.encode() + b"\n")
    assert b"Released under the MIT License." in vendored[:200]
    installed = JS_DIR / "node_modules" / "socket.io-client"
    assert (installed / "package.json").is_file(), "run `cd tests/js && npm ci` (make test does)"
    assert json.loads((installed / "package.json").read_text())["version"] == pinned
    assert (installed / "dist" / "socket.io.min.js").read_bytes() == vendored
    assert (ROOT / "web" / "vendor" / "socket.io-client.LICENSE").read_bytes() == (installed / "LICENSE").read_bytes()
