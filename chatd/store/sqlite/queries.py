"""The SQL of the Store's operations, as plain functions of a connection: accounts, guest
holds, rooms, messages, history pages and sync. The store runs the writes on its writer
(group commit) and the reads on its readers; nothing here knows which thread it is on."""

from __future__ import annotations

import sqlite3
from typing import Any

from chatd.errors import Conflict
from chatd.store.base import GuestHold, MessageRecord, RoomRecord, UserRecord

MSG_COLS = (
    "id, rev, room_id, sender, recipient, text, ts, edited_ts, edited_by, deleted,"
    " sender_key, recipient_key"
)
_USER_COLS = "id, name, pw_hash, admin, token_version"
# SQLite caps the variables of one statement: rooms go into IN (…) lists this long.
_IN_CHUNK = 500


def dm_key(a: str, b: str) -> str:
    """The one key of a DM pair, whichever way the message went."""
    x, y = sorted((a.lower(), b.lower()))
    return f"{x}\n{y}"


def msg(row: tuple[Any, ...]) -> MessageRecord:
    return MessageRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], bool(row[9]),
        row[10], row[11],
    )  # fmt: skip


def _user(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(row[0], row[1], row[2], bool(row[3]), row[4])


# --- meta ---------------------------------------------------------------------------------


def meta(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM meta").fetchall())


def users_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = 'users_version'").fetchone()
    return int(row[0])


def bump_users_version(db: sqlite3.Connection) -> None:
    """Tell a running server that accounts changed (it polls this value)."""
    db.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'users_version'"
    )


def set_rev(db: sqlite3.Connection, rev: int) -> None:
    db.execute("UPDATE meta SET value = ? WHERE key = 'rev'", (str(rev),))


def last_message_id(db: sqlite3.Connection) -> int:
    """The highest message id ever handed out (AUTOINCREMENT remembers deleted ones)."""
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    top = db.execute("SELECT max(id) FROM messages").fetchone()
    return max(seq[0] if seq else 0, top[0] or 0)


# --- accounts -----------------------------------------------------------------------------


def users(db: sqlite3.Connection) -> list[UserRecord]:
    """Every account, sorted by name case-insensitively."""
    return [_user(r) for r in db.execute(f"SELECT {_USER_COLS} FROM users ORDER BY name_key")]


def get_user(db: sqlite3.Connection, name: str) -> UserRecord | None:
    row = db.execute(
        f"SELECT {_USER_COLS} FROM users WHERE name_key = ?", (name.lower(),)
    ).fetchone()
    return None if row is None else _user(row)


def create_user(db: sqlite3.Connection, name: str, pw_hash: str, admin: bool) -> UserRecord:
    cur = db.execute(
        "INSERT INTO users (name, name_key, pw_hash, admin, created_at) "
        "VALUES (?, ?, ?, ?, strftime('%s','now')) ON CONFLICT(name_key) DO NOTHING",
        (name, name.lower(), pw_hash, int(admin)),
    )
    if cur.rowcount == 0:
        raise Conflict(f"user {name!r} already exists")
    return UserRecord(int(cur.lastrowid or 0), name, pw_hash, admin, 0)


def delete_user(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("DELETE FROM users WHERE name_key = ?", (name.lower(),)).rowcount > 0


def bump_token_version(db: sqlite3.Connection, name: str) -> int:
    row = db.execute(
        "UPDATE users SET token_version = token_version + 1 WHERE name_key = ? "
        "RETURNING token_version",
        (name.lower(),),
    ).fetchone()
    return int(row[0]) if row else 0


def set_password(db: sqlite3.Connection, user_id: int, pw_hash: str) -> int | None:
    row = db.execute(
        "UPDATE users SET pw_hash = ?, token_version = token_version + 1 WHERE id = ? "
        "RETURNING token_version",
        (pw_hash, user_id),
    ).fetchone()
    return int(row[0]) if row else None


def revoke(db: sqlite3.Connection, jti: str, expires_at: int) -> None:
    db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (jti, expires_at))


def revoked(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT jti, expires_at FROM revoked").fetchall())


def purge_revoked(db: sqlite3.Connection, now: int) -> None:
    db.execute("DELETE FROM revoked WHERE expires_at <= ?", (now,))


# --- guest holds (compare-and-set on version) ------------------------------------------


def guest_holds(db: sqlite3.Connection) -> list[GuestHold]:
    return [
        GuestHold(n, j, h, v)
        for n, j, h, v in db.execute("SELECT name, jti, held_until, version FROM guests")
    ]


def guest_hold(db: sqlite3.Connection, name: str) -> GuestHold | None:
    row = db.execute(
        "SELECT name, jti, held_until, version FROM guests WHERE name_key = ?", (name.lower(),)
    ).fetchone()
    return None if row is None else GuestHold(*row)


def hold_guest(db: sqlite3.Connection, hold: GuestHold) -> None:
    db.execute(
        "INSERT OR REPLACE INTO guests (name_key, name, jti, expires_at, held_until,"
        " version) VALUES (?, ?, ?, 0, ?, ?)",
        (hold.name.lower(), hold.name, hold.jti, hold.held_until, hold.version),
    )


def update_hold(db: sqlite3.Connection, hold: GuestHold) -> bool:
    cur = db.execute(
        "UPDATE guests SET held_until = ?, version = ?"
        " WHERE name_key = ? AND jti = ? AND version < ?",
        (hold.held_until, hold.version, hold.name.lower(), hold.jti, hold.version),
    )
    return cur.rowcount > 0


def release_guest(db: sqlite3.Connection, hold: GuestHold) -> bool:
    cur = db.execute(
        "DELETE FROM guests WHERE name_key = ? AND jti = ? AND version < ?",
        (hold.name.lower(), hold.jti, hold.version),
    )
    return cur.rowcount > 0


def drop_hold(db: sqlite3.Connection, name: str) -> None:
    """Remove whatever hold is stored for the name (a lapsed one, offline)."""
    db.execute("DELETE FROM guests WHERE name_key = ?", (name.lower(),))


# --- rooms --------------------------------------------------------------------------------


def rooms(db: sqlite3.Connection) -> list[RoomRecord]:
    return [
        RoomRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]))
        for r in db.execute("SELECT id, name, topic, owner, created_at, ephemeral, open FROM rooms")
    ]


