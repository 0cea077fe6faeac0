"""The reply Structs of chatd.protocol.replies: one per command, decoding real server replies
and encoding back to the very same JSON (so the server's handlers can return them), and
ignoring fields they do not know (a newer server must not break an older client)."""

from __future__ import annotations

import json
from typing import Any

import chatd_client as cc
import msgspec
from chatd_client import connect

from chatd.dispatch import command_table
from chatd.protocol import ALL_COMMANDS, command_name
from chatd.protocol.models import Message
from chatd.protocol.replies import (
    REPLIES,
    ChannelsReply,
    Empty,
    MessageReply,
    PingReply,
    RoomListReply,
    StatsReply,
    SyncReply,
    reply_type,
)
from tests.client.util import FAST
from tests.helpers import Client, admin, running_server

# --- without sockets ----------------------------------------------------------------------


def test_every_command_in_the_command_table_has_a_reply_struct() -> None:
    table = {spec.name for spec in command_table()}
    assert set(REPLIES) == table
    assert {command_name(cls) for cls in ALL_COMMANDS} == table
    for name in table:
        assert issubclass(reply_type(name), msgspec.Struct)


def test_unknown_fields_are_ignored_when_decoding() -> None:
    got = msgspec.json.decode(b'{"pong":true,"shiny":[1,{"x":2}]}', type=PingReply)
    assert got == PingReply(pong=True)
    page = msgspec.json.decode(b'{"changes":[],"rev":7,"more":false,"new_field":1}', type=SyncReply)
    assert page.rev == 7 and page.changes == [] and page.more is False
    assert msgspec.json.decode(b'{"whatever":1}', type=Empty) == Empty()


def test_stats_needs_the_contract_fields_only_and_tolerates_more() -> None:
    contract = {
        "version": "0.1.0", "uptime": 1.5, "connections": 1, "users_online": 1, "rooms": 0,
        "messages": 0, "rev": 0,
    }  # fmt: skip
    got = msgspec.json.decode(
        json.dumps({**contract, "from_the_future": {"a": 1}}), type=StatsReply
    )
    assert got.version == "0.1.0" and got.rev == 0 and got.refused == {}
    try:
        msgspec.json.decode(
            json.dumps({k: v for k, v in contract.items() if k != "rev"}), type=StatsReply
        )
    except msgspec.ValidationError as exc:
        assert "rev" in str(exc)
    else:
        raise AssertionError("a stats reply without `rev` was accepted")


def test_paged_replies_carry_next_only_when_more() -> None:
    assert json.loads(msgspec.json.encode(RoomListReply(rooms=[], more=False))) == {
        "rooms": [], "more": False,
    }  # fmt: skip
    assert json.loads(msgspec.json.encode(ChannelsReply(channels=[], more=True, next="room:a"))) == {
        "channels": [], "more": True, "next": "room:a",
    }  # fmt: skip


def test_a_pre_encoded_message_encodes_the_same_as_the_struct() -> None:
    """Handlers splice a Message encoded once (msgspec.Raw) into the reply and the event."""
    msg = Message(id=1, rev=2, room="lobby", to=None, from_="ann", text="hi", ts="t")
    raw = msgspec.Raw(msgspec.json.encode(msg))
    spliced = MessageReply(message=raw)  # type: ignore[arg-type]
    assert msgspec.json.encode(spliced) == msgspec.json.encode(MessageReply(message=msg))


# --- real server replies -------------------------------------------------------------------


def _same_json(cmd: str, data: dict[str, Any]) -> None:
    """The server's data decodes with the command's Struct and encodes back to the same
    JSON, field order included."""
    typed = msgspec.json.decode(json.dumps(data), type=REPLIES[cmd])
    again = json.loads(msgspec.json.encode(typed))
    assert json.dumps(again) == json.dumps(data), cmd


class _Recorder:
    """Calls commands on a line client and checks each ok reply against its Struct."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def ok(self, c: Client, cmd: str, **fields: Any) -> dict[str, Any]:
        data = await c.ok(cmd, **fields)
        _same_json(cmd, data)
        self.seen.add(cmd)
        return data


async def test_every_commands_real_reply_decodes_and_encodes_back_the_same() -> None:
    rec = _Recorder()
    async with running_server() as srv:
        connect_ = lambda: Client.connect(srv.port)  # noqa: E731
        root = await admin(srv, connect_)
        ann = await connect_()
        bob = await connect_()
        await rec.ok(ann, "ping")
        await rec.ok(ann, "help")
        await rec.ok(ann, "help", command="msg.edit")
        await rec.ok(ann, "register", user="ann", password="password1")
        ann.token = (await rec.ok(ann, "login", user="ann", password="password1"))["token"]
        await rec.ok(bob, "login", user="bob")  # a guest
        other = await connect_()
        await rec.ok(other, "auth", token=ann.token)
        await rec.ok(ann, "whoami")
        await rec.ok(ann, "refresh")
        await rec.ok(ann, "room.create", room="lobby", topic="hi")
        await rec.ok(ann, "room.create", room="news", ephemeral=False, open=True)
        await rec.ok(ann, "room.edit", room="news", topic="all the news")
        await rec.ok(ann, "room.edit", room="news", name="News2")
        first = await rec.ok(ann, "room.list", limit=1)
        assert first["more"] is True and "next" in first
        last = await rec.ok(ann, "room.list", after=first["next"])
        assert last["more"] is False and "next" not in last
        await rec.ok(bob, "room.join", room="lobby")
        await rec.ok(ann, "room.members", room="lobby")
        sent = await rec.ok(ann, "msg.send", room="lobby", text="hello", nonce="n1")
        await rec.ok(ann, "msg.send", room="lobby", text="hello", nonce="n1")  # a repeat
        await rec.ok(ann, "msg.send", to="bob", text="psst")
        await rec.ok(ann, "msg.edit", message_id=sent["message"]["id"], text="hello!")
        await rec.ok(ann, "room.history", room="lobby")
        await rec.ok(ann, "dm.history", **{"with": "bob"})
        await rec.ok(ann, "msg.delete", message_id=sent["message"]["id"])
        await rec.ok(ann, "sync", since=0)  # the tombstone too
        page = await rec.ok(ann, "channels", limit=2)
        assert page["more"] is True
        await rec.ok(ann, "channels", after=page["next"])
        await rec.ok(root, "user.list")
        await rec.ok(root, "stats")
        await rec.ok(ann, "passwd", password="password1", new_password="password2")
        await rec.ok(bob, "room.leave", room="lobby")
        await rec.ok(ann, "room.delete", room="News2")
        await rec.ok(root, "user.delete", user="ann")
        await rec.ok(bob, "logout")
        for c in (root, ann, bob, other):
            await c.close()
    assert rec.seen == set(REPLIES)


async def test_the_library_returns_the_protocols_reply_structs() -> None:
    async with running_server() as srv:
        connect_ = lambda: Client.connect(srv.port)  # noqa: E731
        root = await admin(srv, connect_)
        await root.close()
        async with connect(
            "127.0.0.1", srv.port, user="root", password="admin-password", options=FAST
        ) as chat:
            users = await chat.user_list()
            assert [u.name for u in users] == ["root"] and users[0].admin
            stats = await chat.stats()
            assert isinstance(stats, StatsReply) and stats.connections >= 1
            who = await chat.whoami()
            assert isinstance(who, cc.AuthResult) and who.user == "root"
            res = await chat.passwd("admin-password", "admin-password2")
            assert chat.token == res.token
            assert (await chat.whoami()).user == "root"
