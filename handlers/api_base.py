"""What every JSON API handler shares: error rendering, CORS and who the caller is."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

import tornado.web

from handlers.identity import Identify, host_user
from services.chat_service import Caller, ChatService
from services.errors import ChatError

log = logging.getLogger("aichat.http")

CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
CORS_EXPOSE_HEADERS = "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After"

# methods a cross-site form can send with the host's cookies
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Tornado's own error statuses, mapped to the API's codes
STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def as_chat_error(exc: Exception) -> ChatError:
    """A ChatError as it is; anything else is a bug: logged, and shown only as internal_error."""
    if isinstance(exc, ChatError):
        return exc
    log.error("unexpected failure", exc_info=exc)
    return ChatError("internal_error", "Internal server error.")


class ApiHandler(tornado.web.RequestHandler):
    chat: ChatService
    cors_origins: tuple[str, ...] = ()
    identify: Identify | None = None
    #: the user the host application's identify() named (embedding); None: JWT rules
    host_user: str | None = None

    def initialize(self, chat: ChatService, cors_origins: tuple[str, ...], identify: Identify | None = None) -> None:
        self.chat = chat
        self.cors_origins = cors_origins
        self.identify = identify
        # Tornado calls set_default_headers before initialize: add the CORS headers now
        self.set_default_headers()

    async def prepare(self) -> None:
        if self.identify is None:
            return
        if self.request.method in UNSAFE_METHODS and not self._origin_allowed():
            return self.send_chat_error(ChatError("forbidden", "Requests from this origin are not allowed."))
        try:
            self.host_user = await host_user(self.identify, self.request)
        except ChatError as error:
            self.send_chat_error(error)

    def check_xsrf_cookie(self) -> None:
        """Chat routes take JSON (or no body) under CORS rules, never forms, so a host app's
        `xsrf_cookies` form token does not apply to them. What a cross-site form could still
        send with the host's login cookie is refused by its Origin in prepare()."""

    def _origin_allowed(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin is None or "*" in self.cors_origins or origin in self.cors_origins:
            return True
        return urlsplit(origin).netloc.lower() == self.request.host.lower()

    def set_default_headers(self) -> None:
        if not self.cors_origins:
            return  # same origin only: no CORS headers, whatever the Origin
        if "*" in self.cors_origins:
            # the same answer for every origin: nothing for caches to tell apart
            self.set_header("Access-Control-Allow-Origin", "*")
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            return
        # the headers depend on the Origin, so every response says so (a cache must not hand
        # one origin's response to another), including those without CORS headers
        self.set_header("Vary", "Origin")
        origin = self.request.headers.get("Origin")
        if origin and origin in self.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)

    def options(self, *args: str) -> None:
        """CORS preflight; without an allowed origin the browser keeps it same-origin."""
        if "Access-Control-Allow-Origin" in self._headers:
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def caller(self) -> Caller:
        # remote_ip honours X-Forwarded-For / X-Real-IP only when the server runs with
        # xheaders (trust_proxy_headers)
        return Caller(client_ip=self.request.remote_ip or "unknown",
                      authorization=self.request.headers.get("Authorization"), host_user=self.host_user,
                      transport="sse")

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def send_chat_error(self, error: ChatError) -> None:
        if error.rate is not None:
            for name, value in error.rate.headers().items():
                self.set_header(name, value)
        if error.retry_after is not None:
            self.set_header("Retry-After", str(error.retry_after))
        body: dict[str, Any] = {"error": error.message, "code": error.code}
        self.send_json(body, error.http_status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (unknown route, wrong method, uncaught exception) as JSON too;
        # never a traceback
        code = STATUS_CODES.get(status_code, "internal_error")
        message = self._reason if status_code < 500 else "Internal server error."
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message, "code": code}))


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            self.send_chat_error(ChatError("not_found", "No such endpoint."))
