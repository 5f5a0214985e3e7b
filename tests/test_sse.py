"""HTTP SSE transport: POST /api/v2/ai/chat/stream against a real fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from server.lifecycle import RunningServer
from services.chat_request import new_id
from tests.conftest import TEST_SYSTEM_PROMPT, http_json, sse_post, url
from tests.fake_upstream import Script
from tests.ports import free_port

CHAT = "/api/v2/ai/chat/stream"
DEFAULT_ANSWER = "Hello, world!"  # the fake upstream's default Script
API_KEY = "sk-test-secret-key"  # conftest's configured upstream key
FRAME = re.compile(r"id: ([^\n:]+):(\d+)\ndata: ([^\n]*)")


async def raw_stream(server: RunningServer, payload: Any, headers: dict[str, str] | None = None
                     ) -> tuple[int, CIMultiDict[str], str]:
    """POST a chat and return status, headers and the body exactly as sent (not decompressed)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url(server, CHAT), data=json.dumps(payload).encode(),
                                headers=all_headers) as response:
            body = await response.read()
            return response.status, CIMultiDict(response.headers), body.decode("utf-8")


def parse_frames(body: str) -> tuple[list[tuple[str, int, dict[str, Any]]], list[str]]:
    """Split an SSE body into (messageId, seq, data) frames and comment lines, strictly."""
    assert body.endswith("\n\n"), body[-200:]
    frames: list[tuple[str, int, dict[str, Any]]] = []
    comments: list[str] = []
    for block in body[:-2].split("\n\n"):
        if block.startswith(":"):
            assert "\n" not in block, block
            comments.append(block)
            continue
        match = FRAME.fullmatch(block)
        assert match is not None, f"malformed frame {block!r}"
        frames.append((match.group(1), int(match.group(2)), json.loads(match.group(3))))
    return frames, comments


