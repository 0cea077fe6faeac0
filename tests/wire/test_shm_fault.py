"""The database's `-shm` file damaged under a running server (issue 13, item 14): SQLite maps
it, so a truncation used to kill the process with SIGBUS on the next access. Now the server
stops cleanly instead — clients get `server.shutdown`, one CRITICAL line says why, exit
status 3 — and every acknowledged message is there when it starts again (README, "When the
-shm file is damaged")."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from chatd.store.sqlite import SQLiteStore
from tests.helpers import SECRET, TIMEOUT, Client, running_server
from tests.process import ROOT, Served, chatd_serving
from tests.wire.test_crash import STORM, serving
from tests.wire.test_durability import all_history

pytestmark = pytest.mark.one_node("one process's SQLite -shm file")

STORAGE_FAILED = 3


async def exits(srv: Served) -> int:
    rc = await asyncio.wait_for(srv.proc.wait(), 3 * TIMEOUT)
    await asyncio.sleep(0.1)  # the last log lines
    return rc


def log_text(srv: Served) -> str:
    return b"".join(srv.log).decode(errors="replace")


async def until_shutdown(c: Client) -> dict[str, Any]:
    """Frames until `server.shutdown` (writes refused meanwhile say why)."""
    while True:
        frame = await c.recv(3 * TIMEOUT)
        if frame["type"] == "event" and frame["event"] == "server.shutdown":
            return frame
        if frame["type"] == "error":
            assert frame["code"] == "internal" and "storage failed" in frame["message"], frame


async def history_after_restart(db: str) -> list[str]:
    async with serving(db):
        pass  # the listening line: it opened (SQLite rebuilt the -shm from the WAL)
    async with serving(db) as srv:
        c = await Client.connect(srv.port)
        await c.guest("reader")
        await c.ok("room.join", room="r")
        texts = [m["text"] for m in await all_history(c, "r")]
        await c.close()
    return texts


def damage(shm: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(shm, 0)
    elif how == "removed":
        shm.unlink()
    else:  # replaced: what another process would then map is a different file
        shm.rename(shm.with_name(shm.name + ".old"))
        shm.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "removed", "replaced"])
async def test_a_damaged_shm_stops_the_server_cleanly(tmp_path: Path, how: str) -> None:
    db = str(tmp_path / "c.db")
    async with serving(db) as srv:
        c = await Client.connect(srv.port)
        await c.guest("alice")
        await c.ok("room.create", room="r")
        acked = [(await c.ok("msg.send", room="r", text=f"m{i}"))["message"]["text"] for i in range(5)]
        damage(Path(db + "-shm"), how)
        await c.send({"cmd": "msg.send", "id": "late", "room": "r", "text": "late"})
        shutdown = await until_shutdown(c)
        assert shutdown["data"]["reason"] == "storage failure", shutdown
        await c.close()
        rc = await exits(srv)
        log = log_text(srv)
        assert rc == STORAGE_FAILED, (rc, log)  # before: -SIGBUS when truncated
        assert "CRITICAL stopping: the database's shared-memory file" in log and how in log, log
        assert "Traceback" not in log, log
    texts = await history_after_restart(db)
    assert texts[: len(acked)] == acked, texts


async def test_a_truncated_shm_under_load_never_kills_the_server(tmp_path: Path) -> None:
    """Truncated while statements run: a thread faults inside SQLite (the SIGBUS path) or
    the next look sees it (the watch path); either way exit 3, acknowledged data kept."""
    db = str(tmp_path / "c.db")
    acked: list[str] = []
    async with serving(db, *STORM) as srv:
        clients = [await Client.connect(srv.port) for _ in range(4)]
        for i, c in enumerate(clients):
            await c.guest(f"u{i}")
            if i == 0:
                await c.ok("room.create", room="r")
            else:
                await c.ok("room.join", room="r")

        async def storm(c: Client, name: str) -> None:
            seq = 0
            while True:
                batch = [f"{name}-{seq + k}" for k in range(16)]
                await c.send_raw(b"".join(
                    b'{"cmd":"msg.send","id":"%s","room":"r","text":"%s"}\n' % (t.encode(), t.encode())
                    for t in batch
                ))  # fmt: skip
                for _ in batch:
                    frame = await c.recv(3 * TIMEOUT)
                    while frame["type"] == "event" and frame["event"] == "message":
                        frame = await c.recv(3 * TIMEOUT)
                    if frame["type"] == "event":  # server.shutdown
                        return
                    if frame["type"] == "ok":
                        acked.append(frame["data"]["message"]["text"])
                seq += 16

        tasks = [asyncio.create_task(storm(c, f"u{i}")) for i, c in enumerate(clients)]
        await asyncio.sleep(0.5)
        os.truncate(db + "-shm", 0)
        rc = await exits(srv)
        log = log_text(srv)
        assert rc == STORAGE_FAILED, (rc, log)  # before: -SIGBUS
        assert "CRITICAL stopping:" in log, log
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
    assert acked
    stored = set(await history_after_restart(db))
    assert not [t for t in acked if t not in stored]


async def test_sigbus_stops_the_server_cleanly(tmp_path: Path) -> None:
    """The handler itself (the fault arrives in a thread inside SQLite, which the loop on
    the main thread cannot see; here it is sent from outside to make it certain)."""
    db = str(tmp_path / "c.db")
    async with serving(db) as srv:
        c = await Client.connect(srv.port)
        await c.guest("alice")
        await c.ok("room.create", room="r")
        await c.ok("msg.send", room="r", text="kept")
        srv.proc.send_signal(signal.SIGBUS)
        shutdown = await until_shutdown(c)
        assert shutdown["data"]["reason"] == "storage failure", shutdown
        await c.close()
        rc = await exits(srv)
        log = log_text(srv)
        assert rc == STORAGE_FAILED, (rc, log)  # before: -SIGBUS
        assert "CRITICAL stopping: the process got SIGBUS" in log, log
    assert await history_after_restart(db) == ["kept"]


async def test_periodic_tasks_say_nothing_more_once_storage_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The users poll meets the fault (often before the watch that stops the server does):
    the one CRITICAL line says why, not a traceback every poll until the exit. In-process,
    with the fault as the SIGBUS handler records it (a real truncation would fault this
    test process when its connections are collected)."""
    async with running_server(db=str(tmp_path / "c.db"), db_poll_interval=0.02) as srv:
        c = await Client.connect(srv.port)
        await c.guest("alice")
        await c.ok("room.create", room="lobby")
        store = srv.store
        assert isinstance(store, SQLiteStore)
        store.abandon("the process got SIGBUS (test)")
        await asyncio.sleep(0.3)  # about 15 polls
        assert not [r for r in caplog.records if r.exc_info], caplog.text  # before: one a poll
        store._fault = None  # the files are whole: let the test server close normally
        await c.close()


