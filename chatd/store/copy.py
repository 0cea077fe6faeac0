"""`chatd copy --from SRC --to DST` (issue 11): move everything durable between an SQLite
file and a Redis database (either way, or SQLite to SQLite), keeping ids, revisions, the
epoch, nonces, tombstones, guest holds and revocations, so clients' `sync` cursors and
tokens stay valid. The target must be empty.

Tokens are signed with the server's secret, which is not data of either store: the secret
file beside an SQLite database (`DB.secret`) is NOT copied. Run the target's servers with
the same secret (`--secret`, `CHATD_SECRET`, or copy that file beside a new SQLite target)
and every token minted before the copy verifies after it.

The SQLite side is read and written here with plain sqlite3 (the schema is the SQLite
store's, chatd/store/schema.py); the Redis side through RedisStore's export/import.
Stop the servers of the source first: a copy is not a backup of a live service."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

from chatd.store.base import GuestHold, RoomRecord
from chatd.store.dump import Dump, MessageRow, UserRow
from chatd.store.sqlite.backup import seal_over, temp_beside
from chatd.store.sqlite.dbfiles import held_by_a_server
from chatd.store.sqlite.schema import SCHEMA_VERSION


class CopyError(Exception):
    """The copy cannot be done; the message says why, for the operator."""


def is_redis_url(where: str) -> bool:
    return where.startswith(("redis://", "rediss://", "unix://"))


# --- SQLite ------------------------------------------------------------------------------

_MSG_COLS = (
    "id, rev, room_id, sender, sender_key, recipient, recipient_key, text, ts, edited_ts,"
    " edited_by, deleted, nonce"
)


def _open_sqlite(path: str, *, readonly: bool) -> sqlite3.Connection:
    from chatd.store.sqlite import StoreOpenError, identify

    if readonly:
        uri = f"file:{urllib.parse.quote(path)}?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    else:
        db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    try:
        version = identify(db)
    except StoreOpenError as exc:
        db.close()
        raise CopyError(f"{path}: {exc}") from None
    if readonly and version != SCHEMA_VERSION:
        db.close()
        raise CopyError(
            f"{path} has schema version {version}; start this chatd on it once to upgrade it"
        )
    return db


def _seq(db: sqlite3.Connection, table: str) -> int:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    top = db.execute(f"SELECT max(id) FROM {table}").fetchone()[0]  # fixed table names
    return max(int(row[0]) if row else 0, int(top or 0))


def export_sqlite(path: str) -> tuple[Dump, Iterator[list[MessageRow]]]:
    """The SQLite database at ``path`` as a Dump and its messages (id order, tombstones
    too; those of a deleted room not purged yet are left out), read in one transaction."""
    if not os.path.isfile(path):
        raise CopyError(f"no database at {path}")
    db = _open_sqlite(path, readonly=True)
    db.execute("BEGIN")  # one consistent view for the whole copy (WAL: writers go on)
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    dump = Dump(
        epoch=meta["epoch"],
        rev=int(meta["rev"]),
        users_version=int(meta.get("users_version", 0)),
        last_user_id=_seq(db, "users"),
        last_room_id=_seq(db, "rooms"),
        last_message_id=_seq(db, "messages"),
        users=[
            UserRow(i, n, h, bool(a), v, float(c or 0))
            for i, n, h, a, v, c in db.execute(
                "SELECT id, name, pw_hash, admin, token_version, created_at FROM users ORDER BY id"
            )
        ],
        guests=[
            GuestHold(n, j, h, v)
            for n, j, h, v in db.execute(
                "SELECT name, jti, held_until, version FROM guests ORDER BY name"
            )
        ],
        revoked=dict(db.execute("SELECT jti, expires_at FROM revoked").fetchall()),
        rooms=[
            RoomRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]))
            for r in db.execute(
                "SELECT id, name, topic, owner, created_at, ephemeral, open FROM rooms ORDER BY id"
            )
        ],
    )

    def messages(batch: int = 2_000) -> Iterator[list[MessageRow]]:
        try:
            after = 0
            while True:
                rows = db.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE id > ? AND (room_id IS NULL"
                    " OR room_id IN (SELECT id FROM rooms)) ORDER BY id LIMIT ?",
                    (after, batch),
                ).fetchall()
                if not rows:
                    return
                yield [_message_row(r) for r in rows]
                after = rows[-1][0]
        finally:
            db.execute("COMMIT")
            db.close()

    return dump, messages()


def _message_row(r: tuple[Any, ...]) -> MessageRow:
    return MessageRow(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], bool(r[11]), r[12]
    )


def sqlite_is_empty(path: str) -> bool:
    """No file (or an empty one), or a chatd database with no data and revision 0."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    db = _open_sqlite(path, readonly=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in ("users", "rooms", "messages", "guests", "revoked"):
            if table in tables and db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                return False
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'rev'").fetchone()
            return row is None or int(row[0]) == 0
        return True
    finally:
        db.close()