async def raw_http(server: RunningServer, head: str, body: bytes) -> tuple[int, dict[str, Any] | None]:
    """Send a hand-written HTTP/1.1 request (no client-added headers) and read the JSON answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    header_block, _, payload = response.partition(b"\r\n\r\n")
    status = int(header_block.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None


async def assert_chat_works(server: RunningServer, message: str = "again") -> None:
    result = await sse_post(server, {"message": message})
    assert result.status == 200, result.body
    assert result.content == DEFAULT_ANSWER
    assert result.last["done"] is True


def assert_no_leak(frames: list[dict[str, Any]], *secrets: str) -> None:
    text = json.dumps(frames)
    for secret in ("Traceback", "File \"", "127.0.0.1", "http://", API_KEY, *secrets):
        assert secret not in text, f"{secret!r} leaked into {text}"


def ci(headers: dict[str, str]) -> CIMultiDict[str]:
    """Header names are case-insensitive (Tornado sends `Ratelimit-Limit`)."""
    return CIMultiDict(headers)



# --- the stream itself -------------------------------------------------------------------


async def test_frames_headers_and_content_are_exact(server, upstream):
    status, headers, body = await raw_stream(server, {"message": "Hi there"}, {"Accept-Encoding": "gzip"})
    assert status == 200, body
    assert headers["Content-Type"].split(";")[0] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache, no-transform"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in headers
    assert headers["RateLimit-Limit"] == "20"
    assert headers["RateLimit-Remaining"] == "19"
    assert int(headers["RateLimit-Reset"]) >= 0

    frames, _ = parse_frames(body)
    assert "event:" not in body
    *content, last = frames
    assert [data["content"] for _, _, data in content] == ["Hello", ", ", "world", "!"]
    message_id = last[2]["messageId"]
    session_id = last[2]["sessionId"]
    assert last[2] == {"done": True, "sessionId": session_id, "messageId": message_id}
    seqs = []
    for frame_message, seq, data in content:
        assert set(data) == {"content", "sessionId", "messageId"}
        assert data["sessionId"] == session_id and data["messageId"] == message_id
        assert frame_message == message_id
        seqs.append(seq)
    # seq is the answer's length in characters once the delta is added
    assert seqs == [5, 7, 12, 13]
    assert last[0] == message_id and last[1] >= seqs[-1]


async def test_upstream_receives_prompt_model_and_key(server, upstream):
    result = await sse_post(server, {"message": "What is 2+2?"})
    assert result.status == 200
    assert len(upstream.requests) == 1
    sent = upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": TEST_SYSTEM_PROMPT}
    assert sent.body["messages"][-1] == {"role": "user", "content": "What is 2+2?"}
    assert len(sent.body["messages"]) == 2  # a new session has no history
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["stream"] is True
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"].startswith("AsyncOpenAI/Python")
    assert sent.headers["X-Stainless-Retry-Count"] == "0"  # what the retry metric reads
    # the SDK's telemetry about this host is not sent upstream
    told = {name.lower() for name in sent.headers} & {"x-stainless-os", "x-stainless-arch", "x-stainless-runtime",
                                                       "x-stainless-runtime-version", "x-stainless-lang",
                                                       "x-stainless-package-version", "x-stainless-async",
                                                       "x-stainless-read-timeout"}
    assert told == set()


async def test_upstream_stream_read_whatever_its_line_ends_and_read_boundaries(server, upstream):
    def event(text: str) -> bytes:
        return b'data: {"choices": [{"index": 0, "delta": {"content": "' + text.encode() + b'"}}]}'
    body = (b": keep-alive comment\r\n\r\n" + event("Ünï") + b"\r\n\r\n" + event("cödé") + b"\n\n"
            + event("bad \\u00e9") + b"\r\r" + b'data: {"choices": [{"index": 0, "delta": {"content": "x\xff"}}]}\n\n'
            + b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\r\n\r\ndata: [DONE]\r\n')
    # cut everywhere that matters: inside a CRLF, inside a two-byte character, inside "data:"
    cuts = sorted({body.index(b"\r\n") + 1, body.index("Ü".encode()) + 1, body.index("é".encode()) + 1,
                   body.index(b"data:", 40) + 3, body.index(b"\r\r") + 1, len(body) - 3})
    pieces = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    upstream.queue(Script(raw=pieces, delay=0.02))
    result = await sse_post(server, {"message": "hi"})
    assert result.status == 200 and result.last.get("done") is True, result.events
    # invalid UTF-8 from upstream becomes U+FFFD, the rest of the answer is kept
    assert result.content == "Ünïcödébad éx\ufffd"


async def test_first_frame_arrives_while_upstream_still_streaming(server, upstream):
    upstream.queue(Script(chunks=["one ", "two ", "three ", "four ", "five"], delay=0.3))
    arrivals: list[tuple[float, dict[str, Any]]] = []
    result = await sse_post(server, {"message": "count"},
                            on_event=lambda event: arrivals.append((time.monotonic(), event)))
    assert result.content == "one two three four five"
    assert result.last["done"] is True
    first_content = next(at for at, event in arrivals if "content" in event)
    done_at = arrivals[-1][0]
    # the upstream spends ~1.2 s between its first and last chunk
    assert first_content < done_at - 0.5


async def test_heartbeat_comments_while_waiting_for_first_token(make_server, upstream):
    server = await make_server(server__heartbeat_seconds=0.2)
    upstream.queue(Script(first_delay=1.0))
    status, _, body = await raw_stream(server, {"message": "slow"})
    assert status == 200
    frames, comments = parse_frames(body)
    assert ": ping" in comments
    assert 0 <= body.index(": ping") < body.index('data: {"content"')
    assert "".join(data.get("content", "") for _, _, data in frames) == DEFAULT_ANSWER
    assert frames[-1][2]["done"] is True


# --- sessionId ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [{"message": "hi"}, {"message": "hi", "sessionId": None}])
async def test_absent_session_id_gets_a_uuid4(server, payload):
    result = await sse_post(server, payload)
    assert result.status == 200, result.body
    session_ids = {event["sessionId"] for event in result.events}
    assert len(session_ids) == 1
    assert uuid.UUID(session_ids.pop()).version == 4


def test_made_up_ids_are_distinct_canonical_uuid4s():
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for made_up in ids:
        parsed = uuid.UUID(made_up)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, made_up)


@pytest.mark.parametrize("session_id", ["my_session-1", "A" * 128, "x"])
async def test_valid_session_id_is_echoed(server, session_id):
    result = await sse_post(server, {"message": "hi", "sessionId": session_id})
    assert result.status == 200, result.body
    assert result.content == DEFAULT_ANSWER
    assert [event["sessionId"] for event in result.events] == [session_id] * len(result.events)


@pytest.mark.parametrize("session_id", ["", "a" * 129, "a b", "ä", 123, ["x"], {"id": "x"}, True])
async def test_invalid_session_id_is_rejected(server, upstream, session_id):
    result = await sse_post(server, {"message": "hi", "sessionId": session_id})
    assert result.status == 400
    assert set(result.body) == {"error", "code"}
    assert result.body["code"] == "invalid_request"
    assert "RateLimit-Limit" in ci(result.headers)
    assert upstream.requests == []
    await assert_chat_works(server)


# --- message -----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    {},
    {"sessionId": "s1"},
    {"message": None},
    {"message": 42},
    {"message": ["hi"]},
    {"message": ""},
    {"message": "   \n\t "},
    {"message": "x" * 11},
    {"message": "ä" * 11},
])
async def test_invalid_message_is_rejected(make_server, upstream, payload):
    server = await make_server(ai__max_message_chars=10)
    result = await sse_post(server, payload)
    assert result.status == 400
    assert result.body["code"] == "invalid_request"
    assert set(result.body) == {"error", "code"}
    assert upstream.requests == []
    await assert_chat_works(server)


@pytest.mark.parametrize("message", ["x" * 10, "ä" * 10])
async def test_message_of_exactly_max_chars_is_accepted(make_server, upstream, message):
    server = await make_server(ai__max_message_chars=10)
    result = await sse_post(server, {"message": message})
    assert result.status == 200, result.body
    assert result.content == DEFAULT_ANSWER
    assert upstream.requests[0].body["messages"][-1]["content"] == message


# --- bad bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"not json", b"{\"message\": ", b"[\"message\"]", b"\"hello\"", b"42", b"null",
                                 b"", b"\xff\xfe"])
async def test_body_that_is_not_a_json_object(server, upstream, raw):
    result = await sse_post(server, None, raw=raw)
    assert result.status == 400
    assert result.body == {"error": result.body["error"], "code": "invalid_json"}
    assert upstream.requests == []
    await assert_chat_works(server)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_or_missing_content_type(server, upstream, content_type):
    body = json.dumps({"message": "hi"}).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    status, answer = await raw_http(server, head, body)
    assert status == 415
    assert answer is not None and answer["code"] == "unsupported_media_type"
    assert upstream.requests == []
    await assert_chat_works(server)


async def test_json_content_type_with_charset_is_accepted(server):
    result = await sse_post(server, {"message": "hi"}, headers={"Content-Type": "application/json; charset=utf-8"})
    assert result.status == 200
    assert result.content == DEFAULT_ANSWER


async def test_body_over_limit_with_content_length(make_server, upstream):
    server = await make_server(server__max_body_bytes=100)
    result = await sse_post(server, {"message": "x" * 200})
    assert result.status == 413
    assert result.body["code"] == "too_large"
    assert upstream.requests == []
    await assert_chat_works(server)


async def test_body_over_limit_chunked(make_server, upstream):
    server = await make_server(server__max_body_bytes=100)
    body = json.dumps({"message": "x" * 300}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 50):
            yield body[start:start + 50]

    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, CHAT), data=chunks(),
                                headers={"Content-Type": "application/json"}) as response:
            assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert response.status == 413
            answer = await response.json()
    assert answer["code"] == "too_large"
    assert upstream.requests == []
    await assert_chat_works(server)


async def test_body_within_limit_chunked(make_server, upstream):
    server = await make_server(server__max_body_bytes=100)
    body = json.dumps({"message": "small"}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 5):
            yield body[start:start + 5]

    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, CHAT), data=chunks(),
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            text = await response.text()
    assert '"done":true' in text
    assert upstream.requests[0].body["messages"][-1]["content"] == "small"


# --- upstream failures -------------------------------------------------------------------


async def failed_stream(server: RunningServer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a chat expected to fail mid-stream; returns (content frames, error frame)."""
    status, _, body = await raw_stream(server, {"message": "hi", "sessionId": "failing-1"})
    assert status == 200, body
    frames, _ = parse_frames(body)
    events = [data for _, _, data in frames]
    *content, last = events
    assert all(set(event) == {"content", "sessionId", "messageId"} for event in content), events
    assert not any("done" in event for event in events)
    assert {"error", "code", "sessionId"} <= set(last) <= {"error", "code", "sessionId", "messageId"}
    assert last["sessionId"] == "failing-1"
    assert isinstance(last["error"], str) and last["error"]
    assert_no_leak(events, str(server.port))
    return content, last


