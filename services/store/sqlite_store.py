"""The embedded store: SQLite in WAL mode, so a single host needs no database server.

All SQL runs on one dedicated thread that owns the connection, so the event loop never
blocks on disk and writes are serialised without locks. Each public method is one job for
that thread and runs its whole transaction there (aiosqlite would cost one hop per
statement); the jobs queued while the thread was busy run as one batch, with one commit and
one wake-up of the event loop for all of them (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    fence INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, updated_at DESC);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    model TEXT,
    usage TEXT,
    ttft_ms REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, seq);
"""

MESSAGE_COLUMNS = "id, session_id, role, content, status, created_at, model, usage, ttft_ms"


def _call(job: _Job, db: sqlite3.Connection) -> tuple[_Job, bool, Any]:
    """Every failure becomes a StoreError: the chat service handles no other kind."""
    try:
        return job, True, job.work(db)
    except StoreError as exc:  # raised by the work itself (OwnershipConflict, ...)
        return job, False, exc
    except sqlite3.Error as exc:
        return job, False, StoreError(f"sqlite: {exc}")
    except Exception as exc:  # MemoryError, OSError, a value SQLite cannot bind...
        return job, False, StoreError(f"sqlite: {type(exc).__name__}: {exc}")


def _deliver(outcomes: list[tuple[_Job, bool, Any]]) -> None:
    """On the event loop: hand each caller its result (unless it stopped waiting)."""
    for job, ok, value in outcomes:
        if job.future.done():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _to_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def _message(row: sqlite3.Row | tuple) -> MessageRecord:
    message_id, session_id, role, content, status, created_at, model, usage, ttft_ms = row
    return MessageRecord(
        id=message_id,
        session_id=session_id,
        role=role,
        content=content,
        status=status,
        created_at=_to_datetime(created_at),
        model=model,
        usage=json.loads(usage) if usage else None,
        ttft_ms=ttft_ms,
    )


class _Job:
    """One store call: its work, run on the store thread, and the future the caller awaits."""

    __slots__ = ("work", "future", "loop", "transaction")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any],
                 loop: asyncio.AbstractEventLoop, transaction: bool) -> None:
        self.work = work
        self.future = future
        self.loop = loop
        self.transaction = transaction


