"""The cluster building blocks against a real redis-server: limiter, session locks, control channel."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from services.cluster.control import ControlChannel
from services.cluster.locks import HeldLock, LockHolder, SessionLocks
from services.cluster.rate_limit import RedisRateLimiter
from services.cluster.redis_client import ClusterUnavailable, Keys, connect
from services.rate_limiter import RateLimiter, RateStatus
from tests.conftest import SseResponse, http_json, read_sse, sse_post, url
from tests.fake_upstream import Script
from tests.redis_server import RedisProcess, key_prefix, redis_url  # noqa: F401  (fixtures)
from tests.test_robustness import SlowStore


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    redis = connect(redis_url)
    yield redis
    await redis.aclose()


class Clock:
    """A time the test moves by hand; quarter seconds are exact in floats and in microseconds."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_redis_limiter_answers_like_the_in_process_one(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    clock = Clock()
    window = 10
    local = RateLimiter(window, clock=clock)
    shared = RedisRateLimiter(client, Keys(key_prefix), window, clock=clock)
    limits = {"ip:a": 3, "ip:b": 5, "user:c": 1}
    rng = random.Random(11)
    refused = 0
    for step in range(1500):
        clock.now += rng.choice((0, 0, 0.25, 0.5, 1, 2.75, 4, 9.75, 10, 12))
        key = rng.choice(list(limits))
        if rng.random() < 0.7:
            expected, got = await local.acquire(key, limits[key]), await shared.acquire(key, limits[key])
        else:
            expected, got = await local.peek(key, limits[key]), await shared.peek(key, limits[key])
        assert got == expected, f"step {step}: {key} at {clock.now}"
        refused += not got.allowed
    assert refused > 100  # the sequence really hit the limits


