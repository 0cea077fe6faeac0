"""The offline account commands on SQLite (`AdminStore`): one plain connection, no server
lock, so they work while a server runs on the same database (WAL lets both write; SQLite's
own locks order the transactions, busy_timeout waits them out)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from chatd.store.base import NameHeld, StoreMissing, StoreOpenError, UserRecord
from chatd.store.sqlite import queries as q
from chatd.store.sqlite.dbfiles import create_private
from chatd.store.sqlite.schema import check_file, connect, identify, migrate

T = TypeVar("T")


class SQLiteAdmin:
    """`AdminStore` on an SQLite file. Every change is one `BEGIN IMMEDIATE` transaction
    that also bumps users_version, so a running server reloads the accounts.

    ``create``: make a missing database (mode 0600, as the server does); without it a
    missing one is StoreMissing and nothing is created. StoreOpenError for a file that is
    not chatd's (checked read-only, before anything changes) or cannot be opened."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        if path == ":memory:":
            raise StoreOpenError(":memory: keeps nothing; name a database file")
        if not os.path.exists(path):
            if not create:
                raise StoreMissing(f"no database at {path}")
            try:
                create_private(path)
            except OSError as exc:
                raise StoreOpenError(f"cannot create it: {exc.strerror or exc}") from None
        check_file(path)
        self.path = path
        db = connect(path)
        try:
            identify(db)  # before WAL: never convert someone else's file
            db.execute("PRAGMA journal_mode=WAL")
            migrate(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreOpenError(str(exc)) from None
        except BaseException:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        self._db.close()

    def _change(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction that tells a running server (users_version)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            q.bump_users_version(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def create_user(self, name: str, pw_hash: str, admin: bool, now: float) -> UserRecord:
        def op(db: sqlite3.Connection) -> UserRecord:
            hold = q.guest_hold(db, name)
            if hold is not None:
                # A hold lasts while its guest is connected (held_until None, kept so by
                # the running server) and until held_until after that.
                if hold.held_until is None or hold.held_until > now:
                    raise NameHeld(name, hold.held_until)
                q.drop_hold(db, name)
            return q.create_user(db, name, pw_hash, admin)

        return self._change(op)

    def delete_user(self, name: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if not q.delete_user(db, name):
                raise _Nothing
            return True

        try:
            return self._change(op)
        except _Nothing:
            return False  # rolled back: nothing changed, so a server need not reload

    def find_user(self, name: str) -> UserRecord | None:
        return q.get_user(self._db, name)

    def list_users(self) -> list[UserRecord]:
        return q.users(self._db)


class _Nothing(Exception):
    """Internal: the change found nothing to do (its transaction is rolled back)."""
