"""A node's side of the change stream (chatd/cluster.py) with the Redis store's packed
messages (issue 11): another node's sends, edits and deletes arrive as events with every
field; read-your-writes (`caught_up`) waits for what another node wrote before the call,
and a burst of waits shares one tail query. One real node in-process on a real Redis, the
"other node" writing through a second RedisStore (as a node's store does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatd.store.base import NewMessage

pytestmark = pytest.mark.one_node("drives its own node and a second store on its own Redis")

TIMEOUT = 10.0
PASSWORD = "correct horse battery"


@pytest.fixture
async def node(redis_url: str) -> AsyncIterator[Any]:
    from chatd.server import ChatServer
    from chatd.store.redis.store import RedisStore
    from tests.helpers import SECRET, TEST_CONFIG

    server = ChatServer(TEST_CONFIG, RedisStore(redis_url), SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[Any]:
    """Another node's store on the same Redis."""
    from chatd.store.redis.store import RedisStore

    store = RedisStore(redis_url, drop_ephemeral=False)
    store.open()
    store.node = "elsewhere"
    try:
        yield store
    finally:
        await store.close()


async def test_another_node_s_sends_edits_and_deletes_arrive_whole(node: Any, other: Any) -> None:
    from tests.helpers import Client

    c = await Client.connect(node.port)
    try:
        await c.ok("login", user="ann")
        await c.ok("room.create", room="dev")
        room_id = node.app.rooms.rooms["dev"].id
        bob = "bob#g1"
        sent = await asyncio.gather(*(
            other.add_message(NewMessage(room_id, "bob", None, f"m{i} \u00e9\U0001f600", 1_765_000_000.25 + i, f"n{i}", bob))
            for i in range(5)
        ))  # fmt: skip
        got = [await c.event("message") for _ in range(5)]
        assert [(m["id"], m["rev"], m["text"], m["from"], m["room"]) for m in got] == [
            (r.id, r.rev, r.text, "bob", "dev") for r, _ in sent
        ]
        assert got[0]["ts"] == "2025-12-06T05:46:40.250Z"
        first = sent[0][0]
        edited = await other.edit_message(first.id, "fixed", 1_765_000_100.5, "bob")
        ev = await c.event("message.edited")
        assert (ev["id"], ev["rev"], ev["text"], ev["edited_by"]) == (first.id, edited.rev, "fixed", "bob")
        gone = await other.delete_message(first.id, "bob")
        ev = await c.event("message.deleted")
        assert (ev["id"], ev["rev"], ev["room"], ev["by"]) == (first.id, gone.rev, "dev", "bob")
        assert node.store.rev == gone.rev  # the node's revision follows the stream
    finally:
        await c.close()


