"""Room membership across nodes behaves as on one server (issue 11): a user's first
connection into a room is announced once and its last one out once, whichever nodes its
connections are on and however they race; an ephemeral room closes only when nobody is in
it on any node, decided together with the joins; and a node that may have missed changes
(an outage, a stream gap) starts afresh from Redis. Two in-process nodes on one real
redis-server; a race is made certain by holding one node's stream reader, or tried many
times (bounded in count and time)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from chatd.cluster import Cluster
from chatd.server import ChatServer
from chatd.store.redis.store import RedisStore
from tests.helpers import SECRET, TEST_CONFIG, Client, clients
from tests.process import Served, chatd_serving
from tests.redisutil import RedisServer

pytestmark = pytest.mark.one_node("starts its own nodes on its own Redis")

ATTEMPTS = 12  # tries of a race that cannot be forced; each a few round trips
RACE_BUDGET = 30.0  # seconds: the tries stop early past this


@contextlib.asynccontextmanager
async def two_nodes(url: str, **config: Any) -> AsyncIterator[tuple[ChatServer, ChatServer]]:
    servers: list[ChatServer] = []
    try:
        for _ in range(2):
            server = ChatServer(TEST_CONFIG.replace(**config), RedisStore(url), SECRET)
            await server.start()
            servers.append(server)
        yield servers[0], servers[1]
    finally:
        for server in reversed(servers):
            await server.stop()


class Readers:
    """Holds a node's change-stream reader (it parks before its next read) and lets it
    go: what that node hears from the others waits meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._held: dict[Cluster, tuple[asyncio.Event, asyncio.Event]] = {}
        read_batch = Cluster._read_batch
        held = self._held

        async def gated(cluster: Cluster) -> Any:
            gate = held.get(cluster)
            if gate is not None:
                go, parked = gate
                parked.set()
                await asyncio.wait_for(go.wait(), 20)
            return await read_batch(cluster)

        monkeypatch.setattr(Cluster, "_read_batch", gated)

    async def hold(self, server: ChatServer) -> None:
        go, parked = asyncio.Event(), asyncio.Event()
        self._held[server.cluster] = (go, parked)
        await asyncio.wait_for(parked.wait(), 10)  # the read in flight has finished

    def release(self, server: ChatServer) -> None:
        go, _ = self._held.pop(server.cluster)
        go.set()


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = condition()
        if not isinstance(done, bool):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


async def departure_stored(server: ChatServer, room: str, key: str) -> None:
    """Until `server` has its user out of the room and Redis has it out on that node."""
    import redis.asyncio as aioredis

    live = server.app.rooms.get(room)
    raw = aioredis.Redis.from_url(server.store.url)
    try:
        await until(lambda: key not in live.users, f"{key} out of {room} on the node")
        field = f"{live.id}\n{key}"
        node_hash = f"{server.store.prefix}node:{server.cluster.node}:m"
        await until(lambda: _false(raw.hexists(node_hash, field)), f"{key}'s departure stored")
    finally:
        await raw.aclose()


async def _false(x: Awaitable[Any]) -> bool:
    return not await x


def named(events: list[dict[str, Any]], event: str, user: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event and e["data"]["user"] == user]


async def test_a_user_joining_a_room_on_two_nodes_at_once_is_announced_once(
    redis_url: str,
) -> None:
    async with two_nodes(redis_url) as (a, b), clients(a.port, a.port, b.port) as (o, u1, u2):
        await o.ok("login", user="Obs")
        token = (await u1.ok("login", user="Ula"))["token"]
        await u2.ok("auth", token=token)
        began = time.monotonic()
        for i in range(ATTEMPTS):
            room = f"r{i}"
            await o.ok("room.create", room=room)
            await asyncio.gather(u1.ok("room.join", room=room), u2.ok("room.join", room=room))
            # Its reply comes after every change made before it, on any node.
            assert (await o.ok("room.members", room=room))["members"] == ["Obs", "Ula"]
            joined = [e for e in named(o.events, "member.joined", "Ula") if e["data"]["room"] == room]
            assert len(joined) == 1, (room, joined)
            if time.monotonic() - began > RACE_BUDGET:
                break