def import_sqlite(path: str, dump: Dump, messages: Iterator[list[MessageRow]]) -> int:
    """Write a dump into the (empty) SQLite database at ``path`` in one transaction,
    creating it (mode 0600) if missing. Returns how many messages were written."""
    from chatd.store.sqlite import dm_key, migrate
    from chatd.store.sqlite.dbfiles import create_private

    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    create_private(path)
    db = _open_sqlite(path, readonly=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        migrate(db)
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO users (id, name, name_key, pw_hash, admin, token_version, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(u.id, u.name, u.name.lower(), u.pw_hash, int(u.admin), u.token_version,
              u.created_at) for u in dump.users],
        )  # fmt: skip
        db.executemany(
            "INSERT INTO guests (name_key, name, jti, expires_at, held_until, version)"
            " VALUES (?, ?, ?, 0, ?, ?)",
            [(g.name.lower(), g.name, g.jti, g.held_until, g.version) for g in dump.guests],
        )
        db.executemany("INSERT INTO revoked VALUES (?, ?)", list(dump.revoked.items()))
        db.executemany(
            "INSERT INTO rooms (id, name, name_key, topic, owner, created_at, ephemeral, open)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.id, r.name, r.name.lower(), r.topic, r.owner, r.created_at, int(r.ephemeral),
              int(r.open)) for r in dump.rooms],
        )  # fmt: skip
        count = 0
        for rows in messages:
            db.executemany(
                "INSERT INTO messages (id, rev, room_id, sender, sender_key, recipient,"
                " recipient_key, dm_key, text, ts, edited_ts, edited_by, deleted, nonce)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(m.id, m.rev, m.room_id, m.sender, m.sender_key, m.recipient, m.recipient_key,
                  dm_key(m.sender_key, m.recipient_key) if m.recipient_key is not None else None,
                  m.text, m.ts, m.edited_ts, m.edited_by, int(m.deleted), m.nonce)
                 for m in rows],
            )  # fmt: skip
            count += len(rows)
        # AUTOINCREMENT's counters: an id handed out once (its row since deleted) never again.
        for table, last in (("users", dump.last_user_id), ("rooms", dump.last_room_id),
                            ("messages", dump.last_message_id)):  # fmt: skip
            db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, last))
        for key, value in (("epoch", dump.epoch), ("rev", str(dump.rev)),
                           ("users_version", str(dump.users_version))):  # fmt: skip
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        db.execute("COMMIT")
        return count
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


# --- the command -------------------------------------------------------------------------


