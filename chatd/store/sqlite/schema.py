"""The SQLite schema, versioned (each entry of MIGRATIONS moves a database one version up),
and what tells a chatd database from any other file: identify, migrate, check_file."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
import uuid

from chatd.store.base import StoreOpenError

SCHEMA_VERSION = 3
APPLICATION_ID = 0x63686174  # "chat": tells a chatd database from any other SQLite file

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL UNIQUE,
        pw_hash TEXT NOT NULL,
        admin INTEGER NOT NULL DEFAULT 0,
        token_version INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE guests (
        name_key TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        jti TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE revoked (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
    CREATE TABLE rooms (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL UNIQUE,
        topic TEXT NOT NULL,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        ephemeral INTEGER NOT NULL,
        open INTEGER NOT NULL
    );
    -- AUTOINCREMENT: a deleted newest message's id is never handed out again.
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rev INTEGER NOT NULL,
        room_id INTEGER,
        sender TEXT NOT NULL,
        sender_key TEXT NOT NULL,
        recipient TEXT,
        recipient_key TEXT,
        dm_key TEXT,
        text TEXT NOT NULL,
        ts REAL NOT NULL,
        edited_ts REAL,
        edited_by TEXT,
        deleted INTEGER NOT NULL DEFAULT 0,
        nonce TEXT
    );
    CREATE INDEX messages_room ON messages(room_id, id) WHERE room_id IS NOT NULL;
    CREATE INDEX messages_rev ON messages(rev);
    CREATE INDEX messages_dm ON messages(dm_key, id) WHERE room_id IS NULL;
    CREATE INDEX messages_dm_from ON messages(sender_key, id) WHERE room_id IS NULL;
    CREATE INDEX messages_dm_to ON messages(recipient_key, id) WHERE room_id IS NULL;
    CREATE UNIQUE INDEX messages_nonce ON messages(sender_key, nonce) WHERE nonce IS NOT NULL;
    """,
    # sync reads each source by revision: its rooms, and its DMs either way.
    2: """
    DROP INDEX messages_rev;
    CREATE INDEX messages_room_rev ON messages(room_id, rev) WHERE room_id IS NOT NULL;
    CREATE INDEX messages_dm_from_rev ON messages(sender_key, rev) WHERE room_id IS NULL;
    CREATE INDEX messages_dm_to_rev ON messages(recipient_key, rev) WHERE room_id IS NULL;
    """,
    # Guest names come back: a hold lasts while its guest is connected (held_until NULL)
    # and until held_until after that; every change of a hold takes the next version, and
    # a write applies only over an older one (compare-and-set). expires_at is unused since.
    3: """
    ALTER TABLE guests ADD COLUMN held_until INTEGER;
    ALTER TABLE guests ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    """,
}


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread."""
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


def check_file(path: str) -> None:
    """Refuse (StoreOpenError), before anything is created beside it, a file that is not a
    chatd database. Read-only: nothing in someone else's file changes. A missing or empty
    file passes (it becomes a new database)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreOpenError(str(exc)) from None
    try:
        identify(db)
    finally:
        db.close()

