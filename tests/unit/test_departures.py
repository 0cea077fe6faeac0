"""member.left batching in the core, without sockets (issue 13, item 2): a mass disconnect
costs one write per remaining connection, not one per departure per connection, and a
room's other events never overtake its waiting departures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from chatd.app import LEFT_MAX_WAIT
from chatd.changes import message_of
from chatd.dispatch import Outcome, Request
from chatd.handlers.messages import emit_message_event
from chatd.protocol.events import MessagePosted
from chatd.rooms import LiveRoom
from chatd.session import Session
from chatd.store.base import MessageRecord, RoomRecord
from tests.unit.fakes import Core, FakePeer, core


class CountingPeer(FakePeer):
    """Counts writes; a write may hold several frames (one per line)."""

    def lines(self) -> list[dict[str, Any]]:
        out = [json.loads(line) for data in self.sent for line in data.splitlines()]
        self.sent.clear()
        return out


@pytest.fixture
def k() -> Iterator[Core]:
    with core() as c:
        yield c


def room(k: Core, name: str = "big", *, ephemeral: bool = False) -> LiveRoom:
    rid = len(k.app.rooms.by_id) + 1
    return k.app.rooms.add(RoomRecord(rid, name, "", "owner", 0.0, ephemeral, False))


def member(k: Core, r: LiveRoom, name: str) -> tuple[Session, CountingPeer]:
    uid = len(list(k.app.accounts.users())) + 1
    user = k.add_user(name, uid)
    peer = CountingPeer()
    s = k.app.open_session(peer, "127.0.0.1")
    token = k.token(user)
    k.app.bind(s, k.tokens.verify(token))
    k.app.rooms.join(r, s)
    return s, peer


def next_turn(k: Core) -> int:
    """Fire the zero-delay timers due now (one loop turn); returns how many fired."""
    due = [t for t in k.scheduler.live() if t.delay == 0]
    for t in due:
        t.fire()
    return len(due)


def settle_all(k: Core) -> int:
    turns = 0
    while next_turn(k):
        turns += 1
        assert turns < 100
    return turns


def test_a_mass_disconnect_costs_one_write_per_remaining_connection(k: Core) -> None:
    r = room(k)
    watcher, wpeer = member(k, r, "watcher")
    n = 2000
    members = [member(k, r, f"m{i}") for i in range(n)]
    for s, _ in members:
        k.app.close_session(s)
    # While they go, nobody is written to (at once, this was n²/2 writes to members that
    # were about to be found closed too).
    assert wpeer.sent == [] and all(p.sent == [] for _, p in members)
    assert r.users.keys() == {"watcher"} and list(r.sessions) == [watcher]
    settle_all(k)
    assert len(wpeer.sent) == 1  # one write: every departure, in order
    left = wpeer.lines()
    assert [e["data"]["user"] for e in left] == [f"m{i}" for i in range(n)]
    assert {(e["event"], e["data"]["room"], e["data"]["reason"]) for e in left} == {
        ("member.left", "big", "disconnected")
    }
    assert all(p.sent == [] for _, p in members)
    assert k.app.departures_waiting() == 0


def test_departures_wait_while_the_room_keeps_losing_members(k: Core) -> None:
    r = room(k)
    _, wpeer = member(k, r, "watcher")
    a, _ = member(k, r, "a")
    b, _ = member(k, r, "b")
    k.app.close_session(a)
    assert next_turn(k) == 1 and wpeer.sent == []  # a left this turn: look again
    k.app.close_session(b)
    assert next_turn(k) == 1 and wpeer.sent == []  # b left this turn: look again
    assert next_turn(k) == 1  # a quiet turn: out they go
    assert [e["data"]["user"] for e in wpeer.lines()] == ["a", "b"]
    assert next_turn(k) == 0  # nothing left to look at: no timer


def test_departures_wait_while_the_host_still_has_closed_connections_to_clean_up(
    k: Core,
) -> None:
    # The host closes EOF'd connections a bounded number per turn and their sessions leave
    # later: a turn without a departure does not mean the disconnect is over, and a batch
    # sent then is written to thousands of connections about to be found gone.
    r = room(k)
    _, wpeer = member(k, r, "watcher")
    a, _ = member(k, r, "a")
    k.closing = True
    k.app.close_session(a)
    for _ in range(5):
        k.clock.advance(LEFT_MAX_WAIT / 20)
        assert next_turn(k) == 1 and wpeer.sent == []  # quiet turns, but chores are queued
    k.closing = False
    assert next_turn(k) == 1
    assert [e["data"]["user"] for e in wpeer.lines()] == ["a"]
    k.closing = True  # the bound holds even so
    b, _ = member(k, r, "b")
    k.app.close_session(b)
    k.clock.advance(LEFT_MAX_WAIT)
    next_turn(k)
    assert [e["data"]["user"] for e in wpeer.lines()] == ["b"]


def test_departures_go_out_after_the_max_wait_even_if_the_room_keeps_losing_members(
    k: Core,
) -> None:
    r = room(k)
    _, wpeer = member(k, r, "watcher")
    leavers = [member(k, r, f"m{i}")[0] for i in range(50)]
    turns = 0
    for s in leavers:
        k.app.close_session(s)
        k.clock.advance(LEFT_MAX_WAIT / 10)
        next_turn(k)
        turns += 1
        if wpeer.sent:
            break
    assert wpeer.sent and turns <= 11
    sent = [e["data"]["user"] for e in wpeer.lines()]
    assert sent == [f"m{i}" for i in range(turns)]


def test_a_newcomer_is_not_told_of_departures_from_before_it_came(k: Core) -> None:
    r = room(k)
    _, wpeer = member(k, r, "watcher")
    gone, _ = member(k, r, "gone")
    k.app.close_session(gone)
    newcomer_user = k.add_user("new", 99)
    peer = CountingPeer()
    s = k.app.open_session(peer, "127.0.0.1")
    token = k.token(newcomer_user)
    k.app.bind(s, k.tokens.verify(token))
    out = k.dispatcher.handle(s, b'{"cmd":"room.join","room":"big","id":1}')
    assert isinstance(out, Outcome)
    # The watcher hears of the departure before the join (its events follow the reply).
    assert [e["event"] for e in wpeer.lines()] == ["member.left"]
    assert out.events is not None
    assert [json.loads(f.json_frame())["event"] for _, f in out.events] == ["member.joined"]
    assert json.loads(out.reply)["data"]["members"] == ["new", "watcher"]
    settle_all(k)
    assert peer.sent == [] and wpeer.sent == []


def test_member_list_and_messages_come_after_the_departures_they_follow(k: Core) -> None:
    r = room(k)
    asker, apeer = member(k, r, "asker")
    gone, _ = member(k, r, "gone")
    k.app.close_session(gone)
    out = k.dispatcher.handle(asker, b'{"cmd":"room.members","room":"big","id":1}')
    assert isinstance(out, Outcome)
    assert [e["data"]["user"] for e in apeer.lines()] == ["gone"]  # before the reply
    assert json.loads(out.reply)["data"]["members"] == ["asker"]
    other, _ = member(k, r, "other")
    k.app.close_session(other)
    rec = MessageRecord(1, 1, r.id, "asker", None, "hi", 0.0, None, None, False)
    req = Request(k.app, asker)
    emit_message_event(k.app, req, rec, MessagePosted(message_of(k.app.rooms, rec)))
    assert [list(a.local(k.app.presence)) for a, _ in req.events] == [[asker]]
    assert [e["data"]["user"] for e in apeer.lines()] == ["other"]  # before the message


async def test_an_emptied_ephemeral_room_drops_its_waiting_departures(k: Core) -> None:
    # async: removing the room queues its deletion on the store (never run here)
    r = room(k, "tmp", ephemeral=True)
    a, apeer = member(k, r, "a")
    b, _ = member(k, r, "b")
    k.app.close_session(b)
    k.app.close_session(a)
    assert k.app.departures_waiting() == 0 and r.deleted
    settle_all(k)
    assert apeer.sent == []



@pytest.mark.parametrize("failure, logged", [("stopped", False), ("other", True)])
def test_an_ephemeral_room_emptied_while_the_server_stops_is_dropped_quietly(
    k: Core, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    failure: str, logged: bool,
) -> None:
    """A delete refused by the stopping store (the room is dropped at the next start) puts
    no ERROR and traceback per room in the stop's log; any other failure is still logged."""
    from chatd.errors import Internal, StoreStopped

    async def refused(room_id: int, by: str = "") -> None:
        raise StoreStopped("the server is shutting down") if failure == "stopped" else OSError

    monkeypatch.setattr(k.app.store, "delete_room", refused)
    r = room(k, "brief", ephemeral=True)
    s, _ = member(k, r, "ann")
    k.app.leave(r, s, "closed")
    assert r.id not in k.app.rooms.by_id
    (drop,) = k.scheduler.spawned
    k.scheduler.spawned.clear()
    with caplog.at_level("ERROR"), pytest.raises(StopIteration):
        drop.send(None)
    assert bool([rec for rec in caplog.records if rec.levelname == "ERROR"]) is logged
    assert issubclass(StoreStopped, Internal)  # on the wire it is still `internal`
