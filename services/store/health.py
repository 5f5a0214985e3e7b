"""Whether the store has been failing to write lately, for readiness and for the chat path.

A write that fails marks the store unhealthy for ``window_seconds``; any write that
succeeds afterwards clears the mark at once. Reads (the readiness ping) do not clear it:
a full disk still answers reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# How long a write failure keeps /readyz at 503 when no write succeeds afterwards.
FAILURE_WINDOW_SECONDS = 30.0


class StoreHealth:
    __slots__ = ("window_seconds", "_clock", "_failed_at", "failures")

    def __init__(
        self, window_seconds: float = FAILURE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_seconds = window_seconds
        self._clock = clock
        self._failed_at: float | None = None
        #: write failures since start-up
        self.failures = 0

    def write_failed(self) -> None:
        self._failed_at = self._clock()
        self.failures += 1

    def write_succeeded(self) -> None:
        self._failed_at = None

    @property
    def healthy(self) -> bool:
        """False after a write failure in the last ``window_seconds`` with no success since."""
        failed_at = self._failed_at
        return failed_at is None or self._clock() - failed_at > self.window_seconds
