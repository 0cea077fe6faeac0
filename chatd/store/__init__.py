"""Storage: the Store protocol and its SQLite implementation (the embedded default)."""

from chatd.store.base import (
    GuestHold,
    MessageRecord,
    NewMessage,
    RoomRecord,
    Snapshot,
    Store,
    UserRecord,
)
from chatd.store.sqlite import SQLiteStore, StoreOpenError

__all__ = [
    "GuestHold",
    "MessageRecord",
    "NewMessage",
    "RoomRecord",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "StoreOpenError",
    "UserRecord",
]
