"""`chatd backup`: an online, consistent copy of a chatd database."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import uuid

from chatd.store.base import StoreOpenError
from chatd.store.sqlite.dbfiles import is_part_of
from chatd.store.sqlite.schema import connect, identify


def backup(source: str, dest: str) -> int:
    """An online, consistent copy of the chatd database ``source`` into ``dest`` with
    SQLite's backup API, while a server may be writing to it: the copy is taken in one
    step inside one read transaction (WAL lets the writer go on meanwhile), written to a
    private temporary file beside ``dest`` (unpredictable name, created exclusively, mode
    0600: it holds password hashes and DMs) and renamed over it, so ``dest`` is always whole.
    The copy gets a new epoch: restored, it rewinds ids and revisions, and clients must know
    their cursors are void (contract, Revisions). Returns the number of messages in the copy.
    Raises StoreOpenError when ``source`` is not usable or ``dest`` is the live database
    itself (or one of its files) under any spelling: renaming over it would cut a running
    server off its file and lose what it acknowledges after. Takes no lock."""
    if not os.path.isfile(source):
        raise StoreOpenError("no such database file")
    if is_part_of(source, dest):
        raise StoreOpenError(
            f"{dest} is the database itself or one of its files (-wal, -shm, .lock, .secret);"
            " name another file for the backup"
        )
    if os.path.isdir(dest):
        raise StoreOpenError(f"{dest} is a directory; name the backup file")
    src = connect(source)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(dest))
    )
    os.close(fd)
    try:
        try:
            if identify(src) == 0:
                raise StoreOpenError("not a chatd database (it is empty)")
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)  # pages=-1: all at once, one consistent snapshot
                out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                with out:
                    out.execute(
                        "UPDATE meta SET value = ? WHERE key = 'epoch'", (uuid.uuid4().hex,)
                    )
                count = int(
                    out.execute("SELECT count(*) FROM messages WHERE deleted = 0").fetchone()[0]
                )
            finally:
                out.close()
        except sqlite3.DatabaseError as exc:
            raise StoreOpenError(str(exc)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
    finally:
        src.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return count