# Loaded into the server process (as sitecustomize), it makes a fault happen at a known
# time. "poll": once the marker file exists, the next users poll reads, in a store reader
# thread, one byte of a mapping whose file was cut to nothing — the same fault a truncated
# -shm gives inside SQLite (in C, without the GIL). "close": the graceful stop's store close
# meets a SIGBUS first (sent to itself) and goes on. "close_stuck": the store close waits
# for a reader thread stuck in the poll's fault.
FAULT_HOOK = """
import asyncio, ctypes, mmap, os, signal, tempfile
from chatd.store.sqlite import store as _store

_MARK = os.environ["CHATD_TEST_FAULT_MARK"]
_AT = os.environ["CHATD_TEST_FAULT_AT"]
_users_version = _store.SQLiteStore.users_version
_close = _store.SQLiteStore.close


def _fault(db):
    f = tempfile.TemporaryFile()
    f.truncate(mmap.PAGESIZE)
    m = mmap.mmap(f.fileno(), mmap.PAGESIZE)
    f.truncate(0)
    out = ctypes.create_string_buffer(1)
    ctypes.memmove(out, ctypes.addressof(ctypes.c_char.from_buffer(m)), 1)  # (a foreign call)
    return out.raw


async def users_version(self):
    if _AT == "poll" and os.path.exists(_MARK):
        os.unlink(_MARK)
        await self._read(_fault)
    return await _users_version(self)


async def close(self):
    if _AT == "close":
        os.kill(os.getpid(), signal.SIGBUS)
        await asyncio.sleep(0.2)
    elif _AT == "close_stuck":
        await self._read(_fault)
    await _close(self)


_store.SQLiteStore.users_version = users_version
_store.SQLiteStore.close = close
"""


def fault_hook(tmp_path: Path, at: str) -> tuple[Path, dict[str, str]]:
    """The marker file and the environment that load FAULT_HOOK into a server."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    mark = tmp_path / "fault-now"
    env = {
        "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
        "CHATD_TEST_FAULT_MARK": str(mark),
        "CHATD_TEST_FAULT_AT": at,
    }
    return mark, env


async def test_a_fault_inside_a_store_thread_stops_the_server_cleanly(tmp_path: Path) -> None:
    """A real SIGBUS in a reader thread (not sent from outside): the thread stays stuck in
    it, the loop stops the server, exit 3, the acknowledged messages are there."""
    mark, env = fault_hook(tmp_path, "poll")
    db = str(tmp_path / "c.db")
    async with chatd_serving("serve", "--db", db, "--port", "0", "--secret", SECRET, **env) as srv:
        c = await Client.connect(srv.port)
        await c.guest("alice")
        await c.ok("room.create", room="r")
        acked = [(await c.ok("msg.send", room="r", text=f"m{i}"))["message"]["text"] for i in range(3)]
        mark.touch()
        shutdown = await until_shutdown(c)
        assert shutdown["data"]["reason"] == "storage failure", shutdown
        await c.close()
        rc = await exits(srv)
        log = log_text(srv)
        assert not mark.exists(), log  # the fault did happen
        assert rc == STORAGE_FAILED, (rc, log)
        assert "CRITICAL stopping: the process got SIGBUS" in log, log
    assert await history_after_restart(db) == acked


@pytest.mark.parametrize("at", ["close", "close_stuck"])
async def test_a_fault_during_a_graceful_stop_still_exits_3(tmp_path: Path, at: str) -> None:
    """SIGTERM, then a SIGBUS while the store closes: the stop ends (or, stuck behind the
    faulted thread, the backstop ends it) with status 3, never 0 and never a hang."""
    _, env = fault_hook(tmp_path, at)
    db = str(tmp_path / "c.db")
    async with chatd_serving("serve", "--db", db, "--port", "0", "--secret", SECRET, **env) as srv:
        c = await Client.connect(srv.port)
        await c.guest("alice")
        await c.ok("room.create", room="r")
        await c.ok("msg.send", room="r", text="kept")
        await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(srv.proc.wait(), 30)  # the backstop: 2 * 2 s + 10 s
        await asyncio.sleep(0.1)
        log = log_text(srv)
        assert rc == STORAGE_FAILED, (rc, log)  # before: 0 ("close"), a hang ("close_stuck")
        assert "CRITICAL stopping: the process got SIGBUS" in log, log
    assert await history_after_restart(db) == ["kept"]
