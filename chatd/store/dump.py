"""What `chatd copy` moves between stores (issue 11): everything durable, in records that
say nothing about either store's layout. Messages travel separately, in batches."""

from __future__ import annotations

import msgspec

from chatd.store.base import GuestHold, RoomRecord


class UserRow(msgspec.Struct, frozen=True):
    id: int
    name: str
    pw_hash: str
    admin: bool
    token_version: int
    created_at: float


class MessageRow(msgspec.Struct, frozen=True):
    """A stored message with everything both stores keep (MessageRecord plus its nonce)."""

    id: int
    rev: int
    room_id: int | None
    sender: str
    sender_key: str
    recipient: str | None
    recipient_key: str | None
    text: str
    ts: float
    edited_ts: float | None
    edited_by: str | None
    deleted: bool
    nonce: str | None


class Dump(msgspec.Struct):
    """The whole store but its messages. The counters are the last id handed out, so a
    copy never hands out an id again, even one whose message or room is gone."""

    epoch: str
    rev: int
    users_version: int
    last_user_id: int
    last_room_id: int
    last_message_id: int
    users: list[UserRow]
    guests: list[GuestHold]
    revoked: dict[str, int]
    rooms: list[RoomRecord]
