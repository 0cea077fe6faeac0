"""Messages and DMs over real sockets (wire contract, "Commands", "Rules", "Events")."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.helpers import (
    RFC3339,
    TIMEOUT,
    Client,
    Connect,
    admin,
    guest,
    running_server,
    second,
)


async def registered(connect: Connect, name: str, pw: str = "password123") -> Client:
    c = await connect()
    await c.ok("register", user=name, password=pw)
    c.token = (await c.ok("login", user=name, password=pw))["token"]
    return c


async def send_many(c: Client, n: int, **fields: Any) -> list[dict[str, Any]]:
    """Pipeline n msg.send frames; the replies (in order), events kept on the client."""
    base = f"many-{id(c)}-"
    frames = b"".join(
        json.dumps({"cmd": "msg.send", "id": f"{base}{i}", "text": f"m{i}", **fields}).encode()
        + b"\n"
        for i in range(n)
    )
    await c.send_raw(frames)
    replies = []
    while len(replies) < n:
        f = await c.recv()
        if f["type"] == "event":
            c.events.append(f)
            continue
        assert f["id"] == f"{base}{len(replies)}", f
        replies.append(f)
    return replies


def ids(messages: list[dict[str, Any]]) -> list[int]:
    return [m["id"] for m in messages]


# --- msg.send ----------------------------------------------------------------------------


async def test_send_replies_first_then_every_room_connection_gets_the_message(connect) -> None:
    ann = await guest(connect, "ann")
    ann2 = await second(connect, ann)
    bob = await guest(connect, "bob")
    carl = await guest(connect, "carl")
    await ann.ok("room.create", room="dev")
    await ann2.ok("room.join", room="dev")
    await bob.ok("room.join", room="dev")
    await ann.event("member.joined")
    await ann.send({"cmd": "msg.send", "id": "s1", "room": "DEV", "text": "héllo 👋"})
    reply = await ann.recv()
    assert reply["type"] == "ok" and reply["id"] == "s1"
    msg = reply["data"]["message"]
    assert RFC3339.match(msg["ts"])
    assert {k: v for k, v in msg.items() if k not in ("id", "rev", "ts")} == {
        "room": "dev", "to": None, "from": "ann", "text": "héllo 👋",
        "edited_ts": None, "edited_by": None, "deleted": False,
    }
    assert isinstance(msg["id"], int) and isinstance(msg["rev"], int)
    assert await ann.recv() == {"type": "event", "event": "message", "data": msg}
    for c in (ann2, bob):
        assert await c.event("message") == msg
    await carl.no_frame()
    await ann.no_frame(0.05)  # exactly once
    second_msg = (await bob.ok("msg.send", room="dev", text="again"))["message"]
    assert second_msg["id"] > msg["id"] and second_msg["rev"] > msg["rev"]


async def test_send_needs_exactly_one_of_room_and_to(connect) -> None:
    ann = await guest(connect, "ann")
    await guest(connect, "bob")
    await ann.ok("room.create", room="dev")
    await ann.error("msg.send", "bad_request", text="x")
    await ann.error("msg.send", "bad_request", room="dev", to="bob", text="x")
    await ann.error("msg.send", "bad_request", room="dev")
    await ann.error("msg.send", "bad_request", room="dev", text=5)
    await ann.error("msg.send", "bad_request", room="dev", text="x", nonce="n" * 65)
    await ann.error("msg.send", "bad_request", room="dev", text="x", nonce="")
    assert (await ann.ok("room.history", room="dev"))["messages"] == []


async def test_text_is_one_to_4000_code_points_and_not_only_whitespace(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    await ann.error("msg.send", "bad_request", room="dev", text="")
    for blank in [" ", "\n\t \r", "\u3000\u00a0"]:
        await ann.error("msg.send", "bad_request", room="dev", text=blank)
    big = "😀" * 4000  # 4000 code points, 16000 bytes
    assert (await ann.ok("msg.send", room="dev", text=big))["message"]["text"] == big
    await ann.error("msg.send", "bad_request", room="dev", text="é" * 4001)
    assert (await ann.ok("msg.send", room="dev", text=" padded "))["message"]["text"] == " padded "


async def test_send_to_a_closed_room_needs_membership(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="dev")
    await bob.error("msg.send", "forbidden", room="dev", text="let me in")
    await bob.error("msg.send", "not_found", room="nowhere", text="x")
    await ann.no_frame()
    assert (await bob.ok("room.history", room="dev"))["messages"] == []
    anon = await connect()
    await anon.error("msg.send", "unauthorized", room="dev", text="x")


# --- DMs -------------------------------------------------------------------------------


async def test_dm_goes_to_every_connection_of_both_users(connect) -> None:
    ann = await guest(connect, "ann")
    ann2 = await second(connect, ann)
    bob = await guest(connect, "Bob")
    bob2 = await second(connect, bob)
    carl = await guest(connect, "carl")
    await ann.send({"cmd": "msg.send", "id": 1, "to": "bob", "text": "psst"})
    reply = await ann.recv()
    assert reply["type"] == "ok"
    msg = reply["data"]["message"]
    assert msg["to"] == "Bob" and msg["room"] is None and msg["from"] == "ann"
    assert await ann.recv() == {"type": "event", "event": "message", "data": msg}
    for c in (ann2, bob, bob2):
        assert await c.event("message") == msg
    for c in (ann, ann2, bob, bob2, carl):
        await c.no_frame(0.05)


async def test_dm_to_an_unknown_user_is_not_found(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.error("msg.send", "not_found", to="nobody", text="hello?")
    gone = await guest(connect, "gone")
    await gone.ok("logout")  # a guest that logged out no longer holds its name
    await ann.error("msg.send", "not_found", to="gone", text="hello?")
    await ann.error("msg.send", "bad_request", to="bad name", text="x")


async def test_dm_to_an_offline_registered_user_is_kept(connect) -> None:
    reg = await registered(connect, "Reggie")
    await reg.ok("logout")
    await reg.close()
    ann = await guest(connect, "ann")
    msg = (await ann.ok("msg.send", to="reggie", text="read this later"))["message"]
    assert msg["to"] == "Reggie"
    r = await connect()
    await r.ok("login", user="reggie", password="password123")
    got = await r.ok("dm.history")
    assert got == {"messages": [msg], "more": False}
    assert (await r.ok("dm.history", **{"with": "ANN"}))["messages"] == [msg]


async def test_dm_to_oneself_arrives_once_per_connection(connect) -> None:
    ann = await guest(connect, "ann")
    ann2 = await second(connect, ann)
    msg = (await ann.ok("msg.send", to="ann", text="note to self"))["message"]
    assert await ann.event("message") == msg
    assert await ann2.event("message") == msg
    await ann.no_frame(0.05)
    await ann2.no_frame(0.05)
    assert (await ann.ok("dm.history", **{"with": "ann"}))["messages"] == [msg]


async def test_dm_history_with_and_without_a_partner(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    carl = await guest(connect, "carl")
    dave = await guest(connect, "dave")
    await registered(connect, "reg")
    m1 = (await ann.ok("msg.send", to="bob", text="1"))["message"]
    m2 = (await carl.ok("msg.send", to="ann", text="2"))["message"]
    m3 = (await bob.ok("msg.send", to="ann", text="3"))["message"]
    await bob.ok("msg.send", to="carl", text="not ann's")
    assert ids((await ann.ok("dm.history"))["messages"]) == [m1["id"], m2["id"], m3["id"]]
    assert ids((await ann.ok("dm.history", **{"with": "Bob"}))["messages"]) == [m1["id"], m3["id"]]
    assert ids((await ann.ok("dm.history", **{"with": "carl"}))["messages"]) == [m2["id"]]
    page = await ann.ok("dm.history", limit=2)
    assert ids(page["messages"]) == [m2["id"], m3["id"]] and page["more"] is True
    page = await ann.ok("dm.history", before=m2["id"])
    assert ids(page["messages"]) == [m1["id"]] and page["more"] is False
    page = await ann.ok("dm.history", after=m1["id"], limit=1)
    assert ids(page["messages"]) == [m2["id"]] and page["more"] is True
    # A registered user with no DMs yet: an empty page; an unknown name: not_found.
    assert await ann.ok("dm.history", **{"with": "reg"}) == {"messages": [], "more": False}
    await ann.error("dm.history", "not_found", **{"with": "stranger"})
    await ann.error("dm.history", "bad_request", **{"with": "bad name!"})
    await ann.error("dm.history", "bad_request", limit=0)
    assert (await dave.ok("dm.history"))["messages"] == []


async def test_dm_history_with_a_guest_gone_offline_still_shows_past_dms(connect) -> None:
    ann = await guest(connect, "ann")
    tmp = await guest(connect, "tmp")
    m = (await tmp.ok("msg.send", to="ann", text="bye"))["message"]
    await tmp.ok("logout")
    assert (await ann.ok("dm.history", **{"with": "tmp"}))["messages"] == [m]


# --- msg.edit / msg.delete -------------------------------------------------------------


async def test_edit_own_message_tells_the_room(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    carl = await guest(connect, "carl")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    msg = (await bob.ok("msg.send", room="dev", text="helo"))["message"]
    await ann.event("message")
    await bob.event("message")
    await bob.send({"cmd": "msg.edit", "id": "e", "message_id": msg["id"], "text": "hello"})
    reply = await bob.recv()
    assert reply["type"] == "ok" and reply["id"] == "e"
    edited = reply["data"]["message"]
    assert edited["id"] == msg["id"] and edited["rev"] > msg["rev"] and edited["text"] == "hello"
    assert edited["edited_by"] == "bob" and RFC3339.match(edited["edited_ts"])
    assert edited["ts"] == msg["ts"]
    assert await bob.recv() == {"type": "event", "event": "message.edited", "data": edited}
    assert await ann.event("message.edited") == edited
    await carl.no_frame()
    assert (await carl.ok("room.history", room="dev"))["messages"] == [edited]
    await bob.error("msg.edit", "bad_request", message_id=msg["id"], text="  ")
    await bob.error("msg.edit", "bad_request", message_id=msg["id"])
    await bob.error("msg.edit", "not_found", message_id=msg["id"] + 1000, text="x")


async def test_edit_and_delete_grants_own_and_any(connect) -> None:
    ann = await guest(connect, "ann")
    await ann.ok("room.create", room="dev")
    none = await guest(connect, "none", grants=[])
    own = await guest(connect, "own", grants=["msg:edit", "msg:delete"])
    anyg = await guest(connect, "anyg", grants=["msg:edit:any", "msg:delete:any"])
    for c in (none, own, anyg):
        await c.ok("room.join", room="dev")
    mine = {}
    for c, name in ((none, "none"), (own, "own"), (anyg, "anyg")):
        mine[name] = (await c.ok("msg.send", room="dev", text=f"by {name}"))["message"]["id"]
    annmsg = (await ann.ok("msg.send", room="dev", text="by ann"))["message"]["id"]
    # Without grants: own messages are refused, and an unknown id is not_found first.
    await none.error("msg.edit", "forbidden", message_id=mine["none"], text="x")
    await none.error("msg.delete", "forbidden", message_id=mine["none"])
    await none.error("msg.edit", "not_found", message_id=10**9, text="x")
    await none.error("msg.delete", "not_found", message_id=10**9)
    # msg:edit / msg:delete: own only.
    await own.ok("msg.edit", message_id=mine["own"], text="own edit")
    await own.error("msg.edit", "forbidden", message_id=annmsg, text="x")
    await own.error("msg.delete", "forbidden", message_id=annmsg)
    # The :any grants cover one's own messages and everyone else's.
    assert (await anyg.ok("msg.edit", message_id=annmsg, text="fixed"))["message"][
        "edited_by"
    ] == "anyg"
    await anyg.ok("msg.edit", message_id=mine["anyg"], text="mine too")
    await anyg.ok("msg.delete", message_id=mine["none"])
    await own.ok("msg.delete", message_id=mine["own"])
    history = (await ann.ok("room.history", room="dev"))["messages"]
    assert [(m["from"], m["text"]) for m in history] == [("anyg", "mine too"), ("ann", "fixed")]


async def test_delete_tells_the_room_and_the_message_is_gone(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    keep = (await ann.ok("msg.send", room="dev", text="keep"))["message"]
    msg = (await ann.ok("msg.send", room="dev", text="oops"))["message"]
    await ann.send({"cmd": "msg.delete", "id": "d", "message_id": msg["id"]})
    while True:
        f = await ann.recv()
        if f.get("event") != "message":
            break
    assert f == {"type": "ok", "id": "d", "data": {}}
    ev = await ann.event("message.deleted")
    assert ev["id"] == msg["id"] and ev["rev"] > msg["rev"]
    assert ev == {"id": msg["id"], "rev": ev["rev"], "room": "dev", "to": None, "by": "ann"}
    assert await bob.event("message.deleted") == ev
    assert (await bob.ok("room.history", room="dev"))["messages"] == [keep]
    await ann.error("msg.delete", "not_found", message_id=msg["id"])
    await ann.error("msg.edit", "not_found", message_id=msg["id"], text="back")


async def test_dm_edit_and_delete_reach_both_users_and_nobody_else(server, connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    bob2 = await second(connect, bob)
    carl = await guest(connect, "carl")
    msg = (await ann.ok("msg.send", to="bob", text="secret"))["message"]
    for c in (ann, bob, bob2):
        await c.event("message")
    edited = (await ann.ok("msg.edit", message_id=msg["id"], text="secret!"))["message"]
    for c in (ann, bob, bob2):
        assert await c.event("message.edited") == edited
    # A DM of two other users does not exist for a third, whatever the grants.
    root = await admin(server, connect)
    for c in (carl, root):
        await c.error("msg.edit", "not_found", message_id=msg["id"], text="x")
        await c.error("msg.delete", "not_found", message_id=msg["id"])
    await carl.no_frame(0.05)
    await bob.ok("msg.delete", message_id=msg["id"])  # bob has msg:delete:any by default
    for c in (ann, bob, bob2):
        ev = await c.event("message.deleted")
        assert ev == {"id": msg["id"], "rev": ev["rev"], "room": None, "to": "bob", "by": "bob"}
    await carl.no_frame(0.05)
    assert (await ann.ok("dm.history"))["messages"] == []


# --- room.history ------------------------------------------------------------------------


async def test_room_history_paging_over_1200_messages() -> None:
    async with running_server(rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        other = await Client.connect(srv.port)
        try:
            await c.ok("login", user="ann")
            await other.ok("login", user="bob")
            await c.ok("room.create", room="big")
            await c.ok("room.create", room="noise")
            replies = await send_many(c, 1200, room="big")
            await send_many(c, 5, room="noise")
            all_ids = [r["data"]["message"]["id"] for r in replies]
            assert all_ids == sorted(all_ids) and len(set(all_ids)) == 1200

            async def page(**kw: Any) -> tuple[list[int], bool]:
                data = await other.ok("room.history", room="big", **kw)
                return ids(data["messages"]), data["more"]

            assert await page() == (all_ids[-50:], True)  # default limit 50, newest
            assert await page(limit=500) == (all_ids[-500:], True)
            assert await page(limit=501) == (all_ids[-500:], True)  # clamped
            assert await page(limit=10**6) == (all_ids[-500:], True)
            assert await page(limit=1200) == (all_ids[-500:], True)
            assert await page(before=all_ids[100], limit=50) == (all_ids[50:100], True)
            assert await page(before=all_ids[30], limit=50) == (all_ids[:30], False)
            assert await page(before=all_ids[50], limit=50) == (all_ids[:50], False)
            assert await page(after=all_ids[1100], limit=50) == (all_ids[1101:1151], True)
            assert await page(after=all_ids[1150], limit=100) == (all_ids[1151:], False)
            assert await page(after=all_ids[1148], limit=51) == (all_ids[1149:], False)
            assert await page(after=0, limit=3) == (all_ids[:3], True)
            assert await page(after=all_ids[10], before=all_ids[20], limit=5) == (
                all_ids[11:16], True,
            )
            assert await page(after=all_ids[10], before=all_ids[20], limit=9) == (
                all_ids[11:20], False,
            )
            assert await page(after=all_ids[10], before=all_ids[11]) == ([], False)
            assert await page(before=all_ids[0]) == ([], False)
            assert await page(after=all_ids[-1]) == ([], False)
            for bad in (0, -1, "5"):
                await other.error("room.history", "bad_request", room="big", limit=bad)
            await other.error("room.history", "bad_request", room="big", before=-3)
            await other.error("room.history", "not_found", room="nowhere")
            # Walking back with `before` and forward with `after` sees every message once.
            seen: list[int] = []
            cursor: dict[str, Any] = {}
            while True:
                got, more = await page(limit=500, **cursor)
                seen = got + seen
                if not more:
                    break
                cursor = {"before": got[0]}
            assert seen == all_ids
            seen, cursor = [], {"after": 0}
            while True:
                got, more = await page(limit=333, **cursor)
                seen += got
                if not more:
                    break
                cursor = {"after": got[-1]}
            assert seen == all_ids
        finally:
            await c.close()
            await other.close()


# --- nonces --------------------------------------------------------------------------------


async def test_a_repeated_nonce_returns_the_original_without_posting_again(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    first = (await ann.ok("msg.send", room="dev", text="once", nonce="n-1"))["message"]
    again = (await ann.ok("msg.send", room="dev", text="once", nonce="n-1"))["message"]
    assert again == first
    assert await bob.event("message") == first
    await bob.no_frame()
    # Another user may use the same nonce: it is per user.
    other = (await bob.ok("msg.send", room="dev", text="mine", nonce="n-1"))["message"]
    assert other["id"] != first["id"]
    assert ids((await bob.ok("room.history", room="dev"))["messages"]) == [first["id"], other["id"]]


async def test_a_nonce_retry_before_rejoining_is_answered_with_the_original(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await bob.ok("room.create", room="dev")
    await ann.ok("room.join", room="dev")
    first = (await ann.ok("msg.send", room="dev", text="did it go?", nonce="retry-7"))["message"]
    await ann.close()  # the connection drops before the client saw the reply
    await bob.event("message")
    await bob.event("member.left")
    again = await connect()
    await again.ok("auth", token=ann.token)
    data = await again.ok("msg.send", room="dev", text="did it go?", nonce="retry-7")
    assert data["message"] == first
    await bob.no_frame()
    await again.error("msg.send", "forbidden", room="dev", text="new", nonce="retry-8")
    # Pipelined duplicates in flight together still post once.
    await again.ok("room.join", room="dev")
    await bob.event("member.joined")
    frames = b"".join(
        json.dumps({"cmd": "msg.send", "id": i, "room": "dev", "text": "dup", "nonce": "p"}).encode()
        + b"\n"
        for i in range(5)
    )
    await again.send_raw(frames)
    got = [await again.reply(i) for i in range(5)]
    assert len({g["data"]["message"]["id"] for g in got}) == 1
    await bob.event("message")
    await bob.no_frame()
    history = (await bob.ok("room.history", room="dev"))["messages"]
    assert [m["text"] for m in history] == ["did it go?", "dup"]


async def test_a_nonce_retry_to_a_dm_is_answered_with_the_original(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    first = (await ann.ok("msg.send", to="bob", text="hi", nonce="dm-1"))["message"]
    assert (await ann.ok("msg.send", to="bob", text="hi", nonce="dm-1"))["message"] == first
    await bob.event("message")
    await bob.no_frame()


# --- load -------------------------------------------------------------------------------


async def _read_until(c: Client, want_messages: int, want_replies: int) -> tuple[list[int], int]:
    msgs: list[int] = []
    replies = 0
    while len(msgs) < want_messages or replies < want_replies:
        line = await c.reader.readline()  # the caller bounds the whole wait
        assert line, "connection closed"
        f = json.loads(line)
        if f["type"] == "event":
            if f["event"] == "message":
                msgs.append(f["data"]["id"])
        else:
            assert f["type"] == "ok", f
            replies += 1
    return msgs, replies


async def test_200_clients_each_sending_10_get_all_2000_messages_in_order() -> None:
    n, per = 200, 10
    async with running_server(rate_limit=0) as srv:
        clients = [await Client.connect(srv.port) for _ in range(n)]
        try:
            await clients[0].ok("login", user="u0")
            await clients[0].ok("room.create", room="crowd")
            for i, c in enumerate(clients[1:], 1):
                await c.ok("login", user=f"u{i}")
                await c.ok("room.join", room="crowd")
            batch = [
                b"".join(
                    json.dumps({"cmd": "msg.send", "room": "crowd", "text": f"{i}:{k}"}).encode()
                    + b"\n"
                    for k in range(per)
                )
                for i in range(n)
            ]
            for c, frames in zip(clients, batch, strict=True):
                c.writer.write(frames)
            await asyncio.gather(*(c.writer.drain() for c in clients))
            results = await asyncio.wait_for(
                asyncio.gather(*(_read_until(c, n * per, per) for c in clients)), 60
            )
            first = results[0][0]
            assert len(first) == n * per and first == sorted(first)
            assert len(set(first)) == n * per
            for msgs, replies in results:
                assert msgs == first and replies == per
            await asyncio.gather(*(c.no_frame(0.05) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_room_delete_while_messages_are_in_flight() -> None:
    async with running_server(rate_limit=0) as srv:
        owner = await Client.connect(srv.port)
        senders = [await Client.connect(srv.port) for _ in range(20)]
        try:
            await owner.ok("login", user="owner")
            await owner.ok("room.create", room="doomed")
            for i, c in enumerate(senders):
                await c.ok("login", user=f"s{i}")
                await c.ok("room.join", room="doomed")
            for c in senders:
                c.writer.write(
                    b"".join(
                        json.dumps(
                            {"cmd": "msg.send", "id": k, "room": "doomed", "text": f"x{k}"}
                        ).encode()
                        + b"\n"
                        for k in range(50)
                    )
                )
            owner.writer.write(b'{"cmd":"room.delete","id":"del","room":"doomed"}\n')
            await asyncio.gather(*(c.writer.drain() for c in [*senders, owner]))

            async def watch(c: Client, replies_wanted: int) -> None:
                closed = False
                codes: set[str] = set()
                replies = 0
                while not closed or replies < replies_wanted:
                    f = await c.recv(TIMEOUT)
                    if f["type"] == "event":
                        if f["event"] == "room.closed":
                            assert not closed
                            closed = True
                        elif f["event"] == "message":
                            assert not closed, "a message after room.closed"
                    else:
                        replies += 1
                        codes.add(f["type"] if f["type"] == "ok" else f["code"])
                assert codes <= {"ok", "not_found"}, codes

            await asyncio.gather(watch(owner, 1), *(watch(c, 50) for c in senders))
            assert (await owner.ok("room.list"))["rooms"] == []
            await owner.error("room.history", "not_found", room="doomed")
            assert await senders[0].ok("ping") == {"pong": True}
        finally:
            for c in [owner, *senders]:
                await c.close()


async def _revisions_seen(obs: Client, count: int) -> list[int]:
    revs: list[int] = []
    while len(revs) < count:
        frame = await obs.recv()
        if frame.get("event") in ("message", "message.edited", "message.deleted"):
            revs.append(frame["data"]["rev"])
    return revs


async def test_events_arrive_in_revision_order_while_edits_and_sends_interleave() -> None:
    """Contract: each connection receives message events in revision order, also when
    edits (which look the message up first) and pipelined sends share group commits."""
    async with running_server(rate_limit=0) as srv:
        obs = await Client.connect(srv.port)
        editors = [await Client.connect(srv.port) for _ in range(4)]
        senders = [await Client.connect(srv.port) for _ in range(4)]
        everyone = [obs, *editors, *senders]
        try:
            await obs.guest("observer")
            await obs.ok("room.create", room="order")
            for i, c in enumerate(editors + senders):
                await c.guest(f"user{i}")
                await c.ok("room.join", room="order")
            edits = 40
            ids = [(await e.ok("msg.send", room="order", text="edit me"))["message"]["id"] for e in editors]

            async def edit_loop(e: Client, mid: int) -> None:
                for i in range(edits):
                    await e.ok("msg.edit", message_id=mid, text=f"edit {i}")

            sends = 100

            async def pipeline(c: Client) -> None:
                for _ in range(4):
                    await c.send_raw(b"".join(
                        json.dumps({"cmd": "msg.send", "room": "order", "text": f"s{i}"}).encode()
                        + b"\n"
                        for i in range(sends // 4)
                    ))  # fmt: skip
                    await asyncio.sleep(0.002)

            await asyncio.gather(
                *(edit_loop(e, mid) for e, mid in zip(editors, ids, strict=True)),
                *(pipeline(c) for c in senders),
            )
            total = len(editors) * (1 + edits) + len(senders) * sends
            revs = await _revisions_seen(obs, total)
            assert revs == sorted(revs) and len(set(revs)) == len(revs)
        finally:
            for c in everyone:
                await c.close()


async def test_a_slow_failing_nonce_send_does_not_hold_back_others_events() -> None:
    """A send that fails and looks its nonce up in the store must not delay the events
    of the sends pipelined behind it, seen by others, past newer revisions."""
    async with running_server(rate_limit=0) as srv:
        obs = await Client.connect(srv.port)
        a = await Client.connect(srv.port)
        b = await Client.connect(srv.port)
        try:
            await obs.guest("watcher")
            await obs.ok("room.create", room="main")
            await obs.ok("room.create", room="closed")  # `a` is not a member of it
            for c, name in ((a, "ann"), (b, "ben")):
                await c.guest(name)
                await c.ok("room.join", room="main")
            await a.ok("room.leave", room="closed")
            rounds = 150
            a_frames = b"".join(
                json.dumps({"cmd": "msg.send", "room": "closed", "text": "x", "nonce": f"n{i}"}).encode()
                + b"\n"
                + json.dumps({"cmd": "msg.send", "room": "main", "text": f"a{i}"}).encode()
                + b"\n"
                for i in range(rounds)
            )
            b_frames = b"".join(
                json.dumps({"cmd": "msg.send", "room": "main", "text": f"b{i}"}).encode() + b"\n"
                for i in range(rounds)
            )
            await asyncio.gather(a.send_raw(a_frames), b.send_raw(b_frames))
            revs = await _revisions_seen(obs, 2 * rounds)
            assert revs == sorted(revs)
        finally:
            for c in (obs, a, b):
                await c.close()


async def test_the_next_holder_of_a_guest_name_sees_none_of_the_former_holders_dms(
    connect: Connect,
) -> None:
    alice = await guest(connect, "alice")
    bob = await guest(connect, "bob")
    secret = (await alice.ok("msg.send", to="bob", text="for the first bob"))["message"]
    await bob.event("message")
    await bob.ok("logout")
    await bob.close()
    impostor = await guest(connect, "bob")
    # alice is a guest it never wrote to: not someone it has DMs with (contract).
    await impostor.error("dm.history", "not_found", **{"with": "alice"})
    assert (await impostor.ok("dm.history"))["messages"] == []
    assert (await impostor.ok("sync", since=0))["changes"] == []
    await impostor.error("msg.delete", "not_found", message_id=secret["id"])
    await impostor.error("msg.edit", "not_found", message_id=secret["id"], text="mine now")
    # alice still has her side of it, under the name it was sent to.
    mine = (await alice.ok("dm.history", **{"with": "bob"}))["messages"]
    assert [m["text"] for m in mine] == ["for the first bob"]
    # A new DM to the name reaches the new holder only.
    await alice.ok("msg.send", to="bob", text="for the second bob")
    assert (await impostor.event("message"))["text"] == "for the second bob"
