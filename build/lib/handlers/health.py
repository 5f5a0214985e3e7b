"""Liveness and readiness probes."""

from __future__ import annotations

from handlers.api_base import ApiHandler


class HealthHandler(ApiHandler):
    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(ApiHandler):
    async def get(self) -> None:
        if await self.chat.ready():
            self.send_json({"status": "ready"})
        else:
            self.send_json({"status": "unavailable", "error": "The store does not answer."}, 503)
