"""How `chatd serve` stops around a SIGBUS (the -shm cut short) without hanging: the
store's final closes leave the loop's thread, a fault found while the writer finishes
stops the closing, and a stop that never finishes still exits with status 3."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from chatd.cli import STORAGE_FAILED, _on_sigbus, backstop
from chatd.store.base import RoomRecord
from chatd.store.sqlite import SQLiteStore


class _Recorded:
    """A connection whose close records the thread it ran on."""

    def __init__(self, db: sqlite3.Connection, threads: list[str]) -> None:
        self.db = db
        self.threads = threads

    def close(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.db.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_the_final_checkpoint_runs_off_the_loops_thread(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c.db"))
    store.open()
    await store.create_room(RoomRecord(0, "lobby", "", "ann", 0.0, False, True))
    threads: list[str] = []
    assert store._db is not None
    store._db = _Recorded(store._db, threads)  # type: ignore[assignment]
    await store.close()
    assert threads and threads[0] != threading.current_thread().name  # before: MainThread


async def test_a_fault_while_the_writer_finishes_leaves_the_connections_alone(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c.db"))
    store.open()
    await store.create_room(RoomRecord(0, "lobby", "", "ann", 0.0, False, True))
    real_stop = store._writer.stop

    async def stop_then_fault() -> None:
        await real_stop()
        store.abandon("SIGBUS while the writer finished")

    store._writer.stop = stop_then_fault  # type: ignore[method-assign]
    db = store._db
    assert db is not None
    await store.close()
    # Not closed (a close would checkpoint through the damaged file): still usable.
    assert db.execute("SELECT count(*) FROM rooms").fetchone() == (1,)  # before: closed
    db.close()
    store._unlock()


def test_a_stop_stuck_after_a_sigbus_still_exits_with_status_3(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c.db"))
    exited: list[int] = []
    done = threading.Event()

    def exit(code: int) -> None:
        exited.append(code)
        done.set()

    stop = asyncio.Event()
    timer = backstop(store, 0.05, exit)
    for _ in range(3):  # a thread faulting again and again: one backstop
        _on_sigbus(store, stop, timer)
    assert stop.is_set() and store.fault() is not None
    assert done.wait(10)  # nothing stopped the server: the backstop exits
    assert exited == [STORAGE_FAILED]
