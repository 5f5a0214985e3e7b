"""The MongoDB store, for deployments with several server processes sharing one database.

Written once against the collection API that motor's AsyncIOMotorClient and pymongo's
AsyncMongoClient share (awaitable find_one, insert_many, update_one, ...); only building
and closing the client differ. Like the SQLite store, a turn costs three round trips at
most (begin, a checkpoint every few seconds, finish), never one per chunk.

Collections:
  sessions  {_id: sessionId, owner, title, createdAt, updatedAt, messageCount, fence}
  messages  {_id: message id, sessionId, seq, role, content, status, createdAt, updatedAt,
             model, usage, ttftMs}
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pymongo
from bson.errors import BSONError
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from services.store.base import (
    STATUS_COMPLETE,
    STATUS_PARTIAL,
    ChatStore,
    ContextMessage,
    Fence,
    FencedOut,
    FinishedMessage,
    MessageRecord,
    NewTurn,
    OwnershipConflict,
    SessionContext,
    SessionRecord,
    SessionSummary,
    StoreError,
    make_title,
)

DRIVERS = ("motor", "pymongo")

_MESSAGE_FIELDS = {
    "sessionId": 1, "role": 1, "content": 1, "status": 1, "createdAt": 1, "model": 1, "usage": 1, "ttftMs": 1,
}


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn every error into StoreError so callers handle one exception type."""
    try:
        yield
    except StoreError:
        raise
    except (PyMongoError, BSONError) as exc:
        # pymongo's messages name hosts, never the credentials of the URI
        raise StoreError(f"mongodb {action}: {exc}") from exc
    except Exception as exc:  # an encoding error, a driver bug...: still the store failing
        raise StoreError(f"mongodb {action}: {type(exc).__name__}") from exc


def _message(doc: dict[str, Any]) -> MessageRecord:
    return MessageRecord(
        id=doc["_id"],
        session_id=doc["sessionId"],
        role=doc["role"],
        content=doc["content"],
        status=doc["status"],
        created_at=doc["createdAt"],
        model=doc.get("model"),
        usage=doc.get("usage"),
        ttft_ms=doc.get("ttftMs"),
    )


