"""The recovery component driven by hand, without sockets: which commands it sends after a
reconnect, in which order, what it makes of the replies, and the events it hands on."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec
import pytest
from chatd_client.errors import Forbidden, NotFound, RateLimited, SessionEnded, Unauthorized
from chatd_client.recovery import END, REFRESH, RELOGIN, Recovery, Refused, Step
from chatd_client.types import EPOCH_CHANGED, RECONNECTED, REJOIN_FAILED, Event, Hello

from chatd.protocol import commands as c
from chatd.protocol.models import Message, RoomInfo
from chatd.protocol.replies import (
    AuthReply,
    LoginReply,
    MessageReply,
    RoomJoinReply,
    SyncReply,
)
from tests.client.test_codec import Waiter


def hello(epoch: str = "e1", rev: int = 0) -> Hello:
    return Hello("chatd", "1", 1, 65536, 4000, 500, epoch, rev)


def msg(
    id: int, rev: int, text: str = "t", *, edited: bool = False, deleted: bool = False
) -> Message:
    return Message(
        id=id, rev=rev, room="lobby", to=None, from_="ann", text="" if deleted else text,
        ts="ts", edited_ts="ts2" if edited else None, deleted=deleted,
    )  # fmt: skip


def live(m: Message, name: str = "message") -> Event:
    return Event(name, msgspec.to_builtins(m), m.room, m)


def room(name: str) -> RoomInfo:
    return RoomInfo(name, "", "ann", "ts", 1, False, False)


def who(user: str = "ann") -> AuthReply:
    return AuthReply(user=user, grants=["msg:edit"], expires_at=99)


def logged_in(
    *, password: str | None = None, rooms: tuple[str, ...] = (), rev: int = 0
) -> Recovery:
    """A Recovery as after a first connection: authenticated with a token, in `rooms`."""
    rec = Recovery(user="ann", password=password, token="tok")
    rec.started(hello(rev=rev))
    rec.bound("ann", ["msg:edit"], 99)
    for r in rooms:
        rec.joined(r)
    return rec


class Driver:
    """Plays the server: records each command, answers with the given reply."""

    def __init__(self, steps: Generator[Step, Any, None]) -> None:
        self.steps = steps
        self.step: Step | None = next(steps)
        self.sent: list[c.Command] = []

    def expect(self, kind: type[c.Command]) -> Any:
        assert self.step is not None, "no more commands"
        assert isinstance(self.step.cmd, kind), self.step.cmd
        self.sent.append(self.step.cmd)
        return self.step.cmd

    def _advance(self, go: Any) -> None:
        try:
            self.step = go()
        except StopIteration:
            self.step = None

    def reply(self, value: Any) -> None:
        self._advance(lambda: self.steps.send(value))

    def fail(self, error: Exception) -> None:
        self._advance(lambda: self.steps.throw(error))

    @property
    def done(self) -> bool:
        return self.step is None


def test_a_reconnect_re_auths_re_joins_then_syncs_and_delivers_each_change_once() -> None:
    rec = logged_in(rooms=("lobby", "Dev"))
    assert rec.accept(live(msg(5, 5)))  # seen before the drop
    assert not rec.accept(live(msg(5, 5)))  # a repeat
    resume = rec.resume(hello(rev=9), conn=2, attempts=3)
    d = Driver(resume.steps())
    assert d.expect(c.Auth).token == "tok"
    d.reply(who())
    assert d.expect(c.RoomJoin).room == "lobby"
    d.reply(RoomJoinReply(room=room("lobby"), members=["ann"]))
    assert d.expect(c.RoomJoin).room == "Dev"
    d.reply(RoomJoinReply(room=room("dev"), members=["ann"]))  # the server's spelling
    # A live message arrives on the new connection before the sync answers; the sync
    # returns it too. A stale repeat (rev 5) arrives as well.
    resume.hold(live(msg(6, 6, "new")))
    resume.hold(live(msg(5, 5)))
    assert d.expect(c.Sync).since == 5
    d.reply(
        SyncReply(changes=[msg(6, 6, "new"), msg(2, 7, "fixed", edited=True)], rev=8, more=True)
    )
    assert d.expect(c.Sync).since == 8
    d.reply(SyncReply(changes=[msg(1, 9, deleted=True)], rev=9, more=False))
    assert d.done
    assert [type(cmd) for cmd in d.sent] == [c.Auth, c.RoomJoin, c.RoomJoin, c.Sync, c.Sync]
    events = resume.commit()
    assert [e.name for e in events] == [RECONNECTED, "message", "message.edited", "message.deleted"]
    assert events[0].data == {"attempts": 3, "epoch_changed": False}
    assert [e.message.rev for e in events[1:] if e.message] == [6, 7, 9]
    assert events[1].recovered and events[3].data["id"] == 1
    assert rec.rev == 9 and sorted(rec.rooms.values()) == ["dev", "lobby"]


def test_a_refused_token_without_password_ends_the_session_instead_of_a_guest_login() -> None:
    rec = logged_in(rooms=("lobby",))
    d = Driver(rec.resume(hello(), conn=2).steps())
    d.expect(c.Auth)
    with pytest.raises(Refused) as refused:
        d.fail(Unauthorized("account deleted", code="unauthorized"))
    assert refused.value.error.code == "unauthorized"
    ended = refused.value.session_ended()  # what the client raises from then on
    assert isinstance(ended, SessionEnded) and ended.code == "unauthorized"
    assert "ann" in str(ended) and "not logging in as anyone else" in str(ended)
    assert [type(cmd) for cmd in d.sent] == [c.Auth]  # no login, as a guest or otherwise


def test_a_refused_token_with_the_password_logs_the_same_account_in_again() -> None:
    rec = logged_in(password="password1", rooms=("lobby",))
    d = Driver(rec.resume(hello(), conn=2).steps())
    d.expect(c.Auth)
    d.fail(Unauthorized("expired", code="token_expired"))
    login = d.expect(c.Login)
    assert (login.user, login.password) == ("ann", "password1")
    d.reply(LoginReply(token="tok2", user="ann", grants=[], expires_at=200))
    d.expect(c.RoomJoin)
    assert rec.token == "tok2" and rec.expires_at == 200 and not rec.guest
    # … and a login the server refuses too ends it.
    d2 = Driver(rec.resume(hello(), conn=3).steps())
    d2.expect(c.Auth)
    d2.fail(Unauthorized("revoked"))
    d2.expect(c.Login)
    with pytest.raises(Refused):
        d2.fail(Unauthorized("wrong password"))


def test_a_transient_refusal_is_not_the_end_of_the_session() -> None:
    rec = logged_in()
    d = Driver(rec.resume(hello(), conn=2).steps())
    d.expect(c.Auth)
    with pytest.raises(RateLimited):  # the next attempt, after the backoff, tries again
        d.fail(RateLimited("slow down", retry_after=1.0))
    assert rec.authed


def test_a_room_that_cannot_be_re_joined_is_reported_and_forgotten() -> None:
    rec = logged_in(rooms=("gone", "lobby"))
    resume = rec.resume(hello(), conn=2)
    d = Driver(resume.steps())
    d.expect(c.Auth)
    d.reply(who())
    d.expect(c.RoomJoin)
    d.fail(NotFound("no room 'gone'"))
    d.expect(c.RoomJoin)
    d.reply(RoomJoinReply(room=room("lobby"), members=["ann"]))
    d.expect(c.Sync)
    assert rec.rooms == {"gone": "gone", "lobby": "lobby"}  # nothing changes before commit
    d.reply(SyncReply(changes=[], rev=0, more=False))
    events = resume.commit()
    assert [e.name for e in events] == [REJOIN_FAILED, RECONNECTED]
    assert events[0].data == {"room": "gone", "code": "not_found", "message": "no room 'gone'"}
    assert list(rec.rooms) == ["lobby"]


def test_a_new_epoch_syncs_from_the_new_stores_revision_and_says_so() -> None:
    rec = logged_in(rev=50)
    rec.accept(live(msg(40, 50)))
    resume = rec.resume(hello(epoch="e2", rev=3), conn=2)
    d = Driver(resume.steps())
    d.expect(c.Auth)
    d.reply(who())
    assert d.expect(c.Sync).since == 3
    d.reply(SyncReply(changes=[msg(2, 4, edited=True)], rev=4, more=False))
    events = resume.commit()
    assert [e.name for e in events][:2] == [EPOCH_CHANGED, RECONNECTED]
    assert events[0].data == {"old": "e1", "new": "e2"}
    assert events[2].message is not None and events[2].message.rev == 4
    assert rec.epoch == "e2" and rec.rev == 4


def test_queued_sends_go_again_with_their_nonce_after_the_sync() -> None:
    rec = logged_in(rooms=("lobby",))
    lost, queued, written_here, refused = Waiter(), Waiter(), Waiter(), Waiter()
    e1 = rec.outbox.add(c.MsgSend(text="lost reply", room="lobby", nonce="n1"), lost)
    rec.outbox.written(e1, 1)  # on the connection that dropped
    rec.outbox.add(c.MsgSend(text="typed offline", room="lobby", nonce="n2"), queued)
    e3 = rec.outbox.add(c.MsgSend(text="already on 2", room="lobby", nonce="n3"), written_here)
    rec.outbox.written(e3, 2)
    resume = rec.resume(hello(), conn=2)
    d = Driver(resume.steps())
    d.expect(c.Auth)
    d.reply(who())
    d.expect(c.RoomJoin)
    d.reply(RoomJoinReply(room=room("lobby"), members=["ann"]))
    d.expect(c.Sync)
    d.reply(SyncReply(changes=[], rev=0, more=False))
    assert d.expect(c.MsgSend).nonce == "n1"
    rec.outbox.add(c.MsgSend(text="meanwhile", room="gone", nonce="n4"), refused)
    d.reply(MessageReply(message=msg(1, 1, "lost reply")))
    assert d.expect(c.MsgSend).nonce == "n2"
    d.reply(MessageReply(message=msg(2, 2, "typed offline")))
    assert d.expect(c.MsgSend).nonce == "n4"
    d.fail(Forbidden("join gone first"))
    assert d.done
    assert lost.result.text == "lost reply" and queued.result.id == 2
    assert isinstance(refused.error, Forbidden)
    assert not written_here.done() and len(rec.outbox) == 1  # its own reply settles it


def test_without_a_session_a_reconnect_only_resends() -> None:
    rec = Recovery()
    rec.started(hello())
    w = Waiter()
    rec.outbox.add(c.MsgSend(text="x", room="a", nonce="n"), w)
    resume = rec.resume(hello(), conn=2)
    d = Driver(resume.steps())
    d.expect(c.MsgSend)
    d.fail(Unauthorized("log in first"))
    assert d.done and isinstance(w.error, Unauthorized)
    assert [e.name for e in resume.commit()] == [RECONNECTED]


def test_live_events_keep_rooms_in_step_and_call_for_the_right_action() -> None:
    rec = logged_in(rooms=("lobby", "old"))
    updated = {"name": "New", "previous_name": "old"}
    assert rec.observe(Event("room.updated", updated, "New"), current=True) is None
    assert rec.observe(Event("room.closed", {"room": "lobby"}, "lobby"), current=True) is None
    assert rec.rooms == {"new": "New"}
    assert rec.observe(Event("session.expiring", {}), current=True) == REFRESH
    assert rec.observe(Event("session.expiring", {}), current=False) is None
    assert rec.observe(Event("session.expired", {}), current=True) == END  # no password
    with_password = logged_in(password="password1")
    assert with_password.observe(Event("session.expired", {}), current=True) == RELOGIN
    revoked = Event("session.expired", {"reason": "logout"})
    assert with_password.observe(revoked, current=True) == END
