"""The chat page: static files from the `web/` folder, served at `/` (or under a prefix)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import tornado.web

from handlers.api_base import RequestGuard
from services.host_filter import HostFilter

# Only the page's own files: no inline script or style, no other origin. `connect-src 'self'`
# covers fetch and the same-origin websocket of Socket.IO.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)

# Explicit, so they do not depend on the host's mime.types
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

WEB_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


def web_root() -> Path:
    """The `web/` folder: inside a PyInstaller bundle when frozen, else beside the code."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "web"
    return Path(__file__).resolve().parent.parent / "web"


@tornado.web.stream_request_body
class WebFileHandler(RequestGuard, tornado.web.StaticFileHandler):
    """A file of the page, with a strict Content-Security-Policy.

    Served with `Cache-Control: no-cache` (revalidated by ETag), so an upgrade of the server
    never leaves a browser with an old app.js against a new API.
    """

    def initialize(self, path: str, default_filename: str | None = None,
                   host_filter: HostFilter | None = None, max_body_bytes: int = 0) -> None:
        super().initialize(path, default_filename)
        self.host_filter = host_filter
        self.max_body_bytes = max_body_bytes  # the page takes none: any body is refused (413) unread

    def prepare(self) -> None:
        self.guard()

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def get_content_type(self) -> str:
        assert self.absolute_path is not None
        known = CONTENT_TYPES.get(Path(self.absolute_path).suffix.lower())
        return known if known is not None else super().get_content_type()

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # as the API does: a JSON error, never Tornado's HTML page or a traceback
        if status_code == 403:  # a path outside the folder, or not a file: as absent as any other
            status_code = 404
            self.set_status(404)
        code = WEB_STATUS_CODES.get(status_code, "internal_error")
        message = self._reason if status_code < 500 else "Internal server error."
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message, "code": code}))


@tornado.web.stream_request_body
class PrefixRedirectHandler(RequestGuard, tornado.web.RedirectHandler):
    """`/chat` -> `/chat/`, guarded like the page."""

    def initialize(self, url: str, host_filter: HostFilter | None = None,  # type: ignore[override]
                   max_body_bytes: int = 0) -> None:
        super().initialize(url)
        self.host_filter = host_filter
        self.max_body_bytes = max_body_bytes

    def prepare(self) -> None:
        self.guard()


def web_ui_routes(prefix: str = "", root: Path | None = None, host_filter: HostFilter | None = None,
                  max_body_bytes: int = 0) -> list[tuple[str, type, dict[str, Any]]]:
    """Routes of the page under ``prefix`` ("" or like "/chat"): the page at ``prefix + "/"``
    and its files at ``prefix + "/web/..."``.

    The page finds the API relative to its own address, so the API routes must be mounted
    under the same prefix.
    """
    prefix = prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"a route prefix starts with '/': {prefix!r}")
    folder = str(root if root is not None else web_root())
    escaped = re.escape(prefix)
    guard = {"host_filter": host_filter, "max_body_bytes": max_body_bytes}
    routes: list[tuple[str, type, dict[str, Any]]] = [
        (escaped + r"/()", WebFileHandler, {"path": folder, "default_filename": "index.html", **guard}),
        (escaped + r"/web/(.+)", WebFileHandler, {"path": folder, **guard}),
    ]
    if prefix:
        # `/chat` -> `/chat/`: the page's relative URLs need the trailing slash
        routes.append((escaped, PrefixRedirectHandler, {"url": prefix + "/", **guard}))
    return routes
