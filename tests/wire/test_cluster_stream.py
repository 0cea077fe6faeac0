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


async def test_own_sends_go_out_with_the_events_their_handlers_made(
    node: Any, other: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader delivers this node's own message changes with the events their handlers
    made (Bus.posted: not built and encoded again), in order, to every member here; another
    node's change is built from its entry; none is kept once its entry is applied."""
    from chatd import changes
    from tests.helpers import Client

    built: list[str] = []
    real = changes.message_event

    def counting(rooms: Any, kind: str, *args: Any) -> Any:
        built.append(kind)
        return real(rooms, kind, *args)

    monkeypatch.setattr(changes, "message_event", counting)
    ann, bob = await Client.connect(node.port), await Client.connect(node.port)
    try:
        await ann.ok("login", user="ann")
        await bob.ok("login", user="bob")
        await ann.ok("room.create", room="dev")
        await bob.ok("room.join", room="dev")
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


async def test_the_stream_queries_run_again_after_redis_forgets_its_scripts(
    node: Any, other: Any, redis_url: str
) -> None:
    """SCRIPT FLUSH (or a restarted Redis): a catch-up's tail query and the reader's head
    query (chatd/cluster.py, _TAIL and _HEAD) are answered NOSCRIPT once, load their
    script again and go on: the catch-up still waits for another node's write, and the
    write still arrives."""
    import hashlib

    import redis.asyncio as aioredis

    from chatd.cluster import _HEAD, _TAIL
    from tests.helpers import Client, until

    tail, head = (hashlib.sha1(s.encode()).hexdigest() for s in (_TAIL, _HEAD))
    raw = aioredis.Redis.from_url(redis_url)
    c = await Client.connect(node.port)
    try:
        await c.ok("login", user="ann")
        await c.ok("room.create", room="dev")
        room_id = node.app.rooms.rooms["dev"].id
        assert await raw.script_exists(tail, head) == [True, True]
        await raw.script_flush()
        assert await raw.script_exists(tail, head) == [False, False]
        sent, _ = await other.add_message(
            NewMessage(room_id, "bob", None, "after the flush", 1.0, None, "bob#g1")
        )
        await asyncio.wait_for(node.app.bus.caught_up(), TIMEOUT)
        assert node.store.rev >= sent.rev  # the catch-up waited for the write
        assert await raw.script_exists(tail) == [True]  # the tail query ran it again
        assert (await c.event("message", timeout=TIMEOUT))["text"] == "after the flush"

        async def head_loaded() -> bool:
            return bool((await raw.script_exists(head))[0])

        await until(head_loaded, within=TIMEOUT)  # the reader's next read ran it again
    finally:
        await c.close()
        await raw.aclose()


async def test_an_own_send_read_after_a_rename_names_the_room_as_it_is_now(
    node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event a handler made (Bus.posted) names the room as it was then; a rename
    applied before the reader gets to the send's entry makes the reader build it again,
    so a member hears `room.updated` and then the message under the new name."""
    from tests.helpers import Client

    cluster = node.cluster
    gate, parked = asyncio.Event(), asyncio.Event()
    gate.set()
    read_batch = type(cluster)._read_batch

    async def paused(self: Any) -> Any:
        if not gate.is_set():
            parked.set()
        await asyncio.wait_for(gate.wait(), 20)
        return await read_batch(self)

    ann, bob = await Client.connect(node.port), await Client.connect(node.port)
    try:
        await ann.ok("login", user="ann")
        await bob.ok("login", user="bob")
        await ann.ok("room.create", room="dev")
        await bob.ok("room.join", room="dev")
        monkeypatch.setattr(type(cluster), "_read_batch", paused)
        gate.clear()
        await asyncio.wait_for(parked.wait(), TIMEOUT)  # the XREAD in flight came back
        sent = await ann.ok("msg.send", room="dev", text="hello")
        assert sent["message"]["room"] == "dev" and sent["message"]["rev"] in node.app.bus.own
        node.app.rooms.rename(node.app.rooms.rooms["dev"], "r0")  # as a rename applied here
        gate.set()
        got = await bob.event("message")
        assert (got["id"], got["room"]) == (sent["message"]["id"], "r0")
        assert node.app.bus.own == {}
    finally:
        gate.set()
        await ann.close()
        await bob.close()
