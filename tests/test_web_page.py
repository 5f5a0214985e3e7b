"""The chat page at `/`, driven in a real browser (Debian's chromium through Playwright)
against the real server and the fake upstream.

One browser for the module, a fresh context (cookies, localStorage) per test. On a failure
the page is saved as `failure.png` in the test's tmp_path. Chromium comes from
scripts/setup_chromium.sh (run by `make test`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, Response, async_playwright

from server.lifecycle import RunningServer, start_server
from tests.conftest import http_json, make_settings, shutdown_or_explain, sse_post, url
from tests.fake_upstream import FakeUpstream, Script
from tests.tcp_relay import Relay

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "web-page-test-secret-0123456789-abcdefghij"  # >= 32 bytes
ASSISTANT = '[data-role="assistant"]'
WAIT_MS = 15_000


def paced(count: int, delay: float = 0.1) -> Script:
    """An answer of ``count`` words, one chunk every ``delay`` seconds."""
    return Script(chunks=[f"word{i} " for i in range(count)], delay=delay)


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


# --- fixtures: the browser, and the server in this module's event loop ---------------------


def chromium() -> str:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/setup_chromium.sh (as root)"
    return CHROMIUM


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


# conftest's `upstream` and `make_server`, in the module's loop (the browser's)
@pytest_asyncio.fixture(loop_scope="module")
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def make_server(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Callable[..., Any]]:
    started: list[RunningServer] = []

    async def factory(**overrides: Any) -> RunningServer:
        running = await start_server(make_settings(tmp_path, upstream, **overrides))
        started.append(running)
        return running

    yield factory
    for running in started:
        await shutdown_or_explain(running)


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    opened = await context.new_page()
    opened.set_default_timeout(WAIT_MS)
    script_errors: list[str] = []
    opened.on("pageerror", lambda error: script_errors.append(str(error)))
    yield opened
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        await opened.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
    await context.close()
    assert script_errors == [], "uncaught errors in the page"


# --- helpers ----------------------------------------------------------------------------


async def open_page(page: Page, address: str) -> None:
    await page.goto(address)
    await page.wait_for_selector('body[data-ready="true"]', state="attached")


async def send(page: Page, message: str) -> None:
    box = page.get_by_label("Message")
    await box.fill(message)
    await box.press("Enter")


async def answer_texts(page: Page) -> list[str]:
    return await page.locator(ASSISTANT).all_text_contents()


async def wait_for_answers(page: Page, count: int, status: str = "complete") -> list[str]:
    """The texts of the page's answers, once the ``count``-th has ended with ``status``."""
    await page.wait_for_function("([sel, n, status]) => document.querySelectorAll(sel)[n]?.dataset.status === status",
                                 arg=[ASSISTANT, count - 1, status])
    assert await page.locator(f'{ASSISTANT}[data-status="streaming"]').count() == 0
    texts = await answer_texts(page)
    assert len(texts) == count
    return texts


async def current_session(page: Page) -> str:
    session_id = await page.evaluate("localStorage.getItem('aichat.sessionId')")
    assert session_id, "the page keeps its session id"
    return session_id


async def stored_messages(server: RunningServer, session_id: str,
                          headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}", headers=headers)
    assert status == 200, body
    return body["messages"]


async def sample_lengths(page: Page, until_status: str) -> list[int]:
    """The answer's text length, sampled as it streams, until it reaches ``until_status``."""
    lengths: list[int] = []
    locator = page.locator(ASSISTANT).last
    await locator.wait_for()
    while await locator.get_attribute("data-status") != until_status:
        lengths.append(len(await locator.text_content() or ""))
        await asyncio.sleep(0.03)
    return lengths


# --- tests ------------------------------------------------------------------------------