def copy(source: str, target: str) -> int:
    """Copy ``source`` to the empty ``target`` (each an SQLite path or a redis:// URL).
    Returns how many messages were copied; CopyError when refused or impossible."""
    from chatd.store.redis import RedisStore, RedisStoreError

    if source == target:
        raise CopyError("--from and --to are the same")
    try:
        if is_redis_url(target):
            empty = RedisStore(target).is_empty()
        else:
            empty = sqlite_is_empty(target)
        if not empty:
            raise CopyError(f"the target {shown(target)} is not empty; chatd copy only fills an empty one")
        if is_redis_url(source):
            src = RedisStore(source)
            dump, messages = src.export_dump(), src.export_messages()
        else:
            dump, messages = export_sqlite(source)
        if is_redis_url(target):
            return RedisStore(target).import_dump(dump, messages)
        return import_sqlite(target, dump, messages)
    except RedisStoreError as exc:
        raise CopyError(str(exc)) from None
    except sqlite3.Error as exc:
        raise CopyError(f"SQLite: {exc}") from None


def shown(where: str) -> str:
    """A URL without its password."""
    if not is_redis_url(where):
        return where
    u = urllib.parse.urlsplit(where)
    return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"


# --- chatd backup --redis ----------------------------------------------------------------


def backup_redis(url: str, dest: str, *, attempts: int = 3) -> int:
    """`chatd backup --redis URL PATH`: the Redis data as an SQLite file at ``dest`` (made
    private beside it, then renamed over it, so ``dest`` is always whole), while nodes run.

    Redis gives no snapshot across many reads, so the copy is checked instead: the
    counters every message, room and account change and revocation moves (revision, ids,
    users_version, `changes`) and the number of revocations are read before and after; if
    any moved, the copy is thrown away and taken again, up to ``attempts`` times, then
    refused (the message points to Redis's own online backup). Joins, leaves and guest
    holds move none of them, so a busy service is backed up all the same; guest holds are
    as read during the copy. A ``dest`` that a running chatd server holds as its database
    is refused. As
    `chatd backup`, the copy gets a new epoch: restored (`chatd copy --from PATH --to
    redis://...`), ids and revisions rewind, and clients must know their cursors are void.
    Returns the number of live messages in the copy."""
    from chatd.store.redis import RedisStore, RedisStoreError

    if os.path.isdir(dest):
        raise CopyError(f"{dest} is a directory; name the backup file")
    if held_by_a_server(dest):
        raise CopyError(
            f"{dest} is the database of a running chatd server; replacing it would cut that "
            "server off its file: name another file"
        )
    store = RedisStore(url)
    try:
        for _ in range(attempts):
            before = _change_marks(store)
            dump = store.export_dump()
            dump.epoch = uuid.uuid4().hex
            with temp_beside(dest) as tmp:
                import_sqlite(tmp, dump, store.export_messages())
                if _change_marks(store) != before:
                    continue  # a node wrote meanwhile: take it again
                return seal_over(tmp, dest)
    except RedisStoreError as exc:
        raise CopyError(str(exc)) from None
    except sqlite3.Error as exc:
        raise CopyError(f"SQLite: {exc}") from None
    except OSError as exc:
        raise CopyError(f"cannot write {dest}: {exc.strerror or exc}") from None
    raise CopyError(
        f"the data in {shown(url)} changed during each of {attempts} tries (nodes are "
        "writing): back Redis up with its own online snapshot (redis-cli --rdb FILE), or "
        "stop the nodes and try again"
    )


def _change_marks(store: Any) -> tuple[Any, ...]:
    """What any message, room or account change, or a revocation, moves (RedisStore): the
    counters, and `changes`, which every room and account change and revocation moves
    (scripts.py, notify: a rename, a user.delete or a passwd moves no other counter);
    joins, leaves and guest holds move none of them (a busy service can be backed up)."""
    from redis.exceptions import RedisError

    from chatd.store.redis import RedisStoreError

    P = store.prefix
    r = store.sync_client()
    try:
        marks = r.hmget(
            P + "meta", "epoch", "rev", "msg_id", "room_id", "user_id", "users_version", "changes"
        )
        return (*marks, r.zcard(P + "revoked"))
    except RedisError as exc:
        raise RedisStoreError(f"Redis at {shown(store.url)}: {exc}") from None
    finally:
        r.close()
