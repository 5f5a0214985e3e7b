"""Pieces shared by the bench processes: the answer text, the request directive, tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import time

# Words of the fake answers: a quote, a backslash and non-ASCII text make sure every
# relay escapes and decodes JSON correctly (the content check would catch it).
WORDS = ("Hello", "world", "the", "quick", "brown", "fox", 'says "hi"', "café", "naïve", "back\\slash",
         "jumps", "over", "lazy", "dogs", "émoji-✓", "streaming", "tokens", "42")

#: The fake upstream reads how to answer from the user message: `[bench n=<chunks> ms=<gap>]`.
DIRECTIVE = re.compile(rb"\[bench n=(\d+) ms=(\d+)\]")

JWT_SECRET = "bench-secret-not-for-production"
BENCH_USER = "bench-user"


def chunk_text(index: int) -> str:
    return WORDS[index % len(WORDS)] + " "


def expected_text(chunks: int) -> str:
    return "".join(chunk_text(i) for i in range(chunks))


def bench_message(chunks: int, gap_ms: int) -> str:
    return f"Benchmark question [bench n={chunks} ms={gap_ms}] please answer."


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_token(secret: str = JWT_SECRET, subject: str = BENCH_USER, ttl_seconds: int = 4 * 3600) -> str:
    now = int(time.time())
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64url(json.dumps({"sub": subject, "iat": now, "exp": now + ttl_seconds},
                                separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = _b64url(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def raise_nofile(wanted: int = 65536) -> int:
    """Raise the open-files limit as far as the hard limit allows; returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_to(cores: set[int]) -> bool:
    """Pin the calling process (and threads it starts later) to ``cores`` when the machine has them."""
    try:
        available = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return False
    if not cores or not cores <= available or len(available) < 2:
        return False
    os.sched_setaffinity(0, cores)
    return True


def new_event_loop():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