async def test_upstream_http_500_before_stream(make_server, upstream):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(status=500))
    content, error = await failed_stream(server)
    assert content == []
    assert error["code"] == "upstream_error"
    assert_no_leak([error], str(upstream.port))
    await assert_chat_works(server)


async def test_upstream_drop_mid_stream_is_not_retried(make_server, upstream):
    server = await make_server(ai__max_retries=2)
    upstream.queue(Script(chunks=["alpha ", "beta ", "gamma ", "delta"], drop_after=2))
    content, error = await failed_stream(server)
    assert [event["content"] for event in content] == ["alpha ", "beta "]
    assert error["code"] == "upstream_error"
    assert_no_leak([error], str(upstream.port))
    assert len(upstream.requests) == 1  # never retried once the answer has begun
    await assert_chat_works(server)


async def test_upstream_stall_times_out(make_server, upstream):
    server = await make_server(ai__request_timeout_seconds=1, ai__max_retries=0)
    upstream.queue(Script(chunks=["first ", "second"], stall_after=1))
    content, error = await failed_stream(server)
    assert [event["content"] for event in content] == ["first "]
    assert error["code"] == "timeout"
    await assert_chat_works(server)


async def test_upstream_never_answering_times_out(make_server, upstream):
    server = await make_server(ai__request_timeout_seconds=1, ai__max_retries=0)
    upstream.queue(Script(never_answer=True))
    content, error = await failed_stream(server)
    assert content == []
    assert error["code"] == "timeout"
    await assert_chat_works(server)


