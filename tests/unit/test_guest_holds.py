"""Guest holds without sockets: the App decides (injected clock and scheduler), and the
store ends where memory did (issue 13 item 7). That every store applies a hold's change
only over an older version is tests/store/test_conformance.py's, for each store."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from chatd.auth import Claims
from chatd.domain.identity import guest_jti
from chatd.errors import Unauthorized
from chatd.session import Session
from chatd.store.base import GuestHold, Snapshot
from chatd.store.sqlite import SQLiteStore
from chatd.store.sqlite.schema import APPLICATION_ID, MIGRATIONS
from tests.unit.fakes import UNIT_CONFIG, Core, core

GRACE = UNIT_CONFIG.replace(guest_grace=120)


def bind_guest(k: Core, name: str, *sessions: Session) -> Claims:
    hold = k.app.accounts.guest_hold(name.lower()) or k.app.accounts.new_hold(name)
    _token, claims = k.tokens.mint(name, guest_jti(hold.jti), (), 3600)
    for s in sessions:
        k.app.bind(s, claims)
    return claims


def live_hold_timers(k: Core) -> list[float]:
    return [t.delay for t in k.scheduler.live() if t.fn.__name__ == "lapse"]


async def test_a_hold_lasts_while_connected_then_for_the_grace() -> None:
    with core(GRACE) as k:
        (s1, _), (s2, _) = k.session(), k.session()
        claims = bind_guest(k, "Ann", s1, s2)
        assert k.app.accounts.guest_hold("ann").held_until is None  # type: ignore[union-attr]
        k.app.close_session(s1)
        assert k.app.accounts.guest_hold("ann").held_until is None  # type: ignore[union-attr]
        assert live_hold_timers(k) == []
        k.app.close_session(s2)  # the last one: the grace starts
        hold = k.app.accounts.guest_hold("ann")
        assert hold is not None and hold.held_until == k.clock.now() + 120
        assert live_hold_timers(k) == [120]
        k.clock.advance(119)
        assert k.app.accounts.check_claims(claims) is hold
        k.clock.advance(1)
        [timer] = [t for t in k.scheduler.live() if t.fn.__name__ == "lapse"]
        timer.fire()
        assert k.app.accounts.guest_hold("ann") is None
        with pytest.raises(Unauthorized, match="guest session ended"):
            k.app.accounts.check_claims(claims)


async def test_a_late_timer_does_not_release_a_hold_that_came_back() -> None:
    with core(GRACE) as k:
        (s1, _), (s2, _) = k.session(), k.session()
        claims = bind_guest(k, "bo", s1)
        k.app.close_session(s1)
        [first] = [t for t in k.scheduler.live() if t.fn.__name__ == "lapse"]
        k.clock.advance(60)
        k.app.bind(s2, claims)  # reconnects within the grace
        assert first.cancelled
        assert k.app.accounts.guest_hold("bo").held_until is None  # type: ignore[union-attr]
        k.app.close_session(s2)  # a new grace, from now
        first.fn()  # the old timer running anyway (compare-and-set: it changes nothing)
        hold = k.app.accounts.guest_hold("bo")
        assert hold is not None and hold.held_until == k.clock.now() + 120
        assert hold.version == 4  # created, grace, back, grace again


async def test_a_hold_whose_timer_is_late_ends_when_its_grace_does() -> None:
    with core(GRACE) as k:
        s, _ = k.session()
        claims = bind_guest(k, "cy", s)
        k.app.close_session(s)
        k.clock.advance(120)
        with pytest.raises(Unauthorized, match="guest session ended"):
            k.app.accounts.check_claims(claims)
        assert k.app.accounts.guest_hold("cy") is None


async def test_with_no_grace_the_last_connection_releases_at_once() -> None:
    with core(UNIT_CONFIG.replace(guest_grace=0)) as k:
        s, _ = k.session()
        bind_guest(k, "di", s)
        k.app.close_session(s)
        assert k.app.accounts.guest_hold("di") is None


async def test_a_restart_gives_every_hold_a_fresh_grace() -> None:
    with core(GRACE) as k:
        stale = GuestHold("Ed", "7", k.clock.now() - 5000, 3)
        connected = GuestHold("fi", "8", None, 2)
        k.app.load(Snapshot("e", 0, [], [stale, connected], {}, [], 0))
        for key in ("ed", "fi"):
            hold = k.app.accounts.guest_hold(key)
            assert hold is not None and hold.held_until == k.clock.now() + 120
        assert sorted(live_hold_timers(k)) == [120, 120]


async def test_held_note_says_until_when() -> None:
    with core(GRACE) as k:
        assert k.app.accounts.held_note(GuestHold("a", "1", None, 1).held_until) == "while connected"
        assert k.clock.now() == 1_700_000_000
        assert k.app.accounts.held_note(GuestHold("a", "1", 1_700_000_120, 2).held_until) == (
            "until 2023-11-14T22:15:20.000Z (in 120 s)"
        )


# --- memory and the store --------------------------------------------------------------


async def test_memory_and_store_agree_after_a_grace_then_a_release() -> None:
    """The App decides; the store ends where memory did."""
    store = SQLiteStore(":memory:")
    store.open()
    try:
        with core(GRACE, store) as k:
            s, _ = k.session()
            hold = k.app.accounts.new_hold("hy")
            await store.hold_guest(hold)
            bind_guest(k, "hy", s)
            k.app.close_session(s)  # grace: version 2
            k.app.accounts.drop_hold(k.app.accounts.guest_hold("hy"))  # type: ignore[arg-type]  # released: v3
            for coro in k.scheduler.spawned:
                await asyncio.wait_for(coro, 5)
            k.scheduler.spawned.clear()
            assert k.app.accounts.guest_hold("hy") is None
            rows = await store._read(lambda db: db.execute("SELECT * FROM guests").fetchall())
            assert rows == []
    finally:
        await store.close()


async def test_a_schema_2_database_keeps_its_guest_holds_after_the_migration(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "v2.db")
    db = sqlite3.connect(path, isolation_level=None)
    for v in (1, 2):
        for statement in MIGRATIONS[v].split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('epoch', 'e'), ('rev', '0'), ('users_version', '0')")
    db.execute("INSERT INTO guests VALUES ('jo', 'Jo', '42', 1700003600)")
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute("PRAGMA user_version=2")
    db.close()
    store = SQLiteStore(path)
    snap = store.open()
    try:
        # Held as if connected when the server stopped: the start gives it a fresh grace.
        assert snap.guests == [GuestHold("Jo", "42", None, 0)]
        assert await store.update_hold(GuestHold("Jo", "42", 1700000120, 1))
    finally:
        await store.close()


async def test_register_on_a_hold_only_the_store_knows_says_until_when(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several nodes: the hold was taken on another node a moment ago; the store refuses
    the account with NameHeld, and the reply is the contract's conflict, saying until when."""
    from chatd.dispatch import Pending
    from chatd.protocol import commands as c
    from chatd.store.base import NameHeld
    from tests.unit.fakes import drive

    with core(GRACE) as k:
        async def held(name: str, pw_hash: str, admin: bool) -> None:
            raise NameHeld(name, 1_700_000_120)

        monkeypatch.setattr(k.app.store, "create_user", held)
        s, _ = k.session()
        cmd = c.Register(user="ida", password="a long password")
        pending = k.dispatcher.execute(s, cmd, k.dispatcher.specs[c.Register])
        assert isinstance(pending, Pending)  # it hashes the password first
        frame = (await drive(pending)).reply
        assert b'"conflict"' in frame, frame
        assert b"held by a guest until 2023-11-14T22:15:20.000Z (in 120 s)" in frame, frame
        assert not k.app.accounts.is_registering("ida")
