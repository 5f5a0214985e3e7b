"""GET /metrics: this server's Prometheus metrics, in the text exposition format."""

from __future__ import annotations

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from handlers.api_base import RequestGuard
from services.host_filter import HostFilter


@tornado.web.stream_request_body
class MetricsHandler(RequestGuard, tornado.web.RequestHandler):
    def initialize(self, registry: CollectorRegistry, host_filter: HostFilter | None = None,
                   max_body_bytes: int = 0) -> None:
        self.registry = registry
        self.host_filter = host_filter
        self.max_body_bytes = max_body_bytes  # it takes none: any body is refused (413) unread

    def prepare(self) -> None:
        self.guard()

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.set_header("Cache-Control", "no-store")
        self.finish(generate_latest(self.registry))
