"""Retention and the removal of a deleted room's messages: both in small batches through
the writer, so other writes interleave and the writer never stalls for long."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Run = Callable[[Callable[[sqlite3.Connection], T]], Awaitable[T]]

PURGE_BATCH = 2_000  # messages of a deleted room removed per transaction
# Contract: a nonce is kept at least 24 h, so retention blanks such a message instead of
# deleting its row until then.
NONCE_KEEP = 24 * 3600.0


class Purge:
    """Writer housekeeping: delete a gone room's messages, PURGE_BATCH per transaction;
    `again` is told the room while more are left (the store queues it after the commit)."""

    __slots__ = ("again", "room_id")

    def __init__(self, room_id: int, again: Callable[[int], None]) -> None:
        self.room_id = room_id
        self.again = again

    def __call__(self, db: sqlite3.Connection) -> None:
        cur = db.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE room_id = ? LIMIT ?)",
            (self.room_id, PURGE_BATCH),
        )
        if cur.rowcount >= PURGE_BATCH:
            self.again(self.room_id)


async def prune(
    read: Run[Any], write: Run[Any], now: float, max_age: float, keep: int, batch: int
) -> int:
    """Store.prune on SQLite: ``read`` runs a function on a reader, ``write`` one on the
    writer (in a savepoint). The groups to trim are found on a reader; each batch of at
    most ``batch`` rows is its own write. No events, no revisions: a pruned message just
    leaves history. A message whose nonce is younger than NONCE_KEEP is blanked (a
    tombstone) rather than deleted, so a retried send still finds it. Returns how many
    messages left history."""
    total = 0
    if max_age > 0:
        total += await _prune_range(write, "1", (), None, now - max_age, now, batch)
    if keep > 0:
        for where, key in await read(lambda db: _over_keep(db, keep)):

            def cutoff(db: sqlite3.Connection, where: str = where, key: Any = key) -> Any:
                # The oldest of the newest `keep`: a reader's snapshot may be a little
                # old, which only keeps more, never less.
                return db.execute(
                    f"SELECT id FROM messages WHERE {where} AND deleted = 0 "
                    "ORDER BY id DESC LIMIT 1 OFFSET ?",
                    (key, keep - 1),
                ).fetchone()

            below = await read(cutoff)
            if below is not None:
                total += await _prune_range(write, where, (key,), below[0], None, now, batch)
    return total


async def _prune_range(
    write: Run[Any],
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

        n, after, more = await write(op)
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