async def test_a_join_s_member_list_agrees_with_the_arrivals_and_departures_told_after_it(
    redis_url: str,
) -> None:
    """On one server a joiner's member list and the events it gets after are one story:
    a user in the list is not announced as arriving, one not in it not as leaving. So
    here, with the other user's join or leave racing on the same node and on the other."""
    async with two_nodes(redis_url) as (a, b), clients(a.port, a.port, b.port) as (o, u, w):
        await o.ok("login", user="Obs")
        await u.ok("login", user="Ula")
        await w.ok("login", user="Wes")
        began = time.monotonic()
        for i in range(ATTEMPTS):
            room = f"m{i}"
            await w.ok("room.create", room=room)
            await u.ok("room.join", room=room)
            await w.ok("room.members", room=room)
            joined, _, _ = await asyncio.gather(
                o.ok("room.join", room=room),
                u.ok("room.leave", room=room),  # on o's node
                w.ok("room.leave", room=room),  # on the other
            )
            await o.ok("room.members", room=room)  # every event of the race is in by now
            for user in ("Ula", "Wes"):
                left = [e for e in named(o.events, "member.left", user) if e["data"]["room"] == room]
                assert len(left) == (1 if user in joined["members"] else 0), (room, user, joined, left)
            await o.ok("room.leave", room=room)
            if time.monotonic() - began > RACE_BUDGET:
                break


async def test_an_ephemeral_room_left_on_one_node_while_joined_on_another_closes_only_if_empty(
    redis_url: str,
) -> None:
    """Either the join came first (the room stays, with its new member, who is never told
    it closed), or the leave did (the room is gone and the join says `not_found`)."""
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, v):
        await u.ok("login", user="Ula")
        await v.ok("login", user="Vic")
        outcomes = set()
        began = time.monotonic()
        for i in range(ATTEMPTS):
            room = f"e{i}"
            await u.ok("room.create", room=room, ephemeral=True)
            _, joined = await asyncio.gather(
                u.ok("room.leave", room=room), v.call("room.join", room=room)
            )
            rooms_b = [r["name"] for r in (await v.ok("room.list"))["rooms"]]
            rooms_a = [r["name"] for r in (await u.ok("room.list"))["rooms"]]
            if joined["type"] == "ok":
                outcomes.add("joined first")
                assert room in rooms_a and room in rooms_b
                assert (await v.ok("room.members", room=room))["members"] == ["Vic"]
                assert [e for e in v.events if e["event"] == "room.closed"] == []
                await v.ok("room.leave", room=room)  # now it goes: empty everywhere
                await v.error("room.join", "not_found", room=room)
            else:
                outcomes.add("left first")
                assert joined["code"] == "not_found", joined
                assert room not in rooms_a and room not in rooms_b
            if time.monotonic() - began > RACE_BUDGET:
                break
        assert outcomes  # (which one won each time is the race's)


async def test_a_close_while_the_user_is_in_on_another_node_is_not_a_departure(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port, b.port) as (u1, u2, o):
        token = (await u1.ok("login", user="Ula"))["token"]
        await u2.ok("auth", token=token)
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u1.ok("room.join", room="dev")
        await readers.hold(a)  # node a has not heard of Ula's second connection ...
        await u2.ok("room.join", room="dev")
        await u1.close()  # ... when her first one closes there
        await departure_stored(a, "dev", "ula")  # written before a hears of her on b
        readers.release(a)
        assert (await o.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]
        assert named(o.events, "member.left", "Ula") == []
        assert (await u2.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]
        c = await Client.connect(a.port)  # node a agrees
        try:
            await c.ok("login", user="Cid")
            assert (await c.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]
        finally:
            await c.close()


async def test_the_last_connection_out_on_any_node_is_the_departure_even_if_racing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port, b.port) as (u1, u2, o):
        token = (await u1.ok("login", user="Ula"))["token"]
        await u2.ok("auth", token=token)
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u1.ok("room.join", room="dev")
        await u2.ok("room.join", room="dev")
        await o.ok("room.members", room="dev")
        await readers.hold(a)  # node a has not heard that Ula left on b ...
        await u2.ok("room.leave", room="dev")
        await u1.close()  # ... when her last connection closes there
        await departure_stored(a, "dev", "ula")  # written before a hears she left on b
        readers.release(a)
        left = await o.event("member.left")
        assert left == {"room": "dev", "user": "Ula", "reason": "disconnected"}
        assert (await o.ok("room.members", room="dev"))["members"] == ["Obs"]
        assert named(o.events, "member.left", "Ula") == []  # once


