"""Rate limiting: the sliding-log limiter with an injected clock, then end to end.

A timestamp t is live while t > now - window: with window 10, a request at t=0 frees its
slot at exactly now=10.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from services.rate_limiter import RateLimiter, RateStatus
from tests.conftest import sse_post

SECRET = "rate-limit-test-secret-0123456789-abcdefgh"
# python-engineio's polling client waits, on disconnect, for its pending long-poll GET,
# which the server only lets go after ping interval + ping timeout: keep those short
QUICK_POLL = {"server__socketio_ping_interval_seconds": "1", "server__socketio_ping_timeout_seconds": "3"}


class Clock:
    """A settable clock for the limiter (and its key cache)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def expect(status: RateStatus, allowed: bool, remaining: int, reset: int, limit: int = 3) -> None:
    assert (status.allowed, status.limit, status.remaining, status.reset_seconds) == (allowed, limit, remaining, reset)


# --- unit ------------------------------------------------------------------------------


async def test_window_slides(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    expect(await limiter.acquire("k", 3), True, 2, 10)
    clock.now = 1
    expect(await limiter.acquire("k", 3), True, 1, 9)
    clock.now = 2
    expect(await limiter.acquire("k", 3), True, 0, 8)

    clock.now = 3
    rejected = await limiter.acquire("k", 3)
    expect(rejected, False, 0, 7)
    assert rejected.retry_after == 7
    clock.now = 9.5
    rejected = await limiter.acquire("k", 3)
    expect(rejected, False, 0, 1)
    assert rejected.retry_after == 1
    clock.now = 9.999
    assert (await limiter.acquire("k", 3)).allowed is False

    # at exactly t=10 the request made at t=0 has left the window: one slot frees
    clock.now = 10.0
    expect(await limiter.acquire("k", 3), True, 0, 1)  # live now: 1, 2, 10
    assert (await limiter.acquire("k", 3)).allowed is False  # only one was freed
    clock.now = 11.0
    expect(await limiter.acquire("k", 3), True, 0, 1)  # live: 2, 10, 11
    clock.now = 12.0
    expect(await limiter.acquire("k", 3), True, 0, 8)  # live: 10, 11, 12 -> oldest frees at 20
    clock.now = 19.0
    assert (await limiter.acquire("k", 3)).retry_after == 1

    # long idle: the whole budget is back
    clock.now = 100.0
    expect(await limiter.peek("k", 3), True, 3, 0)
    expect(await limiter.acquire("k", 3), True, 2, 10)


async def test_rejected_requests_do_not_use_the_budget(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    for _ in range(2):
        assert (await limiter.acquire("k", 2)).allowed
    clock.now = 5
    for _ in range(50):  # hammering while limited does not push the reset further out
        assert (await limiter.acquire("k", 2)).retry_after == 5
    clock.now = 10
    assert (await limiter.acquire("k", 2)).allowed


async def test_fractional_times_round_reset_up(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    clock.now = 0.25
    expect(await limiter.acquire("k", 1), True, 0, 10, limit=1)
    clock.now = 0.5
    status = await limiter.acquire("k", 1)
    expect(status, False, 0, 10, limit=1)  # frees at 10.25: 9.75 s away, announced as 10
    clock.now = 10.24
    assert (await limiter.acquire("k", 1)).retry_after == 1
    clock.now = 10.25
    assert (await limiter.acquire("k", 1)).allowed


async def test_peek_does_not_consume(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    for _ in range(5):
        expect(await limiter.peek("k", 3), True, 3, 0)
    assert len(limiter) == 0  # peeking stores nothing
    await limiter.acquire("k", 3)
    for _ in range(5):
        expect(await limiter.peek("k", 3), True, 2, 10)
    await limiter.acquire("k", 3)
    await limiter.acquire("k", 3)
    clock.now = 4
    exhausted = await limiter.peek("k", 3)
    expect(exhausted, False, 0, 6)
    assert exhausted.retry_after == 6
    assert await limiter.peek("k", 3) == exhausted
    clock.now = 10
    expect(await limiter.peek("k", 3), True, 3, 0)  # all three were made at t=0


async def test_peek_after_partial_expiry(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    for now in (0, 4, 8):
        clock.now = now
        await limiter.acquire("k", 3)
    clock.now = 12
    expect(await limiter.peek("k", 3), True, 1, 2)  # t=0 gone; t=4 frees at 14
    clock.now = 14
    expect(await limiter.peek("k", 3), True, 2, 4)  # t=8 frees at 18
    clock.now = 18
    expect(await limiter.peek("k", 3), True, 3, 0)


async def test_keys_are_independent(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    for _ in range(3):
        assert (await limiter.acquire("ip:1", 3)).allowed
    assert not (await limiter.acquire("ip:1", 3)).allowed
    expect(await limiter.acquire("ip:2", 3), True, 2, 10)
    expect(await limiter.acquire("user:1", 5), True, 4, 10, limit=5)
    expect(await limiter.peek("ip:2", 3), True, 2, 10)
    assert not (await limiter.acquire("ip:1", 3)).allowed


@pytest.mark.parametrize("start", [0.0, 1002.652246753, 32439.345765670874, 130961.2186978915, 523704.35872851027])
async def test_reset_never_exceeds_the_window(clock: Clock, start: float):
    """Float rounding in (t + window - now) must not announce window + 1 seconds."""
    limiter = RateLimiter(900, clock=clock)
    clock.now = start
    expect(await limiter.acquire("k", 1), True, 0, 900, limit=1)
    rejected = await limiter.acquire("k", 1)
    expect(rejected, False, 0, 900, limit=1)
    assert rejected.retry_after == 900
    expect(await limiter.peek("k", 1), False, 0, 900, limit=1)
    clock.now = start + 899.5
    assert (await limiter.acquire("k", 1)).retry_after == 1
    clock.now = start + 900
    assert (await limiter.acquire("k", 1)).allowed


async def test_headers():
    status = RateStatus(False, 3, 0, 7)
    assert status.headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "7"}
    assert status.retry_after == 7
    assert RateStatus(True, 3, 2, 7).retry_after is None
    assert RateStatus(False, 3, 0, 0).retry_after == 1  # never "retry after 0 seconds"


async def test_memory_is_bounded_under_a_flood_of_keys(clock: Clock):
    limiter = RateLimiter(900, max_keys=10_000, clock=clock)
    for number in range(100_000):
        clock.now = number / 1000
        assert (await limiter.acquire(f"ip:{number}", 20)).allowed
        if number % 9_999 == 0:
            assert len(limiter) <= 10_000
    assert len(limiter) == 10_000
    # the most recent keys are the ones kept, with their budget used
    expect(await limiter.peek("ip:99999", 20), True, 19, 900, limit=20)
    assert (await limiter.acquire("ip:99999", 20)).remaining == 18
    # the oldest were dropped first
    expect(await limiter.peek("ip:0", 20), True, 20, 0, limit=20)
    assert len(limiter) == 10_000


async def test_idle_keys_expire_from_the_cache(clock: Clock):
    limiter = RateLimiter(10, clock=clock)
    await limiter.acquire("idle", 3)
    clock.now = 5
    await limiter.acquire("busy", 3)
    assert len(limiter) == 2
    clock.now = 9.9
    assert len(limiter) == 2
    clock.now = 10  # a whole window since "idle" was last used
    assert len(limiter) == 1
    clock.now = 14.9
    await limiter.acquire("busy", 3)  # using a key keeps it
    clock.now = 20
    assert len(limiter) == 1
    expect(await limiter.peek("busy", 3), True, 2, 5)
    clock.now = 24.9
    assert len(limiter) == 0
    expect(await limiter.peek("busy", 3), True, 3, 0)


# --- end to end ------------------------------------------------------------------------


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


def header(result: Any, name: str) -> str:
    """A response header, looked up case-insensitively (Tornado sends `Ratelimit-Limit`)."""
    found = [value for key, value in result.headers.items() if key.lower() == name.lower()]
    assert len(found) == 1, (name, result.headers)
    return found[0]


def assert_rejected_sse(result: Any, limit: int) -> None:
    assert result.status == 429, (result.status, result.body)
    assert result.body["code"] == "rate_limited"
    retry_after = header(result, "Retry-After")
    assert retry_after.isdigit() and int(retry_after) > 0
    assert header(result, "RateLimit-Limit") == str(limit)
    assert header(result, "RateLimit-Remaining") == "0"
    reset = header(result, "RateLimit-Reset")
    assert reset.isdigit() and int(reset) > 0


def assert_rejected_socket(events: list[tuple[str, dict[str, Any]]]) -> None:
    name, data = events[-1]
    assert name == "ai:error", events
    assert data["code"] == "rate_limited"
    assert isinstance(data["retryAfter"], int) and not isinstance(data["retryAfter"], bool)
    assert data["retryAfter"] > 0


async def test_sse_and_socketio_share_one_budget(make_server, upstream, socket_client):
    server = await make_server(rate_limit__anonymous_limit=3)
    first = await sse_post(server, {"message": "one"})
    second = await sse_post(server, {"message": "two"})
    assert (first.status, second.status) == (200, 200)
    assert header(first, "RateLimit-Remaining") == "2"
    assert header(second, "RateLimit-Remaining") == "1"
    client = await socket_client(server)
    assert (await client.chat({"message": "three"}))[-1][0] == "ai:complete"
    assert len(upstream.requests) == 3

    assert_rejected_sse(await sse_post(server, {"message": "four"}), 3)
    assert_rejected_socket(await client.chat({"message": "four"}))
    other = await socket_client(server)
    assert_rejected_socket(await other.chat({"message": "four"}))
    assert len(upstream.requests) == 3


async def test_socketio_first_then_sse(make_server, upstream, socket_client):
    server = await make_server(rate_limit__anonymous_limit=2)
    client = await socket_client(server)
    for _ in range(2):
        assert (await client.chat({"message": "hi"}))[-1][0] == "ai:complete"
    assert_rejected_sse(await sse_post(server, {"message": "hi"}), 2)
    assert_rejected_socket(await client.chat({"message": "hi", "sessionId": "s-1"}))
    assert client.events[-1][1]["sessionId"] == "s-1"
    assert len(upstream.requests) == 2


async def test_remaining_decreases_on_successful_responses(make_server, upstream):
    server = await make_server(rate_limit__anonymous_limit=3)
    seen = []
    for _ in range(3):
        result = await sse_post(server, {"message": "hi"})
        assert result.status == 200
        assert header(result, "RateLimit-Limit") == "3"
        reset = header(result, "RateLimit-Reset")
        assert reset.isdigit() and 0 < int(reset) <= 900
        seen.append(header(result, "RateLimit-Remaining"))
    assert seen == ["2", "1", "0"]
    assert_rejected_sse(await sse_post(server, {"message": "hi"}), 3)


async def test_users_and_addresses_have_separate_budgets(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET, rate_limit__authenticated_limit=2,
                               rate_limit__anonymous_limit=3)
    for remaining in ("1", "0"):
        result = await sse_post(server, {"message": "a"}, headers=bearer("user-a"))
        assert result.status == 200
        assert (header(result, "RateLimit-Limit"), header(result, "RateLimit-Remaining")) == ("2", remaining)
    assert_rejected_sse(await sse_post(server, {"message": "a"}, headers=bearer("user-a")), 2)
    # the same user over Socket.IO (handshake or payload token) shares that budget
    client = await socket_client(server, auth={"token": token("user-a")})
    assert_rejected_socket(await client.chat({"message": "a"}))
    anonymous_socket = await socket_client(server)
    assert_rejected_socket(await anonymous_socket.chat({"message": "a", "token": token("user-a")}))

    # user B, from the same address, has a budget of its own
    result = await sse_post(server, {"message": "b"}, headers=bearer("user-b"))
    assert (result.status, header(result, "RateLimit-Remaining")) == (200, "1")
    name, _ = (await anonymous_socket.chat({"message": "b", "token": token("user-b")}))[-1]
    assert name == "ai:complete"
    assert_rejected_sse(await sse_post(server, {"message": "b"}, headers=bearer("user-b")), 2)

    # anonymous requests from that address: the address budget, untouched by the users
    result = await sse_post(server, {"message": "anon"})
    assert result.status == 200
    assert (header(result, "RateLimit-Limit"), header(result, "RateLimit-Remaining")) == ("3", "2")
    assert (await anonymous_socket.chat({"message": "anon"}))[-1][0] == "ai:complete"
    assert len(upstream.requests) == 2 + 2 + 2


async def test_invalid_requests_do_not_use_the_budget(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET, rate_limit__anonymous_limit=2,
                               rate_limit__authenticated_limit=1)
    owned = await sse_post(server, {"message": "mine", "sessionId": "owned-session"}, headers=bearer("owner"))
    assert owned.status == 200

    client = await socket_client(server)
    for _ in range(3):
        for raw in (b"{not json", b"[1, 2]", b""):
            assert (await sse_post(server, None, raw=raw)).body["code"] == "invalid_json"
        for payload in ({"message": ""}, {"message": "   "}, {"message": 5}, {"message": "x" * 8001},
                        {"message": "hi", "sessionId": "bad id!"}):
            assert (await sse_post(server, payload)).body["code"] == "invalid_request"
            assert (await client.chat(payload))[-1][1]["code"] == "invalid_request"
        assert (await client.chat("not an object"))[-1][1]["code"] == "invalid_request"
        bad = await sse_post(server, {"message": "hi"}, headers={"Authorization": "Bearer abc.def"})
        assert bad.body["code"] == "invalid_token"
        assert (await client.chat({"message": "hi", "token": "abc.def"}))[-1][1]["code"] == "invalid_token"
        # someone else's session
        assert (await sse_post(server, {"message": "hi", "sessionId": "owned-session"})).status == 404
        assert (await client.chat({"message": "hi", "sessionId": "owned-session"}))[-1][1]["code"] == "not_found"
    # the owner's budget (1) is not touched by a rejected request with a valid token either
    assert (await sse_post(server, {"message": "x" * 8001}, headers=bearer("owner2"))).status == 400
    assert (await sse_post(server, {"message": "ok"}, headers=bearer("owner2"))).status == 200

    assert len(upstream.requests) == 2
    first = await sse_post(server, {"message": "ok"})
    assert (first.status, header(first, "RateLimit-Remaining")) == (200, "1")
    assert (await client.chat({"message": "ok"}))[-1][0] == "ai:complete"
    assert_rejected_sse(await sse_post(server, {"message": "ok"}), 2)


async def test_forwarded_for_is_honoured_when_trusted(make_server, upstream, socket_client):
    server = await make_server(server__trust_proxy_headers="true", rate_limit__anonymous_limit=1, **QUICK_POLL)
    one = {"X-Forwarded-For": "203.0.113.1"}
    two = {"X-Forwarded-For": "203.0.113.2"}
    assert (await sse_post(server, {"message": "hi"}, headers=one)).status == 200
    assert_rejected_sse(await sse_post(server, {"message": "hi"}, headers=one), 1)
    assert (await sse_post(server, {"message": "hi"}, headers=two)).status == 200
    assert_rejected_sse(await sse_post(server, {"message": "hi"}, headers=two), 1)
    # the proxy's own entry (the last one) counts, not what the client put in front of it
    assert_rejected_sse(await sse_post(server, {"message": "hi"}, headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.1"}),
                        1)

    # the Socket.IO handshake headers decide the address of the connection
    three = await socket_client(server, headers={"X-Forwarded-For": "203.0.113.3"})
    assert (await three.chat({"message": "hi"}))[-1][0] == "ai:complete"
    assert_rejected_socket(await three.chat({"message": "hi"}))
    same_as_one = await socket_client(server, headers=one)
    assert_rejected_socket(await same_as_one.chat({"message": "hi"}))
    polling = await socket_client(server, transport="polling", headers={"X-Forwarded-For": "203.0.113.4"})
    assert (await polling.chat({"message": "hi"}))[-1][0] == "ai:complete"
    assert len(upstream.requests) == 4


async def test_forwarded_for_is_ignored_by_default(make_server, upstream, socket_client):
    server = await make_server(rate_limit__anonymous_limit=1, **QUICK_POLL)
    assert (await sse_post(server, {"message": "hi"})).status == 200
    for spoof in ({"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8, 198.51.100.9"},
                  {"X-Real-IP": "198.51.100.10"}):
        assert_rejected_sse(await sse_post(server, {"message": "hi"}, headers=spoof), 1)
        client = await socket_client(server, headers=spoof)
        assert_rejected_socket(await client.chat({"message": "hi"}))
    polling = await socket_client(server, transport="polling", headers={"X-Forwarded-For": "198.51.100.11"})
    assert_rejected_socket(await polling.chat({"message": "hi"}))
    assert len(upstream.requests) == 1
