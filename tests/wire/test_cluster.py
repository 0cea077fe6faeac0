"""Several `chatd serve --redis` processes on one real redis-server as one server (issue
11): users on different nodes chat, edit, delete, DM, see members and room events; two
nodes race on a room name and on sends (one revision order, sync exactly once); kill -9
of a node takes its members away within the TTL; Redis killed and restarted under load
loses no acknowledged message and reconnecting clients see every change once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Client, clients
from tests.process import Served, chatd_serving
from tests.redisutil import RedisServer

pytestmark = pytest.mark.one_node("starts its own node processes on its own Redis")

SECRET = "a-secret-shared-by-every-node-0123456789"
PASSWORD = "correct horse battery"


@contextlib.asynccontextmanager
async def nodes(url: str, n: int = 2, *extra: str) -> AsyncIterator[list[Served]]:
    async with contextlib.AsyncExitStack() as stack:
        served = []
        for _ in range(n):
            args = ("serve", "--redis", url, "--port", "0", "--secret", SECRET, *extra)
            served.append(await stack.enter_async_context(chatd_serving(*args)))
        yield served


async def user(c: Client, name: str, *, register: bool = True) -> None:
    if register:
        await c.ok("register", user=name, password=PASSWORD)
        c.token = (await c.ok("login", user=name, password=PASSWORD))["token"]
    else:
        c.token = (await c.ok("login", user=name))["token"]


async def test_users_on_two_nodes_chat_edit_delete_dm_and_see_each_other(redis_url: str) -> None:
    async with nodes(redis_url) as (n1, n2), clients(n1.port, n2.port, n2.port) as (a, b, b2):
        await user(a, "Ann")
        await user(b, "Bob")
        await b2.ok("auth", token=b.token)
        await a.ok("room.create", room="dev", topic="t0")
        joined = await b.ok("room.join", room="dev")
        assert joined["members"] == ["Ann", "Bob"]
        assert (await a.event("member.joined")) == {"room": "dev", "user": "Bob"}
        assert (await a.ok("room.members", room="dev"))["members"] == ["Ann", "Bob"]
        await b2.ok("room.join", room="dev")  # Bob's second connection: nobody new
        sent = (await a.ok("msg.send", room="dev", text="hello"))["message"]
        for c in (a, b, b2):
            assert (await c.event("message")) == sent
        edited = (await a.ok("msg.edit", message_id=sent["id"], text="hello!"))["message"]
        assert (await b.event("message.edited")) == edited
        await a.ok("msg.delete", message_id=sent["id"])
        gone = await b.event("message.deleted")
        assert gone == {"id": sent["id"], "rev": edited["rev"] + 1, "room": "dev", "to": None,
                        "by": "Ann"}  # fmt: skip
        dm = (await b.ok("msg.send", to="ann", text="psst"))["message"]
        assert (await a.event("message")) == dm
        assert (await b2.event("message")) == dm  # the sender's other connection
        names = [x["name"] for x in (await b.ok("channels"))["channels"]]
        assert names == ["dev", "Ann", "Bob"]
        await a.ok("room.edit", room="dev", topic="t1", name="Dev2")
        await a.event("room.updated")
        upd = await b.event("room.updated")
        assert upd["name"] == "Dev2" and upd["topic"] == "t1" and upd["previous_name"] == "dev"
        assert (await b.ok("room.members", room="Dev2"))["members"] == ["Ann", "Bob"]
        await b.ok("room.leave", room="Dev2")
        await a.no_frame(0.3)  # Bob is still in through b2
        await b2.ok("room.leave", room="Dev2")
        left = await a.event("member.left")
        assert left == {"room": "Dev2", "user": "Bob", "reason": "left"}
        await b.ok("room.join", room="Dev2")
        await a.event("member.joined")
        await a.ok("room.delete", room="Dev2")
        assert (await b.event("room.closed")) == {"room": "Dev2", "by": "Ann"}
        assert (await b.ok("room.list"))["rooms"] == []
        # Accounts: a logout all on one node ends the sessions on the other.
        await a.ok("logout", all=True)
        c = await Client.connect(n2.port)
        try:
            await c.error("auth", "unauthorized", token=a.token)
        finally:
            await c.close()


async def test_names_are_one_namespace_across_nodes(redis_url: str) -> None:
    async with nodes(redis_url) as (n1, n2), clients(n1.port, n2.port, n2.port) as (a, b, c):
        await user(a, "Guesty", register=False)
        await b.error("login", "conflict", user="guesty")  # a guest's name, held on node 1
        await b.error("register", "conflict", user="GUESTY", password=PASSWORD)
        await user(c, "Carl")
        await a.error("register", "conflict", user="carl", password=PASSWORD)
        # A nonce retry on the other node answers with the same message.
        await a.ok("room.create", room="r", open=True)
        first = (await a.ok("msg.send", room="r", text="once", nonce="n-1"))["message"]
        d = await Client.connect(n2.port)
        try:
            await d.ok("auth", token=a.token)
            again = (await d.ok("msg.send", room="r", text="once", nonce="n-1"))["message"]
            assert again == first
        finally:
            await d.close()


async def test_two_nodes_race_on_a_room_name_and_on_sends(redis_url: str) -> None:
    async with nodes(redis_url) as (n1, n2):
        ports = [n1.port, n2.port] * 4
        async with clients(*ports) as cs:
            for i, c in enumerate(cs):
                await user(c, f"u{i}", register=False)
            answers = await asyncio.gather(*(c.call("room.create", room="Same") for c in cs))
            assert sorted(a["type"] for a in answers) == ["error"] * 7 + ["ok"]
            assert all(a["code"] == "conflict" for a in answers if a["type"] == "error")
            for c in cs:
                with contextlib.suppress(AssertionError):
                    await c.ok("room.join", room="Same")
            per_sender = 25

            async def burst(c: Client, i: int) -> list[int]:
                revs = []
                for k in range(per_sender):
                    m = (await c.ok("msg.send", room="Same", text=f"{i}.{k}"))["message"]
                    revs.append(m["rev"])
                return revs

            sent = await asyncio.gather(*(burst(c, i) for i, c in enumerate(cs)))
            total = per_sender * len(cs)
            all_revs = sorted(r for revs in sent for r in revs)
            assert all_revs == list(range(1, total + 1))  # one order, no gap
            for c in cs:  # every connection: every message once, in revision order
                seen = [e["data"]["rev"] for e in c.events if e["event"] == "message"]
                c.events.clear()
                while len(seen) < total:
                    ev = await c.recv()
                    if ev.get("event") == "message":
                        seen.append(ev["data"]["rev"])
                assert seen == list(range(1, total + 1))
            for c in cs[:2]:  # sync from either node: every change exactly once
                got: list[int] = []
                since = 0
                while True:
                    page = await c.ok("sync", since=since, limit=37)
                    got += [m["rev"] for m in page["changes"]]
                    since = page["rev"]
                    if not page["more"]:
                        break
                assert got == list(range(1, total + 1)) and since == total


async def test_a_killed_node_s_members_leave_within_the_ttl(redis_url: str) -> None:
    ttl = 1.0
    async with nodes(redis_url, 2, "--node-ttl", str(ttl)) as (n1, n2):
        async with clients(n1.port, n2.port) as (a, b):
            await user(a, "Ann", register=False)
            await user(b, "Bob", register=False)
            await b.ok("room.create", room="lobby")
            await a.ok("room.join", room="lobby")
            await a.ok("room.create", room="tmp", ephemeral=True)  # only Ann, on node 1
            await b.event("member.joined")
            assert "tmp" in [r["name"] for r in (await b.ok("room.list"))["rooms"]]
            n1.proc.kill()  # SIGKILL: no goodbye
            began = time.monotonic()
            left = await b.event("member.left", timeout=ttl * 4 + 3)
            took = time.monotonic() - began
            assert left == {"room": "lobby", "user": "Ann", "reason": "disconnected"}
            assert took < ttl + ttl / 3 + 1.5, took  # the TTL, one beat, and slack
            assert (await b.ok("room.members", room="lobby"))["members"] == ["Bob"]
            rooms = [r["name"] for r in (await b.ok("room.list"))["rooms"]]
            assert rooms == ["lobby"]  # the dead node keeps no ephemeral room alive


async def test_redis_killed_and_restarted_under_load_loses_no_acknowledged_message() -> None:
    redis_server = RedisServer(appendfsync="always").start()
    try:
        async with nodes(redis_server.url, 2, "--rate-limit", "0") as (n1, n2):
            await _restart_under_load(redis_server, [n1.port, n2.port])
    finally:
        redis_server.close()


async def _restart_under_load(redis_server: RedisServer, ports: list[int]) -> None:
    async with clients(*ports, ports[0]) as (a, b, q):
        await user(a, "Ann")
        await user(b, "Bob")
        await q.ok("auth", token=a.token)
        await a.ok("room.create", room="load")
        await b.ok("room.join", room="load")
        acked: dict[str, int] = {}  # nonce -> message id
        stop = asyncio.Event()

        async def writer(c: Client, who: str) -> None:
            k = 0
            while not stop.is_set() and k < 2_000:
                nonce = f"{who}-{k}"
                k += 1
                try:
                    reply = await c.call("msg.send", room="load", text=nonce, nonce=nonce)
                except (EOFError, ConnectionError, OSError):
                    return  # the node ended the connection (outage rule)
                if reply.get("type") == "ok":
                    acked[nonce] = reply["data"]["message"]["id"]
                else:
                    assert reply["code"] == "internal", reply  # Redis away: said at once
                    await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(writer(a, "a")), asyncio.create_task(writer(b, "b"))]
        await asyncio.sleep(0.5)
        before = len(acked)
        redis_server.stop(kill=True)
        began = time.monotonic()
        err = await q.call("room.history", room="load")
        assert err["type"] == "error" and time.monotonic() - began < 1.0  # at once, no hang
        assert (await q.ok("ping")) is not None  # the connection stays
        await asyncio.sleep(0.5)
        redis_server.start()
        # Each node ends its connections once Redis is back (protocol.md).
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        stop.set()
        shutdown = await q.event("server.shutdown", timeout=10)
        assert "reconnect" in shutdown["reason"]
        for c in (a, b):
            assert any(e["event"] == "server.shutdown" for e in c.events)
        assert before > 0
    # Reconnect: history and sync hold every acknowledged message exactly once.
    async with clients(*ports) as (c1, c2):
        for c in (c1, c2):
            await c.ok("login", user="Ann", password=PASSWORD)
            await c.ok("room.join", room="load")
            ids: list[int] = []
            page: dict[str, Any] = await c.ok("room.history", room="load", after=0, limit=500)
            while True:
                ids += [m["id"] for m in page["messages"]]
                if not page["more"]:
                    break
                page = await c.ok("room.history", room="load", after=ids[-1], limit=500)
            assert len(ids) == len(set(ids))
            assert set(acked.values()) <= set(ids)
            revs: list[int] = []
            since = 0
            while True:
                s = await c.ok("sync", since=since)
                revs += [m["rev"] for m in s["changes"]]
                since = s["rev"]
                if not s["more"]:
                    break
            assert revs == sorted(set(revs)) and len(revs) == len(ids)
        await c1.ok("msg.send", room="load", text="after")
        assert (await c2.event("message"))["text"] == "after"


async def test_a_node_s_own_change_reaches_the_caller_after_its_reply(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's reader may get a change from the stream before the node has handled
    the reply of the write that made it: the event still comes after the reply."""
    from chatd.server import ChatServer
    from chatd.store.redis.store import RedisStore
    from tests.helpers import SECRET as TEST_SECRET
    from tests.helpers import TEST_CONFIG

    server = ChatServer(TEST_CONFIG, RedisStore(redis_url), TEST_SECRET)
    await server.start()
    try:
        c = await Client.connect(server.port)
        try:
            await c.ok("login", user="ann")
            await c.ok("room.create", room="dev")
            slow_replies = RedisStore._receive_batch

            async def slow(self: RedisStore, *args: Any) -> Any:
                replies = await slow_replies(self, *args)
                await asyncio.sleep(0.3)  # the stream reader sees the change meanwhile
                return replies

            monkeypatch.setattr(RedisStore, "_receive_batch", slow)
            await c.send({"cmd": "msg.send", "id": "s", "room": "dev", "text": "hi"})
            first, second = await c.recv(), await c.recv()
            assert first["type"] == "ok" and first["id"] == "s", first
            assert second["event"] == "message" and second["data"] == first["data"]["message"]
        finally:
            await c.close()
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "kept", [None, 1, 0], ids=["nothing-trimmed", "trimmed-but-the-last", "all-trimmed"]
)
async def test_a_node_that_falls_behind_the_stream_cap_ends_its_connections(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, kept: int | None
) -> None:
    """Entries trimmed from the change stream before the node read them (it was further
    behind than the cap) are changes it missed: its clients get `server.shutdown`, and
    after they reconnect everything works. Entries it is merely late on are applied."""
    import redis.asyncio as aioredis

    from chatd.cluster import Cluster
    from chatd.server import ChatServer
    from chatd.store.redis.store import RedisStore
    from tests.helpers import SECRET as TEST_SECRET
    from tests.helpers import TEST_CONFIG

    open_gate, parked = asyncio.Event(), asyncio.Event()
    open_gate.set()
    read_batch = Cluster._read_batch

    async def paused(self: Cluster) -> Any:
        if not open_gate.is_set():
            parked.set()
            await asyncio.wait_for(open_gate.wait(), 20)
        return await read_batch(self)

    monkeypatch.setattr(Cluster, "_read_batch", paused)
    store = RedisStore(redis_url)
    server = ChatServer(TEST_CONFIG, store, TEST_SECRET)
    await server.start()
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with clients(server.port) as (c,):
            await user(c, "ann")
            await c.ok("room.create", room="dev")
            room_id = server.app.rooms.rooms["dev"].id
            await c.ok("msg.send", room="dev", text="seen")
            await c.event("message")
            open_gate.clear()  # the reader stalls ...
            await asyncio.wait_for(parked.wait(), 10)
            # ... while users of another node join, and the stream may be trimmed.
            stream = store.prefix + "changes"
            for name in ("Zed", "Yan"):
                await raw.xadd(stream, {"kind": "in", "room": str(room_id), "key": name.lower(),
                                        "name": name, "node": "elsewhere"})  # fmt: skip
            if kept is not None:
                await raw.xtrim(stream, maxlen=kept, approximate=False)
            open_gate.set()
            if kept is None:  # late, not lost: applied, nothing ends
                await c.ok("msg.send", room="dev", text="still here")
                await c.event("message")
                members = (await c.ok("room.members", room="dev"))["members"]
                assert members == ["ann", "Yan", "Zed"]
                assert [e for e in c.events if e["event"] == "server.shutdown"] == []
                return
            shutdown = await c.event("server.shutdown", timeout=10)
            assert "reconnect and sync" in shutdown["reason"]
        async with clients(server.port) as (c,):  # reconnects and goes on
            await c.ok("login", user="ann", password=PASSWORD)
            await c.ok("room.join", room="dev")
            await c.ok("msg.send", room="dev", text="after")
            assert (await c.event("message"))["text"] == "after"
            assert [e for e in c.events if e["event"] == "server.shutdown"] == []
    finally:
        await raw.aclose()
        await server.stop()
