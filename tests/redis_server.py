"""A Redis for the tests: REDIS_TEST_URL when set, else a `redis-server` started by the suite.

The server listens on a free local port, keeps nothing on disk (no RDB, no AOF) and runs
in a temporary directory. Use it from a test module with
``from tests.redis_server import redis_url, key_prefix  # noqa: F401`` and give each test
its own key namespace through the ``key_prefix`` fixture, so tests never see each other's
keys. ``RedisProcess`` is also usable directly by a test that stops and restarts Redis.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.ports import free_port

START_TIMEOUT_S = 10.0
MISSING = (
    "the cluster tests need redis-server (`bash scripts/setup_redis.sh` installs Debian's package when run"
    " as root) or REDIS_TEST_URL pointing at a Redis"
)

# every key this run creates starts with this, so a shared Redis can host several runs
RUN_PREFIX = f"aichat-test-{uuid.uuid4().hex[:8]}"
_prefix_numbers = itertools.count(1)


def new_key_prefix() -> str:
    """A key namespace no other test (or test run) uses."""
    return f"{RUN_PREFIX}-{next(_prefix_numbers)}"



def wait_until_up(url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
                client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RedisProcess:
    """One redis-server child process on a fixed port; stop() and start() again keep the port."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(MISSING)
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = Path(self._dir.name) / "server.log"
        with log.open("ab") as out:
            self._process = subprocess.Popen(
                [
                    self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                    "--protected-mode", "no", "--daemonize", "no",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        try:
            wait_until_up(self.url)
        except redis.RedisError:
            self.stop()
            raise RuntimeError(f"redis-server did not start: {log.read_text(errors='replace')[-2000:]}") from None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_TEST_URL")
    if external:
        wait_until_up(external)
        yield external
        with redis.Redis.from_url(external) as client:  # drop only this run's keys
            for key in client.scan_iter(match=f"{RUN_PREFIX}-*", count=1000):
                client.delete(key)
        return
    server = RedisProcess()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def key_prefix() -> str:
    return new_key_prefix()
