"""Per-connection state, free of I/O: who the connection is bound to and where it is.

The server gives each Session a Peer (its socket side). The core writes through
``Session.send`` (the peer's send, bound once for fan-out) and closes through ``peer.close``
(App.drop_user after a deleted account's reply; the server's idle sweep); it never sees a
socket, so it runs in tests with a fake Peer.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

from chatd.ratelimit import TokenBucket

if TYPE_CHECKING:
    from chatd.auth import Claims
    from chatd.rooms import LiveRoom

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
        "__weakref__",
        "claims",
        "closed",
        "commands",
        "guest_logins",
        "id",
        "identity",
        "ip",
        "peer",
        "registers",
        "rooms",
        "send",
        "sends",
        "timers",
        "token",
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
        self.identity: str | None = None  # the account behind the name (App.identity)
        self.token: str | None = None
        self.claims: Claims | None = None
        self.rooms: dict[LiveRoom, None] = {}
        self.timers: list[Cancellable] = []
        self.commands = commands
        # Per-connection budgets beside the per-user and per-address ones (issue 13): made
        # on first use, so a connection that never registers or sends pays nothing.
        self.sends: TokenBucket | None = None  # msg.send/msg.edit, as --rate-limit
        self.registers: TokenBucket | None = None
        self.guest_logins: TokenBucket | None = None
        self.unbound_since = now
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user or '-'}>"

    def cancel_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()
