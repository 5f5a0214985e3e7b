"""Redo the page's screenshots in docs/ (desktop 1280x800, phone 390x844), each showing a
conversation and the signed-in user's chats. Runs the real server in demo mode on a temporary
store and drives Debian's chromium (scripts/setup_chromium.sh) through Playwright:

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
from playwright.async_api import Page, async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.lifecycle import start_server  # noqa: E402
from server.settings import load_settings  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "screenshots-only-secret-0123456789-abcdefgh"
EARLIER_CHATS = ["Plan a three-day trip to Lisbon", "Explain Server-Sent Events in one paragraph"]
QUESTIONS = ["Hi! What can you do?", "Does this stream word by word?\nAnd can I stop it?"]
SHOTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


async def chat(base: str, token: str, message: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "api/v2/ai/chat/stream", json={"message": message}, headers=headers) as response:
            assert response.status == 200, await response.text()
            await response.read()


async def ready(page: Page) -> None:
    await page.wait_for_selector('body[data-ready="true"]', state="attached")
    await page.wait_for_selector("#session-list button")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, environ={}, overrides={
            ("server", "port"): "0", ("ai", "provider"): "demo", ("auth", "jwt_secret"): SECRET,
            ("storage", "sqlite_path"): str(Path(tmp) / "chat.sqlite3"),
        })
        running = await start_server(settings)
        base = f"http://127.0.0.1:{running.port}/"
        token = jwt.encode({"sub": "demo-user", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        try:
            for message in EARLIER_CHATS:
                await chat(base, token, message)
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                session_id = None
                for name, viewport in SHOTS.items():
                    phone = name == "phone"
                    context = await browser.new_context(viewport=viewport, device_scale_factor=2 if phone else 1,
                                                        is_mobile=phone, has_touch=phone)
                    init = {"aichat.token": token, **({"aichat.sessionId": session_id} if session_id else {})}
                    await context.add_init_script(
                        f"for (const [k, v] of Object.entries({json.dumps(init)})) localStorage.setItem(k, v);")
                    page = await context.new_page()
                    await page.goto(base)
                    await ready(page)
                    if session_id is None:  # the conversation, typed once; the phone reopens it
                        for count, question in enumerate(QUESTIONS, start=1):
                            await page.get_by_label("Message").fill(question)
                            await page.get_by_label("Message").press("Enter")
                            await page.wait_for_function(
                                "n => document.querySelectorAll('[data-role=assistant][data-status=complete]')"
                                ".length === n", arg=count, timeout=30_000)
                        session_id = await page.evaluate("localStorage.getItem('aichat.sessionId')")
                        await page.wait_for_function("n => document.querySelectorAll('#session-list button')"
                                                     ".length === n", arg=len(EARLIER_CHATS) + 1)
                    await page.get_by_label("Message").fill("Thanks!")
                    path = ROOT / "docs" / f"screenshot-{name}.png"
                    await page.screenshot(path=str(path))
                    print(f"wrote {path.relative_to(ROOT)}")
                    await context.close()
                await browser.close()
        finally:
            await running.shutdown(0)


if __name__ == "__main__":
    asyncio.run(main())
