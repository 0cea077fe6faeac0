"""Room and Message as they appear on the wire (wire contract, "Commands")."""

from __future__ import annotations

import datetime
from typing import Union

import msgspec


class RoomInfo(msgspec.Struct, frozen=True):
    name: str
    topic: str
    owner: str
    created_at: str
    members: int
    ephemeral: bool
    open: bool


class RenamedRoomInfo(msgspec.Struct, frozen=True):
    name: str
    topic: str
    owner: str
    created_at: str
    members: int
    ephemeral: bool
    open: bool
    previous_name: str


class Message(msgspec.Struct):
    id: int
    rev: int
    room: Union[str, None]
    to: Union[str, None]
    from_: str = msgspec.field(name="from")
    text: str = ""
    ts: str = ""
    edited_ts: Union[str, None] = None
    edited_by: Union[str, None] = None
    deleted: bool = False


def rfc3339(unix: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. 2026-12-01T07:57:40.123Z."""
    dt = datetime.datetime.fromtimestamp(unix, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
