"""A bound token's expiry on several nodes (App._token_due): `session.expired` waits
until the node has applied every change made anywhere before the expiry fired
(Bus.caught_up), so what was stored before reaches the connection first; a connection
rebound or unbound meanwhile is left alone. Driven over fakes: a bus whose catch-up the
test completes by hand."""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.bus import LocalBus
from chatd.session import Session
from chatd.store.base import UserRecord
from tests.unit.fakes import Core, FakePeer, core


class WaitingBus(LocalBus):
    """LocalBus whose catch-up is a future the test completes."""

    def __init__(self, c: Core) -> None:
        super().__init__(c.app.presence, c.app.stats)
        self.waits: list[asyncio.Future[None]] = []

    def caught_up(self) -> Any:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waits.append(fut)
        return fut


def fire_due(c: Core) -> None:
    """Let the token's two presence timers come due: its notice, then its expiry."""
    for _ in range(2):
        [timer] = c.scheduler.live()
        c.clock.advance(timer.delay)
        timer.fire()


def expiry_waiting(c: Core) -> tuple[WaitingBus, UserRecord, Session, FakePeer]:
    """ann's connection, whose bound token has come due while the catch-up waits."""
    bus = c.app.bus = WaitingBus(c)
    user = c.add_user("ann", 1)
    s, peer = c.session()
    c.app.authenticate(s, c.token(user, ttl=120))
    fire_due(c)
    return bus, user, s, peer


def events(peer: Any) -> list[str]:
    return [f["event"] for f in peer.frames() if f.get("type") == "event"]


async def test_an_expiry_waits_for_the_catch_up_before_session_expired() -> None:
    with core() as c:
        bus, _, s, peer = expiry_waiting(c)
        assert s.claims is not None  # due, but not before the catch-up
        assert events(peer) == ["session.expiring"]
        assert len(bus.waits) == 1 and len(c.scheduler.spawned) == 1
        bus.waits[0].set_result(None)
        await c.scheduler.spawned.pop()
        assert s.claims is None and s.user is None
        assert events(peer) == ["session.expired"]


async def test_a_connection_rebound_while_its_expiry_waits_is_not_expired() -> None:
    with core() as c:
        bus, user, s, peer = expiry_waiting(c)
        assert len(c.scheduler.spawned) == 1
        c.app.bind(s, c.tokens.verify(c.token(user, ttl=3600)))  # `auth` anew meanwhile
        bound = s.claims
        assert bound is not None
        bus.waits[0].set_result(None)
        await c.scheduler.spawned.pop()
        assert s.claims is bound
        assert "session.expired" not in events(peer)
