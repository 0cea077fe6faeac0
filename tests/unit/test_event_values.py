"""Events are values (chatd.protocol.events), made into bytes at delivery once per event,
never per recipient (issue 10); each encodes exactly as the contract's Events table shows,
and a stored change becomes the same event the handler emits (chatd.changes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import chatd.protocol.events as events_mod
import chatd.protocol.frames as frames_mod
from chatd import changes
from chatd.bus import Effects, ToRoom, deliver, others_now
from chatd.dispatch import Dispatcher, Outcome, Pending
from chatd.protocol.events import (
    EVENTS,
    Batch,
    Event,
    Hello,
    MemberJoined,
    MemberLeft,
    MessageDeleted,
    MessageEdited,
    MessagePosted,
    RoomClosed,
    RoomUpdated,
    ServerShutdown,
    SessionExpired,
    SessionExpiring,
    SlowConsumer,
    decode_event,
)
from chatd.protocol.models import Message, RenamedRoomInfo, RoomInfo
from chatd.rooms import RoomManager
from chatd.session import Session
from chatd.store.base import MessageRecord, RoomRecord
from tests.unit.fakes import Core, FakePeer, core, drive

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "protocol.md"


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every event encoding made, by event name."""
    made: list[str] = []
    real = events_mod.event_frame

    def counting(name: str, data: Any) -> bytes:
        made.append(name)
        return real(name, data)

    monkeypatch.setattr(events_mod, "event_frame", counting)
    return made


# --- the values and their bytes ----------------------------------------------------------