async def test_answer_streams_in_and_equals_the_stored_message(make_server, upstream, page):
    server = await make_server()
    script = paced(12)
    upstream.default = script
    await open_page(page, url(server, "/"))
    await send(page, "Tell me something")

    lengths = await sample_lengths(page, "complete")
    (text,) = await wait_for_answers(page, 1)
    assert text == "".join(script.chunks)
    # seen growing: several different partial lengths before the end
    partial = sorted({n for n in lengths if 0 < n < len(text)})
    assert len(partial) >= 3, lengths
    assert lengths == sorted(lengths), "the text only grows"

    messages = await stored_messages(server, await current_session(page))
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "Tell me something", "complete"), ("assistant", text, "complete")]
    assert await page.get_by_label("Message").input_value() == ""


async def test_stop_ends_the_answer_cancelled_and_stores_the_partial_text(make_server, upstream, page):
    server = await make_server()
    script = paced(60, delay=0.1)
    upstream.default = script
    await open_page(page, url(server, "/"))
    stop = page.get_by_role("button", name="Stop")
    assert await stop.is_disabled()
    await send(page, "Talk for a long time")
    await page.wait_for_function(
        "sel => (document.querySelector(sel)?.textContent || '').length >= 10", arg=ASSISTANT)
    await stop.click()

    (text,) = await wait_for_answers(page, 1, status="cancelled")
    assert 10 <= len(text) < len("".join(script.chunks))
    assert await page.locator(".message.assistant .meta").text_content() == "Stopped"
    messages = await stored_messages(server, await current_session(page))
    assert (messages[-1]["content"], messages[-1]["status"]) == (text, "partial")
    assert await stop.is_disabled()
    assert await page.get_by_role("button", name="Send").is_enabled()


async def test_follow_up_stays_in_the_session_also_after_a_reload(make_server, upstream, page):
    server = await make_server()
    upstream.queue(Script(chunks=["First ", "answer."]), Script(chunks=["Second ", "answer."]))
    await open_page(page, url(server, "/"))
    await send(page, "first question")
    await wait_for_answers(page, 1)
    session_id = await current_session(page)

    # reloaded, the page shows the conversation again and continues it
    await page.reload()
    await page.wait_for_selector('body[data-ready="true"]', state="attached")
    assert await answer_texts(page) == ["First answer."]
    box = page.get_by_label("Message")
    await box.fill("second")
    await box.press("Shift+Enter")  # a new line, not a send
    await box.press_sequentially("question")
    assert await box.input_value() == "second\nquestion"
    assert len(upstream.requests) == 1
    await page.get_by_role("button", name="Send").click()

    assert await wait_for_answers(page, 2) == ["First answer.", "Second answer."]
    assert await current_session(page) == session_id
    messages = await stored_messages(server, session_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "first question"), ("assistant", "First answer."),
        ("user", "second\nquestion"), ("assistant", "Second answer.")]
    # the model saw the earlier exchange
    sent = upstream.requests[-1].body["messages"]
    assert [m["content"] for m in sent[-3:]] == ["first question", "First answer.", "second\nquestion"]

    await page.get_by_role("button", name="New chat").click()
    assert await answer_texts(page) == []
    await send(page, "another chat")
    await wait_for_answers(page, 1)
    assert await current_session(page) != session_id


async def test_socketio_transport(make_server, upstream, page):
    server = await make_server()
    script = paced(10, delay=0.05)
    upstream.default = script
    sockets: list[str] = []
    posts: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("request", lambda r: posts.append(r.url) if "/api/v2/ai/chat/stream" in r.url else None)
    await open_page(page, url(server, "/"))
    await page.get_by_text("Settings").click()
    await page.get_by_label("Transport").select_option("socketio")
    await send(page, "over socket.io")

    lengths = await sample_lengths(page, "complete")
    (text,) = await wait_for_answers(page, 1)
    assert text == "".join(script.chunks)
    assert len({n for n in lengths if 0 < n < len(text)}) >= 2, lengths
    assert any("/socket.io/" in address and "transport=websocket" in address for address in sockets), sockets
    assert posts == [], "no SSE request in Socket.IO mode"
    messages = await stored_messages(server, await current_session(page))
    assert messages[-1]["content"] == text

    # the choice is remembered; Stop works over Socket.IO too
    upstream.default = paced(60)
    await page.reload()
    await page.wait_for_selector('body[data-ready="true"]', state="attached")
    assert await page.get_by_label("Transport").input_value() == "socketio"
    await send(page, "and stop")
    await page.wait_for_function(
        "sel => (document.querySelectorAll(sel)[1]?.textContent || '').length >= 10", arg=ASSISTANT)
    await page.get_by_role("button", name="Stop").click()
    texts = await wait_for_answers(page, 2, status="cancelled")
    messages = await stored_messages(server, await current_session(page))
    assert (messages[-1]["content"], messages[-1]["status"]) == (texts[-1], "partial")
    assert posts == []


