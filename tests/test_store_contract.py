"""One contract for every ChatStore: SQLite, and MongoDB through motor and through pymongo.

Each MongoDB case gets a fresh database on the shared test server (tests/mongo_server.py),
so cases never see each other's data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pymongo
import pytest
from pymongo import uri_parser

from services.store.base import (
    STATUS_COMPLETE,
    STATUS_ERROR,
    STATUS_PARTIAL,
    ChatStore,
    ContextMessage,
    Fence,
    FencedOut,
    FinishedMessage,
    NewTurn,
    OwnershipConflict,
    StoreError,
)
from services.store.mongo_store import MongoStore
from services.store.sqlite_store import SqliteStore
from tests.mongo_server import new_database_name
from tests.tcp_relay import Relay, relayed_uri

# millisecond precision: MongoDB keeps no more
T0 = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
SHORT_TIMEOUTS = {"server_selection_timeout_ms": 500, "connect_timeout_ms": 500, "socket_timeout_ms": 1000}


@dataclass
class Backend:
    kind: str  # "sqlite", "motor" or "pymongo"
    make: Callable[..., ChatStore]  # a new, unopened store on the same file or database
    location: str  # the sqlite file, or the MongoDB URI
    database: str | None = None


@pytest.fixture(params=["sqlite", "motor", "pymongo"], ids=["sqlite", "mongo-motor", "mongo-pymongo"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Backend:
    if request.param == "sqlite":
        path = str(tmp_path / "chat.db")
        return Backend("sqlite", lambda: SqliteStore(path), path)
    uri = request.getfixturevalue("mongodb_uri")
    database = new_database_name()
    driver = request.param
    return Backend(driver, lambda **kw: MongoStore(uri, database, driver, **kw), uri, database)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[ChatStore]:
    chat_store = backend.make()
    await chat_store.open()
    try:
        yield chat_store
    finally:
        await chat_store.close()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_turn(session_id: str, n: int, owner: str | None = "alice", when: datetime = T0, content: str = "") -> NewTurn:
    return NewTurn(
        session_id=session_id,
        owner=owner,
        user_message_id=f"{session_id}-u{n}",
        user_content=content or f"question {n} of {session_id}",
        assistant_message_id=f"{session_id}-a{n}",
        model="test-model",
        created_at=when,
    )


def finished(turn: NewTurn, content: str, when: datetime, status: str = STATUS_COMPLETE, **extra) -> FinishedMessage:
    return FinishedMessage(
        message_id=turn.assistant_message_id,
        session_id=turn.session_id,
        content=content,
        status=status,
        finished_at=when,
        **extra,
    )


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0), value


async def test_absent_things(store: ChatStore) -> None:
    assert await store.load_context("nope", 10) is None
    assert await store.get_session("nope") is None
    assert await store.get_message("nope") is None
    assert await store.list_sessions("nobody") == []
    assert await store.delete_session("nope") is False
    assert await store.get_owner("nope") == (False, None)


async def test_get_owner_tells_existence_and_owner(store: ChatStore) -> None:
    await store.begin_turn(new_turn("owned", 1, owner="alice"))
    await store.begin_turn(new_turn("anon", 1, owner=None))
    assert await store.get_owner("owned") == (True, "alice")
    assert await store.get_owner("anon") == (True, None)
    await store.delete_session("owned")
    assert await store.get_owner("owned") == (False, None)


async def test_begin_turn_creates_the_session(store: ChatStore) -> None:
    turn = new_turn("s1", 1, content="  Hello\n  wide   world  ")
    await store.begin_turn(turn)

    session = await store.get_session("s1")
    assert session is not None
    assert (session.id, session.owner, session.title) == ("s1", "alice", "Hello wide world")
    assert session.created_at == T0 and session.updated_at == T0
    assert_utc(session.created_at)
    assert_utc(session.updated_at)
    user, assistant = session.messages
    assert (user.id, user.role, user.content, user.status) == ("s1-u1", "user", turn.user_content, STATUS_COMPLETE)
    assert (assistant.id, assistant.role, assistant.content, assistant.status, assistant.model) == (
        "s1-a1", "assistant", "", STATUS_PARTIAL, "test-model"
    )
    for message in session.messages:
        assert message.session_id == "s1"
        assert message.created_at == T0
        assert_utc(message.created_at)
        assert message.usage is None and message.ttft_ms is None


async def test_long_first_message_makes_a_short_title(store: ChatStore) -> None:
    await store.begin_turn(new_turn("s1", 1, content="word " * 100))
    session = await store.get_session("s1")
    assert session is not None
    assert len(session.title) == 80 and session.title.endswith("…")


async def test_later_turns_keep_owner_and_title_and_order(store: ChatStore) -> None:
    await store.begin_turn(new_turn("s1", 1, owner="alice", when=at(0), content="first"))
    await store.begin_turn(new_turn("s1", 2, owner="alice", when=at(10), content="second"))
    await store.begin_turn(new_turn("s1", 3, owner="alice", when=at(20), content="third"))

    session = await store.get_session("s1")
    assert session is not None
    assert (session.owner, session.title) == ("alice", "first")
    assert session.created_at == at(0) and session.updated_at == at(20)
    assert [m.id for m in session.messages] == ["s1-u1", "s1-a1", "s1-u2", "s1-a2", "s1-u3", "s1-a3"]
    assert [m.role for m in session.messages] == ["user", "assistant"] * 3
    [summary] = await store.list_sessions("alice")
    assert summary.message_count == 6


async def test_anonymous_session_has_no_owner(store: ChatStore) -> None:
    await store.begin_turn(new_turn("anon", 1, owner=None))
    context = await store.load_context("anon", 10)
    assert context is not None and context.owner is None
    found = await store.get_message("anon-u1")
    assert found is not None and found[1] is None


async def test_a_turn_never_lands_in_another_users_session(store: ChatStore) -> None:
    # two writers raced to create the same session id; the second one must not write into it
    await store.begin_turn(new_turn("raced", 1, owner="alice"))
    with pytest.raises(OwnershipConflict):
        await store.begin_turn(new_turn("raced", 2, owner="bob"))
    with pytest.raises(OwnershipConflict):
        await store.begin_turn(new_turn("raced", 3, owner=None))
    session = await store.get_session("raced")
    assert session is not None and session.owner == "alice"
    assert [m.id for m in session.messages] == ["raced-u1", "raced-a1"]
    # an anonymous session takes anonymous turns only: a user's words would be readable by
    # anyone holding the id (API.md, Sessions and history)
    await store.begin_turn(new_turn("open", 1, owner=None))
    await store.begin_turn(new_turn("open", 2, owner=None))
    with pytest.raises(OwnershipConflict):
        await store.begin_turn(new_turn("open", 3, owner="bob"))
    open_session = await store.get_session("open")
    assert open_session is not None and open_session.owner is None
    assert len(open_session.messages) == 4


async def test_load_context_is_the_last_messages_with_text_oldest_first(store: ChatStore) -> None:
    turns = [new_turn("s1", n, when=at(n), content=f"q{n}") for n in (1, 2, 3)]
    for turn in turns:
        await store.begin_turn(turn)
    await store.finish_message(finished(turns[0], "a1", at(1.5)))
    await store.finish_message(finished(turns[1], "a2", at(2.5)))
    # turns[2]'s answer is still the empty placeholder

    context = await store.load_context("s1", 100)
    assert context is not None and context.owner == "alice"
    assert context.messages == [
        ContextMessage("user", "q1"),
        ContextMessage("assistant", "a1"),
        ContextMessage("user", "q2"),
        ContextMessage("assistant", "a2"),
        ContextMessage("user", "q3"),
    ]
    limited = await store.load_context("s1", 3)
    assert limited is not None
    assert limited.messages == [
        ContextMessage("user", "q2"), ContextMessage("assistant", "a2"), ContextMessage("user", "q3")
    ]
    one = await store.load_context("s1", 1)
    assert one is not None and one.messages == [ContextMessage("user", "q3")]
    none = await store.load_context("s1", 0)
    assert none is not None and none.owner == "alice" and none.messages == []


async def test_checkpoint_saves_text_so_far(store: ChatStore) -> None:
    turn = new_turn("s1", 1)
    await store.begin_turn(turn)
    await store.checkpoint(turn.assistant_message_id, "Once upon")
    await store.checkpoint(turn.assistant_message_id, "Once upon a time")

    found = await store.get_message(turn.assistant_message_id)
    assert found is not None
    message, owner = found
    assert (message.content, message.status, owner) == ("Once upon a time", STATUS_PARTIAL, "alice")
    context = await store.load_context("s1", 10)
    assert context is not None and context.messages[-1] == ContextMessage("assistant", "Once upon a time")


async def test_finish_message_stores_final_text_status_usage_ttft(store: ChatStore) -> None:
    first, second = new_turn("s1", 1, when=at(0)), new_turn("s1", 2, when=at(10))
    await store.begin_turn(first)
    await store.begin_turn(second)
    usage = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
    await store.checkpoint(first.assistant_message_id, "half")
    await store.finish_message(finished(first, "the whole answer", at(5), usage=usage, ttft_ms=123.5))
    await store.finish_message(finished(second, "", at(30), status=STATUS_ERROR))

    found = await store.get_message(first.assistant_message_id)
    assert found is not None
    message, owner = found
    assert owner == "alice"
    assert (message.id, message.session_id, message.role) == ("s1-a1", "s1", "assistant")
    assert (message.content, message.status, message.usage, message.ttft_ms) == (
        "the whole answer", STATUS_COMPLETE, usage, 123.5
    )
    assert message.model == "test-model" and message.created_at == at(0)
    found = await store.get_message(second.assistant_message_id)
    assert found is not None
    assert (found[0].content, found[0].status, found[0].usage, found[0].ttft_ms) == ("", STATUS_ERROR, None, None)

    session = await store.get_session("s1")
    assert session is not None
    assert session.updated_at == at(30) and session.created_at == at(0)
    assert [m.status for m in session.messages] == [STATUS_COMPLETE, STATUS_COMPLETE, STATUS_COMPLETE, STATUS_ERROR]
    assert [m.content for m in session.messages] == [first.user_content, "the whole answer", second.user_content, ""]


async def test_writes_with_an_older_fencing_number_are_refused(store: ChatStore) -> None:
    # node A took the session with fence 5, lost its lock; node B took it with fence 7
    stale = dataclasses.replace(new_turn("s1", 1, when=at(0)), fence=5)
    await store.begin_turn(stale)
    await store.checkpoint(stale.assistant_message_id, "A so far", Fence("s1", 5))
    newer = dataclasses.replace(new_turn("s1", 2, when=at(10)), fence=7)
    await store.begin_turn(newer)
    with pytest.raises(FencedOut):
        await store.checkpoint(stale.assistant_message_id, "A, later", Fence("s1", 5))
    with pytest.raises(FencedOut):
        await store.finish_message(finished(stale, "A's whole answer", at(20), fence=5))
    with pytest.raises(FencedOut):
        await store.begin_turn(dataclasses.replace(new_turn("s1", 3, when=at(30)), fence=6))
    await store.checkpoint(newer.assistant_message_id, "B so far", Fence("s1", 7))
    await store.finish_message(finished(newer, "B's answer", at(15), fence=7))

    session = await store.get_session("s1")
    assert session is not None
    assert [(m.content, m.status) for m in session.messages] == [
        (stale.user_content, STATUS_COMPLETE), ("A so far", STATUS_PARTIAL),
        (newer.user_content, STATUS_COMPLETE), ("B's answer", STATUS_COMPLETE),
    ]
    assert session.updated_at == at(15)  # the refused writes changed nothing
    # unfenced writes (one process) and other sessions are never refused
    await store.begin_turn(dataclasses.replace(new_turn("s2", 1), fence=1))
    await store.checkpoint("s1-a1", "unfenced")
    assert (await store.get_message("s1-a1"))[0].content == "unfenced"  # type: ignore[index]


async def test_get_message_returns_record_and_owner(store: ChatStore) -> None:
    await store.begin_turn(new_turn("s1", 1, owner="alice"))
    await store.begin_turn(new_turn("s2", 1, owner="bob"))
    found = await store.get_message("s2-u1")
    assert found is not None
    message, owner = found
    assert owner == "bob"
    assert (message.id, message.session_id, message.role, message.status) == ("s2-u1", "s2", "user", STATUS_COMPLETE)
    assert_utc(message.created_at)


async def test_list_sessions_only_the_owners_newest_first(store: ChatStore) -> None:
    s1, s2, s3 = (new_turn(f"s{n}", 1, owner="alice", when=at(n), content=f"title {n}") for n in (1, 2, 3))
    for turn in (s1, s2, s3):
        await store.begin_turn(turn)
    await store.begin_turn(new_turn("b1", 1, owner="bob", when=at(4)))
    await store.begin_turn(new_turn("anon", 1, owner=None, when=at(5)))
    await store.begin_turn(new_turn("s2", 2, owner="alice", when=at(6)))
    await store.finish_message(finished(s1, "answer", at(7)))  # s1 is now the most recent

    sessions = await store.list_sessions("alice")
    assert [s.id for s in sessions] == ["s1", "s2", "s3"]
    assert [s.title for s in sessions] == ["title 1", "title 2", "title 3"]
    assert [s.message_count for s in sessions] == [2, 4, 2]
    assert [s.updated_at for s in sessions] == [at(7), at(6), at(3)]
    for summary in sessions:
        assert_utc(summary.updated_at)
    assert [s.id for s in await store.list_sessions("alice", limit=2)] == ["s1", "s2"]
    assert [s.id for s in await store.list_sessions("bob")] == ["b1"]


async def test_delete_session_removes_it_and_its_messages(store: ChatStore) -> None:
    turn = new_turn("s1", 1)
    await store.begin_turn(turn)
    await store.begin_turn(new_turn("s2", 1))
    await store.finish_message(finished(turn, "answer", at(1)))

    assert await store.delete_session("s1") is True
    assert await store.get_session("s1") is None
    assert await store.load_context("s1", 10) is None
    assert await store.get_message("s1-u1") is None
    assert await store.get_message("s1-a1") is None
    assert [s.id for s in await store.list_sessions("alice")] == ["s2"]
    assert await store.delete_session("s1") is False
    # the other session is untouched, and the id can be used again from scratch
    other = await store.get_session("s2")
    assert other is not None and len(other.messages) == 2
    await store.begin_turn(new_turn("s1", 1, owner="carol", content="again"))
    reborn = await store.get_session("s1")
    assert reborn is not None and (reborn.owner, reborn.title, len(reborn.messages)) == ("carol", "again", 2)


async def test_text_the_store_cannot_encode_is_a_store_error(store: ChatStore) -> None:
    # not only the driver's own errors: an encoding error (here a lone surrogate, which
    # UTF-8 cannot carry) must reach the chat service as StoreError too
    with pytest.raises(StoreError):
        await store.begin_turn(new_turn("bad", 1, content="lone \ud800 surrogate"))
    turn = new_turn("s1", 1)
    await store.begin_turn(turn)
    with pytest.raises(StoreError):
        await store.finish_message(finished(turn, "answer \udfff", at(1)))
    await store.ping()  # and the store still works


async def test_reused_message_id_is_a_store_error(store: ChatStore) -> None:
    await store.begin_turn(new_turn("s1", 1))
    with pytest.raises(StoreError):
        await store.begin_turn(new_turn("s1", 1))


async def test_ping(store: ChatStore) -> None:
    await store.ping()
    assert store.description


async def test_sqlite_unusable_path_is_a_store_error(tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    chat_store = SqliteStore(str(tmp_path / "a-file" / "chat.db"))  # its directory cannot exist
    with pytest.raises(StoreError):
        await chat_store.open()
    await chat_store.close()


async def test_closed_store_raises_store_error(backend: Backend) -> None:
    chat_store = backend.make()
    await chat_store.open()
    await chat_store.close()
    with pytest.raises(StoreError):
        await chat_store.ping()
    with pytest.raises(StoreError):
        await chat_store.load_context("s1", 10)
    with pytest.raises(StoreError):
        await chat_store.begin_turn(new_turn("s1", 1))


async def test_sqlite_closed_store_cannot_be_reopened(tmp_path) -> None:
    chat_store = SqliteStore(str(tmp_path / "chat.db"))
    await chat_store.open()
    await chat_store.close()
    with pytest.raises(StoreError):  # its thread has ended: an error, not a wait forever
        await asyncio.wait_for(chat_store.open(), 10)


async def test_data_survives_a_restart(backend: Backend) -> None:
    turn = new_turn("s1", 1, content="remember me")
    first = backend.make()
    await first.open()
    try:
        await first.begin_turn(turn)
        await first.finish_message(finished(turn, "I will", at(1), usage={"total_tokens": 3}, ttft_ms=7.0))
    finally:
        await first.close()

    second = backend.make()
    await second.open()
    try:
        session = await second.get_session("s1")
        assert session is not None
        assert (session.owner, session.title) == ("alice", "remember me")
        assert [(m.content, m.status) for m in session.messages] == [
            ("remember me", STATUS_COMPLETE), ("I will", STATUS_COMPLETE)
        ]
        assert session.messages[1].usage == {"total_tokens": 3} and session.messages[1].ttft_ms == 7.0
        # numbering continues after the restart
        await second.begin_turn(new_turn("s1", 2, when=at(2)))
        session = await second.get_session("s1")
        assert session is not None and [m.id for m in session.messages][-2:] == ["s1-u2", "s1-a2"]
    finally:
        await second.close()


async def test_open_twice_is_idempotent(store: ChatStore, backend: Backend) -> None:
    await store.begin_turn(new_turn("s1", 1))
    await store.open()
    await store.open()
    await store.begin_turn(new_turn("s1", 2, when=at(1)))
    session = await store.get_session("s1")
    assert session is not None and len(session.messages) == 4

    if backend.kind == "sqlite":
        with sqlite3.connect(backend.location) as db:
            indexes = {row[1]: row[2] for row in db.execute("PRAGMA index_list(messages)")}
        assert indexes["messages_by_session"] == 1  # unique
    else:
        with pymongo.MongoClient(backend.location, serverSelectionTimeoutMS=5000) as client:
            db = client[backend.database]
            messages = db.messages.index_information()
            sessions = db.sessions.index_information()
        by_key = {tuple(tuple(k) for k in info["key"]): info for info in messages.values()}
        assert by_key[(("sessionId", 1), ("seq", 1))].get("unique") is True
        assert any(
            tuple(tuple(k) for k in info["key"]) == (("owner", 1), ("updatedAt", -1)) for info in sessions.values()
        )
        assert len(messages) == 2 and len(sessions) == 2  # _id + ours, nothing duplicated


async def test_concurrent_turns_on_different_sessions_all_persist(store: ChatStore) -> None:
    async def one_turn(n: int) -> None:
        turn = new_turn(f"c{n}", 1, when=at(n), content=f"hello {n}")
        await store.begin_turn(turn)
        await store.checkpoint(turn.assistant_message_id, f"partial {n}")
        await store.finish_message(finished(turn, f"answer {n}", at(n + 100)))

    await asyncio.gather(*(one_turn(n) for n in range(20)))

    sessions = await store.list_sessions("alice")
    assert len(sessions) == 20
    assert [s.id for s in sessions] == [f"c{n}" for n in reversed(range(20))]
    for n in range(20):
        session = await store.get_session(f"c{n}")
        assert session is not None
        assert [(m.content, m.status) for m in session.messages] == [
            (f"hello {n}", STATUS_COMPLETE), (f"answer {n}", STATUS_COMPLETE)
        ]


async def test_concurrent_turns_on_one_session_get_distinct_positions(store: ChatStore) -> None:
    await store.begin_turn(new_turn("s1", 0))
    await asyncio.gather(*(store.begin_turn(new_turn("s1", n, when=at(n))) for n in range(1, 11)))

    session = await store.get_session("s1")
    assert session is not None and len(session.messages) == 22
    # each turn's user message is immediately followed by its own assistant placeholder
    pairs = [(session.messages[i].id, session.messages[i + 1].id) for i in range(0, 22, 2)]
    assert sorted(pairs) == sorted((f"s1-u{n}", f"s1-a{n}") for n in range(11))
    [summary] = await store.list_sessions("alice")
    assert summary.message_count == 22


async def test_a_failing_write_among_concurrent_ones_fails_alone(store: ChatStore, backend: Backend) -> None:
    # calls made together may share one transaction (SQLite's group commit): one that fails
    # must be rolled back alone, and every other one kept
    await store.begin_turn(new_turn("s1", 1))
    await store.begin_turn(new_turn("mine", 1, owner="bob"))
    results = await asyncio.gather(
        *(store.begin_turn(new_turn(f"c{n}", 1, when=at(n))) for n in range(5)),
        store.begin_turn(new_turn("s1", 1, when=at(9))),  # a message id that exists: fails
        store.begin_turn(new_turn("mine", 2, owner="alice", when=at(9))),  # bob's session: fails
        *(store.begin_turn(new_turn(f"d{n}", 1, when=at(n))) for n in range(5)),
        return_exceptions=True,
    )
    assert [r is None for r in results] == [True] * 5 + [False] * 2 + [True] * 5
    assert all(isinstance(r, StoreError) for r in results[5:7])  # the second: an OwnershipConflict
    for session_id in [f"c{n}" for n in range(5)] + [f"d{n}" for n in range(5)]:
        session = await store.get_session(session_id)
        assert session is not None and [m.id for m in session.messages] == [f"{session_id}-u1", f"{session_id}-a1"]
    for session_id, owner in (("s1", "alice"), ("mine", "bob")):
        session = await store.get_session(session_id)
        assert session is not None and session.owner == owner
        assert [m.id for m in session.messages] == [f"{session_id}-u1", f"{session_id}-a1"]
    counts = {s.id: s.message_count for s in await store.list_sessions("alice")}
    assert counts["c0"] == 2 and counts["d4"] == 2
    if backend.kind == "sqlite":  # a transaction: the failed turns' counter updates are undone too
        [bobs] = await store.list_sessions("bob")
        assert counts["s1"] == 2 and bobs.message_count == 2


# --- MongoDB only: failing fast when the server is away ---------------------------------


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("driver", ["motor", "pymongo"])
async def test_mongo_unreachable_fails_fast_with_store_error(driver: str) -> None:
    chat_store = MongoStore(
        f"mongodb://127.0.0.1:{unused_port()}/?directConnection=true", "aichat", driver, **SHORT_TIMEOUTS
    )
    started = time.monotonic()
    with pytest.raises(StoreError):
        await chat_store.open()
    assert time.monotonic() - started < 5
    with pytest.raises(StoreError):
        await chat_store.ping()
    await chat_store.close()


@pytest.mark.parametrize("driver", ["motor", "pymongo"])
async def test_mongo_outage_mid_use_is_a_store_error_then_recovers(driver: str, mongodb_uri: str) -> None:  # noqa: F811
    host, port = uri_parser.parse_uri(mongodb_uri)["nodelist"][0]
    relay = Relay(host, port)
    await relay.start()
    chat_store = MongoStore(relayed_uri(mongodb_uri, relay.port), new_database_name(), driver, **SHORT_TIMEOUTS)
    await chat_store.open()
    try:
        turn = new_turn("s1", 1)
        await chat_store.begin_turn(turn)

        await relay.stop()
        started = time.monotonic()
        with pytest.raises(StoreError):
            await chat_store.checkpoint(turn.assistant_message_id, "lost")
        with pytest.raises(StoreError):
            await chat_store.ping()
        assert time.monotonic() - started < 8

        await relay.start()  # same port: the store reconnects by itself
        deadline = time.monotonic() + 15
        while True:
            try:
                await chat_store.ping()
                break
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await chat_store.finish_message(finished(turn, "back", at(1)))
        found = await chat_store.get_message(turn.assistant_message_id)
        assert found is not None and found[0].content == "back"
    finally:
        await chat_store.close()
        await relay.stop()


def test_mongo_description_hides_the_uri() -> None:
    chat_store = MongoStore("mongodb://admin:s3cret@db.internal:27017/?authSource=admin", "aichat", "motor")
    assert chat_store.description == "mongodb (motor) database aichat"
    assert "s3cret" not in chat_store.description and "db.internal" not in chat_store.description
    with pytest.raises(ValueError):
        MongoStore("mongodb://localhost", "aichat", "mongoengine")


async def test_sqlite_fenced_writes_wait_for_another_process_holding_the_write_lock(tmp_path) -> None:
    """Cluster nodes on one host share one SQLite file: a fenced write (it reads the fence, then
    writes) waits out another connection's write lock within the busy timeout instead of
    failing at once with "database is locked"."""
    store = SqliteStore(str(tmp_path / "shared.sqlite3"))
    await store.open()
    try:
        turn = dataclasses.replace(new_turn("s1", 1), fence=1)
        await store.begin_turn(turn)
        other = sqlite3.connect(tmp_path / "shared.sqlite3", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction

        async def release_later() -> None:
            await asyncio.sleep(0.5)
            other.execute("COMMIT")

        releasing = asyncio.create_task(release_later())
        started = time.monotonic()
        await store.checkpoint(turn.assistant_message_id, "partial text", fence=Fence("s1", 1))
        await store.finish_message(dataclasses.replace(finished(turn, "all of it", T0), fence=1))
        assert time.monotonic() - started >= 0.4  # it waited for the lock, and then succeeded
        await releasing
        other.close()
        session = await store.get_session("s1")
        assert session is not None and session.messages[-1].content == "all of it"
    finally:
        await store.close()
