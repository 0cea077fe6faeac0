"""Live room state: which connections are in which room. Returns who to notify; never
touches sockets (STYLE). Membership belongs to connections; member events are per user
(wire contract, "Rules": first connection in, last connection out)."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from chatd.errors import Conflict, NotFound
from chatd.protocol.frames import encode_json
from chatd.protocol.models import RenamedRoomInfo, RoomInfo, rfc3339
from chatd.store.base import RoomRecord

if TYPE_CHECKING:
    import asyncio

    from chatd.session import Session


class LiveRoom:
    __slots__ = (
        "__weakref__",
        "_members_json",
        "created_at",
        "deleted",
        "edit_lock",
        "entering",
        "ephemeral",
        "id",
        "members_sorted",
        "name",
        "open",
        "owner",
        "remote",
        "sessions",
        "topic",
        "users",
    )

    def __init__(self, rec: RoomRecord) -> None:
        self.id = rec.id
        self.name = rec.name
        self.topic = rec.topic
        self.owner = rec.owner
        self.created_at = rec.created_at
        self.ephemeral = rec.ephemeral
        self.open = rec.open
        # Insertion-ordered set of member connections; fan-out walks it.
        self.sessions: dict[Session, None] = {}
        # Several nodes: connections whose user's entry into the room this node has asked
        # Redis for and not read back from the change stream yet. They become members
        # (join `sessions`) at that entry, so they get exactly the room's events after
        # it, as they would after their join on one server (RoomManager.admit).
        self.entering: dict[Session, None] = {}
        # user key -> how many of that user's connections are in the room
        self.users: dict[str, int] = {}
        # Several nodes (chatd/cluster): user key -> the nodes that user is in the room on,
        # this one too, as the change stream has told this node so far. The member list
        # is this map then (a local join or leave shows in it once its entry is read), so
        # that it agrees with the member events every node sends from the stream.
        self.remote: dict[str, set[str]] = {}
        # (user key, display name) of every member user, sorted: kept in step by join and
        # leave (an insort is one memmove), so a member list never sorts (issue 13, item
        # 11); its JSON is encoded once per change and reused by every reader.
        self.members_sorted: list[tuple[str, str]] = []
        self._members_json: msgspec.Raw | None = None
        self.deleted = False
        # room.edit reads name and topic before its write: edits of one room take turns,
        # so a topic change never writes back a name a concurrent rename just replaced.
        self.edit_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<LiveRoom {self.name}>"

    def info(self) -> RoomInfo:
        return RoomInfo(
            name=self.name,
            topic=self.topic,
            owner=self.owner,
            created_at=rfc3339(self.created_at),
            members=len(self.members_sorted),
            ephemeral=self.ephemeral,
            open=self.open,
        )

    def renamed_info(self, previous: str) -> RenamedRoomInfo:
        i = self.info()
        return RenamedRoomInfo(
            i.name, i.topic, i.owner, i.created_at, i.members, i.ephemeral, i.open, previous
        )

    def member_names(self) -> list[str]:
        return [name for _, name in self.members_sorted]

    def members_json(self) -> msgspec.Raw:
        """The member list (users, by name case-insensitively) as JSON, for replies."""
        cached = self._members_json
        if cached is None:
            cached = self._members_json = msgspec.Raw(encode_json(self.member_names()))
        return cached

    def _member_in(self, key: str, name: str) -> None:
        bisect.insort(self.members_sorted, (key, name))
        self._members_json = None

    def _member_out(self, key: str) -> None:
        members = self.members_sorted
        i = bisect.bisect_left(members, (key,))
        if i < len(members) and members[i][0] == key:
            del members[i]
        self._members_json = None

    def has_user(self, user_key: str) -> bool:
        return user_key in self.users or user_key in self.remote

    def is_empty(self) -> bool:
        """No member on any node."""
        return not self.sessions and not self.remote


class RoomManager:
    """Rooms by case-folded name. Names are reserved as soon as a create starts, so two
    racing creates of one name cannot both reach the store."""

    def __init__(self) -> None:
        self.rooms: dict[str, LiveRoom] = {}
        # Membership is kept here alone: each room's connections (LiveRoom.sessions) and,
        # for connections in at least one room, the rooms they are in.
        # (Its one room, or a dict once it is in several: most connections are in one.)
        self._joined: dict[Session, LiveRoom | dict[LiveRoom, None]] = {}
        self.by_id: dict[int, LiveRoom] = {}
        self._reserved: set[str] = set()
        # owner (case-folded) -> rooms owned now, live and being created (issue 13, item 5)
        self._owned: dict[str, int] = {}
        # Rooms in case-insensitive name order, with their keys, for paging room.list and
        # channels; rebuilt on the first read after a change.
        self._sorted: tuple[list[str], list[LiveRoom]] | None = None
        # Several nodes (chatd/cluster): told when a user enters a room here (its first
        # connection on this node) or leaves it (its last), with (room, user key, display
        # name, entered, reason). Who is first in or last out on ANY node is then decided
        # in Redis, which announces it: join and leave announce nothing themselves.
        self.on_presence: Callable[[LiveRoom, str, str, bool, str], None] | None = None

    def load(self, records: list[RoomRecord]) -> None:
        for rec in records:
            self._add(LiveRoom(rec))

    def _add(self, room: LiveRoom) -> None:
        self.rooms[room.name.lower()] = room
        self.by_id[room.id] = room
        self._count_owner(room.owner, 1)
        self._sorted = None

    def _count_owner(self, owner: str, delta: int) -> None:
        key = owner.lower()
        n = self._owned.get(key, 0) + delta
        if n > 0:
            self._owned[key] = n
        else:
            self._owned.pop(key, None)

    def owned(self, owner: str) -> int:
        """Rooms `owner` owns now, counting creates still on their way to the store."""
        return self._owned.get(owner.lower(), 0)

    def in_order(self) -> tuple[list[str], list[LiveRoom]]:
        """(case-folded names, rooms), both in case-insensitive name order."""
        if self._sorted is None:
            keys = sorted(self.rooms)
            self._sorted = (keys, [self.rooms[k] for k in keys])
        return self._sorted

    def after(self, name: str | None) -> tuple[list[str], list[LiveRoom], int]:
        """The ordered rooms and the index of the first one after `name` (a cursor)."""
        keys, rooms = self.in_order()
        start = 0 if name is None else bisect.bisect_right(keys, name.lower())
        return keys, rooms, start

    def get(self, name: str) -> LiveRoom:
        room = self.rooms.get(name.lower())
        if room is None:
            raise NotFound(f"no room {name!r}")
        return room

    def reserve(self, name: str, owner: str | None = None) -> None:
        """Hold a name while it is created (or renamed to); with `owner`, the room counts
        as owned from now on, so parallel creates cannot pass the cap together."""
        key = name.lower()
        if key in self.rooms or key in self._reserved:
            raise Conflict(f"room {name!r} already exists")
        self._reserved.add(key)
        if owner is not None:
            self._count_owner(owner, 1)

    def release(self, name: str, owner: str | None = None) -> None:
        key = name.lower()
        if key in self._reserved:
            self._reserved.discard(key)
            if owner is not None:
                self._count_owner(owner, -1)

    def add(self, rec: RoomRecord) -> LiveRoom:
        self._reserved.discard(rec.name.lower())
        room = LiveRoom(rec)
        self._add(room)
        return room

    def rename(self, room: LiveRoom, new_name: str) -> None:
        del self.rooms[room.name.lower()]
        self._reserved.discard(new_name.lower())
        room.name = new_name
        self.rooms[new_name.lower()] = room
        self._sorted = None

    def remove(self, room: LiveRoom) -> list[Session]:
        """Forget a room; returns the connections that were in it (no longer members)."""
        if self.by_id.pop(room.id, None) is not None:
            self._count_owner(room.owner, -1)
        self.rooms.pop(room.name.lower(), None)
        self._sorted = None
        room.deleted = True
        if self.on_presence is not None:
            names = dict(room.members_sorted)
            for key in room.users:
                self.on_presence(room, key, names.get(key, key), False, "")
        members = list(room.sessions)
        for s in (*members, *room.entering):
            self._forget(s, room)
        room.sessions.clear()
        room.entering.clear()
        room.users.clear()
        room.remote.clear()
        room.members_sorted.clear()
        room._members_json = None
        return members

    def rooms_of(self, session: Session) -> list[LiveRoom]:
        """The rooms a connection is in, in the order it joined them."""
        joined = self._joined.get(session)
        if joined is None:
            return []
        return list(joined) if isinstance(joined, dict) else [joined]

    def _forget(self, session: Session, room: LiveRoom) -> None:
        joined = self._joined.get(session)
        if joined is room:
            del self._joined[session]
        elif isinstance(joined, dict):
            joined.pop(room, None)
            if len(joined) == 1:
                self._joined[session] = next(iter(joined))

    def join(self, room: LiveRoom, session: Session) -> bool:
        """Add a connection; True when it is the user's first connection in the room, to
        be announced (never with several nodes: see on_presence)."""
        if session in room.sessions or session in room.entering:
            return False
        key = session.user_key
        assert key is not None
        n = room.users.get(key, 0)
        if self.on_presence is None:
            room.sessions[session] = None
        elif n == 0 or any(s.user_key == key for s in room.entering):
            room.entering[session] = None  # a member once its entry is read (admit)
        else:
            room.sessions[session] = None  # the user is in here already
        joined = self._joined.get(session)
        if joined is None:
            self._joined[session] = room
        elif isinstance(joined, dict):
            joined[room] = None
        else:
            self._joined[session] = {joined: None, room: None}
        room.users[key] = n + 1
        if n != 0:
            return False
        name = session.user or key
        if self.on_presence is not None:
            self.on_presence(room, key, name, True, "")  # the list follows the stream
            return False
        room._member_in(key, name)
        return True

    def leave(self, room: LiveRoom, session: Session, reason: str = "left") -> bool:
        """Remove a connection; True when it was the user's last connection in the room,
        to be announced with `reason` (never with several nodes: see on_presence)."""
        if session in room.sessions:
            del room.sessions[session]
        elif session in room.entering:
            del room.entering[session]
        else:
            return False
        self._forget(session, room)
        key = session.user_key
        assert key is not None
        n = room.users.get(key, 1) - 1
        if n <= 0:
            room.users.pop(key, None)
            if self.on_presence is not None:
                self.on_presence(room, key, session.user or key, False, reason)
                return False
            room._member_out(key)
            return True
        room.users[key] = n
        return False

    def withdraw(self, room: LiveRoom, key: str) -> list[Session]:
        """Take the user's connections out of the room without a word (several nodes: their
        join was refused, the room having closed first; or this node reset its presence).
        Returns them."""
        out = [s for s in (*room.sessions, *room.entering) if s.user_key == key]
        for s in out:
            room.sessions.pop(s, None)
            room.entering.pop(s, None)
            self._forget(s, room)
        room.users.pop(key, None)
        return out

    def admit(self, room: LiveRoom, key: str) -> None:
        """The user's entry into the room is read (several nodes): its connections that
        were entering are members now."""
        if room.entering:
            for s in [s for s in room.entering if s.user_key == key]:
                del room.entering[s]
                room.sessions[s] = None

    def withdraw_all(self) -> None:
        """Every connection out of every room, without a word (several nodes: after an
        outage the node ends its connections and starts its presence afresh)."""
        for room in self.rooms.values():
            for key in list(room.users):
                self.withdraw(room, key)  # an entering connection too: its user is in `users`

    # --- members as the change stream tells them (several nodes: chatd/cluster) ------

    def remote_in(self, room: LiveRoom, node: str, key: str, name: str) -> bool:
        """`node` says its user `key` is in the room; True when the user is new to it."""
        nodes = room.remote.get(key)
        new = nodes is None
        if nodes is None:
            nodes = room.remote[key] = set()
            room._member_in(key, name)
        nodes.add(node)
        return new

    def replace_remote(self, room: LiveRoom, remote: dict[str, tuple[str, set[str]]]) -> None:
        """The room's members on every node, as Redis has them now (key -> (display name,
        nodes)): what this node adopts after it may have missed changes."""
        for key in list(room.remote):
            del room.remote[key]
            room._member_out(key)
        for key, (name, nodes) in remote.items():
            for node in nodes:
                self.remote_in(room, node, key, name)

    def remote_out(self, room: LiveRoom, node: str, key: str) -> bool:
        """`node` says its user `key` left the room; True when the user is gone from it."""
        nodes = room.remote.get(key)
        if nodes is None or node not in nodes:
            return False
        nodes.discard(node)
        if nodes:
            return False
        del room.remote[key]
        room._member_out(key)
        return True
