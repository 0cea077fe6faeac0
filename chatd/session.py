"""Per-connection state, free of I/O: who the connection is bound to.

One per connection, so it is kept small (__slots__, nothing allocated until needed):
which rooms it is in lives in chatd.rooms.RoomManager, its send and registration budgets
in chatd.domain.limits, its token's expiry on chatd.domain.presence's shared heap. Its
binding (user, claims, identity; not the token string) is written by chatd.domain.presence alone.

The server gives each Session a Peer (its socket side). The core reaches it only through
the Bus (chatd.bus): ``Session.send`` (the peer's send, bound once for fan-out) for frames
and ``peer.close`` to close (a deleted account's connections, after the caller's reply);
the server itself also closes through the peer (idle sweep). The core never sees a
socket, so it runs in tests with a fake Peer.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from chatd.auth import Claims
    from chatd.ratelimit import TokenBucket

_ids = itertools.count(1)


class Peer(Protocol):
    def send(self, data: bytes) -> None:
        """Queue bytes for the client; never waits (past the hard limit the peer drops)."""
        ...

    def close(self) -> None:
        """Flush what is queued (best effort) and close the connection."""
        ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Session:
    __slots__ = (
        "claims",
        "closed",
        "commands",
        "id",
        "identity",
        "ip",
        "peer",
        "send",
        "unbound_since",
        "user",
        "user_key",
    )

    def __init__(self, peer: Peer, ip: str, now: float, commands: TokenBucket | None) -> None:
        self.id = next(_ids)
        self.peer = peer
        self.send = peer.send  # bound once: fan-out calls it per recipient
        self.ip = ip
        self.user: str | None = None  # display name of the bound user
        self.user_key: str | None = None
        self.identity: str | None = None  # the account behind the name (domain.identity)
        self.claims: Claims | None = None
        self.commands = commands  # the per-connection command rate (protocol.md Limits)
        self.unbound_since = now
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user or '-'}>"