def create_room(db: sqlite3.Connection, room: RoomRecord) -> RoomRecord:
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


def update_room(db: sqlite3.Connection, room_id: int, name: str, topic: str) -> None:
    db.execute(
        "UPDATE rooms SET name = ?, name_key = ?, topic = ? WHERE id = ?",
        (name, name.lower(), topic, room_id),
    )


def delete_room(db: sqlite3.Connection, room_id: int) -> None:
    db.execute("DELETE FROM rooms WHERE id = ?", (room_id,))


def drop_ephemeral_rooms(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM rooms WHERE ephemeral = 1")


def orphaned_rooms(db: sqlite3.Connection) -> list[int]:
    """Ids of gone rooms whose messages are still stored."""
    return [
        r[0]
        for r in db.execute(
            "SELECT DISTINCT room_id FROM messages WHERE room_id IS NOT NULL"
            " AND room_id NOT IN (SELECT id FROM rooms)"
        )
    ]


# --- messages -----------------------------------------------------------------------------


def find_nonce(db: sqlite3.Connection, sender_key: str, nonce: str) -> MessageRecord | None:
    row = db.execute(
        f"SELECT {MSG_COLS} FROM messages WHERE sender_key = ? AND nonce = ?",
        (sender_key, nonce),
    ).fetchone()
    return msg(row) if row is not None else None


def insert_messages(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Rows of (id, rev, room_id, sender, sender_key, recipient, recipient_key, dm_key,
    text, ts, nonce). Explicit ids: AUTOINCREMENT still records them in sqlite_sequence,
    so an id is never handed out twice, and the one writer knows them without lastrowid."""
    db.executemany(
        "INSERT INTO messages (id, rev, room_id, sender, sender_key, recipient,"
        " recipient_key, dm_key, text, ts, nonce) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )


def change_message(
    db: sqlite3.Connection, assignments: str, params: tuple[Any, ...], message_id: int, rev: int
) -> MessageRecord | None:
    """Change a live message, stamping `rev` on it; None if it is gone or deleted, or its
    room is (a deleted room's messages stay until purged)."""
    row = db.execute(
        f"UPDATE messages SET {assignments}, rev = ? WHERE id = ? AND deleted = 0 AND "
        f"(room_id IS NULL OR room_id IN (SELECT id FROM rooms)) RETURNING {MSG_COLS}",
        (*params, rev, message_id),
    ).fetchone()
    return None if row is None else msg(row)


def get_message(db: sqlite3.Connection, message_id: int) -> MessageRecord | None:
    row = db.execute(f"SELECT {MSG_COLS} FROM messages WHERE id = ?", (message_id,)).fetchone()
    return msg(row) if row else None


def count_messages(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


def has_dms_between(db: sqlite3.Connection, me: str, other: str) -> bool:
    who = other.lower()
    row = db.execute(
        "SELECT 1 FROM messages WHERE room_id IS NULL AND ("
        "(sender_key = ? AND lower(recipient) = ?) OR (recipient_key = ? AND lower(sender) = ?)"
        ") LIMIT 1",
        (me, who, me, who),
    ).fetchone()
    return row is not None


# --- history pages and sync -----------------------------------------------------------------


def room_page(
    db: sqlite3.Connection, room_id: int, before: int | None, after: int | None, limit: int
) -> tuple[list[MessageRecord], bool]:
    return page(db, "room_id = ?", (room_id,), before, after, limit)


def dm_page(
    db: sqlite3.Connection,
    me: str,
    other: str | None,
    before: int | None,
    after: int | None,
    limit: int,
) -> tuple[list[MessageRecord], bool]:
    """DMs of identity `me`, oldest first; with `other` (a name), only those with whoever
    held that name. Another holder of `me`'s name sees none of them."""
    sent: tuple[str, tuple[Any, ...]]
    got: tuple[str, tuple[Any, ...]]
    if other is not None:
        who = other.lower()
        sent = ("room_id IS NULL AND sender_key = ? AND lower(recipient) = ?", (me, who))
        got = ("room_id IS NULL AND recipient_key = ? AND lower(sender) = ?", (me, who))
    else:
        sent = ("room_id IS NULL AND sender_key = ?", (me,))
        got = ("room_id IS NULL AND recipient_key = ?", (me,))
    return page(db, sent[0], sent[1], before, after, limit, got)


def page(
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
            f"SELECT {MSG_COLS} FROM messages WHERE {arm_where} AND deleted = 0{cursor}{order}"
        )
        params += [*arm_args, *cursor_args, limit + 1]
    if len(parts) == 1:
        sql = parts[0]
    else:
        sql = " UNION ".join(f"SELECT * FROM ({p})" for p in parts) + order
        params.append(limit + 1)
    rows = db.execute(sql, params).fetchall()
    more = len(rows) > limit
    result = [msg(r) for r in rows[:limit]]
    if not ascending:
        result.reverse()
    return result, more


def changes_since(
    db: sqlite3.Connection, rev: int, room_ids: list[int], me: str, limit: int
) -> tuple[list[MessageRecord], bool]:
    """Every message with rev > `rev` in those rooms and in `me`'s DMs, oldest revision
    first. Each source is read through its own (…, rev) index, so the cost is what the
    caller missed, not every change on the server since."""
    arms = [
        "SELECT {cols} FROM messages WHERE room_id IS NULL AND sender_key = ? AND rev > ?",
        "SELECT {cols} FROM messages WHERE room_id IS NULL AND recipient_key = ?"
        " AND sender_key != recipient_key AND rev > ?",
    ]
    params: list[Any] = [me, rev, me, rev]
    for i in range(0, len(room_ids), _IN_CHUNK):
        chunk = room_ids[i : i + _IN_CHUNK]
        arms.append(
            "SELECT {cols} FROM messages WHERE room_id IN ("
            + ",".join("?" * len(chunk))
            + ") AND rev > ?"
        )
        params += [*chunk, rev]
    sql = (
        " UNION ALL ".join(f"SELECT * FROM ({a.format(cols=MSG_COLS)})" for a in arms)
        + " ORDER BY rev LIMIT ?"
    )
    params.append(limit + 1)
    rows = db.execute(sql, params).fetchall()
    return [msg(r) for r in rows[:limit]], len(rows) > limit
