"""Typed events and the names of reply data. Message, RoomInfo and every reply Struct
are the server's own (chatd.protocol.models and .replies), so the client's types cannot
drift from the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from chatd.protocol.models import Message, RoomInfo
from chatd.protocol.replies import (
    AuthReply,
    Channel,
    CommandHelp,
    HistoryReply,
    LoginReply,
    RefreshReply,
    RoomJoinReply,
    RoomMembersReply,
    SyncReply,
)

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


# The reply types are the wire's own (chatd.protocol.replies); these names stay for
# applications written against earlier versions of this library.
LoginResult = LoginReply
AuthResult = AuthReply  # auth; whoami returns WhoAmIReply, a subclass of it
RefreshResult = RefreshReply
JoinResult = RoomJoinReply
Members = RoomMembersReply
HistoryPage = HistoryReply
SyncPage = SyncReply


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
