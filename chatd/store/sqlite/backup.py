"""`chatd backup`: an online, consistent copy of a chatd database; and how every backup
file is written (here and `chatd backup --redis`, chatd.store.copy): made private beside
its destination, sealed on disk, then renamed over it (`temp_beside`, `seal_over`)."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from chatd.store.base import StoreOpenError
from chatd.store.sqlite.dbfiles import is_part_of
from chatd.store.sqlite.schema import connect, identify


def backup(source: str, dest: str) -> int:
    """An online, consistent copy of the chatd database ``source`` into ``dest`` with
    SQLite's backup API, while a server may be writing to it: the copy is taken in one
    step inside one read transaction (WAL lets the writer go on meanwhile), written to a
    private temporary file beside ``dest`` and renamed over it (`temp_beside`,
    `seal_over`), so ``dest`` is always whole.
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
    try:
        with temp_beside(dest) as tmp:
            try:
                if identify(src) == 0:
                    raise StoreOpenError("not a chatd database (it is empty)")
                out = sqlite3.connect(tmp)
                try:
                    src.backup(out)  # pages=-1: all at once, one consistent snapshot
                    with out:
                        out.execute(
                            "UPDATE meta SET value = ? WHERE key = 'epoch'", (uuid.uuid4().hex,)
                        )
                finally:
                    out.close()
                return seal_over(tmp, dest)
            except sqlite3.DatabaseError as exc:
                raise StoreOpenError(str(exc)) from None
    finally:
        src.close()


@contextmanager
def temp_beside(dest: str) -> Iterator[str]:
    """The path of a new private file beside ``dest`` (unpredictable name, created
    exclusively, mode 0600: a copy holds password hashes and DMs). On the way out it is
    removed, with any -wal or -shm SQLite left beside it, unless `seal_over` renamed it."""
    folder = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
    finally:
        for f in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.lexists(f):
                os.unlink(f)


def seal_over(tmp: str, dest: str) -> int:
    """The SQLite database at ``tmp`` made one self-contained file (no -wal), flushed to
    disk and renamed over ``dest``, the rename flushed too: ``dest`` is the old file or
    the whole new one, even across a power loss. Returns its number of live messages.
    The caller has refused a ``dest`` that is a live database (`backup`: is_part_of;
    `backup_redis`: held_by_a_server)."""
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        count = int(db.execute("SELECT count(*) FROM messages WHERE deleted = 0").fetchone()[0])
    finally:
        db.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    dir_fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
    return count
