"""The SQLite schema, versioned; each entry of MIGRATIONS moves a database one version up."""

from __future__ import annotations

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
