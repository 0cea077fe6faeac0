"""Room and Message as they appear on the wire (wire contract, "Commands")."""

from __future__ import annotations

import time

import msgspec


class RoomInfo(msgspec.Struct, frozen=True):
    name: str
    topic: str
    owner: str
    created_at: str
    members: int
    ephemeral: bool
    open: bool


class RenamedRoomInfo(RoomInfo, frozen=True):
    """A Room in `room.updated` after a rename."""

    previous_name: str


class Message(msgspec.Struct):
    id: int
    rev: int
    room: str | None
    to: str | None
    from_: str = msgspec.field(name="from")
    text: str = ""
    ts: str = ""
    edited_ts: str | None = None
    edited_by: str | None = None
    deleted: bool = False


class _SecondCache:
    """The date-and-time part changes once a second; formatting it is the slow part."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""


_last = _SecondCache()


def rfc3339(unix: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. 2026-12-01T07:57:40.123Z."""
    ms = int(unix * 1000)
    second, millis = divmod(ms, 1000)
    cache = _last
    if cache.second != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.second, cache.prefix = second, prefix
    return f"{cache.prefix}.{millis:03d}Z"