async def cut_mid_answer(page: Page, relay: Relay) -> tuple[int, str]:
    """Once the answer shows 30 characters, drop the browser's connections; the text shown
    then, and the answer's final text once the page has resumed it."""
    try:
        await page.wait_for_function(
            "sel => (document.querySelector(sel)?.textContent || '').length >= 30", arg=ASSISTANT)
        before = len(await page.locator(ASSISTANT).text_content() or "")
        relay.cut()
        (text,) = await wait_for_answers(page, 1)
    finally:
        await relay.stop()
    return before, text


async def assert_resumed_whole(server: RunningServer, page: Page, script: Script, before: int,
                               text: str) -> list[dict[str, Any]]:
    """Every word once, in order (nothing lost, nothing repeated), stored complete."""
    assert text == "".join(script.chunks)
    assert before < len(text)
    messages = await stored_messages(server, await current_session(page))
    assert (messages[-1]["content"], messages[-1]["status"]) == (text, "complete")
    return messages


async def test_a_dropped_connection_is_resumed_from_the_last_id(make_server, upstream, page):
    server = await make_server()
    relay = Relay("127.0.0.1", server.port)  # the browser goes through it; cutting it drops the stream
    await relay.start()
    script = paced(30, delay=0.08)
    upstream.default = script
    resumes: list[Request] = []
    page.on("request", lambda r: resumes.append(r) if "/api/v2/ai/chat/stream/" in r.url else None)
    await open_page(page, f"http://127.0.0.1:{relay.port}/")
    await send(page, "a long answer please")
    before, text = await cut_mid_answer(page, relay)
    messages = await assert_resumed_whole(server, page, script, before, text)
    assert resumes, "the page resumed over GET stream/{messageId}"
    last_event_id = await resumes[0].header_value("last-event-id")
    message_id = messages[-1]["id"]
    assert resumes[0].url.endswith(f"/api/v2/ai/chat/stream/{message_id}")
    assert last_event_id is not None and last_event_id.startswith(f"{message_id}:")
    assert int(last_event_id.rpartition(":")[2]) > 0


async def test_a_dropped_socketio_connection_is_resumed_from_the_last_seq(make_server, upstream, page):
    server = await make_server()
    relay = Relay("127.0.0.1", server.port)
    await relay.start()
    script = paced(30, delay=0.08)
    upstream.default = script
    sent: list[str] = []
    # what the page sends, over either engine.io transport (a resume right after reconnecting
    # often leaves by polling, before the upgrade to websocket)
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
    page.on("request", lambda r: sent.extend((r.post_data or "").split("\x1e")) if "/socket.io/" in r.url else None)
    await open_page(page, f"http://127.0.0.1:{relay.port}/")
    await page.get_by_text("Settings").click()
    await page.get_by_label("Transport").select_option("socketio")
    await send(page, "a long answer please")
    # socket.io-client reconnects by itself; the page then asks to resume
    before, text = await cut_mid_answer(page, relay)
    messages = await assert_resumed_whole(server, page, script, before, text)
    resumes = [json.loads(frame[frame.index("["):]) for frame in sent if "ai:resume" in frame]
    assert len(resumes) == 1, sent
    name, payload = resumes[0]
    assert name == "ai:resume" and payload["messageId"] == messages[-1]["id"]
    assert 0 < payload["afterSeq"] < len(text)


