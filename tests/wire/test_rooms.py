"""Rooms over real sockets (wire contract, "Commands", "Rules" and "Events")."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import (
    RFC3339,
    TIMEOUT,
    Client,
    admin,
    advance,
    guest,
    running_server,
    second,
)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition the server reaches on its own (a closed socket's cleanup)."""
    async with asyncio.timeout(TIMEOUT):
        # No event tells an outsider that an empty room went: poll, bounded.
        while not await check():
            await asyncio.sleep(0.02)


def names(rooms: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in rooms]


# --- room.create -----------------------------------------------------------------------


async def test_create_returns_the_room_and_the_creator_joins(connect) -> None:
    ann = await guest(connect, "Ann")
    room = (await ann.ok("room.create", room="Lobby", topic="hello"))["room"]
    assert RFC3339.match(room.pop("created_at"))
    assert room == {
        "name": "Lobby", "topic": "hello", "owner": "Ann", "members": 1,
        "ephemeral": False, "open": False,
    }
    assert await ann.ok("room.members", room="lobby") == {"room": "Lobby", "members": ["Ann"]}
    plain = (await ann.ok("room.create", room="plain", ephemeral=True, open=True))["room"]
    assert plain["topic"] == "" and plain["ephemeral"] and plain["open"]
    # The creator is a member: it may post to a closed room at once.
    await ann.ok("msg.send", room="Lobby", text="first")


async def test_create_on_a_taken_name_is_conflict_whatever_the_case(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="Lobby")
    await ann.error("room.create", "conflict", room="Lobby")
    await bob.error("room.create", "conflict", room="lobby")
    await bob.error("room.create", "conflict", room="LOBBY")
    assert names((await bob.ok("room.list"))["rooms"]) == ["Lobby"]


async def test_create_needs_the_room_create_grant(connect) -> None:
    c = await guest(connect, "ann", grants=["msg:edit"])
    await c.error("room.create", "forbidden", room="lobby")
    assert (await c.ok("room.list"))["rooms"] == []


async def test_create_rejects_bad_names_and_long_topics(connect) -> None:
    c = await guest(connect, "ann")
    for bad in ["", ".dot", "-dash", "sp ace", "x" * 33, "ümlaut"]:
        await c.error("room.create", "bad_request", room=bad)
    await c.error("room.create", "bad_request", room="ok", topic="t" * 257)
    room = (await c.ok("room.create", room="ok", topic="é" * 256))["room"]
    assert room["topic"] == "é" * 256


# --- room.edit -------------------------------------------------------------------------


