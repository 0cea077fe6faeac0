"""SQLiteStore: the Store protocol on SQLite in WAL mode.

Durability (see README "Durability"): `synchronous=FULL` fsyncs the WAL on every commit, so an
acknowledged change survives a process crash and a power loss; WAL keeps readers off the
writer's lock. Every write is a small function run by the engine's one writer thread (group
commit, see engine.py); reads run on a small thread pool with their own connections, so
neither blocks the event loop. Message ids and revisions are allocated in the writer thread
(`_Ledger`) and published as `rev` only once committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from chatd.errors import NotFound, StorageFailed
from chatd.store.base import (
    GuestHold,
    MessageRecord,
    NewMessage,
    RoomRecord,
    Snapshot,
    StoreOpenError,
    UserRecord,
)
from chatd.store.sqlite import queries as q
from chatd.store.sqlite.dbfiles import DatabaseFileError, ServerLock, create_private
from chatd.store.sqlite.engine import MAX_BATCH, Grouped, Queued, Result, Writer, as_chat_error
from chatd.store.sqlite.retention import Purge, prune
from chatd.store.sqlite.schema import connect, identify, migrate

T = TypeVar("T")
log = logging.getLogger("chatd")

# A queued msg.send (Grouped: the writer turns a run of these into one executemany).
_Insert = Grouped


class _Ledger:
    """What the writer thread allocates, and puts back when a batch fails: the next message
    id and revision, and which rooms exist (a send to any other room is refused in memory,
    not by a SELECT per message; room ids are never reused, AUTOINCREMENT). Writer thread
    only, after `open`."""

    def __init__(self) -> None:
        self.rev = 0  # the newest revision written (committed once the batch is)
        self.next_id = 0  # the last message id handed out
        self.live_rooms: set[int] = set()
        self.batch_created: list[int] = []  # rooms made by the running batch
        self.batch_deleted: list[int] = []  # rooms deleted by the running batch
        self.purges: list[int] = []  # gone rooms whose messages still need deleting
        self.queue_purge: Callable[[int], None] = lambda room_id: None
        self._rev0 = 0
        self._id0 = 0

    def mark(self) -> None:
        self._rev0 = self.rev
        self._id0 = self.next_id

    def room_created(self, room_id: int) -> None:
        self.live_rooms.add(room_id)
        self.batch_created.append(room_id)

    def room_deleted(self, room_id: int) -> None:
        if room_id in self.live_rooms:
            self.live_rooms.discard(room_id)
            self.batch_deleted.append(room_id)

    def before_commit(self, db: sqlite3.Connection) -> None:
        if self.rev != self._rev0:
            q.set_rev(db, self.rev)

    def committed(self) -> None:
        self.purges += self.batch_deleted
        self.batch_created.clear()
        self.batch_deleted.clear()
        purges, self.purges = self.purges, []
        for room_id in purges:
            self.queue_purge(room_id)

    def purge_again(self, room_id: int) -> None:
        """A purge left more of the room's messages: queue another after the commit."""
        self.purges.append(room_id)

    def rolled_back(self, batch: list[Queued]) -> None:
        self.rev = self._rev0
        self.next_id = self._id0
        # Deleted first, then created: a room made and deleted in the batch stays gone.
        self.live_rooms.update(self.batch_deleted)
        self.live_rooms.difference_update(self.batch_created)
        self.batch_created.clear()
        self.batch_deleted.clear()
        # Housekeeping that was rolled back is tried again after the next good commit
        # (not at once: a full disk must not turn the writer into a busy loop).
        self.purges += [op.room_id for op, _, _ in batch if isinstance(op, Purge)]

    def insert_run(
        self, db: sqlite3.Connection, run: list[tuple[Grouped, Any]]
    ) -> list[Result]:
        """A run of queued msg.sends: each takes the next id and revision unless its nonce
        was used (then the original, checked here in the one writer, so two racing retries
        cannot both post) or its room is gone; then one executemany."""
        out: list[Result] = []
        rows: list[tuple[Any, ...]] = []
        fresh: dict[tuple[str, str], MessageRecord] = {}
        live = self.live_rooms
        for op, fut in run:
            msg: NewMessage = op.item
            sender_key = msg.sender_key or msg.sender.lower()
            if msg.nonce is not None:
                old = fresh.get((sender_key, msg.nonce))
                if old is None:
                    old = q.find_nonce(db, sender_key, msg.nonce)
                if old is not None:
                    out.append((fut, (old, False), None))
                    continue
            if msg.room_id is not None and msg.room_id not in live:
                out.append((fut, None, NotFound("the room was deleted")))
                continue
            self.rev += 1
            self.next_id += 1
            recipient = msg.recipient
            recipient_key = (
                (msg.recipient_key or recipient.lower()) if recipient is not None else None
            )
            rec = MessageRecord(
                self.next_id, self.rev, msg.room_id, msg.sender, recipient,
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
                    q.dm_key(sender_key, recipient_key) if recipient_key is not None else None,
                    msg.text,
                    msg.ts,
                    msg.nonce,
                )
            )
            if msg.nonce is not None:
                fresh[(sender_key, msg.nonce)] = rec
            out.append((fut, (rec, True), None))
        if rows:
            q.insert_messages(db, rows)
        return out


