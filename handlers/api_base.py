"""What every JSON API handler shares: error rendering, CORS and who the caller is."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

import tornado.http1connection
import tornado.httputil
import tornado.web

from handlers.identity import Identify, host_user
from services.chat_service import Caller, ChatService
from services.errors import ChatError
from services.host_filter import HostFilter

log = logging.getLogger("aichat.http")

CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
CORS_EXPOSE_HEADERS = "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After"

# methods a cross-site form can send with the host's cookies
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Tornado's own error statuses, mapped to the API's codes
STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

# Tornado's own cap for a request body is set this far above max_body_bytes: a chunked body
# is then counted (and refused with our 413) by the handler before Tornado's cap answers a
# bare 400. Costs no memory: a refused body is no longer kept, and Tornado buffers at most one
# 64 KB read (its chunk_size) before handing it over.
BODY_CAP_SLACK = 65536


def as_chat_error(exc: Exception) -> ChatError:
    """A ChatError as it is; anything else is a bug: logged, and shown only as internal_error."""
    if isinstance(exc, ChatError):
        return exc
    log.error("unexpected failure", exc_info=exc)
    return ChatError("internal_error", "Internal server error.")


def declared_length(value: str | None) -> int | None:
    """A Content-Length header as a number; None when absent or not a plain number."""
    if value is None:
        return None
    value = value.split(",")[0].strip()  # Tornado accepts repeated equal values
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= 18 else 10**18  # int() refuses over 4,300 digits


class RequestGuard:
    """The Host check and the body limit, applied before any of the body is read.

    For handlers made with ``tornado.web.stream_request_body``: the API handlers, and the
    routes that take no body at all (the page, /metrics). Tornado's server-wide body cap is
    sized for /socket.io/ frames (2 MB); each guarded route lowers it for its own request to
    ``max_body_bytes``, which also works when the routes are mounted in a host's Application
    and HTTPServer. Only routes that read a body (``reads_body``) keep it.
    """

    request: tornado.httputil.HTTPServerRequest
    _finished: bool
    max_body_bytes: int
    host_filter: HostFilter | None
    #: keep the request body (in ``self.body``) for the handler method
    reads_body = False
    rejected = False
    body_size = 0

    def guard(self) -> bool:
        """Refuses a foreign Host or a declared body over the limit; True when refused."""
        self.body = bytearray()
        if self.host_filter is not None and not self.host_filter.allows(self.request.headers.get("Host")):
            self.reject(ChatError("invalid_host", "This Host is not served."))
            return True
        length = declared_length(self.request.headers.get("Content-Length"))
        connection = self.request.connection
        if length is not None and length > self.max_body_bytes:
            if isinstance(connection, tornado.http1connection.HTTP1Connection):
                # Tornado closes the connection once our 413 is written; with the declared
                # length under its cap it does not add a "400 Bad Request" (and a log line) of
                # its own: the unread body is dropped with the connection
                connection.set_max_body_size(length)
            self.reject(self.too_large())
            return True
        if isinstance(connection, tornado.http1connection.HTTP1Connection):
            connection.set_max_body_size(self.max_body_bytes + BODY_CAP_SLACK)
        return False

    def data_received(self, chunk: bytes) -> None:
        if self.rejected:
            return
        self.body_size += len(chunk)
        if self.body_size > self.max_body_bytes:
            self.body.clear()
            return self.reject(self.too_large())
        if self.reads_body:
            self.body += chunk

    def too_large(self) -> ChatError:
        return ChatError("too_large", f"The request body is larger than {self.max_body_bytes} bytes.")

    def reject(self, error: ChatError) -> None:
        """Answers ``error`` before the body is read; the handler method is then not run.

        Tornado closes a connection answered before its request was read (it cannot know
        where the next request starts); saying so spares a keep-alive client from sending
        its next request into a closing connection.
        """
        self.rejected = True
        if not self._finished:
            self.set_header("Connection", "close")  # type: ignore[attr-defined]
            self.send_chat_error(error)

    def send_chat_error(self, error: ChatError) -> None:
        """A JSON error (the API handlers add their rate-limit headers)."""
        self.set_status(error.http_status)  # type: ignore[attr-defined]
        self.set_header("Content-Type", "application/json; charset=utf-8")  # type: ignore[attr-defined]
        self.set_header("Cache-Control", "no-store")  # type: ignore[attr-defined]
        self.finish(json.dumps({"error": error.message, "code": error.code}))  # type: ignore[attr-defined]


@tornado.web.stream_request_body
class ApiHandler(RequestGuard, tornado.web.RequestHandler):
    """The body streams in (stream_request_body), so that prepare() can refuse it before it
    is read (RequestGuard)."""

    chat: ChatService
    cors_origins: tuple[str, ...] = ()
    identify: Identify | None = None
    #: the user the host application's identify() named (embedding); None: JWT rules
    host_user: str | None = None

    def initialize(self, chat: ChatService, cors_origins: tuple[str, ...], max_body_bytes: int,
                   host_filter: HostFilter, identify: Identify | None = None) -> None:
        self.chat = chat
        self.cors_origins = cors_origins
        self.max_body_bytes = max_body_bytes
        self.host_filter = host_filter
        self.identify = identify
        # Tornado calls set_default_headers before initialize: add the CORS headers now
        self.set_default_headers()

    async def prepare(self) -> None:
        """Refuses a foreign Host, a too large body and (embedded) a cross-site write, then asks
        the host who the caller is; subclasses call it first."""
        if self.guard():
            return
        if self.identify is None:
            return
        if self.request.method in UNSAFE_METHODS and not self._origin_allowed():
            return self.reject(ChatError("forbidden", "Requests from this origin are not allowed."))
        try:
            self.host_user = await host_user(self.identify, self.request)
        except ChatError as error:
            self.reject(error)

    def check_xsrf_cookie(self) -> None:
        """Chat routes take JSON (or no body) under CORS rules, never forms, so a host app's
        `xsrf_cookies` form token does not apply to them. What a cross-site form could still
        send with the host's login cookie is refused by its Origin in prepare()."""

    def _origin_allowed(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin is None or "*" in self.cors_origins or origin in self.cors_origins:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # "http://[::1": a client's text, not an origin anyone serves
            return False
        return netloc.lower() == self.request.host.lower()

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
    async def prepare(self) -> None:
        await super().prepare()
        if not self._finished and self.request.method != "OPTIONS":
            self.reject(ChatError("not_found", "No such endpoint."))
