"""Recovery after a disconnect, revision order and persistence (wire contract, "Revisions")."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import Client, advance, running_server

Connect = Callable[[], Awaitable[Client]]


async def guest(connect: Connect, name: str, **login: Any) -> Client:
    c = await connect()
    data = await c.ok("login", user=name, **login)
    c.token = data["token"]
    return c


def revs(changes: list[dict[str, Any]]) -> list[int]:
    return [m["rev"] for m in changes]


async def test_sync_returns_what_was_missed_once_in_revision_order(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await bob.ok("room.create", room="dev")
    await bob.ok("room.create", room="elsewhere")
    await ann.ok("room.join", room="dev")
    old1 = (await ann.ok("msg.send", room="dev", text="old one"))["message"]
    old2 = (await ann.ok("msg.send", room="dev", text="old two"))["message"]
    seen = old2["rev"]  # the highest rev ann has seen
    token = ann.token
    await ann.close()
    new1 = (await bob.ok("msg.send", room="dev", text="while you were out"))["message"]
    await bob.ok("msg.send", room="elsewhere", text="not ann's room")
    await bob.ok("msg.edit", message_id=old1["id"], text="old one, edited")
    edited = (await bob.ok("msg.edit", message_id=old1["id"], text="old one, edited twice"))[
        "message"
    ]
    await bob.ok("msg.delete", message_id=old2["id"])
    dm = (await bob.ok("msg.send", to="ann", text="call me"))["message"]
    await bob.ok("msg.send", to="bob", text="bob's own note")
    gone = (await bob.ok("msg.send", room="dev", text="blink"))["message"]
    await bob.ok("msg.delete", message_id=gone["id"])
    back = await connect()
    await back.ok("auth", token=token)
    await back.ok("room.join", room="dev")
    data = await back.ok("sync", since=seen)
    changes = data["changes"]
    assert data["more"] is False
    assert data["rev"] == back.hello["data"]["rev"]  # the store's current revision
    assert revs(changes) == sorted(revs(changes)) and min(revs(changes)) > seen
    by_id = {m["id"]: m for m in changes}
    assert len(by_id) == len(changes) == 5  # each changed message once
    assert by_id[new1["id"]] == new1
    assert by_id[old1["id"]] == edited
    assert by_id[old2["id"]]["deleted"] is True and by_id[old2["id"]]["text"] == ""
    assert by_id[dm["id"]] == dm
    assert by_id[gone["id"]]["deleted"] is True
    # Tombstones are for sync only, never for history.
    history = (await back.ok("room.history", room="dev"))["messages"]
    assert [m["id"] for m in history] == [old1["id"], new1["id"]]
    # Nothing new since the returned cursor.
    assert await back.ok("sync", since=data["rev"]) == {
        "changes": [], "rev": data["rev"], "more": False,
    }


async def test_sync_covers_only_rooms_the_connection_is_in_now(connect) -> None:
    ann = await guest(connect, "ann")
    bob = await guest(connect, "bob")
    await bob.ok("room.create", room="dev")
    m = (await bob.ok("msg.send", room="dev", text="x"))["message"]
    data = await ann.ok("sync", since=0)
    assert data["changes"] == [] and data["more"] is False
    # The cursor still moves to the store's revision, past changes ann cannot see.
    assert data["rev"] == m["rev"]
    await ann.ok("room.join", room="dev")
    assert (await ann.ok("sync", since=0))["changes"] == [m]
    await ann.ok("room.leave", room="dev")
    assert (await ann.ok("sync", since=0))["changes"] == []


async def test_sync_pages_with_more_and_the_last_rev_as_cursor() -> None:
    async with running_server(rate_limit=0) as srv:
        ann = await Client.connect(srv.port)
        try:
            await ann.ok("login", user="ann")
            await ann.ok("room.create", room="dev")
            start = ann.hello["data"]["rev"]
            sent = []
            for i in range(25):
                sent.append((await ann.ok("msg.send", room="dev", text=f"m{i}"))["message"])
            for m in sent[:5]:
                await ann.ok("msg.edit", message_id=m["id"], text="edited")
            await ann.ok("msg.delete", message_id=sent[5]["id"])
            got: list[dict[str, Any]] = []
            cursor = start
            pages = 0
            while True:
                data = await ann.ok("sync", since=cursor, limit=10)
                pages += 1
                got += data["changes"]
                if data["more"]:
                    assert data["rev"] == data["changes"][-1]["rev"]
                else:
                    break
                cursor = data["rev"]
            assert pages == 3
            assert revs(got) == sorted(set(revs(got)))
            assert sorted(m["id"] for m in got) == sorted(m["id"] for m in sent)
            assert data["rev"] == max(revs(got))
            full = await ann.ok("sync", since=start, limit=1000)  # clamped to 500
            assert full["changes"] == got and full["more"] is False
            await ann.error("sync", "bad_request", since=0, limit=0)
            await ann.error("sync", "bad_request")
            await ann.error("sync", "bad_request", since="1")
        finally:
            await ann.close()


async def test_hello_rev_is_the_store_revision(connect) -> None:
    ann = await guest(connect, "ann")
    assert ann.hello["data"]["rev"] == 0
    await ann.ok("room.create", room="dev")
    m = (await ann.ok("msg.send", room="dev", text="x"))["message"]
    e = (await ann.ok("msg.edit", message_id=m["id"], text="y"))["message"]
    assert e["rev"] == m["rev"] + 1
    late = await connect()
    assert late.hello["data"]["rev"] == e["rev"]
    assert late.hello["data"]["epoch"] == ann.hello["data"]["epoch"]


async def test_each_connection_gets_message_events_in_revision_order() -> None:
    """An edit needs a lookup before its write, so a send pipelined behind it can commit
    first; neither connection may then see the revisions out of order."""
    async with running_server(rate_limit=0) as srv:
        ann = await Client.connect(srv.port)
        bob = await Client.connect(srv.port)
        try:
            await _revision_order(ann, bob)
        finally:
            await ann.close()
            await bob.close()


async def _revision_order(ann: Client, bob: Client) -> None:
    await ann.ok("login", user="ann")
    await bob.ok("login", user="bob")
    await ann.ok("room.create", room="dev")
    await bob.ok("room.join", room="dev")
    target = (await ann.ok("msg.send", room="dev", text="t"))["message"]
    frames: list[dict[str, Any]] = []
    for i in range(20):
        frames.append({"cmd": "msg.edit", "id": f"e{i}", "message_id": target["id"], "text": f"v{i}"})
        frames.append({"cmd": "msg.send", "id": f"s{i}", "room": "dev", "text": f"s{i}"})
    frames.append({"cmd": "msg.delete", "id": "d", "message_id": target["id"]})
    frames.append({"cmd": "msg.send", "id": "last", "room": "dev", "text": "last"})
    await ann.send_raw(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
    for c, expect in ((ann, 1 + 41 + 1), (bob, 1 + 41 + 1)):
        events: list[int] = []
        replies: list[str] = []
        while len(events) < expect or (c is ann and replies[-1:] != ["last"]):
            f = await c.recv()
            if f["type"] == "event":
                if f["event"].startswith("message"):
                    events.append(f["data"]["rev"])
            else:
                assert f["type"] == "ok", f
                replies.append(f["id"])
        assert events == sorted(events), events
        if c is ann:
            assert replies == [f["id"] for f in frames]


async def test_rooms_history_and_dms_survive_a_restart(tmp_path) -> None:
    db = str(tmp_path / "c.db")
    async with running_server(db=db, rate_limit=0) as srv:
        reg = await Client.connect(srv.port)
        await reg.ok("register", user="Reggie", password="password123")
        await reg.ok("register", user="Olive", password="password123")
        await reg.ok("login", user="Reggie", password="password123")
        await reg.ok("room.create", room="Keep", topic="stays", open=True)
        await reg.ok("room.create", room="tmp", ephemeral=True)
        sent = [(await reg.ok("msg.send", room="keep", text=f"k{i}"))["message"] for i in range(5)]
        dm = (await reg.ok("msg.send", to="olive", text="for later", nonce="n1"))["message"]
        await reg.ok("msg.edit", message_id=sent[0]["id"], text="k0 edited")
        deleted = (await reg.ok("msg.send", room="keep", text="newest, deleted"))["message"]
        await reg.ok("msg.delete", message_id=deleted["id"])
        before = await reg.ok("room.history", room="keep")
        epoch = reg.hello["data"]["epoch"]
        last_rev = srv.store.rev
        await reg.close()
    async with running_server(db=db, rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        try:
            assert c.hello["data"]["epoch"] == epoch
            assert c.hello["data"]["rev"] == last_rev == srv.store.rev
            await c.ok("login", user="olive", password="password123")
            rooms = (await c.ok("room.list"))["rooms"]
            assert [(r["name"], r["topic"], r["owner"], r["open"], r["members"]) for r in rooms] == [
                ("Keep", "stays", "Reggie", True, 0)
            ]  # the ephemeral room went at start
            assert await c.ok("room.history", room="keep") == before
            assert (await c.ok("dm.history", **{"with": "reggie"}))["messages"] == [dm]
            new = (await c.ok("msg.send", room="keep", text="after restart"))["message"]
            assert new["id"] > deleted["id"] and new["rev"] > last_rev
            r = await Client.connect(srv.port)
            await r.ok("login", user="reggie", password="password123")
            # A nonce used before the restart still answers with the original.
            assert (await r.ok("msg.send", to="olive", text="for later", nonce="n1"))[
                "message"
            ] == dm
            await r.close()
        finally:
            await c.close()
    async with running_server() as srv:  # a fresh :memory: store is a new epoch
        c = await Client.connect(srv.port)
        assert c.hello["data"]["epoch"] != epoch and c.hello["data"]["rev"] == 0
        await c.close()


# --- the other live events -------------------------------------------------------------


@pytest.mark.fake_clock
async def test_session_expiring_then_expired_and_member_left(server, connect) -> None:
    ann = await guest(connect, "ann")
    short = await guest(connect, "short", ttl=1)
    await ann.ok("room.create", room="dev")
    await short.ok("room.join", room="dev")
    await ann.event("member.joined")
    expiring = await short.event("session.expiring")
    assert list(expiring) == ["expires_at"] and isinstance(expiring["expires_at"], int)
    await short.no_frame(0.05)  # not expired before its time
    await advance(server, expiring["expires_at"] - server.clock.now())
    assert await short.event("session.expired") == {}
    assert await ann.event("member.left") == {"room": "dev", "user": "short", "reason": "expired"}
    await short.error("whoami", "unauthorized")
    await short.no_frame(0.05)  # session.expiring came once


async def test_logout_all_expires_the_users_other_connections(connect) -> None:
    ann = await guest(connect, "ann")
    reg = await connect()
    await reg.ok("register", user="reg", password="password123")
    await reg.ok("login", user="reg", password="password123")
    other = await connect()
    await other.ok("login", user="reg", password="password123")
    await ann.ok("room.create", room="dev")
    await other.ok("room.join", room="dev")
    await ann.event("member.joined")
    assert await reg.ok("logout", all=True) == {}
    assert await other.event("session.expired") == {"reason": "logout"}
    assert await ann.event("member.left") == {"room": "dev", "user": "reg", "reason": "logout"}
    await other.error("whoami", "unauthorized")


async def test_deleted_account_leaves_its_rooms_with_reason_deleted(server, connect) -> None:
    pw = "admin-password"
    rec = await server.store.create_user("root", await server.app.hasher.hash(pw), True)
    assert rec is not None
    await server.app.refresh_user("root")
    root = await connect()
    await root.ok("login", user="root", password=pw)
    victim = await connect()
    await victim.ok("register", user="vic", password="password123")
    await victim.ok("login", user="vic", password="password123")
    await root.ok("room.create", room="dev")
    await victim.ok("room.join", room="dev")
    await root.event("member.joined")
    await root.ok("user.delete", user="vic")
    assert await root.event("member.left") == {"room": "dev", "user": "vic", "reason": "deleted"}
    assert (await root.ok("room.members", room="dev"))["members"] == ["root"]


async def test_server_shutdown_is_sent_to_every_connection() -> None:
    async with running_server() as srv:
        a = await Client.connect(srv.port)
        b = await Client.connect(srv.port)
        await a.ok("login", user="ann")
        await srv.stop("maintenance")
        for c in (a, b):
            ev = await c.event("server.shutdown")
            assert ev == {"reason": "maintenance"}
            await c.close()


async def test_a_connection_that_does_not_read_is_dropped() -> None:
    """slow_consumer is best effort: the kernel buffer is full when the drop happens, so the
    test checks the drop, and that a notice, when it got through, is the last frame."""
    async with running_server(rate_limit=0, outbox_soft=16 * 1024, outbox_low=4 * 1024,
                              outbox_hard=64 * 1024) as srv:
        talker = await Client.connect(srv.port)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", srv.port))
        try:
            await talker.ok("login", user="talker")
            await talker.ok("room.create", room="dev", open=True)
            await talker.ok("room.leave", room="dev")  # the talker does not hear itself
            sock.sendall(b'{"cmd":"login","user":"sleeper"}\n{"cmd":"room.join","room":"dev"}\n')
            room = srv.app.rooms.get("dev")
            for _ in range(250):
                if room.sessions:
                    break
                await asyncio.sleep(0.02)
            assert room.sessions
            big = "x" * 4000
            for _ in range(100):
                await send_burst(talker, big, 20)
                if not room.sessions:
                    break
            assert not room.sessions, "the sleeper was never dropped"
            assert (await talker.ok("room.members", room="dev"))["members"] == []
            data = b""
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
                    data += chunk
            except ConnectionResetError:
                pass
            if b"slow_consumer" in data:
                assert data.rstrip(b"\n").endswith(b'{"type":"event","event":"slow_consumer","data":{}}')
        finally:
            await talker.close()
            sock.close()


async def send_burst(c: Client, text: str, n: int) -> None:
    frames = b"".join(
        json.dumps({"cmd": "msg.send", "id": i, "room": "dev", "text": text}).encode() + b"\n"
        for i in range(n)
    )
    await c.send_raw(frames)
    for i in range(n):
        assert (await c.reply(i))["type"] == "ok"
