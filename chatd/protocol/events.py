"""One msgspec Struct per server event (wire contract, "Events"; protocol.md's Events table).

An event is a value: handlers, timers and the server make one and address it to an
audience (chatd.bus); it becomes bytes at delivery, once per wire format however many
connections get it. ``json_frame`` encodes the JSON line the first time it is asked and
keeps it on the event, so a room of 500 members, a DM sent to both users, and the
caller's own copy delivered after its reply all reuse the one encoding. A second wire
format would add a second cached encoding beside it.

The class attribute ``name`` is the event's wire name; the Struct's fields are its
``data``, except for the events whose data is a whole Message or Room (``data()`` says).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Union

import msgspec

from chatd.protocol.frames import encode_json, event_frame
from chatd.protocol.models import Message, RenamedRoomInfo, RoomInfo

__all__ = [
    "EVENTS",
    "Batch",
    "Event",
    "Frame",
    "Hello",
    "MemberJoined",
    "MemberLeft",
    "MessageDeleted",
    "MessageEdited",
    "MessagePosted",
    "RoomClosed",
    "RoomUpdated",
    "ServerShutdown",
    "SessionExpired",
    "SessionExpiring",
    "SlowConsumer",
    "decode_event",
]


class Event(msgspec.Struct, dict=True):
    """Base of every event. ``dict=True`` gives each event room for its cached encodings
    (msgspec never encodes them); events are not frozen only for that reason: nothing
    changes an event once made."""

    name: ClassVar[str]

    def data(self) -> Any:
        """What goes in the frame's ``data``."""
        return self

    @classmethod
    def from_data(cls, data: bytes) -> Event:
        """The event from its ``data`` as JSON (``decode_event``)."""
        return msgspec.json.decode(data, type=cls)

    def json_frame(self) -> bytes:
        """The JSON line (``{"type":"event","event":…,"data":…}`` and ``\\n``), encoded
        on first use and kept."""
        cache = self.__dict__
        line: bytes | None = cache.get("json")
        if line is None:
            line = cache["json"] = event_frame(self.name, self.data())
        return line


class Hello(Event):
    """The first frame of every connection (protocol.md, "Framing")."""

    name = "hello"
    server: str  # always "chatd"
    version: str
    protocol: int
    max_frame: int
    max_text: int
    history_limit: int
    epoch: str
    rev: int


class MessagePosted(Event):
    """``message``: a message was posted (to a room, or a DM)."""

    name = "message"
    message: Message

    def data(self) -> Any:
        raw = self.__dict__.get("raw_message")  # message_json's cache, read in place
        return raw if raw is not None else self.message_json()

    def json_frame(self) -> bytes:
        # Event.json_frame with ``data`` inlined (one call and one ``__dict__`` fewer per
        # message event: every send's path).
        cache = self.__dict__
        line: bytes | None = cache.get("json")
        if line is None:
            raw = cache.get("raw_message")
            if raw is None:
                raw = self.message_json()
            line = cache["json"] = event_frame(self.name, raw)
        return line

    def message_json(self) -> msgspec.Raw:
        """The message's JSON, encoded once and kept: the reply to the msg.send or msg.edit
        that made the event carries these same bytes (a reply Struct takes a Raw as
        encoded, chatd.protocol.replies)."""
        cache = self.__dict__
        raw: msgspec.Raw | None = cache.get("raw_message")
        if raw is None:
            raw = cache["raw_message"] = msgspec.Raw(encode_json(self.message))
        return raw

    @classmethod
    def from_data(cls, data: bytes) -> Event:
        return cls(msgspec.json.decode(data, type=Message))


class MessageEdited(MessagePosted):
    name = "message.edited"


class MessageDeleted(Event):
    name = "message.deleted"
    id: int
    rev: int
    room: str | None
    to: str | None
    by: str | None  # who deleted it (null only when a stored change does not say)


class MemberJoined(Event):
    name = "member.joined"
    room: str
    user: str


class MemberLeft(Event):
    """``reason``: left, disconnected, expired, logout or deleted."""

    name = "member.left"
    room: str
    user: str
    reason: str


class RoomUpdated(Event):
    """The Room as it is now; a ``RenamedRoomInfo`` (with ``previous_name``) after a rename."""

    name = "room.updated"
    room: RoomInfo

    def data(self) -> RoomInfo:
        return self.room

    @classmethod
    def from_data(cls, data: bytes) -> Event:
        try:
            return cls(msgspec.json.decode(data, type=RenamedRoomInfo))
        except msgspec.ValidationError:
            return cls(msgspec.json.decode(data, type=RoomInfo))


class RoomClosed(Event):
    name = "room.closed"
    room: str
    by: str | None = None  # who deleted it (null only when a stored change does not say)


class SessionExpiring(Event):
    name = "session.expiring"
    expires_at: int


class SessionExpired(Event, omit_defaults=True):
    """``{}``, or ``{"reason":"logout"}`` when another connection's logout or passwd ended it."""

    name = "session.expired"
    reason: str | None = None


class ServerShutdown(Event):
    name = "server.shutdown"
    reason: str


class SlowConsumer(Event):
    name = "slow_consumer"


# Every event of the contract, by wire name (a unit test holds this to protocol.md's table).
EVENTS: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        Hello, MessagePosted, MessageEdited, MessageDeleted, MemberJoined, MemberLeft,
        RoomUpdated, RoomClosed, SessionExpiring, SessionExpired, ServerShutdown,
        SlowConsumer,
    )
}  # fmt: skip


class _Incoming(msgspec.Struct):
    event: str
    data: msgspec.Raw


_incoming = msgspec.json.Decoder(_Incoming)


def decode_event(line: bytes) -> Event:
    """The event value of an encoded event frame (one line, as ``json_frame`` made it: an
    event another node published, say). Its encoding is kept as the event's own, so it is
    not encoded again. Raises ``msgspec.DecodeError`` (or ``ValidationError``) for a frame
    that is not an event of the contract, KeyError for an unknown event name."""
    frame = _incoming.decode(line)
    event = EVENTS[frame.event].from_data(frame.data)
    if line.endswith(b"\n"):
        event.__dict__["json"] = line
    return event


class Batch:
    """Events for the same audience delivered together, in order, as one write per
    recipient (a room's ``member.left`` events after a mass departure, chatd.app). Not a
    wire event: its encoding is its events' lines, joined, made once."""

    __slots__ = ("_json", "events")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self._json: bytes | None = None

    def json_frame(self) -> bytes:
        line = self._json
        if line is None:
            line = self._json = b"".join([e.json_frame() for e in self.events])
        return line


# What the bus carries to an audience.
Frame = Union[Event, Batch]
