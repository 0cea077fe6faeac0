"""The domain objects and the Bus, each alone, without sockets (issue 10): every one is
the only writer of its state and is driven here through its methods."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.auth import Claims, TokenService
from chatd.bus import (
    Effects,
    LocalBus,
    ToRoom,
    ToSessions,
    ToUser,
    deliver,
    others_now,
)
from chatd.clock import FakeClock
from chatd.dispatch import Outcome
from chatd.domain.accounts import Accounts, UnknownAccount
from chatd.domain.identity import (
    TokenId,
    account_jti,
    guest_jti,
    identity_of,
    is_guest_jti,
    is_hold_jti,
)
from chatd.domain.limits import Limits
from chatd.domain.nonces import Nonces
from chatd.domain.presence import Presence
from chatd.errors import Conflict, RateLimited, Unauthorized
from chatd.protocol.events import MemberJoined, RoomClosed
from chatd.rooms import RoomManager
from chatd.session import Session
from chatd.stats import Stats
from chatd.store.base import RoomRecord, UserRecord
from chatd.store.sqlite import SQLiteStore
from tests.unit.fakes import SECRET, UNIT_CONFIG, FakePeer, FakeScheduler, drive

# --- identity ---------------------------------------------------------------------------


def test_token_ids_round_trip_and_say_whose_they_are() -> None:
    jti = account_jti(12, 3)
    assert TokenId.parse(jti) == (12, 3) and not is_guest_jti(jti)
    assert account_jti(12, 3) != jti  # random tail
    g = guest_jti("77")
    assert TokenId.parse(g) == (0, 77) and is_guest_jti(g)
    assert is_hold_jti(g, "77") and not is_hold_jti(g, "78") and not is_hold_jti(jti, "3")
    assert identity_of("Ann", jti) == "ann#12"
    assert identity_of("Ann", g) == "ann#g77"
    assert identity_of("Ann", "foreign") == "ann"
    assert TokenId.parse("a.b.c") is None and TokenId.parse("1.2") is None


# --- nonces -----------------------------------------------------------------------------


def test_nonces_remember_the_newest_within_their_size() -> None:
    n = Nonces(2)
    n.remember("ann#1", "a", 10)
    n.remember("ann#1", "b", 11)
    n.remember("bob#2", "a", 12)
    assert n.get("ann#1", "a") is None  # the oldest went
    assert n.get("ann#1", "b") == 11 and n.get("bob#2", "a") == 12 and len(n) == 2
    assert n.get("ann#9", "b") is None  # another identity's nonce is not this one's


# --- limits -----------------------------------------------------------------------------


def session(ip: str = "10.0.0.1") -> tuple[Session, FakePeer]:
    peer = FakePeer()
    return Session(peer, ip, 0.0, None), peer


def test_send_budget_is_per_user_and_per_connection() -> None:
    clock = FakeClock()
    limits = Limits(UNIT_CONFIG.replace(rate_limit=1.0), clock)  # a burst of 3
    a, _ = session()
    b, _ = session()
    for _ in range(3):
        limits.spend_send("ann", a)
    with pytest.raises(RateLimited):
        limits.spend_send("ann", b)  # another connection, the same user: spent
    for _ in range(3):
        limits.spend_send("bob", b)
    with pytest.raises(RateLimited):
        limits.spend_send("cy", b)  # another name, the same connection: spent
    clock.advance(1.0)
    limits.spend_send("ann", b)
    assert limits.user_buckets() == 3
    clock.advance(100.0)
    limits.purge(clock.now())
    assert limits.user_buckets() == 0


def test_refilled_connection_buckets_are_purged_and_partly_spent_ones_kept() -> None:
    clock = FakeClock()
    limits = Limits(UNIT_CONFIG.replace(rate_limit=1.0, guest_logins_per_connection=2), clock)
    a, _ = session()
    b, _ = session()
    limits.spend_guest_login(a)
    limits.spend_send("ann", a)
    limits.spend_guest_login(b)
    limits.spend_guest_login(b)
    assert limits.connection_buckets() == 3
    clock.advance(5.0)  # a's send budget has refilled, no guest-login budget has
    limits.purge(clock.now())
    assert limits.connection_buckets() == 2
    with pytest.raises(RateLimited):
        limits.spend_guest_login(b)  # what is kept still counts
    clock.advance(60.0)
    limits.purge(clock.now())
    assert limits.connection_buckets() == 0  # a logged-in connection holds none
    limits.spend_guest_login(b)  # afresh: as a full bucket would have allowed


def test_registrations_per_connection_then_forgotten_with_it() -> None:
    clock = FakeClock()
    limits = Limits(UNIT_CONFIG.replace(register_per_connection=1, register_per_ip=100), clock)
    s, _ = session()
    limits.spend_register(s)
    with pytest.raises(RateLimited, match="on this connection"):
        limits.spend_register(s)
    limits.forget_connection(s)
    limits.spend_register(s)  # a fresh budget: only a new connection could have that


# --- accounts ---------------------------------------------------------------------------


def accounts(online: set[str] | None = None) -> tuple[Accounts, FakeClock, FakeScheduler]:
    clock = FakeClock()
    sched = FakeScheduler()
    acc = Accounts(UNIT_CONFIG, clock, SQLiteStore(":memory:"), sched, (online or set()).__contains__)
    return acc, clock, sched


def claims_for(clock: FakeClock, name: str, jti: str) -> Claims:
    tokens = TokenService(SECRET, clock)
    _, claims = tokens.mint(name, jti, (), 3600)
    return claims


def test_a_registration_reserves_its_name_until_it_ends() -> None:
    acc, _, _ = accounts()
    key = acc.begin_register("Ann")
    with pytest.raises(Conflict):
        acc.begin_register("ANN")
    assert acc.is_registering("ann") and not acc.is_registered("ann")
    acc.end_register(key, UserRecord(1, "Ann", "h", False, 0))
    assert acc.is_registered("ann") and not acc.is_registering("ann")
    assert acc.current_identity("ANN") == "ann#1" and acc.display_name("aNN") == "Ann"
    failed = acc.begin_register("Bob")
    acc.end_register(failed, None)
    assert not acc.is_registered("bob") and not acc.is_registering("bob")


def test_revocation_generation_and_deletion_end_tokens() -> None:
    acc, clock, _ = accounts()
    acc.adopt("ann", UserRecord(5, "Ann", "h", False, 0))
    old = claims_for(clock, "Ann", account_jti(5, 0))
    other = claims_for(clock, "Ann", account_jti(5, 0))
    assert acc.check_claims(old).id == 5  # type: ignore[union-attr]
    acc.revoke(old.jti, old.exp)
    with pytest.raises(Unauthorized, match="revoked"):
        acc.check_claims(old)
    acc.new_generation("ann", 1)  # logout all
    with pytest.raises(Unauthorized):
        acc.check_claims(other)
    newer = claims_for(clock, "Ann", account_jti(9, 0))
    with pytest.raises(UnknownAccount):
        acc.check_claims(newer)  # an account this memory has not seen yet
    assert acc.forget_user("ann") is not None and not acc.is_registered("ann")
    clock.advance(7200)
    acc.purge(clock.now())
    assert not acc.is_revoked(old.jti)  # expired anyway: forgotten


async def test_a_hold_is_held_while_online_then_for_the_grace() -> None:
    online = {"gus"}
    acc, clock, sched = accounts(online)
    hold = acc.new_hold("Gus")
    acc.settle_hold("gus")
    assert acc.guest_hold("gus") is hold and acc.held_note(hold.held_until) == "while connected"
    online.clear()
    acc.settle_hold("gus")  # the last connection went: the grace starts
    held = acc.guest_hold("gus")
    assert held is not None and held.held_until is not None and held.version == 2
    assert not acc.is_current_hold(hold) and acc.is_current_hold(held)
    [lapse] = [t for t in sched.live() if t.fn.__name__ == "lapse"]
    clock.advance(lapse.delay)
    lapse.fire()
    assert acc.guest_hold("gus") is None and acc.guest_names() == []
    sched.close()


# --- presence ---------------------------------------------------------------------------


def test_presence_binds_and_unbinds_and_expires_from_one_shared_timer() -> None:
    clock = FakeClock()
    sched = FakeScheduler()
    due: list[tuple[Session, bool]] = []
    pres = Presence(UNIT_CONFIG, clock, sched, lambda s, c, expired: due.append((s, expired)))
    tokens = TokenService(SECRET, clock)
    sessions = [pres.open(FakePeer(), "127.0.0.1") for _ in range(50)]
    for i, s in enumerate(sessions):
        _token, claims = tokens.mint("ann" if i % 2 else "bob", account_jti(1, 0), (), 600)
        pres.bind(s, claims, "Ann" if i % 2 else "Bob")
    assert pres.users_online() == 2 and len(list(pres.sessions_of("ann"))) == 25
    assert sessions[1].identity == "ann#1"
    assert len(sched.live()) == 1  # one timer for every bound connection, not one each
    for s in sessions[10:]:
        pres.unbind(s)
    assert len(list(pres.sessions_of("bob"))) == 5 and sessions[10].user is None
    [notice] = sched.live()
    clock.advance(notice.delay)
    notice.fire()
    assert sorted(s.id for s, expired in due) == sorted(s.id for s in sessions[:10])
    assert not any(expired for _, expired in due)  # unbound ones were skipped
    due.clear()
    [expiry] = sched.live()
    clock.advance(expiry.delay)
    expiry.fire()
    assert len(due) == 10 and all(expired for _, expired in due)
    for s in sessions[:10]:
        pres.unbind(s)
    assert sched.live() == [] and pres.users_online() == 0
    assert pres.close(sessions[0]) and not pres.close(sessions[0]) and pres.count() == 49


# --- the bus ----------------------------------------------------------------------------


class LogPeer(FakePeer):
    """Writes into one log shared by every peer, so the order across them shows."""

    def __init__(self, name: str, log: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.name = name
        self.log = log

    def send(self, data: bytes) -> None:
        self.log.append((self.name, data))

    def close(self) -> None:
        self.log.append((self.name, "closed"))


def test_audiences_resolve_to_local_sessions_and_the_callers_copy_follows_its_reply() -> None:
    clock = FakeClock()
    sched = FakeScheduler()
    pres = Presence(UNIT_CONFIG, clock, sched, lambda s, c, e: None)
    stats = Stats()
    bus = LocalBus(pres, stats)
    rooms = RoomManager()
    room = rooms.add(RoomRecord(1, "lobby", "", "ann", 0.0, False, False))
    log: list[tuple[str, Any]] = []
    tokens = TokenService(SECRET, clock)

    def member(name: str, jti: str) -> Session:
        s = pres.open(LogPeer(name, log), "127.0.0.1")
        _token, claims = tokens.mint(name.rstrip("0123456789"), jti, (), 600)
        pres.bind(s, claims, name)
        rooms.join(room, s)
        return s

    me = member("ann", account_jti(1, 0))
    bob = member("bob", account_jti(2, 0))
    bob_other = member("bob2", guest_jti("5"))  # name "bob" too, another identity
    outsider = pres.open(LogPeer("out", log), "127.0.0.1")
    m1 = MemberJoined(room="lobby", user="m1")
    dm = RoomClosed(room="dm", by="bob")
    out = Outcome(b"reply\n", [(ToRoom(room), m1), (ToUser("bob", "bob#2"), dm)])
    others_now(bus, out, me)
    # Everyone else at once; the caller's copy waits for its reply.
    m1_line, dm_line = m1.json_frame(), dm.json_frame()
    assert log == [("bob", m1_line), ("bob2", m1_line), ("bob", dm_line)]
    log.clear()
    me.send(out.reply)
    deliver(bus, out)
    assert log == [("ann", b"reply\n"), ("ann", m1_line)]
    assert stats.deliveries == 4
    # Closes are part of the outcome too: others at once, the caller's after its reply.
    log.clear()
    closing = Outcome(b"ok\n", None, [ToSessions(me, bob)])
    others_now(bus, closing, me)
    assert log == [("bob", "closed")]
    me.send(closing.reply)
    deliver(bus, closing)
    assert log == [("bob", "closed"), ("ann", b"ok\n"), ("ann", "closed")]
    # A timer's outcome has no caller; skip leaves one connection out of a room.
    log.clear()
    fx = Effects()
    joined = MemberJoined(room="lobby", user="cat")
    fx.emit(ToRoom(room, skip=bob), joined)
    deliver(bus, fx)
    assert log == [("ann", joined.json_frame()), ("bob2", joined.json_frame())]
    assert outsider.user is None and bob_other.identity == "bob#g5"
    # Left out of a room is left out when it is also the caller: no copy after its reply.
    log.clear()
    before = stats.deliveries
    me_joined, x, m2 = (MemberJoined(room="lobby", user=u) for u in ("me", "x", "m2"))
    assert bus.publish(ToRoom(room, skip=me), me_joined, me) is False
    assert log == [("bob", me_joined.json_frame()), ("bob2", me_joined.json_frame())]
    assert bus.publish(ToRoom(room, skip=bob), x, me) is True  # me is in, bob not
    assert stats.deliveries == before + 3
    # A reply queued at once: the whole outcome in one pass, the caller's copies included.
    log.clear()
    me.send(b"reply\n")
    deliver(bus, Outcome(b"reply\n", [(ToRoom(room), m2)], [ToSessions(bob)]))
    line = m2.json_frame()
    assert log == [("ann", b"reply\n"), ("ann", line), ("bob", line), ("bob2", line),
                   ("bob", "closed")]


# --- one event path: a command's closes are part of its outcome -------------------------


async def test_deleting_ones_own_account_closes_the_connection_after_the_reply() -> None:
    import json

    from chatd.dispatch import Pending
    from chatd.domain.identity import account_jti as jti
    from tests.unit.fakes import core

    store = SQLiteStore(":memory:")
    store.open()
    try:
        with core(UNIT_CONFIG, store) as k:
            rec = await store.create_user("Root", "hash", admin=True)
            k.app.accounts.adopt("root", rec)
            log: list[tuple[str, Any]] = []
            me = k.app.open_session(LogPeer("me", log), "127.0.0.1")
            twin = k.app.open_session(LogPeer("twin", log), "127.0.0.1")
            token, _ = k.tokens.mint("Root", jti(rec.id, 0), ("admin",), 600)
            k.app.bind(twin, k.tokens.verify(token))
            line = json.dumps({"cmd": "user.delete", "id": 1, "user": "root", "token": token})
            pending = k.dispatcher.handle(me, line.encode())
            assert isinstance(pending, Pending)
            out = await drive(pending)
            assert json.loads(out.reply)["type"] == "ok"
            assert me.user is None and twin.user is None  # unbound at once, tokens dead
            assert log == []  # nothing sent or closed before the edge delivers
            others_now(k.app.bus, out, me)
            assert log == [("twin", "closed")]
            me.send(out.reply)
            deliver(k.app.bus, out)
            assert log[1:] == [("me", out.reply), ("me", "closed")]
    finally:
        await store.close()
