"""How every backup file is written (chatd/store/sqlite/backup.py: `chatd backup`, with
--db or --redis): private beside its destination, sealed, renamed over it whole."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from chatd.store.sqlite.backup import seal_over, temp_beside


def _wal_db(path: str) -> None:
    """A small database left in WAL mode (as a copy may be): its -wal is checkpointed
    away when the last connection closes, but the file still says WAL, which seal_over
    turns back to a self-contained rollback-journal file."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, deleted INTEGER)")
    db.execute("INSERT INTO messages (deleted) VALUES (0), (0), (1)")
    # Another connection keeps the -wal from being checkpointed away when this one closes.
    keep = sqlite3.connect(path)
    keep.execute("SELECT count(*) FROM messages").fetchone()
    db.close()
    assert os.path.exists(path + "-wal")
    keep.close()


def test_a_sealed_copy_replaces_the_destination_whole_private_and_self_contained(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "backup.db"
    dest.write_text("the previous backup")
    with temp_beside(str(dest)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(dest)
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600
        _wal_db(tmp)
        assert seal_over(tmp, str(dest)) == 2  # the live messages
    assert sorted(os.listdir(tmp_path)) == ["backup.db"]  # no temp file, no -wal
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    db = sqlite3.connect(dest)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    finally:
        db.close()


def test_a_copy_that_fails_leaves_the_destination_and_no_temp_files(tmp_path: Path) -> None:
    dest = tmp_path / "backup.db"
    dest.write_text("the previous backup")
    with pytest.raises(RuntimeError), temp_beside(str(dest)) as tmp:
        _wal_db(tmp)
        raise RuntimeError("the copy failed half way")
    assert sorted(os.listdir(tmp_path)) == ["backup.db"]
    assert dest.read_text() == "the previous backup"
