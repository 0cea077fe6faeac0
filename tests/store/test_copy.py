"""`chatd copy` (issue 11): SQLite -> Redis -> SQLite gives the same data, checked row by
row and field by field; the Redis copy answers every read as the SQLite original; tokens
minted before the copy still work on both copies (same secret); a non-empty target is
refused with exit 2 and one line. Real redis-server (tests/redisutil.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from chatd.auth import TokenService, new_jti
from chatd.cli import main
from chatd.clock import SystemClock
from chatd.server import ChatServer
from chatd.store.base import GuestHold, NewMessage, RoomRecord
from chatd.store.copy import copy
from chatd.store.redis import RedisStore
from chatd.store.sqlite import SQLiteStore
from tests.helpers import SECRET, TEST_CONFIG, Client

TABLES = ("meta", "users", "guests", "revoked", "rooms", "messages", "sqlite_sequence")


def msg(room_id: int | None, text: str, sender: str, key: str, *, to: str | None = None,
        to_key: str | None = None, nonce: str | None = None, ts: float = 1.5) -> NewMessage:  # fmt: skip
    return NewMessage(room_id, sender, to, text, ts, nonce, sender_key=key, recipient_key=to_key)


async def make_source(path: str) -> dict[str, Any]:
    """A database with something of every kind, gaps in every counter included."""
    s = SQLiteStore(path)
    s.open()
    ann = await s.create_user("Ann", "hash-a", True)
    bob = await s.create_user("bob", "hash-b", False)
    await s.create_user("carl", "hash-c", False)
    await s.delete_user("carl")  # the newest user id is gone: the counter is past max(id)
    await s.bump_token_version("ann")
    await s.hold_guest(GuestHold("Guest7", "g7", 1_900_000_000, 3))
    await s.hold_guest(GuestHold("Guest8", "g8", None, 1))
    await s.revoke("1.0.revokedjti", 2_000_000_000)
    lobby = await s.create_room(RoomRecord(0, "lobby", "", "Ann", 1.25, False, False))
    await s.update_room(lobby.id, "Lobby", "the topic")
    await s.create_room(RoomRecord(0, "open", "t", "bob", 2.5, False, True))
    gone = await s.create_room(RoomRecord(0, "gone", "", "bob", 3.0, False, False))
    ann_key, bob_key = f"Ann#{ann.id}", f"bob#{bob.id}"
    sent = []
    for i in range(30):
        m, _ = await s.add_message(msg(lobby.id, f"m{i}", "Ann", ann_key, nonce=f"n{i}",
                                       ts=1000.0 + i / 7))  # fmt: skip
        sent.append(m)
    dm, _ = await s.add_message(msg(None, "psst", "Ann", ann_key, to="bob", to_key=bob_key,
                                    nonce="dm1", ts=2000.123456789))  # fmt: skip
    await s.add_message(msg(None, "back", "bob", bob_key, to="Ann", to_key=ann_key))
    await s.add_message(msg(None, "self", "bob", bob_key, to="bob", to_key=bob_key))
    await s.edit_message(sent[3].id, "edited", 3000.25, "Ann")
    await s.delete_message(sent[4].id)
    await s.delete_message(dm.id)
    await s.add_message(msg(gone.id, "in a room that goes", "bob", bob_key))
    await s.delete_room(gone.id)  # its message (the newest id) is purged
    await s.close()
    return {"ann": ann, "bob": bob, "lobby": lobby, "ann_key": ann_key, "bob_key": bob_key}


def rows(path: str) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
    finally:
        db.close()


async def reads(store: Any, ctx: dict[str, Any]) -> list[Any]:
    """The same questions to any store."""
    lobby, a, b = ctx["lobby"].id, ctx["ann_key"], ctx["bob_key"]
    return [
        await store.room_history(lobby, None, None, 10),
        await store.room_history(lobby, 20, 3, 5),
        await store.room_history(lobby, None, 25, 50),
        await store.dm_history(a, None, None, None, 50),
        await store.dm_history(b, "ann", None, None, 50),
        await store.dm_history(b, "bob", None, None, 50),
        await store.changes_since(0, [lobby], a, 500),
        await store.changes_since(10, [lobby], b, 7),
        await store.find_nonce(a, "n7"),
        await store.find_nonce(a, "dm1"),
        await store.get_message(5),
        await store.has_dms_between(a, "BOB"),
        await store.count_messages(),
        sorted((await store.reload_users())[1], key=lambda u: u.id),
        await store.get_user("ann"),
    ]


async def test_sqlite_to_redis_to_sqlite_keeps_every_field(tmp_path: Path, redis_url: str) -> None:
    src, back = str(tmp_path / "src.db"), str(tmp_path / "back.db")
    ctx = await make_source(src)
    before = rows(src)
    assert copy(src, redis_url) == 33
    assert copy(redis_url, back) == 33
    after = rows(back)
    for table in TABLES:
        assert after[table] == before[table], table
    assert len(before["messages"]) == 33 and before["sqlite_sequence"]

    # The Redis copy answers every read as the SQLite original does (opened read-only in
    # spirit: a fresh copy of the file, since SQLiteStore.open drops ephemeral rooms).
    original = SQLiteStore(back)
    snap_sqlite = original.open()
    red = RedisStore(redis_url)
    snap_redis = red.open()
    try:
        # epoch, rev, users, guests, revocations, rooms (SQLite's guests in table order)
        snap_sqlite.guests.sort(key=lambda g: g.name)
        assert snap_redis == snap_sqlite
        assert await reads(red, ctx) == await reads(original, ctx)
        # Counters go on where they were: no id or revision is handed out twice.
        top_id = max(r[0] for r in before["messages"])
        m1, _ = await red.add_message(msg(ctx["lobby"].id, "next", "bob", ctx["bob_key"]))
        m2, _ = await original.add_message(msg(ctx["lobby"].id, "next", "bob", ctx["bob_key"]))
        assert m1.id == m2.id > top_id + 1 and m1.rev == m2.rev == snap_sqlite.rev + 1
        r1 = await red.create_room(RoomRecord(0, "new", "", "bob", 1.0, False, False))
        r2 = await original.create_room(RoomRecord(0, "new", "", "bob", 1.0, False, False))
        assert r1.id == r2.id == 4
        u1 = await red.create_user("dan", "h", False)
        u2 = await original.create_user("dan", "h", False)
        assert u1.id == u2.id == 4
    finally:
        await red.close()
        await original.close()


async def test_tokens_minted_before_the_copy_work_on_both_copies(
    tmp_path: Path, redis_url: str
) -> None:
    src, back = str(tmp_path / "src.db"), str(tmp_path / "back.db")
    ctx = await make_source(src)
    tokens = TokenService(SECRET, SystemClock())
    ann = ctx["ann"]
    token, _ = tokens.mint("Ann", new_jti(ann.id, 1), ("admin",), 3600)
    stale, _ = tokens.mint("Ann", new_jti(ann.id, 0), ("admin",), 3600)  # before the bump
    revoked, _ = tokens.mint("Ann", "1.0.revokedjti", ("admin",), 3600)
    copy(src, redis_url)
    copy(redis_url, back)
    for store in (RedisStore(redis_url), SQLiteStore(back)):
        server = ChatServer(TEST_CONFIG, store, SECRET)  # the same secret: carried over
        await server.start()
        try:
            c = await Client.connect(server.port)
            try:
                me = await c.ok("auth", token=token)
                assert me["user"] == "Ann"
                page = await c.ok("room.history", room="Lobby", limit=3)
                assert [m["text"] for m in page["messages"]] == ["m27", "m28", "m29"]
                for bad in (stale, revoked):
                    assert (await c.call("auth", token=bad))["code"] == "unauthorized"
            finally:
                await c.close()
        finally:
            await server.stop()


async def test_a_non_empty_target_is_refused_with_one_line(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(tmp_path / "src.db")
    await make_source(src)
    assert main(["copy", "--from", src, "--to", redis_url]) == 0
    capsys.readouterr()
    assert main(["copy", "--from", src, "--to", redis_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err
    assert main(["copy", "--from", redis_url, "--to", src]) == 2
    assert "is not empty" in capsys.readouterr().err
    other = tmp_path / "other.db"
    other.write_text("not a database at all, but not empty either")
    assert main(["copy", "--from", src, "--to", str(other)]) == 2
    assert capsys.readouterr().err.startswith("chatd: ")
