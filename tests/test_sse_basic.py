"""Smoke: the SSE endpoint streams the fake upstream's answer."""

from tests.conftest import sse_post


async def test_streams_upstream_answer(server, upstream):
    result = await sse_post(server, {"message": "Hi there"})
    assert result.status == 200, result.body
    assert result.content == "Hello, world!"
    assert result.last["done"] is True
    sent = upstream.requests[0].body
    assert sent["messages"][-1] == {"role": "user", "content": "Hi there"}
    assert sent["stream"] is True
