"""Entry point: python run.py [--config PATH] [--host HOST] [--port PORT]

Also the entry point of the one-file executable (`make binary`), where the application's
folder is the executable's, not the unpack folder this file runs from.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from server.lifecycle import serve
from server.logging_setup import configure_logging
from server.settings import SettingsError, load_settings
from services.store.base import StoreError

log = logging.getLogger("aichat")


def application_dir() -> Path:
    """Where settings.ini and a relative sqlite_path live: beside the executable when frozen."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    return Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name,
                                     description="AI chat streaming server (SSE and Socket.IO)")
    parser.add_argument("--config", type=Path, default=None,
                        help="settings file (must exist; default: settings.ini beside the program when present, "
                             "else built-in defaults)")
    parser.add_argument("--host", help="listen address (overrides [server] host)")
    parser.add_argument("--port", help="listen port (overrides [server] port)")
    return parser.parse_args(argv)


def settings_file(config: Path | None) -> Path | None:
    """--config (which must exist) > settings.ini beside the program > none (built-in defaults)."""
    if config is not None:
        return config
    beside = application_dir() / "settings.ini"
    return beside if beside.is_file() else None


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not available: using asyncio's own event loop (slower)")
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {}
    if args.host is not None:
        overrides[("server", "host")] = args.host
    if args.port is not None:
        overrides[("server", "port")] = args.port
    config = settings_file(args.config)
    try:
        settings = load_settings(config, overrides=overrides, base_dir=application_dir())
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.server.log_format)
    log.info("settings: %s", config.resolve() if config else "built-in defaults (no settings.ini)")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            return runner.run(serve(settings))
        except (OSError, StoreError) as exc:  # the port is taken, the store cannot be opened
            log.error("cannot start: %s", exc)
            return 1


if __name__ == "__main__":
    sys.exit(main())