class MongoStore(ChatStore):
    def __init__(
        self,
        uri: str,
        database: str,
        driver: str,
        *,
        server_selection_timeout_ms: int = 3000,
        connect_timeout_ms: int = 3000,
        socket_timeout_ms: int = 5000,
    ) -> None:
        if driver not in DRIVERS:
            raise ValueError(f"unknown MongoDB driver {driver!r}, expected one of {DRIVERS}")
        self._uri = uri
        self._database_name = database
        self._driver = driver
        # short timeouts: an outage must fail a request in seconds, not hang it for the
        # driver's 30 s default
        self._client_options: dict[str, Any] = {
            "serverSelectionTimeoutMS": server_selection_timeout_ms,
            "connectTimeoutMS": connect_timeout_ms,
            "socketTimeoutMS": socket_timeout_ms,
            # aware UTC datetimes on read, like the SQLite store returns
            "tz_aware": True,
            "tzinfo": UTC,
        }
        # the URI may hold a password: never log it
        self.description = f"mongodb ({driver}) database {database}"
        self._client: Any = None
        self._db: Any = None

    def _new_client(self) -> Any:
        if self._driver == "motor":
            # imported only when chosen, so pymongo-only deployments need not install motor
            from motor.motor_asyncio import AsyncIOMotorClient

            return AsyncIOMotorClient(self._uri, **self._client_options)
        return pymongo.AsyncMongoClient(self._uri, **self._client_options)

    @property
    def _sessions(self) -> Any:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db["sessions"]

    @property
    def _messages(self) -> Any:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db["messages"]

    async def open(self) -> None:
        if self._client is None:
            with _translated("connect"):  # a malformed URI raises here
                self._client = self._new_client()
            self._db = self._client[self._database_name]
        try:
            with _translated("create indexes"):
                # create_index is a no-op when the same index exists, so open() is idempotent
                await self._messages.create_index([("sessionId", 1), ("seq", 1)], unique=True)
                await self._sessions.create_index([("owner", 1), ("updatedAt", -1)])
        except StoreError:
            await self.close()
            raise

    async def close(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            result = client.close()  # motor: plain call; pymongo async: a coroutine
            if inspect.isawaitable(result):
                await result

    async def ping(self) -> None:
        if self._client is None:
            raise StoreError("the store is closed")
        with _translated("ping"):
            await self._client.admin.command("ping")

    async def load_context(self, session_id: str, limit: int) -> SessionContext | None:
        with _translated("load context"):
            session = await self._sessions.find_one({"_id": session_id}, {"owner": 1})
            if session is None:
                return None
            docs: list[dict[str, Any]] = []
            if limit > 0:  # MongoDB reads limit 0 as "no limit"
                # the newest `limit` with text (skips empty placeholders), then back to oldest first
                cursor = (
                    self._messages.find({"sessionId": session_id, "content": {"$ne": ""}}, {"role": 1, "content": 1})
                    .sort("seq", -1)
                    .limit(limit)
                )
                docs = await cursor.to_list(length=limit)
        return SessionContext(
            owner=session.get("owner"),
            messages=[ContextMessage(doc["role"], doc["content"]) for doc in reversed(docs)],
        )

    async def begin_turn(self, turn: NewTurn) -> None:
        now = turn.created_at
        selector: dict[str, Any] = {"_id": turn.session_id}
        changes: dict[str, Any] = {"updatedAt": now}
        if turn.fence is not None:
            # a session with a higher number does not match: the upsert then collides on _id
            selector["fence"] = {"$not": {"$gt": turn.fence}}
            changes["fence"] = turn.fence
        with _translated("begin turn"):
            # one atomic upsert creates the session if new and reserves two seq numbers, so
            # concurrent turns on one session never collide on (sessionId, seq)
            try:
                session = await self._sessions.find_one_and_update(
                    selector,
                    {
                        "$setOnInsert": {"owner": turn.owner, "title": make_title(turn.user_content), "createdAt": now},
                        "$inc": {"messageCount": 2},
                        "$set": changes,
                    },
                    projection={"messageCount": 1, "owner": 1},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                if turn.fence is None:
                    raise
                raise FencedOut(f"session {turn.session_id}: fencing number {turn.fence} is outdated") from None
            if session.get("owner") != turn.owner:
                # another process created this session for someone else a moment ago (or an
                # anonymous one, which a user must not write into)
                raise OwnershipConflict(f"session {turn.session_id} belongs to another caller")
            count = session["messageCount"]
            # not one transaction (that needs a replica set); if this insert fails the session
            # merely keeps a gap in its seq numbers, which ordering tolerates
            await self._messages.insert_many(
                [
                    {
                        "_id": turn.user_message_id, "sessionId": turn.session_id, "seq": count - 1,
                        "role": "user", "content": turn.user_content, "status": STATUS_COMPLETE,
                        "createdAt": now, "updatedAt": now, "model": None,
                    },
                    {
                        "_id": turn.assistant_message_id, "sessionId": turn.session_id, "seq": count,
                        "role": "assistant", "content": "", "status": STATUS_PARTIAL,
                        "createdAt": now, "updatedAt": now, "model": turn.model,
                    },
                ]
            )

    async def _check_fence(self, session_id: str, number: int) -> None:
        # not atomic with the write that follows (that needs a transaction); the window is
        # one round trip, against a lock that was lost lock_ttl_seconds ago
        newer = await self._sessions.find_one({"_id": session_id, "fence": {"$gt": number}}, {"fence": 1})
        if newer is not None:
            raise FencedOut(f"session {session_id}: fencing number {number} is older than {newer['fence']}")

    async def checkpoint(self, message_id: str, content: str, fence: Fence | None = None) -> None:
        with _translated("checkpoint"):
            if fence is not None:
                await self._check_fence(fence.session_id, fence.number)
            await self._messages.update_one(
                {"_id": message_id}, {"$set": {"content": content, "updatedAt": datetime.now(UTC)}}
            )

    async def finish_message(self, finished: FinishedMessage) -> None:
        now = finished.finished_at
        with _translated("finish message"):
            if finished.fence is not None:
                await self._check_fence(finished.session_id, finished.fence)
            await self._messages.update_one(
                {"_id": finished.message_id},
                {
                    "$set": {
                        "content": finished.content,
                        "status": finished.status,
                        "updatedAt": now,
                        "usage": finished.usage or None,
                        "ttftMs": finished.ttft_ms,
                    }
                },
            )
            await self._sessions.update_one({"_id": finished.session_id}, {"$set": {"updatedAt": now}})

    async def get_session(self, session_id: str) -> SessionRecord | None:
        with _translated("get session"):
            session = await self._sessions.find_one({"_id": session_id})
            if session is None:
                return None
            docs = await self._messages.find({"sessionId": session_id}, _MESSAGE_FIELDS).sort("seq", 1).to_list(None)
        return SessionRecord(
            id=session_id,
            owner=session.get("owner"),
            title=session["title"],
            created_at=session["createdAt"],
            updated_at=session["updatedAt"],
            messages=[_message(doc) for doc in docs],
        )

    async def get_owner(self, session_id: str) -> tuple[bool, str | None]:
        with _translated("get owner"):
            session = await self._sessions.find_one({"_id": session_id}, {"owner": 1})
        return (False, None) if session is None else (True, session.get("owner"))

    async def get_message(self, message_id: str) -> tuple[MessageRecord, str | None] | None:
        with _translated("get message"):
            doc = await self._messages.find_one({"_id": message_id}, _MESSAGE_FIELDS)
            if doc is None:
                return None
            session = await self._sessions.find_one({"_id": doc["sessionId"]}, {"owner": 1})
        # a message whose session is gone (delete in progress) counts as absent, as with the SQL join
        return None if session is None else (_message(doc), session.get("owner"))

    async def list_sessions(self, owner: str, limit: int = 100) -> list[SessionSummary]:
        if limit <= 0:  # MongoDB reads limit 0 as "no limit"
            return []
        with _translated("list sessions"):
            cursor = (
                self._sessions.find({"owner": owner}, {"title": 1, "updatedAt": 1, "messageCount": 1})
                .sort("updatedAt", -1)
                .limit(limit)
            )
            docs = await cursor.to_list(length=limit)
        return [SessionSummary(d["_id"], d["title"], d["updatedAt"], d["messageCount"]) for d in docs]

    async def delete_session(self, session_id: str) -> bool:
        with _translated("delete session"):
            # messages first: a failure in between leaves an empty session, never orphan messages
            await self._messages.delete_many({"sessionId": session_id})
            result = await self._sessions.delete_one({"_id": session_id})
        return result.deleted_count > 0
