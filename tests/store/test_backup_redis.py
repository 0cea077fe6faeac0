"""`chatd backup --redis` (chatd/store/copy.py backup_redis) when the data keeps changing:
the copy is taken again, then refused with a message pointing to Redis's own snapshot; the
target is never left half-written. (The whole path, with a node running, is in
tests/wire/test_cli_redis.py.)"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from chatd.store import copy as copy_module
from chatd.store.copy import CopyError, backup_redis
from chatd.store.redis import RedisStore


def test_a_copy_that_keeps_changing_is_refused_and_leaves_no_file(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RedisStore(redis_url).open()  # a chatd database (an epoch), no data yet
    ticks = itertools.count()
    taken: list[int] = []

    def moving(store: Any) -> tuple[int]:
        n = next(ticks)
        taken.append(n)
        return (n,)  # another value at every look: as if nodes wrote all the time

    monkeypatch.setattr(copy_module, "_change_marks", moving)
    dest = tmp_path / "b.db"
    with pytest.raises(CopyError) as refused:
        backup_redis(redis_url, str(dest), attempts=3)
    assert "changed during each of 3 tries" in str(refused.value)
    assert "redis-cli --rdb" in str(refused.value)
    assert len(taken) == 6  # before and after each of the three tries
    assert os.listdir(tmp_path) == []  # no backup, no temporary file left


def test_a_copy_taken_while_nothing_changes_is_kept(redis_url: str, tmp_path: Path) -> None:
    RedisStore(redis_url).open()
    dest = tmp_path / "b.db"
    assert backup_redis(redis_url, str(dest)) == 0
    assert os.listdir(tmp_path) == ["b.db"]


def test_a_backup_onto_a_running_server_s_database_is_refused(
    redis_url: str, tmp_path: Path
) -> None:
    """`chatd backup --redis URL FILE` renames its copy over FILE: when FILE is the
    database of a running chatd server (on SQLite), under any spelling, that server would
    be cut off its file. Refused; FILE untouched."""
    from chatd.store.sqlite.dbfiles import ServerLock, create_private

    RedisStore(redis_url).open()
    live = tmp_path / "live.db"
    create_private(str(live))
    live.write_bytes(b"the live database")
    (tmp_path / "alias.db").symlink_to(live)
    lock = ServerLock(str(live))
    lock.acquire()
    try:
        for spelling in (live, tmp_path / "alias.db", tmp_path / "." / "live.db"):
            with pytest.raises(CopyError, match="running chatd server"):
                backup_redis(redis_url, str(spelling))
        assert live.read_bytes() == b"the live database"
    finally:
        lock.release()
    assert backup_redis(redis_url, str(tmp_path / "alias.db")) == 0  # no server: replaced


def test_a_rename_during_the_copy_makes_it_taken_again(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename moves no counter (revision, ids, users_version), only the change stream:
    a copy that a rename overlapped is thrown away and taken again, and the kept one has
    the new name."""
    import asyncio
    import sqlite3

    from chatd.store.base import RoomRecord

    async def make_room() -> RoomRecord:
        s = RedisStore(redis_url)
        s.open()
        try:
            return await s.create_room(RoomRecord(0, "dev", "", "ann", 1.0, False, False))
        finally:
            await s.close()

    async def rename() -> None:
        s = RedisStore(redis_url)
        s.open()
        try:
            await s.update_room(room.id, "hall", "")
        finally:
            await s.close()

    room = asyncio.run(make_room())
    real = copy_module.import_sqlite
    copies: list[str] = []

    def import_then_rename(path: str, *args: Any) -> Any:
        out = real(path, *args)
        copies.append(path)
        if len(copies) == 1:
            asyncio.run(rename())  # a node renames the room while the copy is taken
        return out

    monkeypatch.setattr(copy_module, "import_sqlite", import_then_rename)
    dest = tmp_path / "b.db"
    backup_redis(redis_url, str(dest))
    assert len(copies) == 2
    db = sqlite3.connect(dest)
    try:
        assert db.execute("SELECT name FROM rooms").fetchall() == [("hall",)]
    finally:
        db.close()


def test_guest_logins_during_the_copy_do_not_make_it_taken_again(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy service is always having guests come and go (and members join and leave):
    none of that is what a backup copies, so it does not void the copy."""
    import asyncio

    from chatd.store.base import GuestHold

    async def guest_comes() -> None:
        s = RedisStore(redis_url)
        s.open()
        try:
            await s.hold_guest(GuestHold("gus", "1", None, 1))
        finally:
            await s.close()

    RedisStore(redis_url).open()
    real = copy_module.import_sqlite
    copies: list[str] = []

    def import_while_a_guest_comes(path: str, *args: Any) -> Any:
        copies.append(path)
        asyncio.run(guest_comes())
        return real(path, *args)

    monkeypatch.setattr(copy_module, "import_sqlite", import_while_a_guest_comes)
    backup_redis(redis_url, str(tmp_path / "b.db"))
    assert len(copies) == 1
