"""Prometheus metrics of one chat server (names in docs/API.md, "Metrics").

Each ChatMetrics owns its own CollectorRegistry, never prometheus_client's global one:
two chat servers may live in one process (embedding), and each exports only its own.

Nothing here is called per chunk. An answer is recorded twice (started, ended), a store
operation once, a connection when it opens and when it closes; every labelled child is
created once, up front, so recording is an attribute access and an add.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

from services.errors import HTTP_STATUS

T = TypeVar("T")

TRANSPORTS = ("sse", "socketio")
STATUSES = ("complete", "partial", "error")
TOKEN_KINDS = ("prompt", "completion")
STORE_OPERATIONS = (
    "begin_turn", "checkpoint", "finish_message", "load_context", "get_session",
    "list_sessions", "delete_session", "get_owner", "get_message", "ping",
)

# First token: a local model answers in tens of ms, a loaded remote one in seconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _children(metric: MetricWrapperBase, values: tuple[str, ...]) -> dict[str, MetricWrapperBase]:
    return {value: metric.labels(value) for value in values}


class ChatMetrics:
    """The server's metrics; ``enabled=False`` makes every recording method a no-op."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._answers_metric = answers = Counter(
            "aichat_answers", "Answers ended, by the transport that started them and final status",
            ("transport", "status"), registry=r)
        self._answers = {(t, s): answers.labels(t, s) for t in TRANSPORTS for s in STATUSES}
        self._active = Gauge("aichat_active_answers", "Answers being generated now", registry=r)
        self._ttft = Histogram("aichat_time_to_first_token_seconds",
                               "From the start of an answer to its first text from the upstream",
                               buckets=TTFT_BUCKETS, registry=r)
        self._duration = Histogram("aichat_answer_duration_seconds", "From the start of an answer to its end",
                                   buckets=DURATION_BUCKETS, registry=r)
        self._chunks_metric = Counter("aichat_chunks", "Text deltas relayed from the upstream", ("transport",),
                                      registry=r)
        self._chunks = _children(self._chunks_metric, TRANSPORTS)
        self._tokens = _children(Counter("aichat_tokens", "Tokens as the upstream reported their usage",
                                         ("kind",), registry=r), TOKEN_KINDS)
        self._refused_metric = Counter("aichat_requests_refused", "Chat requests refused before an answer started",
                                       ("code",), registry=r)
        self._refused = _children(self._refused_metric, tuple(HTTP_STATUS))
        self._retries = Counter("aichat_upstream_retries", "Upstream HTTP requests that were SDK retries",
                                registry=r)
        self._store = _children(Histogram("aichat_store_operation_seconds", "Latency of store operations",
                                          ("operation",), buckets=STORE_BUCKETS, registry=r), STORE_OPERATIONS)
        # the process's CPU, memory and file descriptors, read from /proc only when scraped
        # (no GC collector: it would hook every garbage collection)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._connections = _children(Gauge("aichat_connections", "Open SSE streams and Socket.IO connections",
                                            ("transport",), registry=r), TRANSPORTS)

    # --- answers (the chat service) ---------------------------------------------------

    def answer_started(self) -> None:
        if self.enabled:
            self._active.inc()

    def answer_ended(
        self,
        transport: str,
        status: str,
        *,
        duration_seconds: float,
        ttft_seconds: float | None,
        chunks: int,
        tokens: dict[str, int] | None,
    ) -> None:
        """Once per answer, at its end: everything about it at once."""
        if not self.enabled:
            return
        self._active.dec()
        answers = self._answers.get((transport, status))
        (answers if answers is not None else self._answers_metric.labels(transport, status)).inc()
        self._duration.observe(duration_seconds)
        if ttft_seconds is not None:
            self._ttft.observe(ttft_seconds)
        if chunks:
            counter = self._chunks.get(transport)
            (counter if counter is not None else self._chunks_metric.labels(transport)).inc(chunks)
        if tokens:
            prompt, completion = tokens.get("prompt_tokens"), tokens.get("completion_tokens")
            if prompt:
                self._tokens["prompt"].inc(prompt)
            if completion:
                self._tokens["completion"].inc(completion)

    def refused(self, code: str) -> None:
        if not self.enabled:
            return
        child = self._refused.get(code)
        if child is None:  # a code outside the API's table: still counted, rarely
            child = self._refused_metric.labels(code)
        child.inc()

    def upstream_retry(self) -> None:
        if self.enabled:
            self._retries.inc()

    # --- store ------------------------------------------------------------------------

    async def timed(self, operation: str, call: Awaitable[T]) -> T:
        """Await a store call, recording how long it took (failures included)."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._store[operation].observe(time.perf_counter() - started)

    # --- connections (the transports) -------------------------------------------------

    def connection_opened(self, transport: str) -> None:
        if self.enabled:
            self._connections[transport].inc()

    def connection_closed(self, transport: str) -> None:
        if self.enabled:
            self._connections[transport].dec()
