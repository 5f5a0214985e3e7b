"""A TCP forwarder that can be cut and restored, to simulate a store outage or a dropped connection."""

from __future__ import annotations

import asyncio
from urllib.parse import quote_plus

from pymongo import uri_parser


class Relay:
    """A TCP forwarder to the test MongoDB that can be cut, to simulate an outage mid-use."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        """Drop every connection open now (both sides see it reset); new ones still get through."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


def relayed_uri(uri: str, port: int) -> str:
    """The test URI, through the relay (single node, same credentials)."""
    parsed = uri_parser.parse_uri(uri)
    credentials = ""
    if parsed["username"]:
        credentials = f"{quote_plus(parsed['username'])}:{quote_plus(parsed['password'] or '')}@"
    auth_source = parsed["options"].get("authSource")
    suffix = f"&authSource={quote_plus(auth_source)}" if auth_source else ""
    return f"mongodb://{credentials}127.0.0.1:{port}/?directConnection=true{suffix}"
