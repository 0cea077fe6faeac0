"""The one event path: events addressed to audiences, delivered by a Bus.

A command's Outcome (chatd.dispatch) carries its reply, its events as ``(audience,
event)`` pairs and the connections it closes (audiences too); a timer's outcome (expiry,
a guest's grace, batched departures) carries the same. Nothing in the core sends to a
connection any other way. Events are values (chatd.protocol.events); the bus is where
they become bytes, once per event however many connections get it (``Event.json_frame``
caches the encoding on the event).

Audiences name who should get a frame, not sockets: a room (``ToRoom``), a user's
connections (``ToUser``, optionally only those of one identity), or given connections
(``ToSessions``). The in-process ``LocalBus`` resolves them to this process's sessions.
The bus for several nodes (issue 11, ``chatd.cluster.RedisBus``) implements the same
``Bus`` protocol: it delivers locally as ``LocalBus`` does and forwards the event's bytes
with its audience to the other nodes, whose bus delivers it to their own sessions; message
events it builds on every node from the store's change stream, in revision order
(``carries_revisions``).

Ordering rule (wire contract: on the caller's own connection a command's reply comes
before the events it causes): ``others_now`` delivers an outcome's events and closes to
every connection except the caller's at once, and leaves in the outcome only the caller's
own share, which ``deliver`` sends after the reply. A reply queued at once needs no
split: ``deliver`` then sends every event to everyone. Fan-out encodes once: the same
bytes go to every recipient's bounded outbox, and no recipient is ever awaited (STYLE 6).
(A second wire format: each session would name its format, and the bus would take each
event's encoding for that format, still once per event and format.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Protocol, Union

import msgspec

from chatd.protocol.events import Event, Frame

if TYPE_CHECKING:
    from chatd.rooms import LiveRoom
    from chatd.session import Session
    from chatd.stats import Stats


class Directory(Protocol):
    """Who is connected here, for resolving audiences (chatd.domain.presence)."""

    def sessions_of(self, user_key: str) -> Collection[Session]: ...


class ToRoom(msgspec.Struct, eq=False):
    """Every connection in the room when the event is delivered (``skip``: but that one).

    A msgspec Struct (never encoded; eq=False: compared by identity, as before) so that
    making one, once per message sent, runs no Python ``__init__``."""

    room: LiveRoom
    skip: Session | None = None

    def local(self, directory: Directory) -> Collection[Session]:
        if self.skip is None:
            return self.room.sessions
        skip = self.skip
        return [s for s in self.room.sessions if s is not skip]


class ToUser:
    """Every connection of a user (by case-folded name); with ``identity``, only those
    bound to that identity (chatd.domain.identity), so a name's next holder gets nothing
    meant for the former one."""

    __slots__ = ("identity", "key")

    def __init__(self, key: str, identity: str | None = None) -> None:
        self.key = key
        self.identity = identity

    def local(self, directory: Directory) -> Collection[Session]:
        sessions = directory.sessions_of(self.key)
        if self.identity is None:
            return list(sessions)
        return [s for s in sessions if s.identity == self.identity]


class ToSessions:
    """The given connections (a room's members captured before the room went, or one
    connection). A bus for several nodes names them by node and connection id."""

    __slots__ = ("sessions",)

    def __init__(self, *sessions: Session) -> None:
        self.sessions = sessions

    @staticmethod
    def of(sessions: Iterable[Session]) -> ToSessions:
        return ToSessions(*sessions)

    def local(self, directory: Directory) -> Collection[Session]:
        return self.sessions


Audience = Union[ToRoom, ToUser, ToSessions]
Events = list[tuple[Audience, Frame]]


class Bus(Protocol):
    # True for a bus that delivers message events (send, edit, delete) itself, from the
    # store's change stream in revision order (chatd/cluster): handlers then emit none.
    carries_revisions: bool

    def caught_up(self) -> Awaitable[None] | None:
        """Something to await before reading state other nodes change (members, rooms,
        accounts): done once this node has applied every change made anywhere before the
        call. None when there is nothing to wait for (one node)."""
        ...

    def published(self) -> Awaitable[None] | None:
        """Something to await before a reply whose membership change other nodes must
        already see (a leave): done once this node's presence writes so far have
        reached the other nodes' stream. None when there is nothing to wait for."""
        ...

    def entered(self, room: LiveRoom, session: Session) -> Awaitable[Any] | None:
        """Something to await before the reply of a join (or create) of `session`, which
        is in `room` here already: done once the membership is recorded where every node
        sees it, with the room's RoomInfo and member list (JSON) as of then, or None;
        raises NotFound when the room closed first (several nodes: it is gone, and the
        connection is out of it again). None when there is nothing to wait for."""
        ...

    def posted(self, rev: int, event: Event) -> None:
        """A bus that carries revisions: the event a handler made of this node's own write
        of revision `rev` (chatd/changes, from the record the store answered), for the
        stream reader to deliver as it is instead of building and encoding it again
        (unless a rename since makes it name the room otherwise)."""
        ...

    def publish(self, audience: Audience, frame: Frame, caller: Session | None = None) -> bool:
        """Deliver `frame` (an event, or a Batch of them) to every connection of `audience`
        at once, except `caller`; True when `caller` is in the audience (its copy is then
        the caller's to send, after its reply). Never waits."""
        ...

    def close(self, audience: Audience, caller: Session | None = None) -> bool:
        """Close every connection of `audience` (queued bytes flushed first), except
        `caller`; True when `caller` is in it."""
        ...


