"""The error codes of the public API, shared by every transport."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.rate_limiter import RateStatus

# code -> HTTP status, for errors that are answered before a stream starts
HTTP_STATUS = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_host": 400,
    "invalid_token": 401,
    "forbidden": 403,
    "not_found": 404,
    "busy": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal_error": 500,
    "upstream_error": 502,
    "unavailable": 503,
    "timeout": 504,
}


class ChatError(Exception):
    """A failure the client is told about: a code from the API and a human-readable text.

    The text is always safe to show; internal detail goes to the log, never here.
    """

    def __init__(self, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        #: the caller's rate-limit budget, when known (rendered as RateLimit-* headers)
        self.rate: RateStatus | None = None

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_payload(self) -> dict[str, object]:
        payload: dict[str, object] = {"error": self.message, "code": self.code}
        if self.retry_after is not None:
            payload["retryAfter"] = self.retry_after
        return payload


class UpstreamError(ChatError):
    """The model provider failed: `upstream_error` or `timeout`.

    ``detail`` says what happened for the server log; it never reaches a client.
    """

    def __init__(self, code: str, detail: str) -> None:
        message = "The AI service took too long to answer." if code == "timeout" else "The AI service failed."
        super().__init__(code, message)
        self.detail = detail