async def test_redis_limiter_on_redis_time_refuses_past_the_limit(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    limiter = RedisRateLimiter(client, Keys(key_prefix), 60)
    assert await limiter.peek("ip:x", 2) == (await limiter.peek("ip:x", 2))
    first = await limiter.acquire("ip:x", 2)
    second = await limiter.acquire("ip:x", 2)
    third = await limiter.acquire("ip:x", 2)
    assert (first.allowed, first.remaining) == (True, 1)
    assert (second.allowed, second.remaining) == (True, 0)
    assert (third.allowed, third.remaining) == (False, 0)
    assert 0 < third.reset_seconds <= 60 and third.retry_after == third.reset_seconds
    ttl = await client.pttl(Keys(key_prefix).rate("ip:x"))
    assert 0 < ttl <= 60_000  # an idle key goes away by itself
    assert (await limiter.peek("ip:other", 2)).remaining == 2


async def test_session_lock_is_exclusive_fenced_and_released(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    keys = Keys(key_prefix)
    node_a, node_b = SessionLocks(client, keys, "a", 5), SessionLocks(client, keys, "b", 5)
    held = await node_a.acquire("s1", "m1", "alice")
    assert isinstance(held, HeldLock)
    refused = await node_b.acquire("s1", "m2", None)
    assert refused == LockHolder("a", "s1", "m1", "alice", held.fence)
    assert await node_b.generating("m1") == LockHolder("a", "s1", "m1", "alice", held.fence)
    assert await node_b.holder("s1") == refused
    assert await node_a.release(held) is True
    assert await node_b.generating("m1") is None and await node_b.holder("s1") is None
    newer = await node_b.acquire("s1", "m2", None)
    assert isinstance(newer, HeldLock) and newer.fence > held.fence
    assert await node_a.release(held) is False  # a stale release leaves the newer lock alone
    assert (await node_a.holder("s1")) == LockHolder("b", "s1", "m2", None, newer.fence)


async def test_taking_a_lock_uses_the_budget_in_the_same_call(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    keys = Keys(key_prefix)
    limiter = RedisRateLimiter(client, keys, 60)
    node_a, node_b = SessionLocks(client, keys, "a", 5), SessionLocks(client, keys, "b", 5)
    first = await node_a.acquire("s1", "m1", None, limiter.use("ip:x", 2))
    assert isinstance(first, HeldLock) and first.rate == RateStatus(True, 2, 1, 60)
    busy = await node_b.acquire("s1", "m2", None, limiter.use("ip:x", 2))
    assert isinstance(busy, LockHolder)  # a busy session uses no budget
    assert (await limiter.peek("ip:x", 2)).remaining == 1
    second = await node_b.acquire("s2", "m3", None, limiter.use("ip:x", 2))
    assert isinstance(second, HeldLock) and second.rate is not None and second.rate.remaining == 0
    refused = await node_b.acquire("s3", "m4", None, limiter.use("ip:x", 2))
    assert isinstance(refused, RateStatus) and not refused.allowed and refused.retry_after
    assert await node_a.holder("s3") is None and await node_a.generating("m4") is None  # no lock taken
    assert set(node_b.held) == {"s2"}


async def test_locks_renew_in_one_call_and_expire_when_not_renewed(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    keys = Keys(key_prefix)
    node_a, node_b = SessionLocks(client, keys, "a", 0.3), SessionLocks(client, keys, "b", 0.3)
    first = await node_a.acquire("s1", "m1", None)
    second = await node_a.acquire("s2", "m2", None)
    assert isinstance(first, HeldLock) and isinstance(second, HeldLock)
    for _ in range(6):  # 0.6 s, twice the TTL, kept alive by renewal
        await asyncio.sleep(0.1)
        assert await node_a.renew() == []
    assert isinstance(await node_b.acquire("s1", "m3", None), LockHolder)
    await asyncio.sleep(0.45)  # not renewed: both expire
    assert await node_b.generating("m2") is None
    taken = await node_b.acquire("s1", "m3", None)
    assert isinstance(taken, HeldLock)
    assert await node_a.renew() == [first, second]
    assert node_a.held == {}


async def test_blocking_pool_waits_for_a_free_connection(redis_url: str, key_prefix: str) -> None:  # noqa: F811
    redis = connect(redis_url, max_connections=1)
    try:
        # the default pool raises "Too many connections" here at once
        results = await asyncio.gather(*(redis.incr(f"{key_prefix}:n") for _ in range(20)))
    finally:
        await redis.aclose()
    assert sorted(results) == list(range(1, 21))


async def test_control_channel_delivers_to_the_named_node_only(client: aioredis.Redis, key_prefix: str) -> None:  # noqa: F811
    keys = Keys(key_prefix)
    got_a: list[dict[str, Any]] = []
    got_b: list[dict[str, Any]] = []
    node_a = ControlChannel(client, keys, "a", got_a.append)
    node_b = ControlChannel(client, keys, "b", got_b.append)
    node_a.start()
    node_b.start()
    try:
        await asyncio.wait_for(asyncio.gather(node_a.subscribed.wait(), node_b.subscribed.wait()), 5)
        assert await node_b.send("a", {"t": "stop", "s": "s1"}) == 1
        assert await node_b.send("nobody", {"t": "stop", "s": "s1"}) == 0
        await client.publish(keys.node_channel("a"), b"not json")  # ignored, the channel lives on
        for number in range(5):  # order kept
            await node_b.send("a", {"t": "d", "n": number})
        async with asyncio.timeout(5):
            while len(got_a) < 6:
                await asyncio.sleep(0.01)
    finally:
        await node_a.stop()
        await node_b.stop()
    assert got_a == [{"t": "stop", "s": "s1"}] + [{"t": "d", "n": n} for n in range(5)]
    assert got_b == []


async def test_control_channel_subscribes_again_after_redis_restarts(key_prefix: str) -> None:  # noqa: F811
    server = RedisProcess()
    server.start()
    redis = connect(server.url)
    got: list[dict[str, Any]] = []
    node = ControlChannel(redis, Keys(key_prefix), "a", got.append)
    node.start()
    try:
        await asyncio.wait_for(node.subscribed.wait(), 5)
        server.stop()
        with pytest.raises(ClusterUnavailable):
            await node.send("a", {"t": "lost"})
        server.start()
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.05)
                if node.subscribed.is_set():
                    await node.send("a", {"t": "back"})
    finally:
        await node.stop()
        await redis.aclose()
        server.close()
    assert got[0] == {"t": "back"}


async def streaming(server: Any, payload: dict[str, Any]) -> tuple[asyncio.Task[SseResponse], list[dict[str, Any]]]:
    """An SSE chat read in the background, returned once its first frame arrived."""
    frames: list[dict[str, Any]] = []
    running = asyncio.create_task(sse_post(server, payload, on_event=lambda event: frames.append(event) or None))
    async with asyncio.timeout(10):
        while not frames:
            await asyncio.sleep(0.01)
    return running, frames


async def test_two_servers_in_one_process_are_two_nodes(make_server, upstream, redis_url, key_prefix):  # noqa: F811
    # same settings, so the same default node id (host:pid): each still gets its own channel
    cluster = {"cluster__redis_url": redis_url, "cluster__key_prefix": key_prefix, "cluster__lock_ttl_seconds": 1}
    first, second = await make_server(**cluster), await make_server(**cluster)
    upstream.queue(Script(chunks=["one ", "two ", "three ", "four "] * 4 + ["one ", "two ", "three ", "four"],
                          delay=0.05))
    running, frames = await streaming(first, {"message": "hi", "sessionId": "two-servers"})
    busy = await sse_post(second, {"message": "again", "sessionId": "two-servers"})
    assert busy.status == 409
    resumed = SseResponse(0, {})
    async with aiohttp.ClientSession() as session:
        async with session.get(url(second, f"/api/v2/ai/chat/stream/{frames[0]['messageId']}")) as response:
            resumed.status = response.status
            await read_sse(response, resumed)
    origin = await running
    assert not origin.last.get("code") and resumed.events[-1].get("done") is True
    assert resumed.status == 200
    assert resumed.content == origin.content == "one two three four " * 4 + "one two three four"


async def test_a_delete_on_another_node_returns_after_the_answer_there_is_written(
        make_server, upstream, redis_url, key_prefix, tmp_path, caplog):  # noqa: F811
    cluster = {"cluster__redis_url": redis_url, "cluster__key_prefix": key_prefix}
    # the generating node takes half a second for its last write of the answer
    generating = await make_server(store=SlowStore(str(tmp_path / "chat.sqlite3"), finish=0.5), **cluster)
    deleting = await make_server(**cluster)
    upstream.queue(Script(chunks=["word "] * 100, delay=0.05), Script(chunks=["fresh"]))
    running, _ = await streaming(generating, {"message": "long", "sessionId": "deleted"})
    status, _, _ = await http_json(deleting, "DELETE", "/api/v2/ai/chat/sessions/deleted")
    assert status == 204
    # the answer was stopped, written and its session freed before the delete went ahead
    again = await sse_post(deleting, {"message": "start over", "sessionId": "deleted"})
    assert again.status == 200 and again.content == "fresh"
    status, body, _ = await http_json(deleting, "GET", "/api/v2/ai/chat/sessions/deleted")
    assert [m["content"] for m in body["messages"]] == ["start over", "fresh"]
    assert (await asyncio.wait_for(running, 5)).last.get("cancelled") is True
    assert "session moved on" not in caplog.text  # the stopped answer's write was not refused


async def test_under_cancel_the_last_listener_leaving_from_another_node_stops_the_answer(
        make_server, upstream, redis_url, key_prefix):  # noqa: F811
    cluster = {"cluster__redis_url": redis_url, "cluster__key_prefix": key_prefix,
               "ai__on_client_disconnect": "cancel"}
    generating, following = await make_server(**cluster), await make_server(**cluster)
    upstream.queue(Script(chunks=["word "] * 200, delay=0.02))
    origin, frames = await streaming(generating, {"message": "long", "sessionId": "left-everywhere"})
    message_id = frames[0]["messageId"]
    follower_frames: list[dict[str, Any]] = []

    async def follow() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(url(following, f"/api/v2/ai/chat/stream/{message_id}")) as response:
                await read_sse(response, SseResponse(response.status, {}), follower_frames.append)

    follower = asyncio.create_task(follow())
    async with asyncio.timeout(10):
        while not follower_frames:
            await asyncio.sleep(0.01)
    origin.cancel()  # the client on the generating node goes; the follower still listens
    await asyncio.sleep(0.3)
    follower.cancel()  # and now the last one, on the other node
    async with asyncio.timeout(10):
        while generating.app.chat.active_count:
            await asyncio.sleep(0.05)
    _, body, _ = await http_json(generating, "GET", "/api/v2/ai/chat/sessions/left-everywhere")
    answer = body["messages"][-1]
    # stopped when nobody listened any more, not run to its end (200 chunks, 4 s)
    assert answer["status"] == "partial" and 0 < len(answer["content"]) < len("word " * 200), answer
