"""Durability around the edges (README "Durability"): clear refusals at start, one server
per database, a full or read-only disk while running, online backup and restore, and
retention (--history-days, --history-max)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from chatd.cli import build_parser, config_from
from chatd.clock import FakeClock
from chatd.config import Config
from chatd.errors import Internal
from chatd.server import ChatServer
from chatd.store.base import NewMessage
from chatd.store.sqlite import SQLiteStore, _Insert
from chatd.store.sqlite.schema import SCHEMA_VERSION
from tests.helpers import SECRET, TEST_CONFIG, TIMEOUT, Client, running_server, until
from tests.process import chatd_run
from tests.wire.test_crash import serving

PASSWORD = "correct horse battery"


def _store(server: ChatServer) -> SQLiteStore:
    return cast(SQLiteStore, server.store)


def writer_pragma(server: ChatServer, sql: str) -> None:
    """Change a setting of the writer's own connection, between batches (the writer is
    idle: every write the test made has been answered). SQLite serializes the call."""
    db = _store(server)._db
    assert db is not None
    db.execute(sql).fetchall()


async def all_history(c: Client, room: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await c.ok("room.history", room=room, after=after, limit=500)
        messages += page["messages"]
        if not page["more"]:
            return messages
        after = messages[-1]["id"]


def refused(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and "listening" not in err, err


# --- errors at start ---------------------------------------------------------------------


@pytest.mark.one_node("one SQLite file's schema version")
async def test_a_database_newer_than_chatd_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "new.db")
    async with running_server(db=db):
        pass
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    rc, _, err = await chatd_run("serve", "--db", db, "--port", "0", "--secret", SECRET)
    refused(rc, err)
    assert f"schema version {SCHEMA_VERSION + 1}" in err and "newer" in err, err
    rc, _, err = await chatd_run("user", "list", "--db", db, "--secret", SECRET)
    refused(rc, err)
    assert "newer" in err, err


@pytest.mark.parametrize("kind", ["other-sqlite", "garbage"])
@pytest.mark.one_node('one SQLite file')
async def test_a_file_that_is_not_a_chatd_database_is_refused_and_left_untouched(
    tmp_path: Path, kind: str
) -> None:
    db = tmp_path / "x.db"
    if kind == "garbage":
        db.write_bytes(b"not a database at all\n" * 300)
    else:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.commit()
        conn.close()
    before = db.read_bytes()
    rc, _, err = await chatd_run("serve", "--db", str(db), "--port", "0", "--secret", SECRET)
    refused(rc, err)
    assert f"cannot open {db}: not a chatd database" in err, err
    rc, _, err = await chatd_run("user", "list", "--db", str(db), "--secret", SECRET)
    refused(rc, err)
    assert "not a chatd database" in err, err
    assert db.read_bytes() == before  # not even switched to WAL
    assert not (tmp_path / "x.db-wal").exists()


@pytest.mark.one_node("one SQLite file's lock between processes")
async def test_a_second_server_on_the_same_database_exits_2_but_cli_commands_work(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "one.db")
    async with running_server(db=db):
        rc, _, err = await chatd_run("serve", "--db", db, "--port", "0", "--secret", SECRET)
        refused(rc, err)
        assert "in use by another chatd server" in err and f"pid {os.getpid()}" in err, err
        rc, _, err = await chatd_run(
            "user", "add", "bot", "--password-stdin", "--db", db, "--secret", SECRET,
            stdin=PASSWORD + "\n",
        )  # fmt: skip
        assert rc == 0, err
        rc, out, err = await chatd_run("user", "list", "--db", db, "--secret", SECRET)
        assert rc == 0 and out.split() == ["bot"], err
        rc, out, err = await chatd_run("token", "bot", "--db", db, "--secret", SECRET)
        assert rc == 0 and out.count(".") == 2, err
        rc, _, err = await chatd_run("backup", str(tmp_path / "copy.db"), "--db", db)
        assert rc == 0, err
    # The lock goes with the server that held it.
    async with serving(db) as srv:
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), TIMEOUT) == 0


# --- a full or read-only disk while running ----------------------------------------------

FAULTS = {
    # max_page_count below the file's size: SQLite answers SQLITE_FULL, as on a full disk.
    "disk-full": ("PRAGMA max_page_count=1", "PRAGMA max_page_count=1073741823", "full"),
    "read-only": ("PRAGMA query_only=1", "PRAGMA query_only=0", "read-only"),
}


@pytest.mark.one_node("faults injected into one SQLite file's connection")
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_disk_fails_sends_keeps_reads_and_events_and_recovers(
    tmp_path: Path, fault: str
) -> None:
    on, off, word = FAULTS[fault]
    db = str(tmp_path / "disk.db")
    big = "x" * 4000  # needs new pages: a full database has none to give
    async with running_server(db=db, rate_limit=0) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        b = await Client.connect(srv.port)
        await b.guest("bob")
        await b.ok("room.join", room="lobby")
        assert await a.event("member.joined") == {"room": "lobby", "user": "bob"}
        sent = [(await a.ok("msg.send", room="lobby", text=f"m{i}"))["message"] for i in range(3)]
        c = await Client.connect(srv.port)
        await c.guest("cat")  # a guest login writes its hold: before the fault

        writer_pragma(srv, on)
        for who in (a, b, a):
            err = await who.error("msg.send", "internal", room="lobby", text=big)
            assert word in err["message"] and "not saved" in err["message"], err
        # Reads and live events go on.
        history = await all_history(b, "lobby")
        assert [m["id"] for m in history] == [m["id"] for m in sent]
        await c.ok("room.join", room="lobby")
        assert await a.event("member.joined") == {"room": "lobby", "user": "cat"}
        assert await b.event("member.joined") == {"room": "lobby", "user": "cat"}
        assert (await c.ok("room.members", room="lobby"))["members"]

        writer_pragma(srv, off)  # the operator frees space: no restart needed
        after = (await a.ok("msg.send", room="lobby", text=big))["message"]
        # The failed batches gave their ids and revisions back: no gap, nothing reused.
        assert after["id"] == sent[-1]["id"] + 1 and after["rev"] == sent[-1]["rev"] + 1
        seen = await c.event("message")
        assert seen["id"] == after["id"]
        history = await all_history(b, "lobby")
        assert [m["text"] for m in history] == ["m0", "m1", "m2", big]
        for cl in (a, b, c):
            await cl.close()
    async with running_server(db=db, rate_limit=0) as srv:
        a = await Client.connect(srv.port)
        await a.guest("dan")
        await a.ok("room.join", room="lobby")
        assert len(await all_history(a, "lobby")) == 4
        assert (await a.ok("msg.send", room="lobby", text="again"))["message"]["id"] > after["id"]
        await a.close()


@pytest.mark.one_node("SQLite's own rollback in one process")
async def test_a_batch_whose_transaction_sqlite_rolled_back_fails_whole(tmp_path: Path) -> None:
    """SQLITE_FULL or an I/O error may roll the whole transaction back, not just the
    statement: the writes after it in the batch must not run in autocommit, and the
    counters go back, so the next id is neither skipped nor handed out twice."""
    store = SQLiteStore(str(tmp_path / "t.db"))
    store.open()
    try:
        started, gate = threading.Event(), threading.Event()

        def hold(db: sqlite3.Connection) -> None:
            started.set()
            gate.wait(TIMEOUT)

        blocker = store._write(hold)  # holds the writer, so the next two share a batch
        assert await asyncio.to_thread(started.wait, TIMEOUT)

        def lost(db: sqlite3.Connection) -> None:
            db.execute("ROLLBACK")  # what SQLite does by itself on some errors
            full = sqlite3.OperationalError("database or disk is full")
            full.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise full

        failing = store._write(lost)
        after = store._enqueue(_Insert(NewMessage(None, "ann", "bob", "lost", 0.0, None)))
        gate.set()  # both run in the next batch, together
        await asyncio.wait_for(blocker, TIMEOUT)
        for fut in (failing, after):
            with pytest.raises(Internal, match="full"):
                await asyncio.wait_for(fut, TIMEOUT)
        rec, created = await store.add_message(NewMessage(None, "ann", "bob", "kept", 0.0, None))
        assert created and rec.id == 1 and rec.rev == 1
        page, _ = await store.dm_history("ann", "bob", None, None, 10)
        assert [m.text for m in page] == ["kept"]
    finally:
        await store.close()


# --- backup and restore ------------------------------------------------------------------


@pytest.mark.one_node('`chatd backup` of one SQLite file')
async def test_backup_while_a_server_writes_is_consistent_and_restores(tmp_path: Path) -> None:
    db = str(tmp_path / "live.db")
    copy = str(tmp_path / "backup.db")
    acked: list[dict[str, Any]] = []
    stop = asyncio.Event()
    async with running_server(db=db, rate_limit=0) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        live_epoch = a.hello["data"]["epoch"]

        async def keep_sending() -> None:
            i = 0
            while not stop.is_set():
                acked.append((await a.ok("msg.send", room="lobby", text=f"t{i}"))["message"])
                i += 1

        sender = asyncio.create_task(keep_sending())
        await until(lambda: _true(len(acked) >= 50))
        before = len(acked)
        rc, _, err = await chatd_run("backup", copy, "--db", db)
        stop.set()
        await asyncio.wait_for(sender, TIMEOUT)
        assert rc == 0 and "backed up" in err, err
        assert len(acked) > before, "the server was not writing during the backup"
        await a.close()
    assert not has_wal(copy)  # one self-contained file

    async with running_server(db=copy) as srv:
        c = await Client.connect(srv.port)
        # Restored, ids and revisions rewind: a new epoch tells clients to start over.
        assert c.hello["data"]["epoch"] != live_epoch
        await c.guest("bob")
        backed = await all_history(c, "lobby")
        await c.close()
    ids = [m["id"] for m in backed]
    # A consistent snapshot: everything acknowledged before it began, and a prefix of the
    # messages (the commit order), never a hole.
    assert len(ids) >= before
    assert ids == [m["id"] for m in acked[: len(ids)]]
    assert [m["text"] for m in backed] == [m["text"] for m in acked[: len(ids)]]

    restore(copy, db)
    async with running_server(db=db, rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        await c.guest("cat")
        assert [m["id"] for m in await all_history(c, "lobby")] == ids
        await c.ok("room.join", room="lobby")
        assert (await c.ok("msg.send", room="lobby", text="x"))["message"]["id"] > ids[-1]
        await c.close()


def has_wal(db: str) -> bool:
    return os.path.exists(db + "-wal")


def restore(backup: str, db: str) -> None:
    """As documented: with the server stopped, copy the backup over the database file and
    delete its -wal and -shm (they belong to the old file)."""
    shutil.copyfile(backup, db)
    for suffix in ("-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("kind", ["missing", "garbage"])
@pytest.mark.one_node('`chatd backup` of one SQLite file')
async def test_backup_of_a_bad_database_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "src.db"
    if kind == "garbage":
        db.write_bytes(b"garbage\n" * 1000)
    rc, _, err = await chatd_run("backup", str(tmp_path / "out.db"), "--db", str(db))
    refused(rc, err)
    assert f"cannot back up {db}:" in err
    assert ("no such database" if kind == "missing" else "not a chatd database") in err, err
    assert not (tmp_path / "out.db").exists()


# --- retention ---------------------------------------------------------------------------


@asynccontextmanager
async def clocked_server(clock: FakeClock, **changes: Any) -> AsyncIterator[ChatServer]:
    cfg = TEST_CONFIG.replace(rate_limit=0, **changes)
    server = ChatServer(cfg, SQLiteStore(cfg.db), SECRET, clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def test_retention_is_off_by_default_and_set_by_flags() -> None:
    assert Config().history_days == 0 and Config().history_max == 0
    args = build_parser().parse_args(["serve", "--history-days", "30", "--history-max", "1000"])
    cfg = config_from(args)
    assert cfg.history_days == 30 and cfg.history_max == 1000
    cfg = config_from(build_parser().parse_args(["serve"]))
    assert cfg.history_days == 0 and cfg.history_max == 0


async def test_retention_off_prunes_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    async with clocked_server(clock, db=str(tmp_path / "r.db")) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        await a.ok("msg.send", room="lobby", text="old")
        clock.advance(10 * 86400)
        assert await srv.prune_history() == 0
        b = await Client.connect(srv.port)
        await b.guest("bob")  # ann's token has long expired
        assert len(await all_history(b, "lobby")) == 1
        for c in (a, b):
            await c.close()


async def test_history_days_removes_old_messages_but_keeps_recent_nonces(tmp_path: Path) -> None:
    clock = FakeClock()
    # 0.001 days = 86.4 s: old enough without outliving the tokens of this test.
    async with clocked_server(
        clock, db=str(tmp_path / "r.db"), history_days=0.001, prune_batch=2
    ) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        b = await Client.connect(srv.port)
        await b.guest("bob")
        await a.ok("room.create", room="lobby")
        for i in range(3):
            await a.ok("msg.send", room="lobby", text=f"old{i}")
        await a.ok("msg.send", to="bob", text="old dm")
        kept = (await a.ok("msg.send", room="lobby", text="retried", nonce="n1"))["message"]
        clock.advance(100)
        new = [(await a.ok("msg.send", room="lobby", text=f"new{i}"))["message"] for i in range(2)]
        assert await srv.prune_history() == 5
        assert [m["text"] for m in await all_history(a, "lobby")] == ["new0", "new1"]
        assert (await b.ok("dm.history"))["messages"] == []
        # A retry within 24 h still finds the original: not posted again.
        again = (await a.ok("msg.send", room="lobby", text="retried", nonce="n1"))["message"]
        assert again["id"] == kept["id"]
        assert [m["id"] for m in await all_history(a, "lobby")] == [m["id"] for m in new]
        assert await srv.prune_history() == 0
        nxt = (await a.ok("msg.send", room="lobby", text="next"))["message"]
        assert nxt["id"] > new[-1]["id"]
        for c in (a, b):
            await c.close()


async def test_history_max_keeps_the_newest_per_room_and_per_dm_pair(tmp_path: Path) -> None:
    clock = FakeClock()
    async with clocked_server(
        clock, db=str(tmp_path / "r.db"), history_max=3, prune_batch=2
    ) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        b = await Client.connect(srv.port)
        await b.guest("bob")
        c = await Client.connect(srv.port)
        await c.guest("cat")
        await a.ok("room.create", room="big")
        await a.ok("room.create", room="small")
        big = [(await a.ok("msg.send", room="big", text=f"b{i}"))["message"] for i in range(6)]
        await a.ok("msg.delete", message_id=big[-1]["id"])  # a tombstone does not count
        await a.ok("msg.send", room="small", text="s0")
        await a.ok("msg.send", room="small", text="s1")
        for i in range(5):
            await a.ok("msg.send", to="bob", text=f"d{i}")
        await a.ok("msg.send", to="cat", text="c0")
        assert await srv.prune_history() == 2 + 2
        assert [m["text"] for m in await all_history(a, "big")] == ["b2", "b3", "b4"]
        assert [m["text"] for m in await all_history(a, "small")] == ["s0", "s1"]
        dms = (await b.ok("dm.history", **{"with": "ann"}))["messages"]
        assert [m["text"] for m in dms] == ["d2", "d3", "d4"]
        assert [m["text"] for m in (await c.ok("dm.history"))["messages"]] == ["c0"]
        assert await srv.prune_history() == 0
        for cl in (a, b, c):
            await cl.close()


async def test_retention_runs_at_start_and_then_periodically(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    clock = FakeClock()
    async with clocked_server(clock, db=db) as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        for i in range(5):
            await a.ok("msg.send", room="lobby", text=f"m{i}")
        await a.close()
    async with clocked_server(clock, db=db, history_max=2, prune_interval=0.05) as srv:
        a = await Client.connect(srv.port)
        await a.guest("bob")

        async def texts() -> list[str]:
            return [m["text"] for m in await all_history(a, "lobby")]

        await until(lambda: _eq(texts(), ["m3", "m4"]))
        await a.ok("room.join", room="lobby")
        for i in range(5, 8):
            await a.ok("msg.send", room="lobby", text=f"m{i}")
        await until(lambda: _eq(texts(), ["m6", "m7"]))
        await a.close()


async def _eq(got: Any, want: Any) -> bool:
    return bool(await got == want)


@pytest.mark.one_node("reads one SQLite file's tables")
async def test_a_deleted_rooms_messages_go_in_batches_and_the_room_is_gone_at_once(
    tmp_path: Path,
) -> None:
    """room.delete answers after the room row is gone; its messages are deleted in small
    transactions afterwards (sends elsewhere never wait behind one huge delete), and a
    restart finishes what a crash interrupted."""
    import sqlite3

    from chatd.store import sqlite as store_sqlite

    db = str(tmp_path / "big.db")
    async with running_server(db=db, rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        await c.guest("owner")
        await c.ok("room.create", room="big")
        n = store_sqlite._PURGE_BATCH * 2 + 10
        frames = b"".join(
            b'{"cmd":"msg.send","room":"big","text":"m%d","id":%d}\n' % (i, i) for i in range(n)
        )
        await c.send_raw(frames)
        for i in range(n):
            await c.reply(i)
        await c.ok("room.delete", room="big")
        await c.error("room.history", "not_found", room="big")
        await c.ok("room.create", room="other")
        await c.ok("msg.send", room="other", text="still fast")

        def left() -> int:
            con = sqlite3.connect(db)
            try:
                return int(con.execute("SELECT count(*) FROM messages WHERE room_id = 1").fetchone()[0])
            finally:
                con.close()

        async def purged() -> bool:
            return left() == 0

        await until(purged)
        await c.close()


@pytest.mark.one_node("writes into one SQLite file's tables")
async def test_messages_of_a_room_deleted_before_a_crash_are_purged_after_restart(
    tmp_path: Path,
) -> None:
    import sqlite3

    db = str(tmp_path / "orphans.db")
    async with running_server(db=db, rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        await c.guest("owner")
        await c.ok("room.create", room="gone")
        for i in range(5):
            await c.ok("msg.send", room="gone", text=f"m{i}")
        await c.close()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM rooms")  # as if the crash came between room row and messages
    con.commit()
    con.close()

    def left() -> int:
        con = sqlite3.connect(db)
        try:
            return int(con.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            con.close()

    assert left() == 5
    async with running_server(db=db) as srv:

        async def purged() -> bool:
            return left() == 0

        await until(purged)
