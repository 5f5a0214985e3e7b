"""A small Tornado application with its own login, mounting the AI chat at /chat.

    python -m examples.tornado_host          # then open http://127.0.0.1:8000/

The host keeps its own Application, settings (cookie_secret, xsrf_cookies, login_url),
IOLoop and signal handling; its signed login cookie decides who chats.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

import tornado.httputil
import tornado.web

from server.embedding import ChatServer

USER_COOKIE = "user"


def cookie_identify(cookie_secret: str):  # noqa: ANN201 (returns the identify callable)
    """The chat's ``identify``: the user of the host's signed login cookie, else None."""

    def identify(request: tornado.httputil.HTTPServerRequest) -> str | None:
        morsel = request.cookies.get(USER_COOKIE)
        if morsel is None:
            return None  # not logged in: the JWT rules apply (anonymous without a token)
        user = tornado.web.decode_signed_value(cookie_secret, USER_COOKIE, morsel.value, max_age_days=31)
        return user.decode() if user else None

    return identify


class HostHandler(tornado.web.RequestHandler):
    def get_current_user(self) -> str | None:
        user = self.get_signed_cookie(USER_COOKIE)
        return user.decode() if user else None


class HomeHandler(HostHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.write(f"<p>Hello {tornado.escape.xhtml_escape(self.current_user)}. "
                   '<a href="/chat/">Open the chat</a></p>')


class LoginHandler(HostHandler):
    def get(self) -> None:
        self.write('<form method="post">' + self.xsrf_form_html() +
                   '<input name="name" placeholder="your name"><button>Log in</button></form>')

    def post(self) -> None:  # the host's xsrf_cookies check runs before this
        self.set_signed_cookie(USER_COOKIE, self.get_body_argument("name"), httponly=True, samesite="Lax")
        self.redirect(self.get_query_argument("next", "/"))


def build_host_app(chat: ChatServer, cookie_secret: str) -> tornado.web.Application:
    routes = [(r"/", HomeHandler), (r"/login", LoginHandler)]
    return tornado.web.Application(
        routes + chat.routes(prefix="/chat"),  # the chat: SSE, history, Socket.IO, page
        cookie_secret=cookie_secret,
        xsrf_cookies=True,
        login_url="/login",
    )


async def main() -> None:
    cookie_secret = os.environ.get("COOKIE_SECRET") or secrets.token_hex(32)
    chat = ChatServer(settings=os.environ.get("AICHAT_SETTINGS"), identify=cookie_identify(cookie_secret))
    app = build_host_app(chat, cookie_secret)
    await chat.start()
    server = app.listen(8000, "127.0.0.1")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print("host app on http://127.0.0.1:8000/ (chat at /chat/)")
    await stop.wait()
    await chat.stop(grace_seconds=30)
    server.stop()


if __name__ == "__main__":
    asyncio.run(main())
