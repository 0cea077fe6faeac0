"""The storage interfaces chatd uses (typing.Protocols) and the records they move.

- `Store`: everything durable the running server needs. Writes resolve only after their
  transaction has committed (group commit), so whatever the server acknowledges survives a
  crash. Message ids and revisions are allocated by the store, never by its caller, and
  `Store.rev` is the `sync` watermark (see there): a second backend owns both.
- `AdminStore`: the offline account commands of the command line (`chatd user`, `chatd
  token`), synchronous, usable while a server runs on the same data.

Nothing here imports an implementation (the SQLite one is `chatd.store.sqlite`), so
importing this module loads no database driver.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

import msgspec

from chatd.errors import Conflict


class StoreOpenError(Exception):
    """The store cannot be used: missing, newer than this program, not chatd's, unreadable,
    or locked by a running server. The message says why, for an operator."""


class StoreMissing(StoreOpenError):
    """An admin open without ``create`` found no store (a read must not make one)."""


class NameHeld(Conflict):
    """`AdminStore.create_user`: a guest holds the name. ``held_until`` is None while the
    guest is connected, else the unix second its grace ends."""

    def __init__(self, name: str, held_until: int | None) -> None:
        super().__init__(f"the name {name!r} is held by a guest")
        self.name = name
        self.held_until = held_until


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


class MessageRecord(msgspec.Struct, array_like=True):
    # array_like: the Redis store keeps a message as a msgpack array whose first elements
    # are these fields in this order (chatd/store/redis/scripts.py, MESSAGE), decoded
    # straight into this type (extra trailing elements are ignored).
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
    """Everything durable. Writes are group-committed; reads run off the event loop.

    Ids and revisions: the store allocates message ids (strictly growing, never handed out
    again, not even after the newest is deleted) and revisions (one global counter; every
    stored change of a message - send, edit, delete - takes the next one). Callers never
    compute either; `add_message`, `edit_message` and `delete_message` return the record
    with what was allocated.

    Writes are applied in the order they were called (a write is queued at the call, not at
    its first await), and their results are delivered in that order too.
    """

    epoch: str

    @property
    def rev(self) -> int:
        """The `sync` watermark (contract, Revisions): every change with a revision up to
        `rev` is committed and visible to every read that starts after `rev` was looked at
        (`changes_since`, histories, `get_message`). It advances only after the commit of
        the writes that took those revisions, in order, never ahead of what reads return;
        it never goes back while the store is open. `open()` sets it to the stored value."""
        ...

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
    async def reload_users(self) -> tuple[int, list[UserRecord]]:
        """Every account and the users_version they were read at (one consistent read)."""
        ...
    async def users_version(self) -> int:
        """A number that changes whenever the accounts were changed from outside this
        store (an `AdminStore`), so a server polling it knows to `reload_users`."""
        ...

    # rooms
    async def create_room(self, room: RoomRecord) -> RoomRecord: ...
    async def update_room(self, room_id: int, name: str, topic: str) -> None: ...
    def delete_room(self, room_id: int, by: str = "") -> Awaitable[None]:
        """``by`` (who deleted it) is for the other nodes' `room.closed` (Redis)."""
        ...

    # messages
    def add_message(self, msg: NewMessage) -> Awaitable[tuple[MessageRecord, bool]]:
        """Store a message with the next id and revision: (record, True). A nonce its
        sender already used gives (the original, False) and allocates nothing. NotFound
        if the room does not exist (deleted, or an ephemeral room ended by a restart).
        Queued at the call; what it returns is the write's own result, not a coroutine
        around it (the hottest write: one coroutine frame less per send)."""
        ...
    async def edit_message(self, message_id: int, text: str, ts: float, by: str) -> MessageRecord | None:
        """The changed live message with the next revision; None if missing or deleted."""
        ...
    async def delete_message(self, message_id: int, by: str = "") -> MessageRecord | None:
        """The tombstone (text "", deleted) with the next revision; None if missing or
        already deleted. ``by`` (who deleted it) goes into the Redis change stream for the
        other nodes' `message.deleted`; it is not stored."""
        ...
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
    ) -> tuple[list[MessageRecord], bool]:
        """Messages changed after revision `rev` in those rooms and in `me`'s DMs, each
        once in its newest state, oldest revision first; at most `limit`, and whether more
        are left. With `Store.rev` read before the call, nothing up to it is missing."""
        ...
    async def has_dms_between(self, me: str, other: str) -> bool: ...

    # retention: messages older than max_age seconds, all but the newest `keep` per room
    # and DM pair (0 = off); returns how many left history
    async def prune(self, now: float, max_age: float, keep: int, batch: int = 500) -> int: ...


class AdminStore(Protocol):
    """The offline account commands (`chatd user add|list|delete`, `chatd token`, the
    token `chatd stats` mints): synchronous, and usable while a server runs on the same
    data, so an implementation never takes the server's lock. Every change is committed
    before the call returns and tells a running server at once (its `Store.users_version`
    changes, and `Store.get_user` reads the change), so a login right after works."""

    def create_user(self, name: str, pw_hash: str, admin: bool, now: float) -> UserRecord:
        """A new account. Conflict if the name (any case) is taken; NameHeld if a guest
        holds it at `now` (contract: registering a held name is a conflict). A hold that
        lapsed before `now` is removed in the same step, so the name is free at once even
        with no server running to release it."""
        ...

    def find_user(self, name: str) -> UserRecord | None:
        """The account of that name (any case), or None."""
        ...

    def list_users(self) -> list[UserRecord]:
        """Every account, sorted by name case-insensitively."""
        ...

    def delete_user(self, name: str) -> bool:
        """Delete the account; whether there was one. A running server closes its
        connections when it sees the change."""
        ...

    def close(self) -> None: ...
