"""What the server writes about requests: the access log, and the HTTP client libraries' loggers."""

from __future__ import annotations

import json
import logging

import tornado.web

access_log = logging.getLogger("tornado.access")

# Loggers of the upstream HTTP clients: at INFO they write every request URL (with its query
# string). Warnings and errors still get through.
UPSTREAM_CLIENT_LOGGERS = ("httpx2", "httpcore2", "httpx", "httpcore", "openai", "aiohttp.client")

# Longest path written to the log; the rest is cut (a path is the client's to choose)
MAX_LOGGED_PATH = 200


def loggable(text: str, limit: int = MAX_LOGGED_PATH) -> str:
    """Client-controlled text made safe for one log line: cut, controls and non-ASCII escaped."""
    cut = text[:limit]
    escaped = json.dumps(cut)[1:-1]  # \n, \x1b, U+2028... become \uXXXX; quotes become \"
    return escaped + "..." if len(text) > limit else escaped


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's ``log_function``: method, path without its query string, status and duration.

    Tornado's default line contains the URI with its query, and `?token=...` reached the log.
    """
    status = handler.get_status()
    if status < 400:
        log = access_log.info
    elif status < 500:
        log = access_log.warning
    else:
        log = access_log.error
    request = handler.request
    log("%d %s %s (%s) %.2fms", status, loggable(request.method or "", 16), loggable(request.path),
        request.remote_ip, 1000.0 * request.request_time())


def quiet_upstream_client_loggers() -> None:
    """Called once at start-up: upstream client loggers at WARNING (their INFO lines carry URLs)."""
    for name in UPSTREAM_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
