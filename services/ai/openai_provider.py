"""Chat Completions streaming through the official SDK, for OpenAI or any compatible server.

The SDK sends the request (auth, retries with backoff on connect errors, 429 and 5xx
before any byte of the answer, error mapping) and we read the raw SSE lines ourselves:
the SDK's typed per-chunk objects cost several times more CPU than the relay itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai
from openai import RequestOptions

from services.ai.base import UsageReport
from services.errors import UpstreamError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# The SDK numbers every attempt of a request in this header: 0 first, then 1, 2, ... per retry.
RETRY_COUNT_HEADER = "x-stainless-retry-count"
# The SDK's telemetry headers (this host's OS, CPU, Python and SDK versions; the read
# timeout), removed the SDK's own way: no upstream needs them, they describe the server to
# whoever runs the endpoint, and each costs work on every request (measured: -0.35 M
# instructions per answer, 7% of it). Kept: User-Agent, and the retry count read above.
UNSENT_HEADERS: dict[str, str] = {
    name: openai.omit  # type: ignore[misc]
    for name in (
        "X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch",
        "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Async",
    )
}

# A decoded JSON string can hold a lone surrogate ("\ud800"): UTF-8 cannot encode it, so it
# would break every writer downstream. Paired surrogates decode to one code point, so any
# surrogate left in a Python string is a lone one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        timeout_seconds: float,
        max_retries: int,
        max_tokens: int | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        #: the answer's length limit sent to the model; None: the model's own
        self.max_tokens = max_tokens
        self.base_url = base_url or OPENAI_DEFAULT_BASE_URL
        #: the endpoint as logs show it: no credentials, no query string
        self.endpoint = _redacted(self.base_url)
        self._client = openai.AsyncOpenAI(
            # local OpenAI-compatible servers need no key, but the SDK insists on one
            api_key=api_key or "not-needed",
            base_url=self.base_url,
            timeout=timeout_seconds,  # connect, and every read: a stalled stream times out
            max_retries=max_retries,
            default_headers=UNSENT_HEADERS,
            http_client=openai.DefaultAioHttpClient(
                timeout=timeout_seconds,
                # once per HTTP attempt (not per chunk): the SDK's retries go through here too
                event_hooks={"request": [self._count_retry]} if on_retry is not None else None,
            ),
        )
        self._on_retry = on_retry
        # joined onto base_url once, as the SDK joins a relative path (raw path + path), and
        # absolute: the SDK then takes it as it is instead of joining it again per request
        base = self._client.base_url
        self._completions_url = str(base.copy_with(raw_path=base.raw_path + b"chat/completions"))
        # what `chat.completions.create` would send besides the messages, encoded once
        fixed: dict[str, object] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if max_tokens is not None:
            fixed["max_tokens"] = max_tokens
        self._body_prefix = json.dumps(fixed, ensure_ascii=False).encode()[:-1] + b', "messages": '
        # as `create` asks: bearer auth (the API key) on this request
        self._request_options: RequestOptions = {
            "security": {"bearer_auth": True},
            "headers": {"X-Stainless-Read-Timeout": openai.omit},  # type: ignore[dict-item]
        }

    async def _count_retry(self, request: httpx2.Request) -> None:
        if request.headers.get(RETRY_COUNT_HEADER, "0") != "0" and self._on_retry is not None:
            self._on_retry()

    async def close(self) -> None:
        await self._client.close()

    async def stream(self, messages: list[dict[str, str]], usage: UsageReport) -> AsyncIterator[str]:
        try:
            # The SDK's generic request path (documented for custom requests): the same auth,
            # retries, timeouts and error mapping as `chat.completions.create`, without its
            # per-call work that never changes here: the typed-params transform of ~40
            # arguments, the options dict, the streaming wrapper. The body is our JSON, built
            # around a prefix encoded once; with `cast_to=httpx2.Response` the SDK hands back
            # the raw streaming response, read line by line below.
            response = await self._client.post(
                self._completions_url,
                cast_to=httpx2.Response,
                content=self._body_prefix + json.dumps(messages, ensure_ascii=False).encode() + b"}",
                options=self._request_options,
                stream=True,
            )
            try:
                finished = False
                async for line in _lines(response.aiter_bytes()):
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    # invalid UTF-8 becomes U+FFFD, as a text decoder would make it
                    chunk = json.loads(data.decode("utf-8", "replace"))
                    if "error" in chunk:
                        raise UpstreamError("upstream_error", f"error in stream: {chunk['error']!r}"[:500])
                    choices = chunk.get("choices")
                    if choices:
                        choice = choices[0]
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            # isascii() is O(1): the regex runs only on non-ASCII chunks
                            if not content.isascii() and _LONE_SURROGATE.search(content) is not None:
                                content = _LONE_SURROGATE.sub("\ufffd", content)
                            yield content
                        if choice.get("finish_reason"):
                            finished = True
                    if chunk.get("usage"):
                        usage.tokens = _usage_counts(chunk["usage"])
                if not finished:
                    raise UpstreamError("upstream_error", "stream ended without [DONE] or a finish_reason")
            finally:
                await response.aclose()
        except UpstreamError:
            raise
        except openai.APITimeoutError as exc:
            if not _timed_out(exc):
                # the SDK's aiohttp transport reports a refused connection as ConnectTimeout
                raise UpstreamError("upstream_error", f"cannot connect to {self.endpoint}: {exc.__cause__}") from exc
            raise UpstreamError("timeout", f"request timed out: {exc}") from exc
        except openai.APIStatusError as exc:
            raise UpstreamError("upstream_error", f"HTTP {exc.status_code} from {self.endpoint}") from exc
        except openai.APIError as exc:
            raise UpstreamError("upstream_error", f"{type(exc).__name__}: {exc}") from exc
        except httpx2.ReadTimeout as exc:
            raise UpstreamError("timeout", "no data from upstream within the timeout") from exc
        except (httpx2.HTTPError, httpx2.StreamError) as exc:
            raise UpstreamError("upstream_error", f"{type(exc).__name__}: {exc}") from exc
        except (ValueError, AttributeError, TypeError) as exc:
            raise UpstreamError("upstream_error", f"malformed stream data: {exc}") from exc


async def _lines(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of an event stream, without their ends (CRLF, LF or CR, as SSE allows). One
    decoding step instead of httpx's text and line decoders; a CRLF split between two reads
    gives one extra empty line, which the stream's reader skips like any separator."""
    pending = b""
    async for data in body:
        if pending:
            data = pending + data
        lines = data.splitlines()
        pending = b"" if not lines or data.endswith((b"\n", b"\r")) else lines.pop()
        for line in lines:
            yield line
    if pending:
        yield pending


def _timed_out(exc: BaseException) -> bool:
    """Whether the root cause of ``exc`` is really a timeout (not, say, a refused connection)."""
    seen: set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    # a bare APITimeoutError (no cause) is the SDK's own deadline
    return isinstance(exc, (TimeoutError, openai.APITimeoutError))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _usage_counts(raw: object) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    counts = {k: v for k, v in raw.items() if k.endswith("_tokens") and isinstance(v, int)}
    return counts or None
