"""The group-commit writer: one thread owns the write connection and runs every queued write
inside one `BEGIN IMMEDIATE` transaction shared with whatever else is queued; the writes'
results are delivered on the event loop, in the order they were queued, only after COMMIT
returned (so an acknowledged write is durable, and events leave in revision order).

The engine knows nothing of chatd's tables. What a store allocates inside a transaction (ids,
revisions, …) it keeps in a `Ledger`, which the engine marks before a batch, lets write itself
just before COMMIT, and rolls back when the batch fails. Storage errors are classified here by
SQLite's result code, in one table (`as_chat_error`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from chatd.errors import ChatError, Internal, StorageFailed, StoreStopped
from chatd.store.deferred import Deferred

T = TypeVar("T")
log = logging.getLogger("chatd")

MAX_BATCH = 2_000
_SMALL_BATCH = 8  # fewer queued writes than this ...
_BUSY = 0.002  # ... within this long of the last commit ...
_COMMIT_DELAY = 0.0005  # ... wait this long for more before committing


class Grouped:
    """A write the engine hands, together with the Grouped writes queued right after it, to
    the store's group runner in one call (msg.send: one executemany for a run of sends)."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item


Op = Callable[[sqlite3.Connection], Any] | Grouped
# (write, its future or None for the writer's own housekeeping, run in a savepoint)
Queued = tuple[Op, "asyncio.Future[Any] | None", bool]
# (future, value, error) per write, in queue order
Result = tuple[Any, Any, BaseException | None]
GroupRunner = Callable[[sqlite3.Connection, list[tuple[Grouped, Any]]], list[Result]]


class Ledger(Protocol):
    """What the store allocates in the writer thread, transaction by transaction."""

    rev: int  # the revision of the newest change written; published once committed

    def mark(self) -> None:
        """A batch begins: remember what to go back to."""

    def before_commit(self, db: sqlite3.Connection) -> None:
        """Write what was allocated, inside the batch's transaction."""

    def committed(self) -> None:
        """The batch's COMMIT returned."""

    def rolled_back(self, batch: list[Queued]) -> None:
        """The batch failed whole: go back to the mark."""


class Writer:
    """One writer thread doing group commit for one connection.

    `rev` is the published watermark: set on the event loop, just before the results of the
    batch that reached it are delivered, so it never runs ahead of a committed state."""

    def __init__(self, ledger: Ledger, run_group: GroupRunner, *, max_batch: int = MAX_BATCH) -> None:
        self.ledger = ledger
        self.run_group = run_group
        self.max_batch = max_batch
        self.rev = 0
        self.db: sqlite3.Connection | None = None
        self.pending: collections.deque[Queued] = collections.deque()
        self._wake = threading.Event()
        self._idle = False
        self._last_commit = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False  # the last batch failed (logged once, and once on recovery)
        # For `stats`: how long the last transactions took (BEGIN to COMMIT, fsync
        # included), appended by the writer thread (deque.append is atomic), and how many
        # batches failed since start.
        self.commit_times: collections.deque[float] = collections.deque(maxlen=1024)
        self.write_errors = 0
        self._failed_batches = 0  # in the current failing streak
        # Asked before every batch (writer thread): why the database must not be touched
        # (the store's fault), or None. A batch then fails without entering SQLite.
        self.guard: Callable[[], str | None] | None = None

    def start(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.rev = self.ledger.rev
        self._thread = threading.Thread(target=self._run, name="chatd-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    def abandon(self) -> None:
        """Stop without waiting for the thread (it may be stuck in a fault): what is queued
        fails at its next look at the guard."""
        self._stopping = True
        self._wake.set()

    def submit(self, fn: Op, multi: bool = False) -> asyncio.Future[Any]:
        """Queue a write (at the call: writes run in the order they were submitted). Its
        future resolves after the commit; ``multi`` runs it in a savepoint, so its failure
        undoes its own statements only."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Every write resolves eagerly, in batch order: events then leave in revision order.
        # (A Deferred is what awaiting code uses of a Future; typed as one without a
        # typing.cast, which is a function call on every write.)
        fut: asyncio.Future[Any] = Deferred(loop)  # type: ignore[assignment]
        if self._stopping:
            fut.set_exception(StoreStopped("the server is shutting down"))
            return fut
        self.pending.append((fn, fut, multi))
        if self._idle:
            self._wake.set()
        return fut

    def housekeeping(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue the store's own write (no one waits for it). Writer thread, or before start."""
        self.pending.append((fn, None, False))

    def _run(self) -> None:
        pending = self.pending
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
                batch: list[Queued] = []
                while pending and len(batch) < self.max_batch:
                    batch.append(pending.popleft())
                self._run_batch(batch)
            if self._stopping and not pending:
                return

    def _run_batch(self, batch: list[Queued]) -> None:
        db = self.db
        assert db is not None
        fault = self.guard() if self.guard is not None else None
        if fault is not None:
            self.write_errors += 1
            refused = StorageFailed(f"storage failed ({fault}); the server is stopping; the change was not saved")
            self._hand_back([(fut, None, refused) for _, fut, _ in batch], self.ledger.rev)
            return
        ledger = self.ledger
        ledger.mark()
        results: list[Result] = []
        began = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            i, n = 0, len(batch)
            while i < n:
                fn, fut, multi = batch[i]
                if isinstance(fn, Grouped):
                    run: list[tuple[Grouped, Any]] = []
                    while i < n:
                        op = batch[i][0]
                        if not isinstance(op, Grouped):
                            break
                        run.append((op, batch[i][1]))
                        i += 1
                    results += self.run_group(db, run)
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
                    results.append((fut, None, as_chat_error(exc)))
                else:
                    if multi:
                        db.execute("RELEASE op")
                    results.append((fut, value, None))
            ledger.before_commit(db)
            db.execute("COMMIT")
            self._last_commit = time.monotonic()
            self.commit_times.append(time.perf_counter() - began)
            ledger.committed()
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
            # the ledger goes back and every write in it fails; the next batch tries anew.
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            ledger.rolled_back(batch)
            err = as_chat_error(exc)
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
        self._hand_back(results, ledger.rev)

    def _hand_back(self, results: list[Result], rev: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, results, rev)

    def _deliver(self, results: list[Result], rev: int) -> None:
        # The watermark first: a command resumed below may read it (sync) at once.
        self.rev = rev
        for fut, value, exc in results:
            if fut is None or fut.done():  # None: the writer's own housekeeping
                continue
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)


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


def as_chat_error(exc: BaseException) -> ChatError:
    """The error a client is told for a failed storage operation (ChatErrors pass through)."""
    if isinstance(exc, ChatError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _STORAGE_ERRORS:
        return Internal(_STORAGE_ERRORS[code & 0xFF])
    return Internal("storage error; the change was not saved")
