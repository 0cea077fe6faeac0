"""The embedded default store: SQLite in WAL mode with one writer thread doing group commit.

Durability (see README "Durability"): `synchronous=FULL` fsyncs the WAL on every commit, so an
acknowledged change survives a process crash and a power loss; WAL keeps readers off the
writer's lock. Every write is a small function run by the single writer thread inside one
`BEGIN IMMEDIATE` transaction shared with whatever else is queued (group commit); its future
resolves on the event loop only after COMMIT returns. Reads run on a small thread pool with
their own connections, so neither blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from chatd.errors import ChatError, Conflict, Internal, NotFound
from chatd.store.base import (
    GuestHold,
    MessageRecord,
    NewMessage,
    RoomRecord,
    Snapshot,
    UserRecord,
)
from chatd.store.dbfiles import DatabaseFileError, ServerLock, create_private, is_part_of
from chatd.store.deferred import Deferred
from chatd.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
log = logging.getLogger("chatd")
_MSG_COLS = (
    "id, rev, room_id, sender, recipient, text, ts, edited_ts, edited_by, deleted,"
    " sender_key, recipient_key"
)
_MAX_BATCH = 2_000
_SMALL_BATCH = 8  # fewer queued writes than this ...
_BUSY = 0.002  # ... within this long of the last commit ...
_COMMIT_DELAY = 0.0005  # ... wait this long for more before committing
_PURGE_BATCH = 2_000  # messages of a deleted room removed per transaction
# Contract: a nonce is kept at least 24 h, so retention blanks such a message instead of
# deleting its row until then.
NONCE_KEEP = 24 * 3600.0


class _Insert:
    """A queued msg.send: the writer turns a run of these into one executemany."""

    __slots__ = ("msg",)

    def __init__(self, msg: NewMessage) -> None:
        self.msg = msg


_Op = Callable[[sqlite3.Connection], Any] | _Insert


class _Purge:
    """Writer housekeeping: delete a gone room's messages, _PURGE_BATCH per transaction,
    queueing itself again after the commit while more are left."""

    __slots__ = ("room_id", "store")

    def __init__(self, store: SQLiteStore, room_id: int) -> None:
        self.store = store
        self.room_id = room_id

    def __call__(self, db: sqlite3.Connection) -> None:
        cur = db.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE room_id = ? LIMIT ?)",
            (self.room_id, _PURGE_BATCH),
        )
        if cur.rowcount >= _PURGE_BATCH:
            self.store._purges.append(self.room_id)


class StoreOpenError(Exception):
    """The database cannot be used: newer than this program, not chatd's, or unreadable."""


def dm_key(a: str, b: str) -> str:
    x, y = sorted((a.lower(), b.lower()))
    return f"{x}\n{y}"


def _msg(row: tuple[Any, ...]) -> MessageRecord:
    return MessageRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], bool(row[9]),
        row[10], row[11],
    )  # fmt: skip


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def identify(db: sqlite3.Connection) -> int:
    """The schema version of a chatd database (0: empty, a new one); StoreOpenError if
    the file is not chatd's or is newer than this program. Reads only: it runs before
    anything (journal mode included) is changed in a file that may be someone else's."""
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"not a chatd database ({exc})") from None
    if app_id != APPLICATION_ID and (app_id != 0 or tables):
        raise StoreOpenError("not a chatd database (it is an SQLite file holding other tables)")
    if version > SCHEMA_VERSION:
        raise StoreOpenError(
            f"the database has schema version {version}, newer than this chatd understands"
            f" ({SCHEMA_VERSION}); run a newer chatd, or restore a backup made by this one"
        )
    return version


def migrate(db: sqlite3.Connection) -> None:
    """Bring a database to SCHEMA_VERSION, or raise StoreOpenError saying why not."""
    version = identify(db)
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[v].split(";"):
                if statement.strip():
                    db.execute(statement)
        if version == 0:
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            db.execute("INSERT INTO meta VALUES ('rev', '0')")
            db.execute("INSERT INTO meta VALUES ('users_version', '0')")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def bump_users_version(db: sqlite3.Connection) -> None:
    """Tell a running server that accounts changed (it polls this value)."""
    db.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'users_version'"
    )