def _check_fence(db: sqlite3.Connection, session_id: str, number: int) -> None:
    """FencedOut if the session has seen a higher fencing number (in the caller's transaction)."""
    row = db.execute("SELECT fence FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is not None and row[0] is not None and row[0] > number:
        raise FencedOut(f"session {session_id}: fencing number {number} is older than {row[0]}")


class SqliteStore(ChatStore):
    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self.description = f"sqlite at {self._path.resolve()}"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    def _submit(self, work: Callable[[sqlite3.Connection], T], transaction: bool = True) -> asyncio.Future[T]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="sqlite-store", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(work, future, loop, transaction))
        return future

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:  # close() stopped the thread: nothing can run any more
            raise StoreError("the store is closed")
        return await self._submit(work)

    # --- the store thread -------------------------------------------------------------

    def _serve(self) -> None:
        """Run every job queued meanwhile as one batch: one transaction, one commit, one wake-up
        of each waiting event loop (group commit). Each job stays atomic on its own (a savepoint),
        so a failing one is rolled back alone and the others are committed as they would be alone."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            batch: list[_Job] = []
            while job is not None:
                # a job whose caller gave up before it ran is dropped, as an executor would
                if not job.future.done():
                    batch.append(job)
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
            stop = job is None
            if batch:
                outcomes = self._run_batch(batch)
                by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
                for outcome in outcomes:
                    by_loop.setdefault(outcome[0].loop, []).append(outcome)
                for loop, delivered in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_deliver, delivered)
                    except RuntimeError:  # that loop is closed: nobody waits any more
                        pass
            if stop:
                return

    def _run_batch(self, batch: list[_Job]) -> list[tuple[_Job, bool, Any]]:
        """(job, ok, result or exception) for every job, in order; open/close run on their own."""
        outcomes: list[tuple[_Job, bool, Any]] = []
        pending: list[_Job] = []
        for job in batch:
            if job.transaction:
                pending.append(job)
            else:
                outcomes += self._run_transaction(pending)
                pending = []
                outcomes.append(_call(job, self._connection))
        outcomes += self._run_transaction(pending)
        return outcomes

    def _run_transaction(self, jobs: list[_Job]) -> list[tuple[_Job, bool, Any]]:
        if not jobs:
            return []
        db = self._connection
        if db is None:
            closed = StoreError("the store is closed")
            return [(job, False, closed) for job in jobs]
        outcomes: list[tuple[_Job, bool, Any]] = []
        try:
            # IMMEDIATE: the write lock first, so SQLite's busy timeout applies when another
            # process (cluster nodes on one file) holds it; a plain BEGIN that reads (a fence
            # check) and then writes would fail at once with "database is locked"
            db.execute("BEGIN IMMEDIATE")
            if len(jobs) == 1:
                outcome = _call(jobs[0], db)
                if db.in_transaction:  # SQLite may have rolled it back itself (disk full, I/O error)
                    db.execute("COMMIT" if outcome[1] else "ROLLBACK")
                return [outcome]
            for index, job in enumerate(jobs):
                db.execute("SAVEPOINT job")
                outcome = _call(job, db)
                if not db.in_transaction:
                    # SQLite ended the whole transaction itself (disk full, I/O error): the jobs
                    # before this one are lost with it; the rest get a transaction of their own
                    lost = outcome[2] if not outcome[1] else StoreError("sqlite: the transaction was rolled back")
                    return [(done, False, lost) for done in jobs[:index + 1]] + self._run_transaction(jobs[index + 1:])
                if not outcome[1]:
                    db.execute("ROLLBACK TO job")  # this job only
                db.execute("RELEASE job")
                outcomes.append(outcome)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            # BEGIN, a savepoint or the commit failed: nothing of the batch is kept
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            error = StoreError(f"sqlite: {exc}")
            return [(job, False, error) for job in jobs]
        return outcomes

    async def open(self) -> None:
        if self._closed:  # its thread has ended
            raise StoreError("the store is closed")

        def connect(_: sqlite3.Connection | None) -> None:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                # autocommit mode: the store thread opens and ends each transaction itself
                connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute("PRAGMA busy_timeout=5000")
                connection.executescript(SCHEMA)
                columns = {row[1] for row in connection.execute("PRAGMA table_info(sessions)")}
                if "fence" not in columns:  # a file made before cluster mode
                    connection.execute("ALTER TABLE sessions ADD COLUMN fence INTEGER")
            except Exception as exc:  # OSError, sqlite3.Error, ...
                raise StoreError(f"cannot open {self._path}: {exc}") from exc
            self._connection = connection

        await self._submit(connect, transaction=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return

        def disconnect(_: sqlite3.Connection | None) -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        # runs after every job queued before it; then the thread ends
        done = self._submit(disconnect, transaction=False)
        self._jobs.put(None)
        await done
        await asyncio.to_thread(self._thread.join)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def load_context(self, session_id: str, limit: int) -> SessionContext | None:
        def read(db: sqlite3.Connection) -> SessionContext | None:
            session = db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if session is None:
                return None
            rows = db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? AND content != ''"
                " ORDER BY seq DESC LIMIT ?",
                (session_id, limit),
            ).fetchall()
            return SessionContext(owner=session[0], messages=[ContextMessage(r, c) for r, c in reversed(rows)])

        return await self._run(read)

    async def begin_turn(self, turn: NewTurn) -> None:
        now = turn.created_at.timestamp()

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO sessions (id, owner, title, created_at, updated_at, message_count)"
                " VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT(id) DO NOTHING",
                (turn.session_id, turn.owner, make_title(turn.user_content), now, now),
            )
            if turn.fence is not None:
                _check_fence(db, turn.session_id, turn.fence)
            count, owner = db.execute(
                "UPDATE sessions SET message_count = message_count + 2, updated_at = ?,"
                " fence = COALESCE(?, fence) WHERE id = ? RETURNING message_count, owner",
                (now, turn.fence, turn.session_id),
            ).fetchone()
            if owner != turn.owner:
                # another writer created this session for someone else a moment ago (or an
                # anonymous one, which a user must not write into); the transaction rolls back
                raise OwnershipConflict(f"session {turn.session_id} belongs to another caller")
            db.executemany(
                "INSERT INTO messages (id, session_id, seq, role, content, status, created_at, updated_at, model)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (turn.user_message_id, turn.session_id, count - 1, "user", turn.user_content,
                     STATUS_COMPLETE, now, now, None),
                    (turn.assistant_message_id, turn.session_id, count, "assistant", "",
                     STATUS_PARTIAL, now, now, turn.model),
                ],
            )

        await self._run(write)

    async def checkpoint(self, message_id: str, content: str, fence: Fence | None = None) -> None:
        now = datetime.now(UTC).timestamp()

        def write(db: sqlite3.Connection) -> None:
            if fence is not None:
                _check_fence(db, fence.session_id, fence.number)
            db.execute("UPDATE messages SET content = ?, updated_at = ? WHERE id = ?", (content, now, message_id))

        await self._run(write)

    async def finish_message(self, finished: FinishedMessage) -> None:
        now = finished.finished_at.timestamp()

        def write(db: sqlite3.Connection) -> None:
            if finished.fence is not None:
                _check_fence(db, finished.session_id, finished.fence)
            db.execute(
                "UPDATE messages SET content = ?, status = ?, updated_at = ?, usage = ?, ttft_ms = ? WHERE id = ?",
                (
                    finished.content,
                    finished.status,
                    now,
                    json.dumps(finished.usage) if finished.usage else None,
                    finished.ttft_ms,
                    finished.message_id,
                ),
            )
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, finished.session_id))

        await self._run(write)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def read(db: sqlite3.Connection) -> SessionRecord | None:
            session = db.execute(
                "SELECT owner, title, created_at, updated_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if session is None:
                return None
            rows = db.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq", (session_id,)
            ).fetchall()
            owner, title, created_at, updated_at = session
            return SessionRecord(
                id=session_id,
                owner=owner,
                title=title,
                created_at=_to_datetime(created_at),
                updated_at=_to_datetime(updated_at),
                messages=[_message(row) for row in rows],
            )

        return await self._run(read)

    async def get_owner(self, session_id: str) -> tuple[bool, str | None]:
        def read(db: sqlite3.Connection) -> tuple[bool, str | None]:
            row = db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
            return (False, None) if row is None else (True, row[0])

        return await self._run(read)

    async def get_message(self, message_id: str) -> tuple[MessageRecord, str | None] | None:
        def read(db: sqlite3.Connection) -> tuple[MessageRecord, str | None] | None:
            row = db.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}, s.owner"
                " FROM messages m JOIN sessions s ON s.id = m.session_id WHERE m.id = ?",
                (message_id,),
            ).fetchone()
            return None if row is None else (_message(row[:-1]), row[-1])

        return await self._run(read)

    async def list_sessions(self, owner: str, limit: int = 100) -> list[SessionSummary]:
        def read(db: sqlite3.Connection) -> list[SessionSummary]:
            rows = db.execute(
                "SELECT id, title, updated_at, message_count FROM sessions WHERE owner = ?"
                " ORDER BY updated_at DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
            return [SessionSummary(i, t, _to_datetime(u), c) for i, t, u, c in rows]

        return await self._run(read)

    async def delete_session(self, session_id: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

        return await self._run(write)
