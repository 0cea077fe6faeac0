"""A stored change as the wire has it: a message record → its Message, its event, and who
gets the event. One place for it: the handlers that make a change use it (one node), and so
does the bus for several nodes (chatd/cluster.py), which reads every node's message changes
from the store's change stream (chatd/store/redis: fields ``rev``, ``kind`` and the
message) and delivers the same event values here.

Room names come from this node's rooms (``RoomManager.by_id``): a message of a room this
node does not know (deleted meanwhile) has ``room`` None and no audience.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd.bus import Audience, ToRoom, ToUser
from chatd.protocol.events import Event, MessageDeleted, MessageEdited, MessagePosted
from chatd.protocol.models import Message, rfc3339

if TYPE_CHECKING:
    from chatd.rooms import RoomManager
    from chatd.store.base import MessageRecord


def _room_name(rooms: RoomManager, m: MessageRecord) -> str | None:
    """The name of the message's room (None: a DM, or a room gone from memory)."""
    live = rooms.by_id.get(m.room_id) if m.room_id is not None else None
    return live.name if live is not None else None


def message_of(rooms: RoomManager, m: MessageRecord) -> Message:
    """The Message a reply, a page or an event carries."""
    return Message(
        id=m.id,
        rev=m.rev,
        room=_room_name(rooms, m),
        to=m.recipient,
        from_=m.sender,
        text=m.text,
        ts=rfc3339(m.ts),
        edited_ts=rfc3339(m.edited_ts) if m.edited_ts is not None else None,
        edited_by=m.edited_by,
        deleted=m.deleted,
    )


def names_room_as_now(rooms: RoomManager, m: MessageRecord, event: Event) -> bool:
    """Whether `event`, made of `m` a moment ago, still names m's room as this node does
    (a rename applied since: it does not, and is made again)."""
    said = event.message.room if isinstance(event, MessagePosted) else getattr(event, "room", None)
    return said == _room_name(rooms, m)


def deleted(rooms: RoomManager, m: MessageRecord, by: str | None) -> MessageDeleted:
    """``by``: who deleted it (the record does not say; None when nobody knows)."""
    return MessageDeleted(id=m.id, rev=m.rev, room=_room_name(rooms, m), to=m.recipient, by=by)


def message_event(
    rooms: RoomManager, kind: str, m: MessageRecord, by: str | None = None
) -> Event:
    """The event of a change by its `kind`, the change stream's (``message``,
    ``message.edited`` or ``message.deleted``; `by`: who deleted, for
    ``message.deleted``); raises ValueError for another kind."""
    if kind == "message":
        return MessagePosted(message_of(rooms, m))
    if kind == "message.edited":
        return MessageEdited(message_of(rooms, m))
    if kind == "message.deleted":
        return deleted(rooms, m, by)
    raise ValueError(f"not a message change: {kind!r}")


def audiences(rooms: RoomManager, m: MessageRecord) -> list[Audience]:
    """Who gets a message's events: the room's connections, or both identities' connections
    for a DM (not whoever holds those names now); nobody when the room is gone."""
    if m.room_id is not None:
        room = rooms.by_id.get(m.room_id)
        return [ToRoom(room)] if room is not None else []
    out: list[Audience] = [ToUser(m.sender.lower(), m.sender_key)]
    if m.recipient is not None and m.recipient_key != m.sender_key:
        out.append(ToUser(m.recipient.lower(), m.recipient_key))
    return out
