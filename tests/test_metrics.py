"""Prometheus metrics scraped over HTTP and parsed with prometheus-client's own parser;
JSON log lines of a real `python run.py`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SseResponse, http_json, read_sse, read_then_leave, sse_post, streamed_text, url
from tests.fake_upstream import Script
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SESSIONS = "/api/v2/ai/chat/sessions"
FAILING = Script(status=500, retry_after_ms=1)  # the SDK retries it after 1 ms

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: Any) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/metrics")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def wait_for_value(server: Any, name: str, expected: float, **labels: str) -> None:
    """Poll until a gauge shows ``expected`` (a disconnect is processed asynchronously)."""
    for _ in range(200):
        if value(await scrape(server), name, **labels) == expected:
            return
        await asyncio.sleep(0.02)
    assert value(await scrape(server), name, **labels) == expected


async def sse_chat_cancelled(server: Any, session_id: str) -> SseResponse:
    """An SSE answer that stalls after two deltas, cancelled with POST .../cancel."""
    result = SseResponse(0, {})
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/api/v2/ai/chat/stream"),
                                json={"message": "Hi", "sessionId": session_id}) as response:
            result.status = response.status
            await read_sse(response, result, lambda _: result.content != "Hello, ")
            # the stream is open: counted as a connection
            assert value(await scrape(server), "aichat_connections", transport="sse") == 1
            assert value(await scrape(server), "aichat_active_answers") == 1
            status, body, _ = await http_json(server, "POST", f"{SESSIONS}/{session_id}/cancel")
            assert status == 202, body
            await read_sse(response, result)
    assert result.last.get("cancelled") is True
    return result


async def test_answers_chunks_tokens_retries_and_store_after_sse_and_socketio_chats(
    make_server, upstream, socket_client
):
    server = await make_server(ai__max_retries="1")

    # --- SSE: complete, cancelled, failed (500 twice: one SDK retry), complete after a retry
    completed = await sse_post(server, {"message": "Hi"})
    assert completed.content == "Hello, world!" and completed.last["done"] is True
    upstream.queue(Script(stall_after=2))
    cancelled = await sse_chat_cancelled(server, "m-sse-cancel")
    assert cancelled.content == "Hello, "
    upstream.queue(FAILING, FAILING)
    failed = await sse_post(server, {"message": "Hi"})
    assert failed.last["code"] == "upstream_error" and failed.content == ""
    upstream.queue(FAILING)
    retried = await sse_post(server, {"message": "Hi"})
    assert retried.content == "Hello, world!"

    # --- Socket.IO: complete, cancelled (ai:cancel), failed
    client = await socket_client(server)
    await wait_for_value(server, "aichat_connections", 1, transport="socketio")
    events = await client.chat({"message": "Hi"})
    assert events[-1][0] == "ai:complete"
    upstream.queue(Script(stall_after=2))
    start = len(client.events)
    await client.client.emit("ai:chat", {"message": "Hi", "sessionId": "m-sio-cancel"})
    await client.wait_for(lambda all_events: streamed_text(all_events[start:]) == "Hello, ")
    await client.client.emit("ai:cancel", {"sessionId": "m-sio-cancel"})
    await client.wait_for(lambda all_events: all_events[-1][0] == "ai:complete")
    assert client.events[-1][1].get("cancelled") is True
    upstream.queue(FAILING, FAILING)
    events = await client.chat({"message": "Hi"})
    assert events[-1][0] == "ai:error" and events[-1][1]["code"] == "upstream_error"

    # a few reads of the history and the probes, to see their store operations
    assert (await http_json(server, "GET", f"{SESSIONS}/m-sse-cancel"))[0] == 200
    assert (await http_json(server, "GET", "/readyz"))[0] == 200

    samples = await scrape(server)
    answers = {(t, s): value(samples, "aichat_answers_total", transport=t, status=s)
               for t in ("sse", "socketio") for s in ("complete", "partial", "error")}
    assert answers == {("sse", "complete"): 2, ("sse", "partial"): 1, ("sse", "error"): 1,
                       ("socketio", "complete"): 1, ("socketio", "partial"): 1, ("socketio", "error"): 1}
    assert value(samples, "aichat_active_answers") == 0
    # a first token in every answer but the two failed ones
    assert value(samples, "aichat_time_to_first_token_seconds_count") == 5
    assert value(samples, "aichat_answer_duration_seconds_count") == 7
    assert value(samples, "aichat_answer_duration_seconds_bucket", le="+Inf") == 7
    # deltas: 4 per complete answer, 2 per cancelled one
    assert value(samples, "aichat_chunks_total", transport="sse") == 4 + 2 + 0 + 4
    assert value(samples, "aichat_chunks_total", transport="socketio") == 4 + 2 + 0
    # the fake upstream reports 7 prompt and 4 completion tokens per complete answer
    assert value(samples, "aichat_tokens_total", kind="prompt") == 3 * 7
    assert value(samples, "aichat_tokens_total", kind="completion") == 3 * 4
    assert value(samples, "aichat_upstream_retries_total") == 3
    assert len(upstream.requests) == 7 + 3
    for operation, count in (("begin_turn", 7), ("finish_message", 7), ("get_session", 1), ("ping", 1)):
        assert value(samples, "aichat_store_operation_seconds_count", operation=operation) == count
    assert value(samples, "aichat_store_operation_seconds_count", operation="list_sessions") == 0
    assert value(samples, "aichat_connections", transport="sse") == 0
    assert value(samples, "aichat_connections", transport="socketio") == 1
    await client.close()
    await wait_for_value(server, "aichat_connections", 0, transport="socketio")


async def test_refusals_are_counted_by_code(make_server, socket_client):
    server = await make_server(rate_limit__anonymous_limit="1")
    assert (await sse_post(server, {"message": "Hi"})).last["done"] is True
    limited = await sse_post(server, {"message": "again"})
    assert limited.status == 429
    assert (await sse_post(server, None, raw=b"[")).status == 400  # invalid_json, refused by the handler
    client = await socket_client(server)
    events = await client.chat({"message": ""})
    assert events[-1][0] == "ai:error" and events[-1][1]["code"] == "invalid_request"

    samples = await scrape(server)
    assert value(samples, "aichat_requests_refused_total", code="rate_limited") == 1
    assert value(samples, "aichat_requests_refused_total", code="invalid_json") == 1
    assert value(samples, "aichat_requests_refused_total", code="invalid_request") == 1
    assert value(samples, "aichat_requests_refused_total", code="busy") == 0
    assert value(samples, "aichat_answers_total", transport="sse", status="complete") == 1
    assert value(samples, "aichat_answers_total", transport="socketio", status="complete") == 0


async def test_each_server_in_a_process_exports_only_its_own(make_server):
    first, second = await make_server(), await make_server()
    assert (await sse_post(first, {"message": "Hi"})).last["done"] is True
    assert value(await scrape(first), "aichat_answers_total", transport="sse", status="complete") == 1
    assert value(await scrape(second), "aichat_answers_total", transport="sse", status="complete") == 0


async def test_metrics_off_means_no_route(make_server):
    server = await make_server(server__metrics="false")
    status, body, _ = await http_json(server, "GET", "/metrics")
    assert status == 404 and body["code"] == "not_found"
    assert (await sse_post(server, {"message": "Hi"})).content == "Hello, world!"


# --- JSON logs of a real server process ---------------------------------------------------



class Remote:
    def __init__(self, port: int) -> None:
        self.port = port


async def test_json_logs_carry_the_answer_ids(tmp_path, upstream):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AICHAT_", "OPENAI_")) and k not in ("MONGODB_URI", "JWT_SECRET")}
    env.update({"OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": "sk-test",
                "AICHAT_STORAGE_SQLITE_PATH": str(tmp_path / "chat.sqlite3"),
                "AICHAT_SERVER_LOG_FORMAT": "json", "AICHAT_AI_MAX_RETRIES": "0"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "run.py"), "--port", str(port), "--config", str(REPO / "settings.ini"),
        env=env, cwd=str(REPO), stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        while not any(b"listening on" in line for line in lines):
            line = await asyncio.wait_for(process.stderr.readline(), 20)
            assert line, b"".join(lines)
            lines.append(line)
        server = Remote(port)
        upstream.queue(Script(status=500))
        failed = await sse_post(server, {"message": "Hi", "sessionId": "json-log"})
        assert failed.last["code"] == "upstream_error"
        assert (await sse_post(server, {"message": "Hi"})).last["done"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 30)
    lines.extend(rest.splitlines(keepends=True))

    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) >= 3
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert record["time"].endswith("+00:00")
    failure = [r for r in records if "upstream" in r["message"] and r["level"] == "WARNING"]
    assert len(failure) == 1, records
    assert failure[0]["messageId"] == failed.last["messageId"]
    assert failure[0]["sessionId"] == "json-log"
    assert failure[0]["logger"] == "aichat.chat"
    # lines outside an answer carry no ids
    assert "messageId" not in next(r for r in records if "listening on" in r["message"])


async def test_a_client_that_leaves_mid_stream_is_no_longer_counted(server, upstream, socket_client):
    upstream.queue(Script(chunks=["a"] * 10, delay=0.05))
    result = await read_then_leave(server, {"message": "Hi"}, frames=1)
    assert result.content == "a"
    await wait_for_value(server, "aichat_connections", 0, transport="sse")
    # a Socket.IO client that goes away without saying goodbye
    client = await socket_client(server)
    await wait_for_value(server, "aichat_connections", 1, transport="socketio")
    await client.client.eio.disconnect(abort=True)
    await wait_for_value(server, "aichat_connections", 0, transport="socketio")
