"""A MongoDB for the tests: MONGODB_TEST_URI when set, else a mongoeco server in a subprocess.

mongoeco needs Python 3.13+, so it runs from .mongo-venv (scripts/setup_mongoeco.sh builds
it) as a child process speaking the MongoDB wire protocol; the stores under test connect to
it with the real drivers, exactly as to a MongoDB. Use it from conftest.py with
``from tests.mongo_server import mongodb_uri  # noqa: F401`` and give each test its own
database with ``new_database_name()``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MONGO_PYTHON = REPO_ROOT / ".mongo-venv" / "bin" / "python"
SERVER_MAIN = Path(__file__).resolve().parent / "mongoeco_server_main.py"
START_TIMEOUT_S = 30.0
MISSING = (
    "make test needs Python 3.13+ (for the mongoeco MongoDB test server) or MONGODB_TEST_URI pointing at a MongoDB;"
    " install one, e.g. `pyenv install 3.13`"
)

# every database this test run creates starts with this, so a shared MongoDB can host
# several runs at once and this run drops only its own databases
DATABASE_PREFIX = f"aichat_test_{uuid.uuid4().hex[:8]}"
_database_numbers = itertools.count(1)


def new_database_name() -> str:
    """A database name no other test (or test run) uses."""
    return f"{DATABASE_PREFIX}_{next(_database_numbers)}"


def _ping(uri: str, timeout_ms: int) -> None:
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms) as client:
        client.admin.command("ping")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def mongodb_uri() -> Iterator[str]:
    external = os.environ.get("MONGODB_TEST_URI")
    if external:
        yield external
        # drop what this run created; other runs' databases have other prefixes
        with pymongo.MongoClient(external, serverSelectionTimeoutMS=5000) as client:
            for name in client.list_database_names():
                if name.startswith(DATABASE_PREFIX + "_"):
                    client.drop_database(name)
        return
    if not MONGO_PYTHON.exists():
        raise RuntimeError(MISSING)
    with tempfile.TemporaryDirectory(prefix="mongoeco-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            # port 0: the server picks a free port and prints its URI, so no port race
            process = subprocess.Popen(
                [str(MONGO_PYTHON), str(SERVER_MAIN), "127.0.0.1", "0"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            yield _wait_until_serving(process, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_until_serving(process: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    uri = None
    while uri is None:
        for line in _read(log_path).splitlines():
            if line.startswith("mongoeco listening on "):
                uri = line.removeprefix("mongoeco listening on ").strip()
        if uri is not None:
            break
        if process.poll() is not None:
            raise RuntimeError(f"the mongoeco test server exited with {process.returncode}:\n{_read(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the mongoeco test server did not start in {START_TIMEOUT_S:.0f} s:\n{_read(log_path)}")
        time.sleep(0.05)
    _ping(uri, timeout_ms=max(1000, int((deadline - time.monotonic()) * 1000)))
    return uri