async def test_after_missing_changes_a_node_serves_the_rooms_and_members_redis_has(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream was trimmed past node a's position while it was not reading: the rooms
    created, deleted and renamed on b meanwhile, and who left, are right on a once its
    clients are back."""
    import redis.asyncio as aioredis

    readers = Readers(monkeypatch)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (x, y):
            token = (await x.ok("login", user="Xia"))["token"]
            await y.ok("login", user="Yan")
            for room in ("old", "mid", "stay"):
                await y.ok("room.create", room=room)
            await x.ok("room.join", room="stay")
            await readers.hold(a)
            await y.ok("room.create", room="new", topic="t")
            await y.ok("room.delete", room="old")
            await y.ok("room.edit", room="mid", name="renamed")
            await y.ok("room.leave", room="stay")  # Yan leaves while a is not listening
            await raw.xtrim(RedisStore(redis_url).prefix + "changes", maxlen=0, approximate=False)
            readers.release(a)
            await x.event("server.shutdown", timeout=10)
            async with clients(a.port) as (x2,):
                await x2.ok("auth", token=token)  # the guest's name is held for it
                names = [r["name"] for r in (await x2.ok("room.list"))["rooms"]]
                assert names == ["new", "renamed", "stay"]
                assert (await x2.ok("room.join", room="new"))["members"] == ["Xia", "Yan"]
                assert (await x2.ok("room.join", room="stay"))["members"] == ["Xia"]
                await x2.error("room.join", "not_found", room="old")
                await y.ok("room.leave", room="new")  # b's events reach a again
                left = await x2.event("member.left")
                assert left == {"room": "new", "user": "Yan", "reason": "left"}
    finally:
        await raw.aclose()


async def test_after_a_redis_outage_nobody_stays_a_member_for_a_connection_closed_meanwhile() -> None:
    """A connection that closed while Redis was away could not record its departure: once
    Redis is back its node makes Redis match what it has, so no node keeps a ghost."""
    redis_server = RedisServer(appendfsync="always").start()
    try:
        async with two_nodes(redis_server.url) as (a, b):
            async with clients(a.port, b.port, a.port) as (u, o, v):
                await u.ok("login", user="Ula")
                token = (await o.ok("login", user="Obs"))["token"]
                await v.ok("login", user="Vic")  # tells when node a has started afresh
                await o.ok("room.create", room="dev")
                await u.ok("room.join", room="dev")
                await o.event("member.joined")
                redis_server.stop(kill=True)
                await u.close()  # its departure cannot be written now
                dev = a.app.rooms.get("dev")
                await until(lambda: not dev.users, "node a has handled the close")
                redis_server.start()
                await o.event("server.shutdown", timeout=15)
                await v.event("server.shutdown", timeout=15)
            async with clients(b.port, a.port) as (o2, w):
                await _retry(o2, "auth", token=token)
                await _retry(w, "login", user="Wes")
                assert (await o2.ok("room.join", room="dev"))["members"] == ["Obs"]
                assert (await w.ok("room.join", room="dev"))["members"] == ["Obs", "Wes"]
                assert (await o2.event("member.joined")) == {"room": "dev", "user": "Wes"}
    finally:
        redis_server.close()


async def _retry(c: Client, cmd: str, **fields: Any) -> None:
    """The first command after the outage may still find the node settling (bounded)."""
    deadline = time.monotonic() + 10
    while True:
        reply = await c.call(cmd, **fields)
        if reply["type"] == "ok" or time.monotonic() > deadline:
            assert reply["type"] == "ok", reply
            return
        await asyncio.sleep(0.2)


async def test_a_killed_node_s_user_still_in_on_a_live_node_does_not_leave(
    redis_url: str,
) -> None:
    ttl = 1.0
    secret = "a-secret-shared-by-every-node-0123456789"
    async with contextlib.AsyncExitStack() as stack:
        served: list[Served] = []
        for _ in range(2):
            args = ("serve", "--redis", redis_url, "--port", "0", "--secret", secret,
                    "--node-ttl", str(ttl))  # fmt: skip
            served.append(await stack.enter_async_context(chatd_serving(*args)))
        n1, n2 = served
        async with clients(n1.port, n1.port, n2.port, n2.port) as (w, u1, u2, o):
            await w.ok("login", user="Wes")
            token = (await u1.ok("login", user="Ula"))["token"]
            await u2.ok("auth", token=token)
            await o.ok("login", user="Obs")
            await o.ok("room.create", room="lobby")
            for c in (w, u1, u2):
                await c.ok("room.join", room="lobby")
            assert (await o.ok("room.members", room="lobby"))["members"] == ["Obs", "Ula", "Wes"]
            n1.proc.kill()  # SIGKILL: Wes's only connection and one of Ula's two
            left = await o.event("member.left", timeout=ttl * 4 + 3)
            assert left == {"room": "lobby", "user": "Wes", "reason": "disconnected"}
            assert (await o.ok("room.members", room="lobby"))["members"] == ["Obs", "Ula"]
            assert named(o.events, "member.left", "Ula") == []



async def test_an_ephemeral_room_whose_creator_went_during_its_create_does_not_stay(
    redis_url: str,
) -> None:
    """On one server an ephemeral room nobody is in goes at once; so it does here when its
    creator's connection broke while the create was being stored (nobody ever joined)."""
    import socket
    import struct

    async with two_nodes(redis_url) as (a, b), clients(b.port) as (o,):
        await o.ok("login", user="Obs")
        for i in range(3):
            c = await Client.connect(a.port)
            await c.ok("login", user=f"Cid{i}")
            await c.send({"cmd": "room.create", "id": "c", "room": f"brief{i}", "ephemeral": True})
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await c.close()  # a reset, at once: the server loses it before the store answers
        deadline = time.monotonic() + 5
        while True:
            rooms = [r["name"] for r in (await o.ok("room.list"))["rooms"]]
            if not rooms or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert rooms == []


async def test_a_node_reaped_while_alive_starts_afresh_and_serves_on(redis_url: str) -> None:
    """Its heartbeat lapsed (Redis was away longer than the TTL, say) and another node
    reaped it: its users left every room there; it ends its connections, and the clients
    that come back are members again everywhere."""
    import redis.asyncio as aioredis

    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, o):
            token = (await u.ok("login", user="Ula"))["token"]
            await o.ok("login", user="Obs")
            await o.ok("room.create", room="dev")
            await u.ok("room.join", room="dev")
            await o.event("member.joined")
            await raw.delete(f"{a.store.prefix}node:{a.cluster.node}")  # the beat lapsed
            await b.cluster._reap()
            left = await o.event("member.left")
            assert left == {"room": "dev", "user": "Ula", "reason": "disconnected"}
            await u.event("server.shutdown")
            async with clients(a.port) as (u2,):
                await u2.ok("auth", token=token)
                assert (await u2.ok("room.join", room="dev"))["members"] == ["Obs", "Ula"]
                assert (await o.event("member.joined")) == {"room": "dev", "user": "Ula"}
                assert (await o.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]
                assert await raw.exists(f"{a.store.prefix}node:{a.cluster.node}") == 1
    finally:
        await raw.aclose()