async def test_a_catch_up_waits_for_what_another_node_wrote_before_it(
    node: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.asyncio as aioredis

    cluster = node.cluster
    gate = asyncio.Event()
    gate.set()
    read_batch = type(cluster)._read_batch

    async def paused(self: Any) -> Any:
        await asyncio.wait_for(gate.wait(), 20)
        return await read_batch(self)

    await node.app.bus.caught_up()
    monkeypatch.setattr(type(cluster), "_read_batch", paused)
    gate.clear()
    await asyncio.sleep(1.5)  # the XREAD in flight returns (BLOCK 1 s); the next one waits
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.xadd("chatd:changes", {"kind": "user", "key": "nobody", "node": "elsewhere"})
        wait = asyncio.ensure_future(node.app.bus.caught_up())
        await asyncio.sleep(0.3)
        assert not wait.done()  # the entry is written but this node has not applied it
        gate.set()
        await asyncio.wait_for(wait, TIMEOUT)
        tail = (await raw.xrevrange("chatd:changes", count=1))[0][0].decode()
        assert cluster.last_id == tail
    finally:
        gate.set()
        await raw.aclose()


async def test_a_burst_of_catch_ups_shares_one_tail_query(node: Any, redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        r.config_resetstat()
        await asyncio.wait_for(
            asyncio.gather(*(node.app.bus.caught_up() for _ in range(50))), TIMEOUT
        )
        stats = r.info("commandstats")
    # The tail query, and the XINFO of the reader's own reads (one a second when idle).
    queries = sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("xrevrange", "xinfo|stream")
    )
    assert 1 <= queries <= 3


async def ann_and_bob_in(node: Any, room: str) -> tuple[Any, Any]:
    """Two connections to the node, logged in as guests ann and bob, both in ``room``."""
    from tests.helpers import Client

    ann, bob = await Client.connect(node.port), await Client.connect(node.port)
    await ann.ok("login", user="ann")
    await bob.ok("login", user="bob")
    await ann.ok("room.create", room=room)
    await bob.ok("room.join", room=room)
    return ann, bob


async def test_own_sends_go_out_with_the_events_their_handlers_made(
    node: Any, other: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader delivers this node's own message changes with the events their handlers
    made (Bus.posted: not built and encoded again), in order, to every member here; another
    node's change is built from its entry; none is kept once its entry is applied."""
    from chatd import changes

    built: list[str] = []
    real = changes.message_event

    def counting(rooms: Any, kind: str, *args: Any) -> Any:
        built.append(kind)
        return real(rooms, kind, *args)

    monkeypatch.setattr(changes, "message_event", counting)
    ann, bob = await ann_and_bob_in(node, "dev")
    try:
        node.app.bus.own[0] = "an event whose entry was applied without it"  # stale
        sent = [await ann.ok("msg.send", room="dev", text=f"m{i}") for i in range(20)]
        edited = await ann.ok("msg.edit", message_id=sent[0]["message"]["id"], text="fixed")
        for c in (ann, bob):
            got = [await c.event("message") for _ in range(20)]
            assert [m["text"] for m in got] == [f"m{i}" for i in range(20)]
            assert got == [r["message"] for r in sent]
            assert (await c.event("message.edited")) == edited["message"]
        assert built == []
        room_id = node.app.rooms.rooms["dev"].id
        await other.add_message(NewMessage(room_id, "cy", None, "from afar", 1_765_000_000.0, None, "cy#g1"))
        assert (await bob.event("message"))["text"] == "from afar"
        assert built == ["message"]
        assert node.app.bus.own == {}
        node.app.bus.posted(edited["message"]["rev"], "made after its entry was applied")
        assert node.app.bus.own == {}  # too late to be used: not kept
    finally:
        await ann.close()
        await bob.close()


class HeldReader:
    """Parks the node's change-stream reader before its next read until released."""

    def __init__(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go, self.parked = asyncio.Event(), asyncio.Event()
        self.go.set()
        read_batch = type(node.cluster)._read_batch
        gate = self

        async def gated(cluster: Any) -> Any:
            if not gate.go.is_set():
                gate.parked.set()
                await asyncio.wait_for(gate.go.wait(), 20)
            return await read_batch(cluster)

        monkeypatch.setattr(type(node.cluster), "_read_batch", gated)

    async def hold(self) -> None:
        self.parked.clear()
        self.go.clear()
        await asyncio.wait_for(self.parked.wait(), 10)  # the read in flight has finished

    def release(self) -> None:
        self.go.set()


async def test_an_own_send_read_after_a_rename_names_the_room_as_it_is_now(
    node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event a handler made (Bus.posted) names the room as it was then; a rename
    applied before the reader gets to the send's entry makes the reader build it again,
    so a member hears `room.updated` and then the message under the new name."""

    reader = HeldReader(node, monkeypatch)
    ann, bob = await ann_and_bob_in(node, "dev")
    try:
        await reader.hold()
        sent = await ann.ok("msg.send", room="dev", text="hello")
        assert sent["message"]["room"] == "dev" and sent["message"]["rev"] in node.app.bus.own
        node.app.rooms.rename(node.app.rooms.rooms["dev"], "r0")  # as a rename applied here
        reader.release()
        got = await bob.event("message")
        assert (got["id"], got["room"]) == (sent["message"]["id"], "r0")
        assert node.app.bus.own == {}
    finally:
        reader.release()
        await ann.close()
        await bob.close()


async def test_after_redis_flushes_its_scripts_a_node_reads_on_and_ends_nothing(
    node: Any, other: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCRIPT FLUSH (or a Redis restart) empties the script cache under a running node:
    its reader's head query (_HEAD) and its catch-up's tail query (_TAIL) answer NOSCRIPT
    once, are loaded again, and the node goes on: a catch-up still waits for what another
    node wrote before it, that node's messages and its own arrive, and no connection is
    ended (a NOSCRIPT taken for a lost Redis would end them all)."""
    import redis.asyncio as aioredis

    from tests.helpers import Client, until

    reader = HeldReader(node, monkeypatch)
    c, d = await Client.connect(node.port), await Client.connect(node.port)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await c.ok("login", user="ann")
        await c.ok("room.create", room="dev")
        room_id = node.app.rooms.rooms["dev"].id
        await d.ok("register", user="dee", password=PASSWORD)
        await d.ok("login", user="dee", password=PASSWORD)
        await reader.hold()
        await raw.script_flush()
        assert (await raw.script_exists(node.cluster._head_sha, node.cluster._tail.sha)) == [False, False]
        # Written elsewhere while the node's reader is parked: a catch-up waits for it.
        await other.add_message(NewMessage(room_id, "bob", None, "early", 1_765_000_000.0, None, "bob#g1"))
        wait = asyncio.ensure_future(node.app.bus.caught_up())

        async def waiting() -> bool:  # the tail query ran again (NOSCRIPT), found the entry
            return bool(node.cluster._catching_up)

        await until(waiting, within=TIMEOUT)
        assert not wait.done()
        reader.release()
        await asyncio.wait_for(wait, TIMEOUT)
        assert (await c.event("message"))["text"] == "early"
        # Both loaded again (the flush emptied the cache: the catch-up's wait proves the
        # tail query ran after it).
        assert (await raw.script_exists(node.cluster._head_sha, node.cluster._tail.sha)) == [True, True]
        await other.add_message(NewMessage(room_id, "bob", None, "later", 1_765_000_001.0, None, "bob#g1"))
        assert (await c.event("message"))["text"] == "later"
        sent = await c.ok("msg.send", room="dev", text="mine")
        assert (await c.event("message")) == sent["message"]
        assert (await c.ok("room.members", room="dev"))["members"] == ["ann"]
        # The login gate's scripts (chatd/store/redis/limits.py), loaded before the flush.
        await d.error("login", "unauthorized", user="dee", password="wrong horse battery")
        await d.ok("login", user="dee", password=PASSWORD)
        assert not node.cluster.down
        assert [e for e in c.events + d.events if e["event"] == "server.shutdown"] == []
    finally:
        reader.release()
        await raw.aclose()
        await c.close()
        await d.close()


async def test_a_gap_is_found_by_the_read_that_finds_the_scripts_flushed(
    node: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's gap check (_HEAD) must survive a script flush: entries this node had
    not read were trimmed away, and the very read that gets NOSCRIPT for its head query
    must still see that it missed them (its clients get `server.shutdown` and resync),
    not read on as if nothing was lost."""
    import redis.asyncio as aioredis

    from tests.helpers import Client

    reader = HeldReader(node, monkeypatch)
    c = await Client.connect(node.port)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await c.ok("login", user="ann")
        await c.ok("room.create", room="dev")
        room_id = node.app.rooms.rooms["dev"].id
        await reader.hold()
        stream = node.store.prefix + "changes"
        for name in ("Zed", "Yan"):
            await raw.xadd(stream, {"kind": "in", "room": str(room_id), "key": name.lower(),
                                    "name": name, "node": "elsewhere"})  # fmt: skip
        await raw.xtrim(stream, maxlen=0, approximate=False)
        await raw.script_flush()
        reader.release()
        shutdown = await c.event("server.shutdown", timeout=TIMEOUT)
        assert shutdown["reason"] == "missed changes from the other nodes; reconnect and sync"
    finally:
        reader.release()
        await raw.aclose()
        await c.close()