def test_every_event_of_the_contract_has_its_struct() -> None:
    text = PROTOCOL_MD.read_text()
    section = text.split("\n## Events\n", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `([a-z_.]+)` \|", section, re.M))
    assert names and set(EVENTS) == names
    for name, cls in EVENTS.items():
        assert cls.name == name and issubclass(cls, Event)


MSG = Message(id=4, rev=5, room="BUILDS", to=None, from_="Dave", text="typo here",
              ts="2026-12-01T08:33:46.484Z", edited_ts="2026-12-01T08:33:46.986Z",
              edited_by="Dave")  # fmt: skip
ROOM = RoomInfo("Builds", "builds and releases", "carol", "2026-12-01T08:33:41.963Z", 2,
                False, False)  # fmt: skip


EXAMPLES = [
        (Hello(server="chatd", version="0.1.0", protocol=1, max_frame=65536, max_text=4000,
               history_limit=500, epoch="28d3", rev=0),
         '{"type":"event","event":"hello","data":{"server":"chatd","version":"0.1.0","protocol":1,"max_frame":65536,"max_text":4000,"history_limit":500,"epoch":"28d3","rev":0}}'),
        (MemberJoined(room="Dev", user="Dave"),
         '{"type":"event","event":"member.joined","data":{"room":"Dev","user":"Dave"}}'),
        (MemberLeft(room="expiry", user="eve", reason="expired"),
         '{"type":"event","event":"member.left","data":{"room":"expiry","user":"eve","reason":"expired"}}'),
        (MessageEdited(MSG),
         '{"type":"event","event":"message.edited","data":{"id":4,"rev":5,"room":"BUILDS","to":null,"from":"Dave","text":"typo here","ts":"2026-12-01T08:33:46.484Z","edited_ts":"2026-12-01T08:33:46.986Z","edited_by":"Dave","deleted":false}}'),
        (MessagePosted(MSG),
         '{"type":"event","event":"message","data":{"id":4,"rev":5,"room":"BUILDS","to":null,"from":"Dave","text":"typo here","ts":"2026-12-01T08:33:46.484Z","edited_ts":"2026-12-01T08:33:46.986Z","edited_by":"Dave","deleted":false}}'),
        (MessageDeleted(id=4, rev=6, room="BUILDS", to=None, by="carol"),
         '{"type":"event","event":"message.deleted","data":{"id":4,"rev":6,"room":"BUILDS","to":null,"by":"carol"}}'),
        (RoomUpdated(RenamedRoomInfo(*[getattr(ROOM, f) for f in ROOM.__struct_fields__], "Dev")),
         '{"type":"event","event":"room.updated","data":{"name":"Builds","topic":"builds and releases","owner":"carol","created_at":"2026-12-01T08:33:41.963Z","members":2,"ephemeral":false,"open":false,"previous_name":"Dev"}}'),
        (RoomUpdated(ROOM),
         '{"type":"event","event":"room.updated","data":{"name":"Builds","topic":"builds and releases","owner":"carol","created_at":"2026-12-01T08:33:41.963Z","members":2,"ephemeral":false,"open":false}}'),
        (RoomClosed(room="BUILDS", by="carol"),
         '{"type":"event","event":"room.closed","data":{"room":"BUILDS","by":"carol"}}'),
        (SessionExpiring(expires_at=1796114046),
         '{"type":"event","event":"session.expiring","data":{"expires_at":1796114046}}'),
        (SessionExpired(), '{"type":"event","event":"session.expired","data":{}}'),
        (SessionExpired(reason="logout"),
         '{"type":"event","event":"session.expired","data":{"reason":"logout"}}'),
        (ServerShutdown(reason="shutting down"),
         '{"type":"event","event":"server.shutdown","data":{"reason":"shutting down"}}'),
        (SlowConsumer(), '{"type":"event","event":"slow_consumer","data":{}}'),
        # `by` is always there, null when unknown, as in message.deleted (the contract's keys)
        (RoomClosed(room="BUILDS"), '{"type":"event","event":"room.closed","data":{"room":"BUILDS","by":null}}'),
        (MessageDeleted(id=4, rev=6, room="BUILDS", to=None, by=None),
         '{"type":"event","event":"message.deleted","data":{"id":4,"rev":6,"room":"BUILDS","to":null,"by":null}}'),
]  # fmt: skip
_IDS = [f"{e.name}-{i}" for i, (e, _) in enumerate(EXAMPLES)]


@pytest.mark.parametrize(("event", "line"), EXAMPLES, ids=_IDS)
def test_each_event_encodes_as_the_contract_shows(event: Event, line: str) -> None:
    """protocol.md's examples from real runs, byte for byte."""
    assert event.json_frame() == line.encode() + b"\n"


@pytest.mark.parametrize(("event", "line"), EXAMPLES, ids=_IDS)
def test_an_encoded_event_decodes_to_the_same_value_and_keeps_its_bytes(
    event: Event, line: str, encodes: list[str]
) -> None:
    """Another node's event, read back as bytes, is the same value, not encoded again."""
    data = line.encode() + b"\n"
    got = decode_event(data)
    assert type(got) is type(event) and got == event
    assert got.json_frame() is data and encodes == []
    with pytest.raises(KeyError):
        decode_event(b'{"type":"event","event":"no.such","data":{}}\n')


def test_an_event_is_encoded_once_however_often_it_is_asked(encodes: list[str]) -> None:
    ev = MemberJoined(room="r", user="u")
    first = ev.json_frame()
    assert all(ev.json_frame() is first for _ in range(10))
    assert encodes == ["member.joined"]
    left = [MemberLeft(room="r", user=f"u{i}", reason="left") for i in range(3)]
    batch = Batch(left)
    assert batch.json_frame() == b"".join(e.json_frame() for e in left)
    assert batch.json_frame() is batch.json_frame()
    assert encodes == ["member.joined"] + ["member.left"] * 3


# --- fan-out: once per event, not per recipient -----------------------------------------


def _members(k: Core, n: int) -> tuple[list[Session], list[FakePeer]]:
    room = k.app.rooms.add(RoomRecord(1, "big", "", "owner", 0.0, False, False))
    sessions, peers = [], []
    for i in range(n):
        user = k.add_user(f"m{i}", i + 1)
        peer = FakePeer()
        s = k.app.open_session(peer, "127.0.0.1")
        token = k.token(user)
        k.app.bind(s, k.tokens.verify(token))
        k.app.rooms.join(room, s)
        sessions.append(s)
        peers.append(peer)
    return sessions, peers


def test_a_fan_out_to_n_connections_encodes_the_event_once(encodes: list[str]) -> None:
    with core() as k:
        sessions, peers = _members(k, 50)
        room = k.app.rooms.get("big")
        # A command's event: the others at once, the caller's own copy after its reply.
        ev = MemberJoined(room="big", user="cat")
        out = Outcome(b"reply\n", [(ToRoom(room), ev)])
        others_now(k.app.bus, out, sessions[0])
        deliver(k.app.bus, out)
        # A timer's event, to the same room.
        fx = Effects()
        bye = ServerShutdown(reason="bye")
        fx.emit(ToRoom(room), bye)
        deliver(k.app.bus, fx)
    assert encodes == ["member.joined", "server.shutdown"]
    first = peers[0].sent[0]
    for peer in peers:
        assert len(peer.sent) == 2
        assert peer.sent[0] is first  # the very same bytes object, not a copy per recipient
    assert json.loads(first)["data"] == {"room": "big", "user": "cat"}


async def test_a_sent_message_is_encoded_once_for_the_room_and_once_for_a_dm(
    encodes: list[str],
) -> None:
    with core() as k:
        k.app.store.open()
        try:
            d = k.dispatcher
            sessions, peers = _members(k, 20)
            await k.app.store.create_room(RoomRecord(0, "big", "", "owner", 0.0, False, False))
            sender = sessions[0]
            for frame in (
                {"cmd": "msg.send", "id": 1, "room": "big", "text": "hello all"},
                {"cmd": "msg.send", "id": 2, "to": "m1", "text": "hello you"},
            ):
                out = await _run(d, sender, frame)
                sender.send(out.reply)
                others_now(k.app.bus, out, sender)
                deliver(k.app.bus, out)
        finally:
            await k.app.store.close()
    assert encodes == ["message", "message"]
    lines = [json.loads(p.sent[0]) for p in peers]
    assert all(line["event"] == "message" and line["data"]["text"] == "hello all" for line in lines[1:])
    # The sender: its reply, then its own copy of each event; the DM's other user gets it.
    assert [json.loads(b).get("event") for b in peers[0].sent] == [None, "message", None, "message"]
    assert json.loads(peers[1].sent[-1])["data"]["text"] == "hello you"
    assert peers[1].sent[-1] is peers[0].sent[-1]


async def test_a_sent_or_edited_message_is_encoded_once_for_its_reply_and_its_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []
    real = frames_mod._encode

    def counting(value: Any) -> bytes:
        # A Message encoded alone, as an event's data, or as a reply's `message`.
        data = getattr(value, "data", value)
        if isinstance(data, Message) or isinstance(getattr(data, "message", None), Message):
            made.append(type(value).__name__)
        return real(value)

    monkeypatch.setattr(frames_mod, "_encode", counting)
    with core() as k:
        k.app.store.open()
        try:
            sessions, peers = _members(k, 3)
            await k.app.store.create_room(RoomRecord(0, "big", "", "owner", 0.0, False, False))
            sender = sessions[0]
            m0 = k.app.accounts.user("m0")
            assert m0 is not None
            editing = k.token(m0, ("msg:edit",))
            for frame in (
                {"cmd": "msg.send", "id": 1, "room": "big", "text": "hello all"},
                {"cmd": "msg.edit", "id": 2, "message_id": 1, "text": "hello, all",
                 "token": editing},
            ):
                out = await _run(k.dispatcher, sender, frame)
                sender.send(out.reply)
                others_now(k.app.bus, out, sender)
                deliver(k.app.bus, out)
        finally:
            await k.app.store.close()
    assert len(made) == 2  # one encoding per message change, not one for each frame
    reply, event = (json.loads(line) for line in peers[0].sent[-2:])
    assert reply["data"]["message"] == event["data"]
    assert event["event"] == "message.edited" and event["data"]["text"] == "hello, all"


async def _run(d: Dispatcher, s: Session, frame: dict[str, Any]) -> Outcome:
    result = d.handle(s, json.dumps(frame).encode())
    if isinstance(result, Pending):
        result = await drive(result)
    assert isinstance(result, Outcome)
    assert json.loads(result.reply)["type"] == "ok", result.reply
    return result


# --- stored changes → events (chatd.changes) --------------------------------------------


def test_a_stored_change_becomes_the_event_its_handler_emits() -> None:
    rooms = RoomManager()
    rooms.add(RoomRecord(3, "Dev", "", "carol", 0.0, False, False))
    rec = MessageRecord(7, 9, 3, "carol", None, "hi", 1796114046.5, None, None, False,
                        sender_key="carol#1")  # fmt: skip
    posted = changes.message_event(rooms, "message", rec)
    assert isinstance(posted, MessagePosted)
    assert json.loads(posted.json_frame())["data"] == {
        "id": 7, "rev": 9, "room": "Dev", "to": None, "from": "carol", "text": "hi",
        "ts": "2026-12-01T08:34:06.500Z", "edited_ts": None, "edited_by": None,
        "deleted": False,
    }  # fmt: skip
    assert isinstance(changes.message_event(rooms, "message.edited", rec), MessageEdited)
    gone = changes.message_event(rooms, "message.deleted", rec, by="dave")
    assert json.loads(gone.json_frame())["data"] == {
        "id": 7, "rev": 9, "room": "Dev", "to": None, "by": "dave"
    }  # fmt: skip
    with pytest.raises(ValueError):
        changes.message_event(rooms, "room.closed", rec)
    [to_room] = changes.audiences(rooms, rec)
    assert isinstance(to_room, ToRoom) and to_room.room.name == "Dev"
    dm = MessageRecord(8, 10, None, "carol", "Dave", "psst", 0.0, None, None, False,
                       sender_key="carol#1", recipient_key="dave#2")  # fmt: skip
    assert [(a.key, a.identity) for a in changes.audiences(rooms, dm)] == [  # type: ignore[union-attr]
        ("carol", "carol#1"), ("dave", "dave#2")
    ]
    gone_room = MessageRecord(9, 11, 99, "carol", None, "x", 0.0, None, None, False)
    assert changes.audiences(rooms, gone_room) == []