class SQLiteStore:
    """Store on SQLite. ``path`` ":memory:" keeps nothing on disk (reads then share the writer).

    A file database is locked (see dbfiles.ServerLock) from ``open`` to ``close``: one server
    per database, however it is spelled; ``chatd user``/``token``/``backup`` do not take the
    lock."""

    def __init__(self, path: str, *, readers: int = 2, max_batch: int = _MAX_BATCH) -> None:
        self.path = path
        self.max_batch = max_batch
        self.memory = path == ":memory:"
        self.rev = 0
        self.epoch = ""
        self._rev_w = 0  # the writer thread's view; becomes self.rev once committed
        # Room ids are never reused (AUTOINCREMENT), so a send to a deleted room is caught
        # in memory instead of by a SELECT per message. Writer thread only.
        self._deleted_rooms: set[int] = set()
        self._batch_deleted: set[int] = set()
        self._purges: list[int] = []  # gone rooms whose messages still need deleting
        self._next_id = 0  # the last message id handed out (writer thread)
        self._db: sqlite3.Connection | None = None
        self._pending: collections.deque[tuple[_Op, asyncio.Future[Any], bool]] = (
            collections.deque()
        )
        self._wake = threading.Event()
        self._idle = False
        self._last_commit = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers_n = readers
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock: ServerLock | None = None
        self._failing = False  # the last batch failed (logged once, and once on recovery)
        # For `stats`: how long the last transactions took (BEGIN to COMMIT, fsync
        # included), appended by the writer thread (deque.append is atomic), and how many
        # batches failed since start.
        self.commit_times: collections.deque[float] = collections.deque(maxlen=1024)
        self.write_errors = 0
        self._failed_batches = 0  # in the current failing streak

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> Snapshot:
        """Open (creating or migrating) the database and load what lives in memory."""
        if not self.memory:
            if os.path.dirname(self.path):
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._lock = ServerLock(self.path)
            try:
                create_private(self.path)
                self._lock.acquire()
            except DatabaseFileError as exc:
                self._lock = None
                raise StoreOpenError(str(exc)) from None
            except OSError as exc:
                self._lock = None
                raise StoreOpenError(f"cannot create {self.path}: {exc.strerror}") from None
        db: sqlite3.Connection | None = None
        try:
            db = _connect(self.path)
            snap = self._load(db)
        except BaseException as exc:
            if db is not None:
                db.close()
            self._unlock(refused=True)
            if isinstance(exc, sqlite3.DatabaseError):
                if exc.sqlite_errorcode in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    raise StoreOpenError(
                        f"the database file is malformed ({exc}); restore a backup"
                    ) from None
                raise StoreOpenError(str(exc)) from None
            raise
        self._db = db
        self._thread = threading.Thread(target=self._writer, name="chatd-writer", daemon=True)
        self._thread.start()
        if not self.memory:
            self._readers = concurrent.futures.ThreadPoolExecutor(
                self._readers_n, thread_name_prefix="chatd-reader"
            )
        return snap

    def _load(self, db: sqlite3.Connection) -> Snapshot:
        """Check, migrate and read what lives in memory; sqlite3 errors propagate."""
        identify(db)  # before WAL: never convert someone else's file
        if not self.memory:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreOpenError(f"cannot use WAL mode (got {mode})")
        # FULL: the WAL is fsynced at every commit, so an acknowledged write
        # survives power loss too, not only a crash of this process.
        db.execute("PRAGMA synchronous=FULL")
        migrate(db)
        db.execute("BEGIN IMMEDIATE")
        # Ephemeral rooms die at start: nobody is connected then (contract). Their messages,
        # and those of any room deleted before a crash, go in small batches once running.
        db.execute("DELETE FROM rooms WHERE ephemeral = 1")
        db.execute("COMMIT")
        orphans = [
            r[0]
            for r in db.execute(
                "SELECT DISTINCT room_id FROM messages WHERE room_id IS NOT NULL"
                " AND room_id NOT IN (SELECT id FROM rooms)"
            )
        ]
        self._deleted_rooms.update(orphans)
        for room_id in orphans:
            self._queue_purge(room_id)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self.epoch = meta["epoch"]
        self.rev = self._rev_w = int(meta["rev"])
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        top = db.execute("SELECT max(id) FROM messages").fetchone()
        self._next_id = max(seq[0] if seq else 0, top[0] or 0)
        return Snapshot(
            epoch=self.epoch,
            rev=self.rev,
            users=self._users(db),
            guests=[
                GuestHold(n, j, h, v)
                for n, j, h, v in db.execute("SELECT name, jti, held_until, version FROM guests")
            ],
            revoked=dict(db.execute("SELECT jti, expires_at FROM revoked").fetchall()),
            rooms=[
                RoomRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]))
                for r in db.execute(
                    "SELECT id, name, topic, owner, created_at, ephemeral, open FROM rooms"
                )
            ],
            users_version=int(meta["users_version"]),
        )

    async def close(self) -> None:
        """Commit what is queued, then stop the writer and the readers."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        if self._readers is not None:
            self._readers.shutdown(wait=False)
        if self._db is not None:
            self._db.close()
        self._unlock()

    def _unlock(self, *, refused: bool = False) -> None:
        """Release the server lock; after a refused start, also remove a lock file this
        start created (nothing of chatd's is left beside a file that is not chatd's)."""
        if self._lock is not None:
            self._lock.release(remove_created=refused)
            self._lock = None

    # --- the writer ------------------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], T], multi: bool = False) -> asyncio.Future[T]:
        return self._enqueue(fn, multi)

    def _enqueue(self, fn: _Op, multi: bool = False) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Every write resolves eagerly, in batch order: events then leave in revision order.
        fut = cast("asyncio.Future[Any]", Deferred(loop))
        if self._stopping:
            fut.set_exception(Internal("the server is shutting down"))
            return fut
        self._pending.append((fn, fut, multi))
        if self._idle:
            self._wake.set()
        return fut

    def _writer(self) -> None:
        pending = self._pending
        while True:
            # Producers set the Event only while the writer sleeps (Event.set takes a lock:
            # too dear per message); looking at `pending` again after raising the flag
            # closes the gap between the last look and the wait.
            self._idle = True
            if not pending and not self._stopping:
                self._wake.wait()
            self._idle = False
            self._wake.clear()
            while pending:
                if len(pending) < _SMALL_BATCH and time.monotonic() - self._last_commit < _BUSY:
                    # Under steady load a commit (an fsync, ~0.1 ms of CPU) for one or two
                    # writes costs more than the writes: wait a moment for company
                    # (PostgreSQL's commit_delay). Idle servers commit at once.
                    time.sleep(_COMMIT_DELAY)
                batch: list[tuple[_Op, asyncio.Future[Any], bool]] = []
                while pending and len(batch) < self.max_batch:
                    batch.append(pending.popleft())
                self._run_batch(batch)
            if self._stopping and not pending:
                return

    def _run_batch(self, batch: list[tuple[_Op, asyncio.Future[Any], bool]]) -> None:
        db = self._db
        assert db is not None
        rev0 = self._rev_w
        id0 = self._next_id
        results: list[tuple[Any, Any, BaseException | None]] = []
        began = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            i, n = 0, len(batch)
            while i < n:
                fn, fut, multi = batch[i]
                if isinstance(fn, _Insert):
                    run: list[tuple[_Insert, Any]] = []
                    while i < n:
                        op = batch[i][0]
                        if not isinstance(op, _Insert):
                            break
                        run.append((op, batch[i][1]))
                        i += 1
                    results += self._insert_run(db, run)
                    continue
                i += 1
                if multi:
                    db.execute("SAVEPOINT op")
                try:
                    value = fn(db)
                except (ChatError, sqlite3.Error) as exc:
                    if not db.in_transaction:
                        # SQLite rolled the whole transaction back (SQLITE_FULL, IOERR…):
                        # fail the batch, or later ops would run in autocommit.
                        raise
                    if multi:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    results.append((fut, None, _as_chat_error(exc)))
                else:
                    if multi:
                        db.execute("RELEASE op")
                    results.append((fut, value, None))
            if self._rev_w != rev0:
                db.execute("UPDATE meta SET value = ? WHERE key = 'rev'", (str(self._rev_w),))
            db.execute("COMMIT")
            self._last_commit = time.monotonic()
            self.commit_times.append(time.perf_counter() - began)
            self._deleted_rooms |= self._batch_deleted
            self._purges += self._batch_deleted
            self._batch_deleted.clear()
            purges, self._purges = self._purges, []
            for room_id in purges:
                self._queue_purge(room_id)
            if self._failing:
                self._failing = False
                log.warning(
                    "storage is writable again (%d batches of writes failed meanwhile)",
                    self._failed_batches,
                    extra={"event": "store_recovered", "failed_batches": self._failed_batches},
                )
                self._failed_batches = 0
        except Exception as exc:
            # Disk full, read-only, I/O error (or a bug): nothing of the batch is saved, so
            # the counters go back and every write in it fails; the next batch tries anew.
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._rev_w = rev0
            self._next_id = id0
            self._batch_deleted.clear()
            # Housekeeping that was rolled back is tried again after the next good commit
            # (not at once: a full disk must not turn the writer into a busy loop).
            self._purges += [op.room_id for op, _, _ in batch if isinstance(op, _Purge)]
            err = _as_chat_error(exc)
            self.write_errors += 1
            self._failed_batches += 1
            if not self._failing:
                # One line per failing streak, and one when it ends with the count: a full
                # disk under load must not write a line per batch.
                self._failing = True
                bug = not isinstance(exc, sqlite3.Error)
                log.error(
                    "writing to the database failed: %s (%d writes lost; clients got errors)",
                    exc, len(batch), exc_info=bug,
                    extra={"event": "store_error", "error": str(exc)},
                )  # fmt: skip
            results = [(fut, None, err) for _, fut, _ in batch]
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, results, self._rev_w)

    def _deliver(self, results: list[tuple[Any, Any, BaseException | None]], rev: int) -> None:
        self.rev = rev
        for fut, value, exc in results:
            if fut is None or fut.done():  # None: the writer's own housekeeping
                continue
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

    # --- reads -----------------------------------------------------------------------

    def _reader_db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = _connect(self.path)
            self._local.db = db
        return db

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            return await self._write(fn)
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(self._reader_db())
            except sqlite3.Error as exc:
                log.error("reading the database failed: %s", exc,
                          extra={"event": "store_error", "error": str(exc)})
                raise _as_chat_error(exc) from None

        return await loop.run_in_executor(self._readers, run)

    # --- accounts --------------------------------------------------------------------

    @staticmethod
    def _users(db: sqlite3.Connection) -> list[UserRecord]:
        return [
            UserRecord(i, n, h, bool(a), v)
            for i, n, h, a, v in db.execute(
                "SELECT id, name, pw_hash, admin, token_version FROM users"
            )
        ]

    async def create_user(self, name: str, pw_hash: str, admin: bool) -> UserRecord:
        def op(db: sqlite3.Connection) -> UserRecord:
            cur = db.execute(
                "INSERT INTO users (name, name_key, pw_hash, admin, created_at) "
                "VALUES (?, ?, ?, ?, strftime('%s','now')) ON CONFLICT(name_key) DO NOTHING",
                (name, name.lower(), pw_hash, int(admin)),
            )
            if cur.rowcount == 0:
                raise Conflict(f"user {name!r} already exists")
            return UserRecord(int(cur.lastrowid or 0), name, pw_hash, admin, 0)

        return await self._write(op)

    async def delete_user(self, name: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM users WHERE name_key = ?", (name.lower(),))
            return cur.rowcount > 0

        return await self._write(op)

    async def bump_token_version(self, name: str) -> int:
        def op(db: sqlite3.Connection) -> int:
            row = db.execute(
                "UPDATE users SET token_version = token_version + 1 WHERE name_key = ? "
                "RETURNING token_version",
                (name.lower(),),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._write(op)

    async def revoke(self, jti: str, expires_at: int) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (jti, expires_at))

        await self._write(op)

    async def get_user(self, name: str) -> UserRecord | None:
        def op(db: sqlite3.Connection) -> UserRecord | None:
            row = db.execute(
                "SELECT id, name, pw_hash, admin, token_version FROM users WHERE name_key = ?",
                (name.lower(),),
            ).fetchone()
            return None if row is None else UserRecord(row[0], row[1], row[2], bool(row[3]), row[4])

        return await self._read(op)

    async def set_password(self, user_id: int, pw_hash: str) -> int | None:
        def op(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "UPDATE users SET pw_hash = ?, token_version = token_version + 1 WHERE id = ? "
                "RETURNING token_version",
                (pw_hash, user_id),
            ).fetchone()
            return int(row[0]) if row else None

        return await self._write(op)

    async def hold_guest(self, hold: GuestHold) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO guests (name_key, name, jti, expires_at, held_until,"
                " version) VALUES (?, ?, ?, 0, ?, ?)",
                (hold.name.lower(), hold.name, hold.jti, hold.held_until, hold.version),
            )

        await self._write(op)

    def update_hold(self, hold: GuestHold) -> Awaitable[bool]:
        # Queued at the call, not at the first await: writes go in the order decided.
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE guests SET held_until = ?, version = ?"
                " WHERE name_key = ? AND jti = ? AND version < ?",
                (hold.held_until, hold.version, hold.name.lower(), hold.jti, hold.version),
            )
            return cur.rowcount > 0

        return self._write(op)

    def release_guest(self, hold: GuestHold) -> Awaitable[bool]:
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "DELETE FROM guests WHERE name_key = ? AND jti = ? AND version < ?",
                (hold.name.lower(), hold.jti, hold.version),
            )
            return cur.rowcount > 0

        return self._write(op)

    async def purge_expired(self, now: int) -> None:
        # Guest holds are not purged here: the server releases each when its grace ends
        # (one owner decides a hold's fate).
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM revoked WHERE expires_at <= ?", (now,))

        await self._write(op, multi=True)

    async def users_version(self) -> int:
        def op(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'users_version'").fetchone()
            return int(row[0])

        return await self._read(op)

    async def reload_users(self) -> tuple[int, list[UserRecord]]:
        def op(db: sqlite3.Connection) -> tuple[int, list[UserRecord]]:
            db.execute("BEGIN")
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'users_version'").fetchone()
                return int(row[0]), self._users(db)
            finally:
                db.execute("COMMIT")

        if self._readers is None:
            return await self._write(lambda db: (0, self._users(db)))
        return await self._read(op)

    # --- rooms -----------------------------------------------------------------------

    async def create_room(self, room: RoomRecord) -> RoomRecord:
        def op(db: sqlite3.Connection) -> RoomRecord:
            cur = db.execute(
                "INSERT INTO rooms (name, name_key, topic, owner, created_at, ephemeral, open) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    room.name,
                    room.name.lower(),
                    room.topic,
                    room.owner,
                    room.created_at,
                    int(room.ephemeral),
                    int(room.open),
                ),
            )
            room.id = int(cur.lastrowid or 0)
            return room

        return await self._write(op)

    async def update_room(self, room_id: int, name: str, topic: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE rooms SET name = ?, name_key = ?, topic = ? WHERE id = ?",
                (name, name.lower(), topic, room_id),
            )

        await self._write(op)

    def delete_room(self, room_id: int) -> Awaitable[None]:
        """Queued at the call, not at the first await: a create of the same name that
        follows (an emptied ephemeral room's name reused at once) then comes after it."""

        def op(db: sqlite3.Connection) -> None:
            # The room row goes now (its history is unreachable from this commit on); its
            # messages follow in batches, so a huge room never stalls everyone's sends.
            db.execute("DELETE FROM rooms WHERE id = ?", (room_id,))
            self._batch_deleted.add(room_id)

        return self._write(op)

    def _queue_purge(self, room_id: int) -> None:
        self._pending.append((_Purge(self, room_id), None, False))  # type: ignore[arg-type]

    # --- messages --------------------------------------------------------------------

    async def add_message(self, msg: NewMessage) -> tuple[MessageRecord, bool]:
        """Store a message; (record, True). A nonce the sender already used returns the
        original instead: (original, False) — checked in the one writer, so two racing
        retries cannot both post. Consecutive sends in a batch become one executemany."""
        result: tuple[MessageRecord, bool] = await self._enqueue(_Insert(msg))
        return result

    def _insert_run(
        self, db: sqlite3.Connection, run: list[tuple[_Insert, Any]]
    ) -> list[tuple[Any, Any, BaseException | None]]:
        out: list[tuple[Any, Any, BaseException | None]] = []
        rows: list[tuple[Any, ...]] = []
        fresh: dict[tuple[str, str], MessageRecord] = {}
        for op, fut in run:
            msg = op.msg
            sender_key = msg.sender_key or msg.sender.lower()
            if msg.nonce is not None:
                old = fresh.get((sender_key, msg.nonce))
                if old is None:
                    row = db.execute(
                        f"SELECT {_MSG_COLS} FROM messages WHERE sender_key = ? AND nonce = ?",
                        (sender_key, msg.nonce),
                    ).fetchone()
                    old = _msg(row) if row is not None else None
                if old is not None:
                    out.append((fut, (old, False), None))
                    continue
            if msg.room_id is not None and (
                msg.room_id in self._deleted_rooms or msg.room_id in self._batch_deleted
            ):
                out.append((fut, None, NotFound("the room was deleted")))
                continue
            self._rev_w += 1
            self._next_id += 1
            recipient = msg.recipient
            recipient_key = (
                (msg.recipient_key or recipient.lower()) if recipient is not None else None
            )
            rec = MessageRecord(
                self._next_id, self._rev_w, msg.room_id, msg.sender, recipient,
                msg.text, msg.ts, None, None, False, sender_key, recipient_key,
            )  # fmt: skip
            rows.append(
                (
                    rec.id,
                    rec.rev,
                    msg.room_id,
                    msg.sender,
                    sender_key,
                    recipient,
                    recipient_key,
                    dm_key(sender_key, recipient_key) if recipient_key is not None else None,
                    msg.text,
                    msg.ts,
                    msg.nonce,
                )
            )
            if msg.nonce is not None:
                fresh[(sender_key, msg.nonce)] = rec
            out.append((fut, (rec, True), None))
        if rows:
            # Explicit ids: AUTOINCREMENT still records them in sqlite_sequence, so an id
            # is never handed out twice, and the one writer knows them without lastrowid.
            db.executemany(
                "INSERT INTO messages (id, rev, room_id, sender, sender_key, recipient,"
                " recipient_key, dm_key, text, ts, nonce) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return out

    async def edit_message(
        self, message_id: int, text: str, ts: float, by: str
    ) -> MessageRecord | None:
        return await self._change_message(
            "text = ?, edited_ts = ?, edited_by = ?", (text, ts, by), message_id
        )

    async def delete_message(self, message_id: int) -> MessageRecord | None:
        return await self._change_message("text = '', deleted = 1", (), message_id)

    def _change_message(
        self, assignments: str, params: tuple[Any, ...], message_id: int
    ) -> asyncio.Future[MessageRecord | None]:
        """Change a live message, stamping the next revision on it; None if it is gone."""

        def op(db: sqlite3.Connection) -> MessageRecord | None:
            rev = self._rev_w + 1
            row = db.execute(
                f"UPDATE messages SET {assignments}, rev = ? "
                f"WHERE id = ? AND deleted = 0 RETURNING {_MSG_COLS}",
                (*params, rev, message_id),
            ).fetchone()
            if row is None:
                return None
            self._rev_w = rev
            return _msg(row)

        return self._write(op)

    async def count_messages(self) -> int:
        """Message rows stored (tombstones included), for `stats`; a read off the loop."""

        def op(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])

        return await self._read(op)

    async def get_message(self, message_id: int) -> MessageRecord | None:
        def op(db: sqlite3.Connection) -> MessageRecord | None:
            row = db.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            return _msg(row) if row else None

        return await self._read(op)

    async def find_nonce(self, sender_key: str, nonce: str) -> MessageRecord | None:
        def op(db: sqlite3.Connection) -> MessageRecord | None:
            row = db.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE sender_key = ? AND nonce = ?",
                (sender_key, nonce),
            ).fetchone()
            return _msg(row) if row else None

        return await self._read(op)

    async def room_history(
        self, room_id: int, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        return await self._read(
            lambda db: _page(db, "room_id = ?", (room_id,), before, after, limit)
        )

    async def dm_history(
        self, me: str, other: str | None, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        """DMs of identity `me`, oldest first; with `other` (a name), only those with
        whoever held that name. Another holder of `me`'s name sees none of them."""
        sent: tuple[str, tuple[Any, ...]]
        got: tuple[str, tuple[Any, ...]]
        if other is not None:
            who = other.lower()
            sent = ("room_id IS NULL AND sender_key = ? AND lower(recipient) = ?", (me, who))
            got = ("room_id IS NULL AND recipient_key = ? AND lower(sender) = ?", (me, who))
        else:
            sent = ("room_id IS NULL AND sender_key = ?", (me,))
            got = ("room_id IS NULL AND recipient_key = ?", (me,))
        return await self._read(
            lambda db: _page(db, sent[0], sent[1], before, after, limit, got)
        )

    async def changes_since(
        self, rev: int, room_ids: list[int], me: str, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        """Every message with rev > `rev` in those rooms and in `me`'s DMs, oldest
        revision first. Each source is read through its own (…, rev) index, so the cost
        is what the caller missed, not every change on the server since."""
        arms = [
            "SELECT {cols} FROM messages WHERE room_id IS NULL AND sender_key = ? AND rev > ?",
            "SELECT {cols} FROM messages WHERE room_id IS NULL AND recipient_key = ?"
            " AND sender_key != recipient_key AND rev > ?",
        ]
        params: list[Any] = [me, rev, me, rev]
        # Rooms in chunks: SQLite caps the variables of one statement.
        for i in range(0, len(room_ids), 500):
            chunk = room_ids[i : i + 500]
            arms.append(
                "SELECT {cols} FROM messages WHERE room_id IN ("
                + ",".join("?" * len(chunk))
                + ") AND rev > ?"
            )
            params += [*chunk, rev]
        sql = (
            " UNION ALL ".join(f"SELECT * FROM ({a.format(cols=_MSG_COLS)})" for a in arms)
            + " ORDER BY rev LIMIT ?"
        )
        params.append(limit + 1)

        def op(db: sqlite3.Connection) -> tuple[list[MessageRecord], bool]:
            rows = db.execute(sql, params).fetchall()
            return [_msg(r) for r in rows[:limit]], len(rows) > limit

        return await self._read(op)

    async def has_dms_between(self, me: str, other: str) -> bool:
        who = other.lower()

        def op(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM messages WHERE room_id IS NULL AND ("
                "(sender_key = ? AND lower(recipient) = ?) OR (recipient_key = ? AND lower(sender) = ?)"
                ") LIMIT 1",
                (me, who, me, who),
            ).fetchone()
            return row is not None

        return await self._read(op)

    # --- retention -------------------------------------------------------------------

    async def prune(self, now: float, max_age: float, keep: int, batch: int = 500) -> int:
        """Retention: remove messages older than ``max_age`` seconds, and all but the newest
        ``keep`` per room and per DM pair (0 turns a rule off). Runs as many small writes
        (at most ``batch`` rows each) so other writes interleave and the writer never stalls
        for long; the groups to trim are found on a reader. No events, no revisions: a
        pruned message just leaves history. A message whose nonce is younger than
        NONCE_KEEP is blanked (a tombstone) rather than deleted, so a retried send still
        finds it. Returns how many messages left history."""
        total = 0
        if max_age > 0:
            total += await self._prune_range("1", (), None, now - max_age, now, batch)
        if keep > 0:
            for where, key in await self._read(lambda db: _over_keep(db, keep)):

                def cutoff(db: sqlite3.Connection, where: str = where, key: Any = key) -> Any:
                    # The oldest of the newest `keep`: a reader's snapshot may be a little
                    # old, which only keeps more, never less.
                    return db.execute(
                        f"SELECT id FROM messages WHERE {where} AND deleted = 0 "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?",
                        (key, keep - 1),
                    ).fetchone()

                below = await self._read(cutoff)
                if below is not None:
                    total += await self._prune_range(where, (key,), below[0], None, now, batch)
        return total

    async def _prune_range(
        self,
        where: str,
        args: tuple[Any, ...],
        below: int | None,
        older_than: float | None,
        now: float,
        batch: int,
    ) -> int:
        total, after, more = 0, 0, True
        while more:

            def op(db: sqlite3.Connection, after: int = after) -> tuple[int, int, bool]:
                return _prune_step(db, where, args, after, below, older_than, now, batch)

            n, after, more = await self._write(op, multi=True)
            total += n
        return total


def _over_keep(db: sqlite3.Connection, keep: int) -> list[tuple[str, Any]]:
    """The rooms and DM pairs holding more than ``keep`` messages (tombstones not counted)."""
    rooms = db.execute(
        "SELECT room_id FROM messages WHERE room_id IS NOT NULL AND deleted = 0 "
        "GROUP BY room_id HAVING count(*) > ?",
        (keep,),
    ).fetchall()
    pairs = db.execute(
        "SELECT dm_key FROM messages WHERE room_id IS NULL AND deleted = 0 "
        "GROUP BY dm_key HAVING count(*) > ?",
        (keep,),
    ).fetchall()
    return [("room_id = ?", r[0]) for r in rooms] + [
        ("room_id IS NULL AND dm_key = ?", p[0]) for p in pairs
    ]


def _prune_step(
    db: sqlite3.Connection,
    where: str,
    args: tuple[Any, ...],
    after: int,
    below: int | None,
    older_than: float | None,
    now: float,
    batch: int,
) -> tuple[int, int, bool]:
    """One batch of retention in id order from ``after``: (messages removed, last id
    looked at, more to look at). With ``older_than`` it stops at the first message that
    is young enough (ids grow with time, so this is the frontier; no index on ts needed)."""
    sql = f"SELECT id, ts, nonce, deleted FROM messages WHERE {where} AND id > ?"
    params: list[Any] = [*args, after]
    if below is not None:
        sql += " AND id < ?"
        params.append(below)
    rows = db.execute(sql + " ORDER BY id LIMIT ?", (*params, batch)).fetchall()
    drop: list[tuple[int]] = []
    blank: list[tuple[int]] = []
    removed = 0
    last = after
    more = len(rows) == batch
    for mid, ts, nonce, deleted in rows:
        if older_than is not None and ts >= older_than:
            more = False
            break
        last = mid
        if nonce is not None and ts > now - NONCE_KEEP:
            if not deleted:
                blank.append((mid,))
        else:
            drop.append((mid,))
        removed += not deleted
    if drop:
        db.executemany("DELETE FROM messages WHERE id = ?", drop)
    if blank:
        db.executemany("UPDATE messages SET text = '', deleted = 1 WHERE id = ?", blank)
    return removed, last, more


def backup(source: str, dest: str) -> int:
    """An online, consistent copy of the chatd database ``source`` into ``dest`` with
    SQLite's backup API, while a server may be writing to it: the copy is taken in one
    step inside one read transaction (WAL lets the writer go on meanwhile), written to a
    private temporary file beside ``dest`` (unpredictable name, created exclusively, mode
    0600: it holds password hashes and DMs) and renamed over it, so ``dest`` is always whole.
    The copy gets a new epoch: restored, it rewinds ids and revisions, and clients must know
    their cursors are void (contract, Revisions). Returns the number of messages in the copy.
    Raises StoreOpenError when ``source`` is not usable or ``dest`` is the live database
    itself (or one of its files) under any spelling: renaming over it would cut a running
    server off its file and lose what it acknowledges after."""
    if not os.path.isfile(source):
        raise StoreOpenError("no such database file")
    if is_part_of(source, dest):
        raise StoreOpenError(
            f"{dest} is the database itself or one of its files (-wal, -shm, .lock, .secret);"
            " name another file for the backup"
        )
    if os.path.isdir(dest):
        raise StoreOpenError(f"{dest} is a directory; name the backup file")
    src = _connect(source)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(dest))
    )
    os.close(fd)
    try:
        try:
            if identify(src) == 0:
                raise StoreOpenError("not a chatd database (it is empty)")
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)  # pages=-1: all at once, one consistent snapshot
                out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                with out:
                    out.execute(
                        "UPDATE meta SET value = ? WHERE key = 'epoch'", (uuid.uuid4().hex,)
                    )
                count = int(
                    out.execute("SELECT count(*) FROM messages WHERE deleted = 0").fetchone()[0]
                )
            finally:
                out.close()
        except sqlite3.DatabaseError as exc:
            raise StoreOpenError(str(exc)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
    finally:
        src.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return count


def _page(
    db: sqlite3.Connection,
    where: str,
    args: tuple[Any, ...],
    before: int | None,
    after: int | None,
    limit: int,
    *more_arms: tuple[str, tuple[Any, ...]],
) -> tuple[list[MessageRecord], bool]:
    """A history page by the contract's paging rules, oldest first, with `more`.

    Several (where, args) arms are each read through their own index with the cursor and
    the limit applied, then merged (UNION also drops a DM to oneself met twice), so a
    page costs its size, not the size of everything that matches."""
    ascending = after is not None
    order = " ORDER BY id " + ("ASC" if ascending else "DESC") + " LIMIT ?"
    cursor = ""
    cursor_args: list[Any] = []
    if after is not None:
        cursor += " AND id > ?"
        cursor_args.append(after)
    if before is not None:
        cursor += " AND id < ?"
        cursor_args.append(before)
    arms = [(where, args), *more_arms]
    parts = []
    params: list[Any] = []
    for arm_where, arm_args in arms:
        parts.append(
            f"SELECT {_MSG_COLS} FROM messages WHERE {arm_where} AND deleted = 0{cursor}{order}"
        )
        params += [*arm_args, *cursor_args, limit + 1]
    if len(parts) == 1:
        sql = parts[0]
    else:
        sql = " UNION ".join(f"SELECT * FROM ({p})" for p in parts) + order
        params.append(limit + 1)
    rows = db.execute(sql, params).fetchall()
    more = len(rows) > limit
    page = [_msg(r) for r in rows[:limit]]
    if not ascending:
        page.reverse()
    return page, more


# SQLite's primary result codes (the low byte of an extended code) -> what the client is told.
# Classified by code, never by message text: texts differ across SQLite versions and
# extended codes (SQLITE_READONLY_DBMOVED, SQLITE_IOERR_SHMSIZE, …) share a primary code.
_STORAGE_ERRORS: dict[int, str] = {
    sqlite3.SQLITE_FULL: "storage is full; the change was not saved, try again later",
    sqlite3.SQLITE_READONLY: "storage is read-only; the change was not saved",
    sqlite3.SQLITE_PERM: "storage is read-only; the change was not saved",
    sqlite3.SQLITE_BUSY: "storage is busy; the change was not saved, try again",
    sqlite3.SQLITE_LOCKED: "storage is busy; the change was not saved, try again",
    sqlite3.SQLITE_IOERR: "storage I/O error; the change was not saved",
    sqlite3.SQLITE_CORRUPT: "storage is damaged; the change was not saved",
    sqlite3.SQLITE_CANTOPEN: "storage cannot be opened; the change was not saved",
}


def _as_chat_error(exc: BaseException) -> ChatError:
    if isinstance(exc, ChatError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _STORAGE_ERRORS:
        return Internal(_STORAGE_ERRORS[code & 0xFF])
    return Internal("storage error; the change was not saved")