async def test_edit_topic_tells_every_connection_of_the_room(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    carl = await guest(connect, "carl")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    await ann.event("member.joined")
    room = (await ann.ok("room.edit", room="dev", topic="shipping"))["room"]
    assert room["topic"] == "shipping" and room["name"] == "dev" and room["members"] == 2
    for c in (ann, bob):
        ev = await c.event("room.updated")
        assert ev == room and "previous_name" not in ev
    await carl.no_frame()
    listed = (await carl.ok("room.list"))["rooms"]
    assert listed[0]["topic"] == "shipping"


async def test_rename_keeps_identity_and_history_shows_the_new_name(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="dev", topic="t")
    await bob.ok("room.join", room="dev")
    sent = (await bob.ok("msg.send", room="dev", text="before the rename"))["message"]
    assert sent["room"] == "dev"
    room = (await ann.ok("room.edit", room="DEV", name="Dev2"))["room"]
    assert room["name"] == "Dev2" and room["topic"] == "t" and "previous_name" not in room
    for c in (ann, bob):
        ev = await c.event("room.updated")
        assert ev["name"] == "Dev2" and ev["previous_name"] == "dev" and ev["topic"] == "t"
    assert names((await bob.ok("room.list"))["rooms"]) == ["Dev2"]
    await bob.error("room.history", "not_found", room="dev")
    history = (await bob.ok("room.history", room="dev2"))["messages"]
    assert [m["id"] for m in history] == [sent["id"]] and history[0]["room"] == "Dev2"
    # Still a member under the new name; the old name is free again.
    assert (await bob.ok("msg.send", room="Dev2", text="after"))["message"]["room"] == "Dev2"
    await bob.ok("room.create", room="dev")


async def test_rename_to_another_case_of_its_own_name_is_allowed(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    room = (await ann.ok("room.edit", room="dev", name="DEV"))["room"]
    assert room["name"] == "DEV"
    ev = await ann.event("room.updated")
    assert ev["name"] == "DEV" and ev["previous_name"] == "dev"
    assert names((await ann.ok("room.list"))["rooms"]) == ["DEV"]
    # The same name exactly is no rename: a plain update without previous_name.
    await ann.ok("room.edit", room="dev", name="DEV", topic="x")
    assert "previous_name" not in await ann.event("room.updated")


async def test_rename_onto_another_room_is_conflict(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    await ann.ok("room.create", room="ops")
    await ann.error("room.edit", "conflict", room="dev", name="ops")
    await ann.error("room.edit", "conflict", room="dev", name="OPS", topic="also not this")
    assert sorted(names((await ann.ok("room.list"))["rooms"])) == ["dev", "ops"]
    assert (await ann.ok("room.list"))["rooms"][0]["topic"] == ""


async def test_edit_needs_a_field(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    frame = await ann.error("room.edit", "bad_request", room="dev")
    assert "topic" in frame["message"] and "name" in frame["message"]
    await ann.error("room.edit", "bad_request", room="dev", name="bad name")
    await ann.error("room.edit", "not_found", room="nowhere", topic="x")


async def test_edit_needs_the_grant_and_membership_or_admin(server, connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    outsider = await guest(connect, "bob")
    await outsider.error("room.edit", "forbidden", room="dev", topic="x")
    weak = await guest(connect, "carl", grants=["room:create", "room:delete"])
    await weak.ok("room.join", room="dev")
    await weak.error("room.edit", "forbidden", room="dev", topic="x")
    root = await admin(server, connect)
    room = (await root.ok("room.edit", room="dev", topic="by admin"))["room"]
    assert room["topic"] == "by admin"
    # An admin without room:edit is still refused: the grant comes first.
    root2 = await connect()
    await root2.ok("login", user="root", password="admin-password", grants=["admin"])
    await root2.error("room.edit", "forbidden", room="dev", topic="x")


# --- room.delete -----------------------------------------------------------------------


async def test_delete_closes_the_room_for_every_member_connection(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    bob2 = await second(connect, bob)
    carl = await guest(connect, "carl")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    await bob2.ok("room.join", room="dev")
    await ann.ok("msg.send", room="dev", text="soon gone")
    await ann.event("message")
    for c in (bob, bob2):
        await c.event("message")
    # The reply comes before the event on the caller's own connection.
    await ann.send({"cmd": "room.delete", "id": "del", "room": "Dev"})
    frames = [await ann.recv() for _ in range(2)]
    assert frames[0] == {"type": "ok", "id": "del", "data": {}}
    assert frames[1] == {"type": "event", "event": "room.closed", "data": {"room": "dev", "by": "ann"}}
    for c in (bob, bob2):
        assert await c.event("room.closed") == {"room": "dev", "by": "ann"}
    await carl.no_frame()
    for c in (ann, bob, carl):
        await c.error("room.history", "not_found", room="dev")
        await c.error("room.members", "not_found", room="dev")
        await c.error("room.join", "not_found", room="dev")
        await c.error("msg.send", "not_found", room="dev", text="x")
    await ann.error("room.delete", "not_found", room="dev")
    assert (await bob.ok("room.list"))["rooms"] == []
    # A room made again under the name is new: empty, and the old members are not in it.
    room = (await carl.ok("room.create", room="dev"))["room"]
    assert room["members"] == 1
    assert (await carl.ok("room.history", room="dev"))["messages"] == []
    assert (await carl.ok("room.members", room="dev"))["members"] == ["carl"]
    await bob.error("msg.send", "forbidden", room="dev", text="not a member any more")
    # Leaving the closed room is a no-op and nobody hears of it.
    await bob2.close()
    await carl.no_frame()


async def test_delete_needs_the_grant_and_membership_or_admin(server, connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    outsider = await guest(connect, "bob")
    await outsider.error("room.delete", "forbidden", room="dev")
    weak = await guest(connect, "carl", grants=["room:edit"])
    await weak.ok("room.join", room="dev")
    await weak.error("room.delete", "forbidden", room="dev")
    await outsider.error("room.delete", "not_found", room="nowhere")
    root = await admin(server, connect)
    await root.ok("room.delete", room="dev")
    assert await ann.event("room.closed") == {"room": "dev", "by": "root"}
    assert await weak.event("room.closed") == {"room": "dev", "by": "root"}
    await root.no_frame()


# --- room.list, room.join, room.leave, room.members ------------------------------------


async def test_list_counts_users_not_connections(connect) -> None:
    ann = await guest(connect, "ann")
    ann2 = await second(connect, ann)
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="b-room")
    await ann2.ok("room.join", room="b-room")
    await bob.ok("room.create", room="A-room", topic="first")
    rooms = (await bob.ok("room.list"))["rooms"]
    assert names(rooms) == ["A-room", "b-room"]
    assert [r["members"] for r in rooms] == [1, 1]
    assert rooms[0]["owner"] == "bob" and rooms[0]["topic"] == "first"
    await bob.ok("room.join", room="b-room")
    assert (await ann.ok("room.list"))["rooms"][1]["members"] == 2
    # room.list needs a token.
    anon = await connect()
    await anon.error("room.list", "unauthorized")


async def test_join_is_idempotent_and_member_joined_goes_to_others_once(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "Bob")
    bob2 = await second(connect, bob)
    await ann.ok("room.create", room="dev")
    data = await bob.ok("room.join", room="DEV")
    assert data["room"]["name"] == "dev" and data["room"]["members"] == 2
    assert data["members"] == ["ann", "Bob"]
    assert await ann.event("member.joined") == {"room": "dev", "user": "Bob"}
    again = await bob.ok("room.join", room="dev")
    assert again["members"] == ["ann", "Bob"] and again["room"]["members"] == 2
    await bob2.ok("room.join", room="dev")  # the user's second connection: no event
    await ann.no_frame()
    await bob.no_frame(0.05)
    assert await bob2.ok("room.members", room="dev") == {"room": "dev", "members": ["ann", "Bob"]}
    await bob.error("room.join", "not_found", room="nowhere")
    await bob.error("room.join", "bad_request", room="no way")


async def test_member_left_only_when_the_users_last_connection_leaves(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    bob2 = await second(connect, bob)
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    await bob2.ok("room.join", room="dev")
    await ann.event("member.joined")
    assert await bob.ok("room.leave", room="dev") == {}
    await ann.no_frame()
    assert (await ann.ok("room.members", room="dev"))["members"] == ["ann", "bob"]
    # bob's first connection left: it no longer receives the room's messages.
    await ann.ok("msg.send", room="dev", text="hi")
    assert (await bob2.event("message"))["text"] == "hi"
    await bob.no_frame(0.05)
    await bob2.ok("room.leave", room="dev")
    assert await ann.event("member.left") == {"room": "dev", "user": "bob", "reason": "left"}
    await bob2.no_frame(0.05)
    assert (await ann.ok("room.members", room="dev"))["members"] == ["ann"]


async def test_leave_of_a_room_one_is_not_in_is_a_no_op(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="dev")
    assert await bob.ok("room.leave", room="dev") == {}
    assert await bob.ok("room.leave", room="DEV") == {}
    await ann.no_frame()
    await bob.error("room.leave", "not_found", room="nowhere")


async def test_members_lists_users_sorted_and_is_open_to_anyone(connect) -> None:
    ann = await guest(connect, "ann")
    zed = await guest(connect, "Zed")
    zed2 = await second(connect, zed)
    bo = await guest(connect, "bo")
    await zed.ok("room.create", room="dev")
    await zed2.ok("room.join", room="dev")
    await bo.ok("room.join", room="dev")
    data = await ann.ok("room.members", room="Dev")
    assert data == {"room": "dev", "members": ["bo", "Zed"]}
    await ann.error("room.members", "not_found", room="nope")


async def test_open_room_accepts_posts_from_non_members(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="desk", open=True)
    await ann.ok("room.create", room="shut")
    msg = (await bob.ok("msg.send", room="desk", text="a question"))["message"]
    assert msg["room"] == "desk" and msg["from"] == "bob"
    assert await ann.event("message") == msg
    await bob.no_frame(0.05)  # not a member: no copy of its own message
    await bob.error("msg.send", "forbidden", room="shut", text="no")
    assert (await ann.ok("room.members", room="desk"))["members"] == ["ann"]


async def test_ephemeral_room_vanishes_with_its_last_member(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="tmp", ephemeral=True)
    await bob.ok("room.join", room="tmp")
    await ann.ok("msg.send", room="tmp", text="short-lived")
    await ann.ok("room.leave", room="tmp")
    assert names((await ann.ok("room.list"))["rooms"]) == ["tmp"]
    await bob.close()  # the last member goes by disconnecting

    async def gone() -> bool:
        return (await ann.ok("room.list"))["rooms"] == []

    await eventually(gone)
    await ann.error("room.join", "not_found", room="tmp")
    # The name is free again, and the new room starts empty.
    await ann.ok("room.create", room="tmp", ephemeral=True)
    assert (await ann.ok("room.history", room="tmp"))["messages"] == []
    await ann.ok("room.leave", room="tmp")
    assert (await ann.ok("room.list"))["rooms"] == []


async def test_non_ephemeral_room_stays_when_empty(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="keep")
    await ann.ok("room.leave", room="keep")
    assert (await ann.ok("room.list"))["rooms"][0]["members"] == 0


# --- channels ----------------------------------------------------------------------------


async def test_channels_lists_rooms_and_known_users_typed(server, connect) -> None:
    reg = await connect()
    await reg.ok("register", user="Reggie", password="password123")
    ann = await guest(connect, "ann")
    gone = await guest(connect, "gone")
    await gone.ok("logout")
    await ann.ok("room.create", room="lobby")
    chans = (await ann.ok("channels"))["channels"]
    assert {"name": "lobby", "type": "room"} in chans
    assert {"name": "Reggie", "type": "user"} in chans  # registered, though offline
    assert {"name": "ann", "type": "user"} in chans  # an online guest
    assert all(c["name"] != "gone" for c in chans)  # a guest that logged out
    assert all(set(c) == {"name", "type"} and c["type"] in ("room", "user") for c in chans)
    await reg.error("channels", "unauthorized")


# --- cleanup when a connection goes ----------------------------------------------------


@pytest.mark.fake_clock
async def test_abrupt_close_logout_and_expiry_give_member_left_with_reason(server, connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    cases: list[tuple[str, str]] = [("dropper", "disconnected"), ("quitter", "logout"),
                                    ("expirer", "expired")]
    clients: dict[str, Client] = {}
    for name, _ in cases:
        ttl = {"ttl": 1} if name == "expirer" else {}
        c = clients[name] = await guest(connect, name, **ttl)
        await c.ok("room.join", room="dev")
        assert (await ann.event("member.joined"))["user"] == name
    clients["dropper"].writer.transport.abort()
    assert await ann.event("member.left") == {"room": "dev", "user": "dropper", "reason": "disconnected"}
    assert await clients["quitter"].ok("logout") == {}
    assert await ann.event("member.left") == {"room": "dev", "user": "quitter", "reason": "logout"}
    exp = clients["expirer"]
    assert "session.expired" not in [e["event"] for e in exp.events]
    await advance(server, 2.0)  # its ttl is 1 s
    assert await exp.event("session.expired") == {}
    assert await ann.event("member.left") == {"room": "dev", "user": "expirer", "reason": "expired"}
    await exp.error("room.join", "unauthorized", room="dev")
    assert (await ann.ok("room.members", room="dev"))["members"] == ["ann"]
    # The logged-out and expired connections stay open and are in no room.
    await ann.ok("msg.send", room="dev", text="anyone?")
    await clients["quitter"].no_frame(0.05)
    assert (await exp.ok("ping")) == {"pong": True}


async def test_concurrent_rename_and_topic_edit_both_stick_across_a_restart(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    async with running_server(db=db) as srv:
        a = await Client.connect(srv.port)
        b = await Client.connect(srv.port)
        try:
            await a.ok("login", user="ann")
            await b.ok("login", user="bob")
            await a.ok("room.create", room="dev", topic="old")
            await b.ok("room.join", room="dev")
            # Both edits are in flight at once: neither may undo the other in the store.
            a.writer.write(b'{"cmd":"room.edit","id":1,"room":"dev","name":"ops"}\n')
            b.writer.write(b'{"cmd":"room.edit","id":2,"room":"dev","topic":"new"}\n')
            ra, rb = await asyncio.gather(a.reply(1), b.reply(2))
            assert ra["type"] == "ok"
            listed = (await a.ok("room.list"))["rooms"]
        finally:
            await a.close()
            await b.close()
    if rb["type"] == "ok":
        assert [(r["name"], r["topic"]) for r in listed] == [("ops", "new")]
    else:  # the topic edit came after the rename and no longer found "dev"
        assert rb["code"] == "not_found" and [r["name"] for r in listed] == ["ops"]
    async with running_server(db=db) as srv:
        c = await Client.connect(srv.port)
        await c.ok("login", user="carl")
        assert [(r["name"], r["topic"]) for r in (await c.ok("room.list"))["rooms"]] == [
            (r["name"], r["topic"]) for r in listed
        ]
        await c.close()


async def test_room_delete_finishes_when_its_sender_hangs_up_at_once(server, connect) -> None:
    """A command waiting for the store runs to its end after the connection is gone:
    the other members still get room.closed (nothing half-done)."""
    owner = await guest(connect, "leaver")
    await owner.ok("room.create", room="doomed")
    member = await guest(connect, "stayer")
    await member.ok("room.join", room="doomed")
    await owner.send({"cmd": "room.delete", "room": "doomed"})
    await owner.close()
    closed = await member.event("room.closed")
    assert closed == {"room": "doomed", "by": "leaver"}
    assert (await member.call("room.members", room="doomed"))["code"] == "not_found"


async def test_a_login_abandoned_mid_hash_leaves_no_session_behind(server, connect) -> None:
    c = await connect()
    await c.send({"cmd": "login", "user": "ghostly"})
    await c.close()
    other = await guest(connect, "lookout")
    await other.ok("ping")
    for _ in range(100):  # the abandoned login's write commits within a few turns
        await asyncio.sleep(0.01)
    assert not server.app.presence.is_online("ghostly")


async def test_an_emptied_ephemeral_rooms_name_can_be_reused_in_the_same_breath(
    server, connect
) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="eph", ephemeral=True)
    await ann.send_raw(
        b'{"cmd":"room.leave","room":"eph","id":"l"}\n'
        b'{"cmd":"room.create","room":"eph","ephemeral":true,"id":"c"}\n'
    )
    assert (await ann.reply("l"))["type"] == "ok"
    created = await ann.reply("c")
    assert created["type"] == "ok", created


async def test_sends_racing_an_ephemeral_rooms_end_never_ack_a_message_without_a_room(
    server, connect
) -> None:
    owner = await guest(connect, "host")
    await owner.ok("room.create", room="brief", ephemeral=True, open=True)
    poster = await guest(connect, "poster")
    frames = b"".join(
        b'{"cmd":"msg.send","room":"brief","text":"t%d","id":%d}\n' % (i, i) for i in range(20)
    )
    await poster.send_raw(frames)
    await owner.ok("room.leave", room="brief")
    for i in range(20):
        frame = await poster.reply(i)
        if frame["type"] == "ok":
            assert frame["data"]["message"]["room"] == "brief", frame
        else:
            assert frame["code"] in ("not_found", "rate_limited"), frame
