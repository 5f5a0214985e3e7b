"""Serve mongoeco's MongoDB wire protocol until terminated (run by tests/mongo_server.py).

Runs under .mongo-venv's Python (3.13+), not the project's venv, because mongoeco needs 3.13.
Usage: python mongoeco_server_main.py HOST PORT [SQLITE_PATH]  (no path: memory engine)
"""

import asyncio
import signal
import sys


async def serve(host: str, port: int, sqlite_path: str | None) -> None:
    from mongoeco.wire import AsyncMongoEcoProxyServer

    engine = None
    if sqlite_path:
        from mongoeco.engines import SQLiteEngine

        engine = SQLiteEngine(sqlite_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with AsyncMongoEcoProxyServer(engine=engine, host=host, port=port) as server:
        print(f"mongoeco listening on {server.address.uri}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
