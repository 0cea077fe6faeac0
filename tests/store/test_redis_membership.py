"""Room membership across nodes as Redis decides it (scripts ROOM_ENTER, ROOM_LEAVE, REAP):
per room and user, the number of nodes it is in; the 0 -> 1 step is announced (`ann`),
the 1 -> 0 step too (`left` with the reason), in the same atomic step, as one stream
entry; an ephemeral room emptied is deleted there, so a join after it is refused. Several
stores on one real redis-server stand for several nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from chatd.store.base import RoomRecord
from chatd.store.redis import RedisStore


@pytest.fixture
async def nodes(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore, redis.Redis]]:
    a, b = RedisStore(redis_url), RedisStore(redis_url)
    a.open()
    b.open()
    a.node, b.node = "na", "nb"
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield a, b, raw
    finally:
        raw.close()
        await a.close()
        await b.close()


def membership(raw: redis.Redis) -> list[dict[str, Any]]:
    """The stream's membership entries so far (kind in/out, room.deleted), oldest first."""
    out = []
    for _, f in raw.xrange("chatd:changes"):
        if f["kind"] in ("in", "out", "room.deleted"):
            out.append({k: v for k, v in f.items() if k in ("kind", "node", "key", "ann", "left", "id", "by")})
    return out


async def test_a_user_on_two_nodes_is_announced_on_its_first_node_in_and_last_out(
    nodes: tuple[RedisStore, RedisStore, redis.Redis],
) -> None:
    a, b, raw = nodes
    room = await a.create_room(RoomRecord(0, "dev", "", "ann", 1.0, False, False))
    n, entry = await a.enter_room(room.id, "ula", "Ula")
    assert n == 1 and raw.xrange("chatd:changes", entry, entry)[0][1]["kind"] == "in"
    assert (await b.enter_room(room.id, "ula", "Ula"))[0] == 2
    # Already in on nb (its departure not stored yet): kept as it is, with an entry.
    n, again = await b.enter_room(room.id, "ula", "Ula")
    assert n == 2 and raw.xrange("chatd:changes", again, again)[0][1]["node"] == "nb"
    assert await a.leave_room(room.id, "ula", "disconnected") == 1
    assert await a.leave_room(room.id, "ula", "disconnected") == 0  # not in on na now
    assert await b.leave_room(room.id, "ula", "left") == 1
    assert membership(raw) == [
        {"kind": "in", "node": "na", "key": "ula", "ann": "1"},
        {"kind": "in", "node": "nb", "key": "ula", "ann": ""},
        {"kind": "in", "node": "nb", "key": "ula", "ann": ""},
        {"kind": "out", "node": "na", "key": "ula", "left": ""},
        {"kind": "out", "node": "nb", "key": "ula", "left": "left"},
    ]
    assert raw.exists(f"chatd:pm:{room.id}") == 0


async def test_an_ephemeral_room_closes_with_its_last_member_anywhere_and_refuses_joins_after(
    nodes: tuple[RedisStore, RedisStore, redis.Redis],
) -> None:
    a, b, raw = nodes
    room = await a.create_room(RoomRecord(0, "tmp", "", "ann", 1.0, True, False))
    await a.enter_room(room.id, "ann", "Ann")
    await b.enter_room(room.id, "bob", "Bob")
    assert await a.leave_room(room.id, "ann", "left") == 1  # Bob is in, on nb
    assert await b.leave_room(room.id, "bob", "left") == 2  # the last: closed with it
    assert membership(raw)[-1] == {"kind": "room.deleted", "node": "", "id": str(room.id), "by": ""}
    assert await a.enter_room(room.id, "ann", "Ann") == (-1, "")
    assert raw.hget("chatd:room_names", "tmp") is None
    again = await b.create_room(RoomRecord(0, "tmp", "", "bob", 2.0, True, False))
    assert again.id != room.id  # the name is free again


async def test_a_reaped_node_s_users_leave_only_where_no_other_node_has_them(
    nodes: tuple[RedisStore, RedisStore, redis.Redis],
) -> None:
    a, b, raw = nodes
    lobby = await a.create_room(RoomRecord(0, "lobby", "", "ann", 1.0, False, False))
    tmp = await a.create_room(RoomRecord(0, "tmp", "", "ann", 1.0, True, False))
    await a.enter_room(lobby.id, "ula", "Ula")
    await a.enter_room(lobby.id, "wes", "Wes")
    await a.enter_room(tmp.id, "wes", "Wes")
    await b.enter_room(lobby.id, "ula", "Ula")
    raw.sadd("chatd:nodes", "na")
    before = len(raw.xrange("chatd:changes"))
    assert await b.reap("na") == 3
    entries = membership(raw)[-5:]
    assert len(raw.xrange("chatd:changes")) == before + 5  # 3 outs, the close, `gone`
    outs = sorted((e["key"], e["left"]) for e in entries if e["kind"] == "out")
    assert outs == [("ula", ""), ("wes", "disconnected"), ("wes", "disconnected")]
    assert {"kind": "room.deleted", "node": "", "id": str(tmp.id), "by": ""} in entries
    assert raw.sismember("chatd:nodes", "na") == 0
    assert raw.hgetall(f"chatd:pm:{lobby.id}") == {"ula": "1"}
    assert raw.exists("chatd:node:na:m") == 0
