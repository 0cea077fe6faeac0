"""The embedded default store: SQLite in WAL mode with one writer thread doing group commit.

    store.py      SQLiteStore (the Store protocol): open/close, the server lock, readers
    engine.py     the group-commit writer thread; storage errors classified by result code
    queries.py    the SQL of each operation: accounts, guest holds, rooms, messages,
                  history pages, sync
    retention.py  prune, and the batched removal of a deleted room's messages
    schema.py     the versioned schema, migrate, identify, check_file
    dbfiles.py    the database's files: private creation, the server lock, "is this file
                  part of that database" (backup safety)
    backup.py     online consistent copy (`chatd backup`)
    admin.py      SQLiteAdmin (the AdminStore protocol): the offline account commands
"""

from chatd.store.base import StoreMissing, StoreOpenError
from chatd.store.sqlite.admin import SQLiteAdmin
from chatd.store.sqlite.backup import backup
from chatd.store.sqlite.engine import as_chat_error
from chatd.store.sqlite.queries import bump_users_version, dm_key
from chatd.store.sqlite.retention import NONCE_KEEP, PURGE_BATCH
from chatd.store.sqlite.schema import check_file, identify, migrate
from chatd.store.sqlite.store import SQLiteStore, _Insert

# The names older code and tests used before the package split.
_as_chat_error = as_chat_error
_PURGE_BATCH = PURGE_BATCH

__all__ = [
    "NONCE_KEEP",
    "PURGE_BATCH",
    "SQLiteAdmin",
    "SQLiteStore",
    "StoreMissing",
    "StoreOpenError",
    "_Insert",
    "as_chat_error",
    "backup",
    "bump_users_version",
    "check_file",
    "dm_key",
    "identify",
    "migrate",
]
