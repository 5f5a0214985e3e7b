"""Entry point: python run.py [--config PATH] [--host HOST] [--port PORT]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from server.lifecycle import serve
from server.settings import SettingsError, load_settings
from services.store.base import StoreError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "settings.ini"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="AI chat streaming server (SSE and Socket.IO)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="settings file (default: %(default)s)")
    parser.add_argument("--host", help="listen address (overrides [server] host)")
    parser.add_argument("--port", help="listen port (overrides [server] port)")
    return parser.parse_args(argv)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {}
    if args.host is not None:
        overrides[("server", "host")] = args.host
    if args.port is not None:
        overrides[("server", "port")] = args.port
    try:
        settings = load_settings(args.config, overrides=overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx2 (under the openai SDK) logs every upstream request at INFO, full URL included:
    # a second log line per answer, and the base URL's credentials or query in the log
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            return runner.run(serve(settings))
        except (OSError, StoreError) as exc:  # the port is taken, the store cannot be opened
            logging.getLogger("aichat").error("cannot start: %s", exc)
            return 1


if __name__ == "__main__":
    sys.exit(main())