async def test_a_join_whose_reply_redis_lost_leaves_no_ghost_member(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The membership was stored but its reply lost (the connection to Redis broke right
    after): the join answers `internal` and the node takes the membership back once it
    reads its entry, so nobody lists a user who is not in the room for long. (Had the node
    read the entry before the reply failed, the join would be answered as done.)"""
    readers = Readers(monkeypatch)
    from redis.exceptions import ConnectionError as RedisConnectionError

    receive = RedisStore._receive_batch
    lost: list[bool] = []

    async def losing(self: RedisStore, flight: Any) -> Any:
        first = flight[0]
        hit = not lost and any(script == "room_enter" for script, _, _ in first[1])
        answered = await receive(self, flight)
        if hit and answered is not None:  # Redis ran it; the reply is lost with the socket
            lost.append(True)
            failed = [first, *flight]
            flight.clear()
            await self._broken(RedisConnectionError("connection lost after the write"), failed)
            return None
        return answered

    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, o):
        await u.ok("login", user="Ula")
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await o.ok("room.members", room="dev")
        monkeypatch.setattr(RedisStore, "_receive_batch", losing)
        await readers.hold(a)  # node a reads its entry only after the reply failed
        await u.error("room.join", "internal", room="dev")
        readers.release(a)
        assert lost
        deadline = time.monotonic() + 5
        while True:
            members = (await o.ok("room.members", room="dev"))["members"]
            if members == ["Obs"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert members == ["Obs"]
        assert (await u.ok("room.members", room="dev"))["members"] == ["Obs"]
        assert (await u.ok("room.join", room="dev"))["members"] == ["Obs", "Ula"]


class FailingLeaves:
    """Makes the store's writer batches holding a ROOM_LEAVE fail (as a timeout or OOM at
    maxmemory would, with the stream reader still fine): `count` of them, or every one
    while `on`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 0) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.left = count
        self.on = count == 0
        self.failed = 0
        command = RedisStore._command

        def failing(store: RedisStore, script: str, args: Any) -> Any:
            # Raised while the writer packs the batch: the batch fails as a broken send.
            if script == "room_leave" and (self.on or self.left > 0):
                self.left -= 1
                self.failed += 1
                raise RedisConnectionError("simulated writer failure")
            return command(store, script, args)

        monkeypatch.setattr(RedisStore, "_command", failing)


