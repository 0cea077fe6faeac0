"""SQLite failures are told apart by their result code, never by message text (issue 13
item 14, issue 10): the client learns what happened, with no detail leaked."""

from __future__ import annotations

import sqlite3

import pytest

from chatd.errors import Internal
from chatd.store.sqlite import _as_chat_error


def _error(code: int, text: str = "something SQLite said") -> sqlite3.Error:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code
    return exc


SQLITE_READONLY_DBMOVED = sqlite3.SQLITE_READONLY | (4 << 8)
SQLITE_IOERR_SHMSIZE = sqlite3.SQLITE_IOERR | (19 << 8)


@pytest.mark.parametrize(
    ("code", "word"),
    [
        (sqlite3.SQLITE_FULL, "full"),
        (sqlite3.SQLITE_READONLY, "read-only"),
        (SQLITE_READONLY_DBMOVED, "read-only"),
        (sqlite3.SQLITE_BUSY, "busy"),
        (sqlite3.SQLITE_LOCKED, "busy"),
        (SQLITE_IOERR_SHMSIZE, "I/O error"),
        (sqlite3.SQLITE_CORRUPT, "damaged"),
    ],
)
def test_a_storage_error_is_classified_by_its_code(code: int, word: str) -> None:
    err = _as_chat_error(_error(code, "a text that names no kind (full? readonly? busy?)"))
    assert isinstance(err, Internal)
    assert word in err.message and "not saved" in err.message


def test_the_text_alone_classifies_nothing() -> None:
    err = _as_chat_error(sqlite3.OperationalError("database or disk is full"))
    assert err.message == "storage error; the change was not saved"


def test_a_real_read_only_write_says_read_only() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA query_only=1")
    with pytest.raises(sqlite3.Error) as info:
        db.execute("CREATE TABLE t (x)")
    assert "read-only" in _as_chat_error(info.value).message
