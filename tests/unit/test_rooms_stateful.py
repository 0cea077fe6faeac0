"""The room manager and the store against a simple model (issue 13, "Also"): join, leave,
send, edit, delete, close (room.delete), disconnect and room.create in any order keep
members, owners' room counts and history consistent.

Driven through the Dispatcher as the server drives it, without sockets, on a SQLite
`:memory:` store; one event loop per example.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatd.dispatch import Outcome, Pending
from chatd.session import Session
from tests.unit.fakes import UNIT_CONFIG, Core, drive

USERS = ("ann", "bob", "cy")
ROOMS = ("lobby", "Dev", "misc")
GRANTS = ("room:create", "room:delete", "msg:edit:any", "msg:delete:any")
CAP = 2  # rooms per user: small, so the owner counts are exercised
CONFIG = UNIT_CONFIG.replace(rate_limit=0, command_rate=0, max_rooms_per_user=CAP)


@dataclass
class ModelRoom:
    name: str
    owner: str
    ephemeral: bool
    members: set[int] = field(default_factory=set)  # session slots
    messages: dict[int, str] = field(default_factory=dict)  # id -> text, live ones


class RoomsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.k = Core(CONFIG)
        self.loop.run_until_complete(self._open())
        self.tokens = {u: self.k.token(self.k.add_user(u, i + 1), GRANTS) for i, u in enumerate(USERS)}
        self.sessions: dict[int, tuple[Session, str]] = {}  # slot -> (session, user)
        self.rooms: dict[str, ModelRoom] = {}  # case-folded name -> model
        self.message_ids: list[int] = []  # every id ever acknowledged
        self.next_slot = 0

    async def _open(self) -> None:
        self.k.app.load(self.k.app.store.open())

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self._drain())
            self.loop.run_until_complete(self.k.app.store.close())
        finally:
            self.k.close()
            self.loop.close()

    # --- driving -----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Run what the core handed to its scheduler (ephemeral rooms' deletes)."""
        while self.k.scheduler.spawned:
            await asyncio.wait_for(self.k.scheduler.spawned.pop(0), 5)

    def run(self, s: Session, frame: dict[str, Any]) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            result = self.k.dispatcher.handle(s, json.dumps(frame).encode())
            if isinstance(result, Pending):
                result = await drive(result)
            assert isinstance(result, Outcome), result
            await self._drain()
            reply: dict[str, Any] = json.loads(result.reply)
            return reply

        return self.loop.run_until_complete(go())

    def expect(self, s: Session, frame: dict[str, Any], code: str | None) -> dict[str, Any]:
        reply = self.run(s, frame)
        got = reply.get("code", "ok") if reply["type"] == "error" else "ok"
        assert got == (code or "ok"), (frame, reply)
        return reply

    def session(self, slot: int) -> tuple[Session, str] | None:
        return self.sessions.get(slot % max(1, self.next_slot)) if self.sessions else None

    def user_in(self, room: ModelRoom, user: str) -> bool:
        return any(self.sessions[m][1] == user for m in room.members)

    def drop_member(self, room: ModelRoom, slot: int) -> None:
        room.members.discard(slot)
        if room.ephemeral and not room.members:
            del self.rooms[room.name.lower()]

    # --- rules -------------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS))
    def connect(self, user: str) -> None:
        s, _ = self.k.session()
        self.expect(s, {"cmd": "auth", "token": self.tokens[user]}, None)
        self.sessions[self.next_slot] = (s, user)
        self.next_slot += 1

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7), name=st.sampled_from(ROOMS), ephemeral=st.booleans())
    def create(self, slot: int, name: str, ephemeral: bool) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, user = found
        owned = sum(1 for r in self.rooms.values() if r.owner == user)
        exists = name.lower() in self.rooms
        code = "forbidden" if owned >= CAP else "conflict" if exists else None
        self.expect(s, {"cmd": "room.create", "room": name, "ephemeral": ephemeral}, code)
        if code is None:
            slot_id = next(k for k, v in self.sessions.items() if v[0] is s)
            self.rooms[name.lower()] = ModelRoom(name, user, ephemeral, {slot_id})

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7), name=st.sampled_from(ROOMS))
    def join(self, slot: int, name: str) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, _ = found
        room = self.rooms.get(name.lower())
        self.expect(s, {"cmd": "room.join", "room": name}, None if room else "not_found")
        if room is not None:
            room.members.add(self._slot(s))

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7), name=st.sampled_from(ROOMS))
    def leave(self, slot: int, name: str) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, _ = found
        room = self.rooms.get(name.lower())
        self.expect(s, {"cmd": "room.leave", "room": name}, None if room else "not_found")
        if room is not None:
            self.drop_member(room, self._slot(s))

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7), name=st.sampled_from(ROOMS), text=st.sampled_from(["hi", "yo", "ü"]))
    def send(self, slot: int, name: str, text: str) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, user = found
        room = self.rooms.get(name.lower())
        code = "not_found" if room is None else None if self.user_in(room, user) else "forbidden"
        reply = self.expect(s, {"cmd": "msg.send", "room": name, "text": text}, code)
        if room is not None and code is None:
            msg = reply["data"]["message"]
            assert msg["room"] == room.name and msg["from"] == user and msg["text"] == text
            room.messages[msg["id"]] = text
            self.message_ids.append(msg["id"])

    def _find_message(self, mid: int) -> ModelRoom | None:
        return next((r for r in self.rooms.values() if mid in r.messages), None)

    @precondition(lambda self: self.sessions and self.message_ids)
    @rule(slot=st.integers(0, 7), pick=st.integers(0, 63), text=st.sampled_from(["edited", "again"]))
    def edit(self, slot: int, pick: int, text: str) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, _ = found
        mid = self.message_ids[pick % len(self.message_ids)]
        room = self._find_message(mid)
        reply = self.expect(
            s, {"cmd": "msg.edit", "message_id": mid, "text": text}, None if room else "not_found"
        )
        if room is not None:
            assert reply["data"]["message"]["text"] == text
            room.messages[mid] = text

    @precondition(lambda self: self.sessions and self.message_ids)
    @rule(slot=st.integers(0, 7), pick=st.integers(0, 63))
    def delete(self, slot: int, pick: int) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, _ = found
        mid = self.message_ids[pick % len(self.message_ids)]
        room = self._find_message(mid)
        self.expect(s, {"cmd": "msg.delete", "message_id": mid}, None if room else "not_found")
        if room is not None:
            del room.messages[mid]

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7), name=st.sampled_from(ROOMS))
    def close(self, slot: int, name: str) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, user = found
        room = self.rooms.get(name.lower())
        code = "not_found" if room is None else None if self.user_in(room, user) else "forbidden"
        self.expect(s, {"cmd": "room.delete", "room": name}, code)
        if room is not None and code is None:
            del self.rooms[name.lower()]

    @precondition(lambda self: self.sessions)
    @rule(slot=st.integers(0, 7))
    def disconnect(self, slot: int) -> None:
        found = self.session(slot)
        if found is None:
            return
        s, _ = found
        slot_id = self._slot(s)
        self.k.app.close_session(s)
        self.loop.run_until_complete(self._drain())
        del self.sessions[slot_id]
        for room in list(self.rooms.values()):
            if slot_id in room.members:
                self.drop_member(room, slot_id)

    def _slot(self, s: Session) -> int:
        return next(k for k, v in self.sessions.items() if v[0] is s)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def rooms_and_members_match(self) -> None:
        live = self.k.app.rooms
        assert set(live.rooms) == set(self.rooms)
        assert live.in_order()[0] == sorted(self.rooms)
        for key, model in self.rooms.items():
            room = live.rooms[key]
            assert room.name == model.name and room.ephemeral == model.ephemeral
            assert {self._slot(s) for s in room.sessions} == model.members
            users = [self.sessions[m][1] for m in model.members]
            assert room.users == {u: users.count(u) for u in set(users)}
        for slot, (s, _) in self.sessions.items():
            assert {r.name.lower() for r in live.rooms_of(s)} == {
                k for k, r in self.rooms.items() if slot in r.members
            }
        for user in USERS:
            assert live.owned(user) == sum(1 for r in self.rooms.values() if r.owner == user)

    @invariant()
    def replies_match(self) -> None:
        """room.members and a room.list walked a page at a time agree with the model."""
        if not self.sessions:
            return
        s, _ = next(iter(self.sessions.values()))
        for model in self.rooms.values():
            members = self.expect(s, {"cmd": "room.members", "room": model.name}, None)
            users = {self.sessions[m][1] for m in model.members}
            assert members["data"] == {"room": model.name, "members": sorted(users)}
        names: list[str] = []
        frame: dict[str, Any] = {"cmd": "room.list", "limit": 2}
        while True:
            page = self.expect(s, frame, None)["data"]
            names += [r["name"] for r in page["rooms"]]
            if not page["more"]:
                break
            frame = {"cmd": "room.list", "limit": 2, "after": page["next"]}
        assert names == [self.rooms[k].name for k in sorted(self.rooms)]

    @invariant()
    def history_matches(self) -> None:
        async def read() -> None:
            for key, model in self.rooms.items():
                room = self.k.app.rooms.rooms[key]
                recs, more = await self.k.app.store.room_history(room.id, None, None, 500)
                assert not more
                assert [(m.id, m.text) for m in recs] == sorted(model.messages.items())

        self.loop.run_until_complete(read())


RoomsMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRooms = RoomsMachine.TestCase
