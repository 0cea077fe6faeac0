"""Storage: the Store and AdminStore protocols (base.py) and their implementations
(sqlite/, the embedded default). Importing this package loads no implementation: the names
of chatd.store.sqlite are handed on lazily, on first use (so `import chatd.store.base`, and
anything importing only the protocols, never loads sqlite3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatd.store.base import (
    AdminStore,
    GuestHold,
    MessageRecord,
    NameHeld,
    NewMessage,
    RoomRecord,
    Snapshot,
    Store,
    StoreMissing,
    StoreOpenError,
    UserRecord,
)

if TYPE_CHECKING:
    from chatd.store.sqlite import SQLiteAdmin, SQLiteStore

_LAZY = {"SQLiteStore", "SQLiteAdmin"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from chatd.store import sqlite

        return getattr(sqlite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdminStore",
    "GuestHold",
    "MessageRecord",
    "NameHeld",
    "NewMessage",
    "RoomRecord",
    "SQLiteAdmin",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "StoreMissing",
    "StoreOpenError",
    "UserRecord",
]
