"""The one storage interface chatd uses (a typing.Protocol) and the records it moves.

Writes resolve only after their transaction has committed (group commit), so whatever
the server acknowledges survives a crash. Ids and revisions are assigned by the store.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

import msgspec


class UserRecord(msgspec.Struct):
    id: int
    name: str
    pw_hash: str
    admin: bool
    token_version: int


class GuestHold(msgspec.Struct, frozen=True):
    """A guest's hold on its name (contract, "Guest names come back"). `jti` is the hold's
    id (in its tokens' jti); `held_until` is None while a connection is bound to the guest,
    else the unix second its grace ends; `version` grows with every change of the hold, so
    a write decided on an older state never overwrites a newer one (compare-and-set)."""

    name: str
    jti: str
    held_until: int | None = None
    version: int = 0


class RoomRecord(msgspec.Struct):
    id: int
    name: str
    topic: str
    owner: str
    created_at: float
    ephemeral: bool
    open: bool


class MessageRecord(msgspec.Struct):
    id: int
    rev: int
    room_id: int | None
    sender: str
    recipient: str | None
    text: str
    ts: float
    edited_ts: float | None
    edited_by: str | None
    deleted: bool
    # Who sent it and to whom, as account identities ("name#id", a guest "name#g<hold>"):
    # a later holder of the same name is someone else (DMs stay their two users').
    sender_key: str = ""
    recipient_key: str | None = None


class Snapshot(msgspec.Struct):
    """What the server loads into memory at start."""

    epoch: str
    rev: int
    users: list[UserRecord]
    guests: list[GuestHold]
    revoked: dict[str, int]
    rooms: list[RoomRecord]
    users_version: int


class NewMessage(msgspec.Struct):
    room_id: int | None
    sender: str
    recipient: str | None
    text: str
    ts: float
    nonce: str | None
    sender_key: str = ""  # identities, see MessageRecord; "" = the name itself
    recipient_key: str | None = None


class Store(Protocol):
    """Everything durable. Writes are group-committed; reads run off the event loop."""

    rev: int
    epoch: str

    def open(self) -> Snapshot: ...
    async def close(self) -> None: ...

    # accounts
    async def create_user(self, name: str, pw_hash: str, admin: bool) -> UserRecord: ...
    async def delete_user(self, name: str) -> bool: ...
    async def bump_token_version(self, name: str) -> int: ...
    async def revoke(self, jti: str, expires_at: int) -> None: ...
    async def get_user(self, name: str) -> UserRecord | None: ...
    async def set_password(self, user_id: int, pw_hash: str) -> int | None:
        """New hash and the next token generation; the new token_version, None if gone."""
        ...
    async def hold_guest(self, hold: GuestHold) -> None:
        """A new hold, replacing whatever row a released or lapsed one left."""
        ...
    def update_hold(self, hold: GuestHold) -> Awaitable[bool]:
        """The same hold's new state, applied only over an older version."""
        ...
    def release_guest(self, hold: GuestHold) -> Awaitable[bool]:
        """Delete the hold unless a newer version of it is stored (hold.version is the
        release's own version)."""
        ...
    async def purge_expired(self, now: int) -> None: ...
    async def reload_users(self) -> tuple[int, list[UserRecord]]: ...
    async def users_version(self) -> int: ...

    # rooms
    async def create_room(self, room: RoomRecord) -> RoomRecord: ...
    async def update_room(self, room_id: int, name: str, topic: str) -> None: ...
    def delete_room(self, room_id: int) -> Awaitable[None]: ...

    # messages
    async def add_message(self, msg: NewMessage) -> tuple[MessageRecord, bool]: ...
    async def edit_message(self, message_id: int, text: str, ts: float, by: str) -> MessageRecord | None: ...
    async def delete_message(self, message_id: int) -> MessageRecord | None: ...
    async def get_message(self, message_id: int) -> MessageRecord | None: ...
    async def count_messages(self) -> int:
        """How many messages are stored (tombstones included), for `stats`."""
        ...
    async def find_nonce(self, sender_key: str, nonce: str) -> MessageRecord | None: ...
    async def room_history(
        self, room_id: int, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]: ...
    async def dm_history(
        self, me: str, other: str | None, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        """DMs of identity `me`; with `other`, only those with whoever held that name."""
        ...
    async def changes_since(
        self, rev: int, room_ids: list[int], me: str, limit: int
    ) -> tuple[list[MessageRecord], bool]: ...
    async def has_dms_between(self, me: str, other: str) -> bool: ...

    # retention: messages older than max_age seconds, all but the newest `keep` per room
    # and DM pair (0 = off); returns how many left history
    async def prune(self, now: float, max_age: float, keep: int, batch: int = 500) -> int: ...