async def test_a_leave_redis_refused_twice_is_retried_until_no_node_lists_the_user(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, o):
        await u.ok("login", user="Ula")
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u.ok("room.join", room="dev")
        await o.event("member.joined")
        failing = FailingLeaves(monkeypatch, count=2)  # the leave and its first retry
        await u.ok("room.leave", room="dev")
        assert failing.failed == 2
        # Owed, and stored once Redis takes it: every node sees her leave.
        assert await o.event("member.left", timeout=5) == {"room": "dev", "user": "Ula", "reason": "left"}
        assert (await o.ok("room.members", room="dev"))["members"] == ["Obs"]
        assert (await u.ok("room.members", room="dev"))["members"] == ["Obs"]
        assert (await u.ok("room.join", room="dev"))["members"] == ["Obs", "Ula"]
        await o.ok("msg.send", room="dev", text="hi ula")
        assert (await u.event("message"))["text"] == "hi ula"


async def test_a_rejoin_while_its_departure_is_still_owed_gets_the_room_s_events(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, o):
        await u.ok("login", user="Ula")
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u.ok("room.join", room="dev")
        await o.event("member.joined")
        failing = FailingLeaves(monkeypatch)
        await u.ok("room.leave", room="dev")
        # Redis still has her in on node a: the join finds her there and lets her in.
        assert (await u.ok("room.join", room="dev"))["members"] == ["Obs", "Ula"]
        await o.ok("msg.send", room="dev", text="one")
        assert (await u.event("message"))["text"] == "one"
        failing.on = False
        retried = failing.failed
        deadline = time.monotonic() + 5  # the owed leave's next try (backoff) comes meanwhile
        while a.cluster._owed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not a.cluster._owed and failing.failed == retried
        await o.ok("msg.send", room="dev", text="two")
        assert (await u.event("message"))["text"] == "two"  # still in: nothing undid the join
        assert (await o.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]
        assert named(o.events, "member.left", "Ula") == []
        assert (await u.ok("room.members", room="dev"))["members"] == ["Obs", "Ula"]