async def test_a_reload_during_an_answer_shows_it_to_its_end(make_server, upstream, page):
    server = await make_server()
    script = paced(30, delay=0.08)
    upstream.default = script
    await open_page(page, url(server, "/"))
    await send(page, "a long answer please")
    await page.wait_for_function(
        "sel => (document.querySelector(sel)?.textContent || '').length >= 20", arg=ASSISTANT)
    await page.reload()  # the answer goes on on the server (on_client_disconnect = finish)
    await page.wait_for_selector('body[data-ready="true"]', state="attached")
    (text,) = await wait_for_answers(page, 1)
    assert text == "".join(script.chunks)
    assert await page.locator('[data-role="user"]').all_text_contents() == ["a long answer please"]
    messages = await stored_messages(server, await current_session(page))
    assert [(m["content"], m["status"]) for m in messages] == [
        ("a long answer please", "complete"), (text, "complete")]


async def test_rate_limited_shows_the_code_and_the_wait(make_server, upstream, page):
    server = await make_server(rate_limit__anonymous_limit=1)
    refusals: list[Response] = []
    page.on("response", lambda r: refusals.append(r) if r.status == 429 else None)
    await open_page(page, url(server, "/"))
    await send(page, "one")
    await wait_for_answers(page, 1)
    await send(page, "two")

    error = page.get_by_role("alert")
    await error.wait_for()
    assert len(refusals) == 1
    retry_after = await refusals[0].header_value("retry-after")
    assert retry_after is not None and int(retry_after) > 0
    shown = await error.text_content() or ""
    assert "rate_limited" in shown and "429" in shown
    assert f"Try again in {retry_after} s" in shown
    # the refused message is kept for a later try, and nothing was stored for it
    assert await page.get_by_label("Message").input_value() == "two"
    assert await page.locator(".message.user .meta").last.text_content() == "Not sent"
    assert len(await stored_messages(server, await current_session(page))) == 2


async def test_a_token_lists_the_callers_sessions_and_reopens_them(make_server, upstream, page):
    server = await make_server(auth__jwt_secret=SECRET)
    alice = {"Authorization": f"Bearer {token('alice')}"}
    for session_id, question in (("alice-1", "Alpha question"), ("alice-2", "Beta question")):
        assert (await sse_post(server, {"message": question, "sessionId": session_id}, headers=alice)).status == 200
    bob = {"Authorization": f"Bearer {token('bob')}"}
    assert (await sse_post(server, {"message": "Bob's secret", "sessionId": "bob-1"}, headers=bob)).status == 200

    await open_page(page, url(server, "/"))
    assert await page.locator("#sessions").is_hidden()  # no token: no list
    await page.get_by_text("Settings").click()
    await page.get_by_label("Token").fill(token("alice"))
    await page.get_by_label("Token").press("Enter")  # `change`
    sessions = page.get_by_role("navigation", name="Your chats")
    await sessions.get_by_role("button").first.wait_for()
    titles = [t.strip() for t in await sessions.locator(".title").all_text_contents()]
    assert titles == ["Beta question", "Alpha question"]  # newest first, Bob's not among them

    await sessions.get_by_role("button", name="Alpha question").click()
    await page.wait_for_function("() => localStorage.getItem('aichat.sessionId') === 'alice-1'")
    assert await page.locator('[data-role="user"]').all_text_contents() == ["Alpha question"]
    assert await answer_texts(page) == ["Hello, world!"]

    await send(page, "more on alpha")
    await wait_for_answers(page, 2)
    messages = await stored_messages(server, "alice-1", headers=alice)
    assert [m["content"] for m in messages] == ["Alpha question", "Hello, world!", "more on alpha",
                                                "Hello, world!"]
    stored_token = await page.evaluate("localStorage.getItem('aichat.token')")
    assert jwt.decode(stored_token, SECRET, algorithms=["HS256"])["sub"] == "alice"

    # a bad token is reported, not ignored
    await page.get_by_label("Token").fill("not-a-token")
    await page.get_by_label("Token").press("Enter")
    await page.get_by_role("alert").wait_for()
    assert "invalid_token" in (await page.get_by_role("alert").text_content() or "")
    assert await page.locator("#sessions").is_hidden()