class _ShmWatch:
    """Watches the database's shared-memory file (``-shm``), which SQLite maps into this
    process: when something outside chatd truncates it, the next access to a page past its
    new end kills the process with SIGBUS (no SQLite error can catch that); when it is
    removed or replaced, another process (``chatd user add``) would index the WAL in a new
    file while this one writes through the old, and the database can be damaged. So every
    write batch and every read first looks (one ``stat``, no descriptor: closing one would
    drop SQLite's POSIX locks on the file) and touches nothing once the file changed."""

    # A stat that fails otherwise than "no such file" (EIO, ESTALE on a network mount) may
    # pass: the server stops only when it fails this many checks in a row.
    STAT_FAILURES_TO_STOP = 3

    def __init__(self, path: str, stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None
        self.size = 0
        self._stat = stat
        self._stat_failures = 0  # in a row; threads may race on it: it only delays a stop

    def arm(self) -> None:
        """Remember the file SQLite mapped (after the first transaction made it)."""
        st = self._stat(self.path)
        self.identity = (st.st_dev, st.st_ino)
        self.size = st.st_size

    def check(self) -> str | None:
        """What happened to the file, or None while it is the one SQLite mapped, whole.
        Any thread: the size compared is the one known before this stat, so a stat taken
        before another thread saw the file grow never reads as a truncation."""
        if self.identity is None:
            return None
        known = self.size
        try:
            st = self._stat(self.path)
        except FileNotFoundError:
            return "was removed"
        except OSError as exc:
            self._stat_failures += 1
            if self._stat_failures < self.STAT_FAILURES_TO_STOP:
                return None  # look again at the next check
            return f"cannot be checked ({exc.strerror}, {self._stat_failures} times in a row)"
        self._stat_failures = 0
        if (st.st_dev, st.st_ino) != self.identity:
            return "was replaced by another file"
        if st.st_size < known:
            return f"was truncated ({known} to {st.st_size} bytes)"
        if st.st_size > self.size:
            self.size = st.st_size  # SQLite maps more as the WAL grows
        return None


def _close_all(dbs: list[sqlite3.Connection]) -> None:
    for db in dbs:
        db.close()


class SQLiteStore:
    """Store on SQLite. ``path`` ":memory:" keeps nothing on disk (reads then share the writer).

    A file database is locked (see dbfiles.ServerLock) from ``open`` to ``close``: one server
    per database, however it is spelled; the offline commands (SQLiteAdmin, backup) do not
    take the lock."""

    def __init__(self, path: str, *, readers: int = 2, max_batch: int = MAX_BATCH) -> None:
        self.path = path
        self.memory = path == ":memory:"
        self.epoch = ""
        self._ledger = _Ledger()
        self._ledger.queue_purge = self._queue_purge
        self._writer = Writer(self._ledger, self._ledger.insert_run, max_batch=max_batch)
        self._submit = self._writer.submit
        self._db: sqlite3.Connection | None = None
        self._readers_n = readers
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        # Every reader thread's connection, closed with the store: one left open keeps this
        # process's SQLite state for the file (its -shm mapping, its locks) alive, so a
        # restore that replaces the file and deletes -wal/-shm would meet stale state
        # ("disk I/O error") when the store is opened again in the same process.
        self._reader_dbs: list[sqlite3.Connection] = []
        self._reader_dbs_lock = threading.Lock()
        self._lock: ServerLock | None = None
        self._shm = None if self.memory else _ShmWatch(os.path.realpath(path) + "-shm")
        # Why the database must not be touched again (see _ShmWatch, abandon), once known.
        self._fault: str | None = None
        self._writer.guard = self.fault

    @property
    def rev(self) -> int:
        """The sync watermark (Store.rev): the revision of the newest batch whose COMMIT
        returned, set on the loop just before that batch's results are delivered; reads
        start after it and see that commit (WAL), so it never runs ahead of them."""
        return self._writer.rev

    @property
    def max_batch(self) -> int:
        return self._writer.max_batch

    @property
    def commit_times(self) -> Any:
        """For `stats`: how long the last transactions took, BEGIN to COMMIT."""
        return self._writer.commit_times

    @property
    def write_errors(self) -> int:
        """For `stats`: batches that failed since start."""
        return self._writer.write_errors

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
            db = connect(self.path)
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
        if self._shm is not None:
            try:
                self._shm.arm()
            except OSError as exc:
                db.close()
                self._unlock(refused=True)
                raise StoreOpenError(f"cannot find the database's -shm file: {exc.strerror}") from None
        self._writer.start(db)
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
        q.drop_ephemeral_rooms(db)
        db.execute("COMMIT")
        for room_id in q.orphaned_rooms(db):
            self._queue_purge(room_id)
        rooms = q.rooms(db)
        self._ledger.live_rooms = {r.id for r in rooms}
        meta = q.meta(db)
        self.epoch = meta["epoch"]
        self._ledger.rev = int(meta["rev"])
        self._ledger.next_id = q.last_message_id(db)
        return Snapshot(
            epoch=self.epoch,
            rev=self._ledger.rev,
            users=q.users(db),
            guests=q.guest_holds(db),
            revoked=q.revoked(db),
            rooms=rooms,
            users_version=int(meta["users_version"]),
        )

    def fault(self) -> str | None:
        """Why the database can no longer be used safely by this process (then nothing
        touches it again: the server must stop), or None. Any thread; costs one stat."""
        if self._fault is None and self._shm is not None:
            what = self._shm.check()
            if what is not None:
                self._fault = f"the database's shared-memory file {self._shm.path} {what} outside chatd"
        return self._fault

    @property
    def failed(self) -> str | None:
        """The fault already recorded, without looking at the file (after ``close`` it
        may be gone: SQLite removes the -shm with its last connection)."""
        return self._fault

    def abandon(self, reason: str) -> None:
        """Touch the database no more (a thread may be stuck in a fault inside SQLite):
        queued writes fail, reads fail, ``close`` leaves the connections as they are."""
        if self._fault is None:
            self._fault = reason

    async def close(self) -> None:
        """Commit what is queued, then stop the writer and the readers. After a fault
        nothing is closed: closing checkpoints, which would touch the damaged file (the
        process exits instead; every committed change is in the WAL, replayed at the next
        open)."""
        if self.fault() is not None:
            # The locks stay too, until the process exits: no other server starts meanwhile.
            self._writer.abandon()
            return
        await self._writer.stop()
        if self._readers is not None:
            # Reads in flight finish (they are short); then no thread uses a connection.
            await asyncio.get_running_loop().run_in_executor(None, self._readers.shutdown, True)
        if self.fault() is not None:
            return  # damaged while the writer finished: closing would checkpoint through it
        with self._reader_dbs_lock:
            reader_dbs, self._reader_dbs = self._reader_dbs, []
        if self._db is not None:
            reader_dbs.append(self._db)  # last: its close checkpoints
        # Not on the loop's thread: a SIGBUS in the final checkpoint would fault it forever
        # (the handler that stops the server runs on that thread, in Python).
        await asyncio.get_running_loop().run_in_executor(None, _close_all, reader_dbs)
        # Only now: closing the lock's descriptor of the database file would drop the
        # POSIX locks of SQLite connections still open in this process.
        self._unlock()

    def _unlock(self, *, refused: bool = False) -> None:
        """Release the server lock; after a refused start, also remove a lock file this
        start created (nothing of chatd's is left beside a file that is not chatd's)."""
        if self._lock is not None:
            self._lock.release(remove_created=refused)
            self._lock = None

    # --- running writes and reads ---------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], T], multi: bool = False) -> asyncio.Future[T]:
        return self._submit(fn, multi)

    def _enqueue(self, fn: Any, multi: bool = False) -> asyncio.Future[Any]:
        return self._submit(fn, multi)

    def _queue_purge(self, room_id: int) -> None:
        self._writer.housekeeping(Purge(room_id, self._ledger.purge_again))

    def _reader_db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = connect(self.path)
            self._local.db = db
            with self._reader_dbs_lock:
                self._reader_dbs.append(db)
        return db

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            return await self._write(fn)
        loop = asyncio.get_running_loop()

        def run() -> T:
            fault = self.fault()
            if fault is not None:
                raise StorageFailed(f"storage failed ({fault}); the server is stopping")
            try:
                return fn(self._reader_db())
            except sqlite3.Error as exc:
                log.error("reading the database failed: %s", exc,
                          extra={"event": "store_error", "error": str(exc)})
                raise as_chat_error(exc) from None

        return await loop.run_in_executor(self._readers, run)

    # --- accounts --------------------------------------------------------------------

    async def create_user(self, name: str, pw_hash: str, admin: bool) -> UserRecord:
        return await self._write(lambda db: q.create_user(db, name, pw_hash, admin))

    async def delete_user(self, name: str) -> bool:
        return await self._write(lambda db: q.delete_user(db, name))

    async def bump_token_version(self, name: str) -> int:
        return await self._write(lambda db: q.bump_token_version(db, name))

    async def revoke(self, jti: str, expires_at: int) -> None:
        await self._write(lambda db: q.revoke(db, jti, expires_at))

    async def get_user(self, name: str) -> UserRecord | None:
        return await self._read(lambda db: q.get_user(db, name))

    async def set_password(self, user_id: int, pw_hash: str) -> int | None:
        return await self._write(lambda db: q.set_password(db, user_id, pw_hash))

    async def hold_guest(self, hold: GuestHold) -> None:
        await self._write(lambda db: q.hold_guest(db, hold))

    def update_hold(self, hold: GuestHold) -> Awaitable[bool]:
        # Queued at the call, not at the first await: writes go in the order decided.
        return self._write(lambda db: q.update_hold(db, hold))

    def release_guest(self, hold: GuestHold) -> Awaitable[bool]:
        return self._write(lambda db: q.release_guest(db, hold))

    async def purge_expired(self, now: int) -> None:
        # Guest holds are not purged here: the server releases each when its grace ends
        # (one owner decides a hold's fate).
        await self._write(lambda db: q.purge_revoked(db, now), multi=True)

    async def users_version(self) -> int:
        return await self._read(q.users_version)

    async def reload_users(self) -> tuple[int, list[UserRecord]]:
        def op(db: sqlite3.Connection) -> tuple[int, list[UserRecord]]:
            db.execute("BEGIN")  # one read transaction: the version matches the users
            try:
                return q.users_version(db), q.users(db)
            finally:
                db.execute("COMMIT")

        if self._readers is None:  # ":memory:": reads run on the writer, inside its batch
            return await self._write(lambda db: (q.users_version(db), q.users(db)))
        return await self._read(op)

    # --- rooms -----------------------------------------------------------------------

    async def create_room(self, room: RoomRecord) -> RoomRecord:
        def op(db: sqlite3.Connection) -> RoomRecord:
            made = q.create_room(db, room)
            self._ledger.room_created(made.id)
            return made

        return await self._write(op)

    async def update_room(self, room_id: int, name: str, topic: str) -> None:
        await self._write(lambda db: q.update_room(db, room_id, name, topic))

    def delete_room(self, room_id: int, by: str = "") -> Awaitable[None]:
        """Queued at the call, not at the first await: a create of the same name that
        follows (an emptied ephemeral room's name reused at once) then comes after it."""

        def op(db: sqlite3.Connection) -> None:
            # The room row goes now (its history is unreachable from this commit on); its
            # messages follow in batches, so a huge room never stalls everyone's sends.
            q.delete_room(db, room_id)
            self._ledger.room_deleted(room_id)

        return self._write(op)

    # --- messages --------------------------------------------------------------------

    def add_message(self, msg: NewMessage) -> Awaitable[tuple[MessageRecord, bool]]:
        """Store a message; (record, True). A nonce the sender already used returns the
        original instead: (original, False). Consecutive sends in a batch become one
        executemany (_Ledger.insert_run)."""
        return self._submit(_Insert(msg))

    async def edit_message(
        self, message_id: int, text: str, ts: float, by: str
    ) -> MessageRecord | None:
        return await self._change_message(
            "text = ?, edited_ts = ?, edited_by = ?", (text, ts, by), message_id
        )

    async def delete_message(self, message_id: int, by: str = "") -> MessageRecord | None:
        return await self._change_message("text = '', deleted = 1", (), message_id)

    def _change_message(
        self, assignments: str, params: tuple[Any, ...], message_id: int
    ) -> asyncio.Future[MessageRecord | None]:
        """Change a live message, stamping the next revision on it; None if it is gone."""
        ledger = self._ledger

        def op(db: sqlite3.Connection) -> MessageRecord | None:
            rec = q.change_message(db, assignments, params, message_id, ledger.rev + 1)
            if rec is not None:
                ledger.rev = rec.rev
            return rec

        return self._write(op)

    async def count_messages(self) -> int:
        """Message rows stored (tombstones included), for `stats`; a read off the loop."""
        return await self._read(q.count_messages)

    async def get_message(self, message_id: int) -> MessageRecord | None:
        return await self._read(lambda db: q.get_message(db, message_id))

    async def find_nonce(self, sender_key: str, nonce: str) -> MessageRecord | None:
        return await self._read(lambda db: q.find_nonce(db, sender_key, nonce))

    async def room_history(
        self, room_id: int, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        return await self._read(lambda db: q.room_page(db, room_id, before, after, limit))

    async def dm_history(
        self, me: str, other: str | None, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        return await self._read(lambda db: q.dm_page(db, me, other, before, after, limit))

    async def changes_since(
        self, rev: int, room_ids: list[int], me: str, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        return await self._read(lambda db: q.changes_since(db, rev, room_ids, me, limit))

    async def has_dms_between(self, me: str, other: str) -> bool:
        return await self._read(lambda db: q.has_dms_between(db, me, other))

    # --- retention -------------------------------------------------------------------

    async def prune(self, now: float, max_age: float, keep: int, batch: int = 500) -> int:
        """Retention (see retention.prune): messages older than ``max_age`` seconds, and all
        but the newest ``keep`` per room and per DM pair (0 turns a rule off), in writes of
        at most ``batch`` rows. Returns how many messages left history."""

        def write(fn: Callable[[sqlite3.Connection], Any]) -> Awaitable[Any]:
            return self._write(fn, multi=True)

        return await prune(self._read, write, now, max_age, keep, batch)
