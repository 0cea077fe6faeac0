"""SQLite-specific checks of the store's seams (the conformance suite holds what every
backend must do): the watermark moves only after COMMIT, and the package layout keeps
the protocols free of the driver."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatd.store.base import NewMessage, StoreOpenError
from chatd.store.sqlite import SQLiteAdmin, SQLiteStore, _Insert

TIMEOUT = 10


async def test_rev_and_reads_move_only_after_the_commit(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "w.db"))
    store.open()
    try:
        busy, first = threading.Event(), threading.Event()
        written, gate = threading.Event(), threading.Event()

        def occupy(db: sqlite3.Connection) -> None:
            busy.set()
            first.wait(TIMEOUT)

        rows_in_transaction: list[int] = []

        def hold(db: sqlite3.Connection) -> None:
            # Runs after the send, inside the same transaction.
            rows_in_transaction.append(db.execute("SELECT count(*) FROM messages").fetchone()[0])
            written.set()
            gate.wait(TIMEOUT)

        blocker = store._write(occupy)  # holds the writer, so the next two share a batch
        assert await asyncio.to_thread(busy.wait, TIMEOUT)
        sent = store._enqueue(_Insert(NewMessage(None, "ann", "bob", "hi", 0.0, None)))
        held = store._write(hold)
        first.set()
        await asyncio.wait_for(blocker, TIMEOUT)
        assert await asyncio.to_thread(written.wait, TIMEOUT)
        # The send's row is written and its revision taken, but not committed: the
        # watermark stays, and a reader does not see it.
        assert rows_in_transaction == [1] and store.rev == 0
        assert await store.changes_since(0, [], "bob", 10) == ([], False)
        gate.set()
        await asyncio.wait_for(held, TIMEOUT)
        rec, created = await asyncio.wait_for(sent, TIMEOUT)
        assert created and rec.rev == 1 and store.rev == 1
        changes, _ = await store.changes_since(0, [], "bob", 10)
        assert [c.id for c in changes] == [rec.id]
    finally:
        first.set()
        gate.set()
        await store.close()


def _loaded_by(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return set(out.split())


@pytest.mark.parametrize("module", ["chatd.store.base", "chatd.store"])
def test_the_store_protocols_load_no_driver(module: str) -> None:
    loaded = _loaded_by(f"import {module}")
    assert not {m for m in loaded if "sqlite" in m or m == "asyncio"}, sorted(loaded)


def test_the_sqlite_names_are_still_handed_on_by_the_package() -> None:
    loaded = _loaded_by("from chatd.store import SQLiteStore, SQLiteAdmin")
    assert "chatd.store.sqlite" in loaded


def test_an_admin_that_cannot_create_the_database_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError, match="cannot create it"):
        SQLiteAdmin(str(tmp_path / "no-such-dir" / "x.db"), create=True)


def test_an_admin_refuses_a_file_that_is_not_chatds_and_changes_nothing(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (t TEXT)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreOpenError, match="not a chatd database"):
        SQLiteAdmin(str(foreign))
    assert foreign.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["notes.db"]