async def test_truncated_upstream_stream(make_server, upstream):
    server = await make_server(ai__max_retries=0)
    upstream.queue(Script(chunks=["half ", "an answer"], truncate=True))
    content, error = await failed_stream(server)
    assert "".join(event["content"] for event in content) == "half an answer"
    assert error["code"] == "upstream_error"
    await assert_chat_works(server)


async def test_unreachable_upstream(make_server, upstream):
    closed = free_port()
    server = await make_server(ai__base_url=f"http://127.0.0.1:{closed}/v1", ai__max_retries=0)
    content, error = await failed_stream(server)
    assert content == []
    assert error["code"] == "upstream_error"
    assert_no_leak([error], str(closed))
    # the server itself keeps serving
    status, body, _ = await http_json(server, "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})


async def test_rate_limit_before_first_token_is_retried(make_server, upstream):
    server = await make_server(ai__max_retries=2)
    upstream.queue(Script(status=429), Script(chunks=["retried ", "fine"]))
    result = await sse_post(server, {"message": "hi"})
    assert result.status == 200
    assert result.content == "retried fine"
    assert result.last["done"] is True
    assert len(upstream.requests) == 2
    assert upstream.requests[0].body == upstream.requests[1].body


# --- CORS, health, unknown paths ----------------------------------------------------------


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


async def test_cors_allowed_origin(make_server):
    server = await make_server(server__cors_origins="https://app.example")
    status, _, raw_headers = await http_json(server, "OPTIONS", CHAT,
                                         headers={"Origin": "https://app.example", **PREFLIGHT})
    headers = ci(raw_headers)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    methods = {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
    assert {"POST", "OPTIONS"} <= methods
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed

    result = await sse_post(server, {"message": "hi"}, headers={"Origin": "https://app.example"})
    assert result.status == 200
    assert ci(result.headers)["Access-Control-Allow-Origin"] == "https://app.example"
    exposed = {h.strip().lower() for h in ci(result.headers)["Access-Control-Expose-Headers"].split(",")}
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= exposed
    assert result.content == DEFAULT_ANSWER


async def test_cors_other_origin_gets_no_allow_origin(make_server):
    server = await make_server(server__cors_origins="https://app.example")
    status, _, raw_headers = await http_json(server, "OPTIONS", CHAT, headers={"Origin": "https://evil.example",
                                                                           **PREFLIGHT})
    headers = ci(raw_headers)
    assert "Access-Control-Allow-Origin" not in headers
    assert "Access-Control-Allow-Methods" not in headers
    result = await sse_post(server, {"message": "hi"}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in ci(result.headers)


async def test_cors_default_is_same_origin_only(server):
    status, _, raw_headers = await http_json(server, "OPTIONS", CHAT, headers={"Origin": "https://app.example",
                                                                           **PREFLIGHT})
    headers = ci(raw_headers)
    assert "Access-Control-Allow-Origin" not in headers
    result = await sse_post(server, {"message": "hi"}, headers={"Origin": "https://app.example"})
    assert result.status == 200
    assert "Access-Control-Allow-Origin" not in ci(result.headers)


async def test_cors_any_origin(make_server):
    server = await make_server(server__cors_origins="*")
    status, _, raw_headers = await http_json(server, "OPTIONS", CHAT, headers={"Origin": "https://x.example",
                                                                           **PREFLIGHT})
    headers = ci(raw_headers)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    result = await sse_post(server, {"message": "hi"}, headers={"Origin": "https://y.example"})
    assert ci(result.headers)["Access-Control-Allow-Origin"] == "*"


async def test_cors_on_error_responses(make_server):
    server = await make_server(server__cors_origins="https://app.example")
    result = await sse_post(server, {"message": ""}, headers={"Origin": "https://app.example"})
    assert result.status == 400
    assert ci(result.headers)["Access-Control-Allow-Origin"] == "https://app.example"


async def test_vary_origin_on_every_response_when_origins_are_listed(make_server):
    # the CORS headers depend on the Origin: a shared cache must not serve one origin's
    # response to another, so even a disallowed or absent Origin gets `Vary: Origin`
    server = await make_server(server__cors_origins="https://app.example, https://other.example")
    requests = [("GET", "/healthz"), ("GET", "/api/v2/ai/chat/sessions/nope"), ("GET", "/nope"),
                ("OPTIONS", CHAT)]
    for origin in ("https://app.example", "https://evil.example", None):
        headers = {"Origin": origin} if origin else {}
        results = [await http_json(server, method, path, headers=headers) for method, path in requests]
        chat = await sse_post(server, {"message": "hi"}, headers=headers)
        for _, _, raw in [*results, (chat.status, None, chat.headers)]:
            response = ci(raw)
            assert "origin" in {v.strip().lower() for v in response.get("Vary", "").split(",")}, (origin, raw)
            if origin == "https://app.example":
                assert response["Access-Control-Allow-Origin"] == origin
                assert "RateLimit-Remaining" in response["Access-Control-Expose-Headers"]
            else:
                assert "Access-Control-Allow-Origin" not in response
                assert "Access-Control-Expose-Headers" not in response


async def test_no_vary_origin_when_the_answer_does_not_depend_on_it(make_server, server):
    any_origin = await make_server(server__cors_origins="*")
    for origin in ("https://x.example", None):
        headers = {"Origin": origin} if origin else {}
        _, _, raw = await http_json(any_origin, "GET", "/healthz", headers=headers)
        assert ci(raw)["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Expose-Headers" in ci(raw)
        assert "Vary" not in ci(raw)
        # same origin only (the default): no CORS header at all
        _, _, raw = await http_json(server, "GET", "/healthz", headers=headers)
        assert not {"Vary", "Access-Control-Allow-Origin", "Access-Control-Expose-Headers"} & set(ci(raw))


async def test_refused_chats_carry_rate_limit_headers(make_server, upstream):
    # 401, 413 and 415 are refused before the service sees the message, yet tell the budget
    server = await make_server(server__max_body_bytes=100)
    refused = [
        await sse_post(server, {"message": "hi"}, headers={"Authorization": "Bearer not-a-jwt"}),
        await sse_post(server, {"message": "x" * 200}),
        await sse_post(server, None, raw=b'{"message": "hi"}', headers={"Content-Type": "text/plain"}),
    ]
    assert [r.status for r in refused] == [401, 413, 415]
    for result in refused:
        headers = ci(result.headers)
        assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("20", "20")
        assert headers["RateLimit-Reset"].isdigit()
    assert upstream.requests == []


async def test_healthz(server):
    status, body, headers = await http_json(server, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok"}
    assert ci(headers)["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("POST", "/api/v2/ai/chat/streamx"),
                                          ("GET", "/api/v2/ai/chat")])
async def test_unknown_path_is_json_404(server, method, path):
    status, body, headers = await http_json(server, method, path)
    assert status == 404
    assert body["code"] == "not_found"
    assert set(body) == {"error", "code"}
    assert ci(headers)["Content-Type"].startswith("application/json")


async def test_wrong_method_on_chat_endpoint_is_json(server):
    status, body, _ = await http_json(server, "GET", CHAT)
    assert status == 405
    assert body["code"] == "method_not_allowed"