async def test_the_page_works_under_a_url_prefix(browser, tmp_path):
    """Mounted at /chat/, every URL the page uses is under /chat/ (no API behind it here)."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    from handlers.web_ui import web_ui_routes

    app = tornado.web.Application(web_ui_routes("/chat"))
    http = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    http.add_sockets(sockets)
    base = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    context = await browser.new_context()
    try:
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        await page.goto(base + "/chat")  # redirected to /chat/
        assert page.url == base + "/chat/"
        await page.wait_for_selector('body[data-ready="true"]', state="attached")
        await page.evaluate("localStorage.setItem('aichat.token', 'x')")
        await page.reload()
        await page.wait_for_selector('body[data-ready="true"]', state="attached")
        await send(page, "hi")
        await page.get_by_role("alert").wait_for()
        await page.get_by_text("Settings").click()
        await page.get_by_label("Transport").select_option("socketio")
        await send(page, "hi")
        await page.wait_for_function(
            "() => performance.getEntriesByType('resource').some(e => e.name.includes('/socket.io/'))")
    finally:
        await context.close()
        http.stop()
        await http.close_all_connections()
    paths = {r.removeprefix(base).split("?")[0] for r in requested}
    assert {"/chat/", "/chat/web/app.js", "/chat/web/style.css", "/chat/api/v2/ai/chat/sessions",
            "/chat/api/v2/ai/chat/stream", "/chat/web/vendor/socket.io.min.js", "/chat/socket.io/"} <= paths, paths
    assert all(p.startswith("/chat") for p in paths), paths


def readme_fetch_example(server_url: str) -> str:
    """The README's browser fetch example, verbatim but for the server's address."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Browser example (fetch)"):]
    start = section.index("```js\n") + len("```js\n")
    code = section[start:section.index("\n```", start)]
    documented = "const SERVER = 'http://127.0.0.1:7000';"
    assert documented in code
    return code.replace(documented, f"const SERVER = {json.dumps(server_url)};")


async def test_readme_fetch_example_from_another_origin_resumes_a_dropped_stream(make_server, upstream, browser):
    """The README's example on a page of another origin (listed in cors_origins), the stream cut."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    page_origin = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    server = await make_server(server__cors_origins=page_origin)
    relay = Relay("127.0.0.1", server.port)
    await relay.start()
    script = paced(30, delay=0.08)
    upstream.default = script
    example = readme_fetch_example(f"http://127.0.0.1:{relay.port}")

    class Page(tornado.web.RequestHandler):
        def get(self, name: str) -> None:
            if name == "example.js":
                self.set_header("Content-Type", "text/javascript")
                self.finish(example)
            else:
                self.finish('<!doctype html><div id="answer"></div><script type="module" src="/example.js"></script>')

    http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/(.*)", Page)]))
    http.add_sockets(sockets)
    context = await browser.new_context()
    logged: list[str] = []
    try:
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda message: logged.append(message.text) if message.type == "log" else None)
        await page.goto(page_origin + "/")
        await page.wait_for_function("() => document.querySelector('#answer').textContent.length >= 30")
        relay.cut()
        async with asyncio.timeout(WAIT_MS / 1000):
            while not logged:  # the example logs its result at the end
                await asyncio.sleep(0.05)
        shown = await page.locator("#answer").text_content()
    finally:
        await context.close()
        http.stop()
        await http.close_all_connections()
        await relay.stop()
    full = "".join(script.chunks)
    assert shown == full  # each word once: nothing lost or repeated across the cut
    (result,) = logged
    session_id, _, text = result.partition(" ")
    assert text == full
    messages = await stored_messages(server, session_id)
    assert messages[-1]["content"] == full
