"""GET /metrics: this server's Prometheus metrics, in the text exposition format."""

from __future__ import annotations

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from handlers.api_base import refuse_foreign_host
from services.host_filter import HostFilter


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, registry: CollectorRegistry, host_filter: HostFilter | None = None) -> None:
        self.registry = registry
        self.host_filter = host_filter

    def prepare(self) -> None:
        refuse_foreign_host(self, self.host_filter)

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.set_header("Cache-Control", "no-store")
        self.finish(generate_latest(self.registry))