async def test_a_join_answered_before_its_node_read_its_entry_gets_the_room_s_events(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a's reader lags past the store's timeout: the join is answered at that bound,
    and from then on its connection is a member (events delivered on a at once reach it)."""
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, a.port, b.port) as (u, w, o):
        await u.ok("login", user="Ula")
        await w.ok("login", user="Wes")
        await o.ok("login", user="Obs")
        await w.ok("room.create", room="dev")
        await o.ok("room.join", room="dev")
        a.store.timeout = 0.3  # the bound of a's waits for its reader (no socket's)
        await readers.hold(a)
        began = time.monotonic()
        joined = await u.ok("room.join", room="dev")
        assert time.monotonic() - began < 2 * 0.3 + 1  # caught_up's bound, then the entry's
        assert "Ula" in joined["members"]
        room = a.app.rooms.get("dev")
        assert len(room.sessions) == 2 and not room.entering
        await w.ok("room.edit", room="dev", topic="now")  # delivered on a at once
        assert (await u.event("room.updated"))["topic"] == "now"
        readers.release(a)
        await o.ok("msg.send", room="dev", text="hi")
        assert (await u.event("message"))["text"] == "hi"
        assert (await u.ok("room.members", room="dev"))["members"] == ["Obs", "Ula", "Wes"]
        assert named(u.events, "member.joined", "Ula") == []


async def test_a_node_starting_while_another_creates_a_room_and_joins_it_serves_both(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes made between a starting node's snapshot (store.open) and its first read of
    the stream are in the one view it starts from (CLUSTER_VIEW, as after an outage)."""
    async with two_nodes(redis_url) as (a, _), clients(a.port) as (o,):
        await o.ok("login", user="Obs")
        beat = Cluster._beat
        made: list[bool] = []

        async def meanwhile(cluster: Cluster) -> None:
            if not made and cluster.app is not a.app:
                made.append(True)
                await o.ok("room.create", room="late", topic="new")
                await o.ok("msg.send", room="late", text="before c")
            await beat(cluster)

        monkeypatch.setattr(Cluster, "_beat", meanwhile)
        c = ChatServer(TEST_CONFIG, RedisStore(redis_url), SECRET)
        await c.start()
        try:
            assert made
            async with clients(c.port) as (u,):
                await u.ok("login", user="Ula")
                rooms = {r["name"]: r for r in (await u.ok("room.list"))["rooms"]}
                assert rooms["late"]["topic"] == "new"
                assert (await u.ok("room.join", room="late"))["members"] == ["Obs", "Ula"]
                assert await o.event("member.joined") == {"room": "late", "user": "Ula"}
                await o.ok("msg.send", room="late", text="after c")
                assert (await u.event("message"))["text"] == "after c"
        finally:
            await c.stop()


async def test_a_node_reaped_alive_that_lapses_again_is_reaped_again_within_the_ttl(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reap lock of a node lasts no longer than its heartbeat's TTL: a node reaped
    while alive, back, and then silent again leaves the rooms again within the TTL (plus
    a third of it), not when a longer lock lapses."""
    ttl = 1.0
    beat = Cluster._beat
    silent: set[Cluster] = set()

    async def beating(cluster: Cluster) -> None:
        if cluster not in silent:
            await beat(cluster)

    monkeypatch.setattr(Cluster, "_beat", beating)
    async with two_nodes(redis_url, node_ttl=ttl) as (a, b), clients(a.port, b.port) as (u, o):
        token = (await u.ok("login", user="Ula"))["token"]
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u.ok("room.join", room="dev")
        await o.event("member.joined")
        silent.add(a.cluster)  # its beat lapses: node b reaps it
        assert (await o.event("member.left", timeout=4 * ttl))["user"] == "Ula"
        await u.event("server.shutdown", timeout=4 * ttl)
        silent.discard(a.cluster)
        async with clients(a.port) as (u2,):
            await _retry(u2, "auth", token=token)
            await a.cluster._beat()  # back (its loop would beat within a third of the TTL)
            assert (await u2.ok("room.join", room="dev"))["members"] == ["Obs", "Ula"]
            assert (await o.event("member.joined")) == {"room": "dev", "user": "Ula"}
            silent.add(a.cluster)  # silent again, soon after the first reap
            began = time.monotonic()
            left = await o.event("member.left", timeout=4 * ttl)
            assert left == {"room": "dev", "user": "Ula", "reason": "disconnected"}
            assert time.monotonic() - began < 2 * ttl + 1
            silent.discard(a.cluster)


async def test_a_node_starting_afresh_lists_a_dead_node_s_members_until_they_are_reaped(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis counts a dead node's users in their rooms until its reap: a node that starts
    afresh meanwhile lists them too (as the other nodes do), and announces their leave
    when the reap comes, so a join of such a user there is neither told nor listed apart."""
    import redis.asyncio as aioredis

    beat = Cluster._beat
    silent: set[Cluster] = set()

    async def beating(cluster: Cluster) -> None:
        if cluster not in silent:
            await beat(cluster)

    monkeypatch.setattr(Cluster, "_beat", beating)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (w, u):
            await w.ok("login", user="Wes")
            await u.ok("login", user="Ula")
            await w.ok("room.create", room="dev")
            await u.ok("room.join", room="dev")
            await w.event("member.joined")
            silent.add(b.cluster)  # node b "dies": its beat lapses ...
            P, dead = a.store.prefix, b.cluster.node
            await raw.delete(f"{P}node:{dead}")
            await raw.set(f"{P}reap:{dead}", "elsewhere", px=60_000)  # ... not reaped yet
            await a.cluster._resync("test: start afresh")
            await w.event("server.shutdown")
            async with clients(a.port) as (c,):
                await _retry(c, "login", user="Cid")
                assert (await c.ok("room.members", room="dev"))["members"] == ["Ula"]
                assert (await c.ok("room.join", room="dev"))["members"] == ["Cid", "Ula"]
                await raw.delete(f"{P}reap:{dead}")
                await a.cluster._reap()  # now it is
                left = await c.event("member.left")
                assert left == {"room": "dev", "user": "Ula", "reason": "disconnected"}
                assert (await c.ok("room.members", room="dev"))["members"] == ["Cid"]
    finally:
        await raw.aclose()