class LocalBus:
    """The in-process Bus: audiences resolve to this process's sessions."""

    __slots__ = ("_directory", "_stats")
    carries_revisions = False

    def caught_up(self) -> None:
        return None

    def published(self) -> None:
        return None

    def entered(self, room: LiveRoom, session: Session) -> None:
        return None

    def posted(self, rev: int, event: Event) -> None:
        return None

    def __init__(self, directory: Directory, stats: Stats) -> None:
        self._directory = directory
        self._stats = stats

    def publish(self, audience: Audience, frame: Frame, caller: Session | None = None) -> bool:
        # The per-recipient loop is the fan-out's whole cost: nothing in it but the send
        # (deliveries are counted from the audience's size, not one by one).
        if type(audience) is ToRoom:
            # The room's own dict (ToRoom.local, inlined), the one left out passed over in
            # the loop (no copy of a big room's members for every join and leave).
            sessions: Collection[Session] = audience.room.sessions
            if audience.skip is not None:
                return self._publish(sessions, frame.json_frame(), caller, audience.skip)
        else:
            sessions = audience.local(self._directory)
        data = frame.json_frame()  # encoded once (and kept on the event), not per recipient
        if caller is None:
            for s in sessions:
                s.send(data)
            self._stats.deliveries += len(sessions)
            return False
        return self._publish(sessions, data, caller, None)

    def _publish(
        self, sessions: Iterable[Session], data: bytes, caller: Session | None,
        skip: Session | None,
    ) -> bool:
        mine = False
        n = 0
        for s in sessions:
            if s is caller:
                mine = s is not skip  # left out is left out, caller or not
            elif s is not skip:
                s.send(data)
                n += 1
        self._stats.deliveries += n
        return mine

    def close(self, audience: Audience, caller: Session | None = None) -> bool:
        mine = False
        for s in list(audience.local(self._directory)):
            if s is caller:
                mine = True
            else:
                s.peer.close()
        return mine


class Effects(msgspec.Struct, kw_only=True):
    """Events and closes collected while something happens (a command: chatd.dispatch's
    Request is one; a timer makes its own and hands it to ``deliver``).

    A msgspec Struct (never encoded) rather than a class with ``__init__``: every command
    makes one, and a Struct is built in C, with no Python frame (≈0.05 µs of a ping)."""

    events: Events = []  # msgspec gives each instance a new empty list
    closes: list[Audience] | None = None

    def emit(self, audience: Audience, frame: Frame) -> None:
        self.events.append((audience, frame))

    def close(self, audience: Audience) -> None:
        if self.closes is None:
            self.closes = []
        self.closes.append(audience)


class Delivery(Protocol):
    """What the bus needs of an outcome (chatd.dispatch.Outcome)."""

    events: Events | None
    closes: list[Audience] | None


def others_now(bus: Bus, outcome: Delivery, me: Session | None) -> None:
    """Deliver the outcome's events and closes to everyone but `me` now, so every
    connection sees changes in commit (revision) order; leave in the outcome only `me`'s
    own share, for ``deliver`` after its reply."""
    events = outcome.events
    if events:
        own: Events = []
        for audience, frame in events:
            if bus.publish(audience, frame, me) and me is not None:
                own.append((ToSessions(me), frame))
        outcome.events = own or None
    closes = outcome.closes
    if closes:
        close_me = False
        for audience in closes:
            close_me = bus.close(audience, me) or close_me
        outcome.closes = [ToSessions(me)] if close_me and me is not None else None


def deliver(bus: Bus, fx: Effects | Delivery) -> None:
    """Every event, then every close, at once: a timer's outcome (no caller), a
    command's once its reply is queued (then the caller's copies need no holding back),
    or the caller's own share that ``others_now`` left, after its reply."""
    if fx.events:
        for audience, frame in fx.events:
            bus.publish(audience, frame)
    if fx.closes:
        for audience in fx.closes:
            bus.close(audience)
