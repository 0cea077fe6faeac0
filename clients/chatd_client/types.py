"""Typed reply data and events. Message and RoomInfo are the server's own
(chatd.protocol.models), so the client's types cannot drift from the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from chatd.protocol.models import Message, RoomInfo

__all__ = [
    "AuthResult",
    "Channel",
    "CommandHelp",
    "Event",
    "Hello",
    "HistoryPage",
    "JoinResult",
    "LoginResult",
    "Members",
    "Message",
    "RefreshResult",
    "RoomInfo",
    "SyncPage",
]


class Hello(msgspec.Struct, frozen=True):
    server: str
    version: str
    protocol: int
    max_frame: int
    max_text: int
    history_limit: int
    epoch: str
    rev: int


class LoginResult(msgspec.Struct, frozen=True):
    token: str
    user: str
    grants: list[str]
    expires_at: int


class AuthResult(msgspec.Struct, frozen=True):
    """The reply to ``auth`` and ``whoami``."""

    user: str
    grants: list[str]
    expires_at: int


class RefreshResult(msgspec.Struct, frozen=True):
    token: str
    expires_at: int


class CommandHelp(msgspec.Struct, frozen=True):
    cmd: str
    usage: str
    auth: bool = True
    grant: str | None = None


class JoinResult(msgspec.Struct, frozen=True):
    room: RoomInfo
    members: list[str]


class Members(msgspec.Struct, frozen=True):
    room: str
    members: list[str]


class HistoryPage(msgspec.Struct, frozen=True):
    messages: list[Message]
    more: bool


class SyncPage(msgspec.Struct, frozen=True):
    changes: list[Message]
    rev: int
    more: bool


class Channel(msgspec.Struct, frozen=True):
    name: str
    type: Literal["room", "user"]


# Events the client itself adds to the stream (not wire events).
DISCONNECTED = "disconnected"  # data: {"reason"}
RECONNECTED = "reconnected"  # data: {"attempts", "epoch_changed"}
EPOCH_CHANGED = "epoch.changed"  # data: {"old", "new"}: the store was replaced
REJOIN_FAILED = "rejoin.failed"  # data: {"room", "code", "message"}
EVENTS_DROPPED = "events.dropped"  # data: {"count"}: the app did not keep up
CLIENT_EVENTS = frozenset({DISCONNECTED, RECONNECTED, EPOCH_CHANGED, REJOIN_FAILED, EVENTS_DROPPED})
MESSAGE_EVENTS = frozenset({"message", "message.edited", "message.deleted"})


@dataclass(frozen=True)
class Event:
    """One event: a wire event (``message``, ``member.joined``, …) or a client notice
    (``disconnected``, ``reconnected``, ``epoch.changed``, ``rejoin.failed``,
    ``events.dropped``).

    ``message`` is set for ``message``, ``message.edited`` and ``message.deleted``; for a
    deletion it is a tombstone (``deleted=True``, empty text; ``from_`` is ``""`` when the
    deletion arrived live, since the wire event does not carry it). ``room`` is the room the
    event concerns, if any. ``recovered`` is true for changes fetched by ``sync`` after a
    reconnect rather than received live.
    """

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    room: str | None = None
    message: Message | None = None
    recovered: bool = False

    @property
    def is_client_notice(self) -> bool:
        return self.name in CLIENT_EVENTS
