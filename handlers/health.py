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
            error = ("Not ready: shutting down, or the store (or Redis, in cluster mode) does not answer "
                     "or failed lately.")
            self.send_json({"status": "unavailable", "error": error}, 503)
