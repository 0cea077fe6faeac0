"""`chatd serve --redis URL` with one node (issue 11, the store half): the Redis store
swapped in for SQLite behind the same wire protocol, in a real process on a real
redis-server: register, login, room, send, history, sync, and a restart keeps everything
(ids, revisions, the epoch, accounts). Several nodes are not covered yet (no Bus)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd.config import redis_address
from chatd.server import ChatServer
from chatd.store.redis import RedisStore
from chatd.store.redis.admin import RedisAdmin
from tests.helpers import SECRET as TEST_SECRET
from tests.helpers import TEST_CONFIG, Client
from tests.process import chatd_run, chatd_serving

pytestmark = pytest.mark.one_node(
    "one node process on its own Redis (several nodes: test_cluster.py)"
)

SECRET = "a-secret-shared-by-every-node-0123456789"
PASSWORD = "correct horse battery"


async def first_life(port: int) -> dict[str, Any]:
    c = await Client.connect(port)
    try:
        await c.ok("register", user="Ann", password=PASSWORD)
        token = (await c.ok("login", user="ann", password=PASSWORD))["token"]
        await c.ok("room.create", room="dev", topic="chat")
        a = (await c.ok("msg.send", room="dev", text="one", nonce="n1"))["message"]
        b = (await c.ok("msg.send", room="dev", text="two"))["message"]
        await c.ok("msg.edit", message_id=a["id"], text="one, edited")
        page = await c.ok("room.history", room="dev")
        assert [m["text"] for m in page["messages"]] == ["one, edited", "two"]
        sync = await c.ok("sync", since=0)
        assert [m["rev"] for m in sync["changes"]] == [2, 3] and sync["rev"] == 3
        return {"hello": c.hello["data"], "token": token, "a": a, "b": b}
    finally:
        await c.close()


async def test_a_server_on_a_redis_store_names_redis_in_its_start_line(redis_url: str) -> None:
    """The store says which it is, not --redis in the config (a test may hand a server a
    Redis store of its own): the start line and the cluster come from one check."""
    assert TEST_CONFIG.redis is None
    server = ChatServer(TEST_CONFIG, RedisStore(redis_url), TEST_SECRET)
    await server.start()
    try:
        settings = server.settings()
        assert settings["redis"] == redis_address(redis_url) and "db" not in settings
        assert server.cluster is not None
    finally:
        await server.stop()


async def test_an_account_deleted_offline_is_closed_on_a_node_before_its_poll(
    redis_url: str,
) -> None:
    """`chatd user delete --redis` (RedisAdmin) runs the nodes' own script: the change goes
    on the change stream, and a node ends the user's connections at once, not at its
    users_version poll (an hour away here)."""
    server = ChatServer(
        TEST_CONFIG.replace(db_poll_interval=3600.0), RedisStore(redis_url), TEST_SECRET
    )
    await server.start()
    try:
        c = await Client.connect(server.port)
        await c.ok("register", user="Frank", password=PASSWORD)
        await c.ok("login", user="frank", password=PASSWORD)
        admin = RedisAdmin(redis_url)
        try:
            assert await asyncio.to_thread(admin.delete_user, "FRANK")
        finally:
            admin.close()
        with pytest.raises(EOFError):
            while True:
                await c.recv(timeout=5)
        await c.close()
    finally:
        await server.stop()


async def test_one_node_on_redis_serves_and_a_restart_keeps_everything(redis_url: str) -> None:
    args = ("serve", "--redis", redis_url, "--port", "0", "--secret", SECRET)
    async with chatd_serving(*args) as srv:
        before = await first_life(srv.port)
    assert any(b"appendfsync always: an acknowledged write is on disk" in x for x in srv.log)
    start = next(x for x in srv.log if b"chatd listening on" in x)
    assert b"redis " in start and b"db " not in start, start  # names the store it uses
    async with chatd_serving(*args) as srv:
        c = await Client.connect(srv.port)
        try:
            hello = c.hello["data"]
            assert hello["epoch"] == before["hello"]["epoch"] and hello["rev"] == 3
            me = await c.ok("auth", token=before["token"])  # the same secret: still good
            assert me["user"] == "Ann"
            await c.ok("room.join", room="dev")
            page = await c.ok("room.history", room="dev")
            assert [m["id"] for m in page["messages"]] == [before["a"]["id"], before["b"]["id"]]
            again = (await c.ok("msg.send", room="dev", text="retry", nonce="n1"))["message"]
            assert again["id"] == before["a"]["id"]  # the nonce outlived the restart
            new = (await c.ok("msg.send", room="dev", text="three"))["message"]
            assert new["id"] > before["b"]["id"] and new["rev"] == 4
            assert (await c.ok("sync", since=3))["changes"] == [new]
        finally:
            await c.close()


async def test_redis_without_a_shared_secret_is_refused(redis_url: str) -> None:
    code, _, err = await chatd_run("serve", "--redis", redis_url, "--port", "0")
    assert code == 2 and "--secret" in err and "CHATD_SECRET" in err


async def test_an_unreachable_redis_is_refused_at_start_with_one_line() -> None:
    code, _, err = await chatd_run(
        "serve", "--redis", "redis://127.0.0.1:1/0", "--port", "0", "--secret", SECRET
    )
    assert code == 2 and err.startswith("chatd: cannot use Redis: ") and err.count("\n") == 1


async def test_redis_going_away_is_a_clear_error_and_the_connection_stays() -> None:
    from chatd.server import ChatServer
    from chatd.store.redis import RedisStore
    from tests.helpers import SECRET as TEST_SECRET
    from tests.helpers import TEST_CONFIG
    from tests.redisutil import RedisServer

    redis_server = RedisServer().start()
    server = ChatServer(TEST_CONFIG, RedisStore(redis_server.url, timeout=2.0), TEST_SECRET)
    await server.start()
    try:
        c = await Client.connect(server.port)
        try:
            token = (await c.ok("login", user="ann"))["token"]
            await c.ok("room.create", room="dev")
            redis_server.stop(kill=True)
            err = await c.call("msg.send", room="dev", text="lost?")
            assert err["code"] == "internal" and "Redis" in err["message"]
            assert "127.0.0.1" not in err["message"]  # no detail leaked to the client
            assert (await c.call("room.history", room="dev"))["code"] == "internal"
            assert await c.ok("ping") is not None  # the connection stays
            redis_server.start()  # back on the same port with its AOF
            # Events may have been missed meanwhile: the node ends the connection once
            # Redis is back, so the client reconnects and syncs (protocol.md).
            shutdown = await c.event("server.shutdown", timeout=10)
            assert "reconnect and sync" in shutdown["reason"]
        finally:
            await c.close()
        c = await Client.connect(server.port)
        try:
            await c.ok("auth", token=token)  # the guest's name was held for it meanwhile
            await c.ok("room.join", room="dev")
            sent = (await c.ok("msg.send", room="dev", text="back"))["message"]
            assert sent["rev"] == 1
        finally:
            await c.close()
    finally:
        await server.stop()
        redis_server.close()


async def test_pipelined_writes_and_reads_on_redis_all_succeed(redis_url: str) -> None:
    """Commands pipelined on one connection: the next command's store read starts while a
    write's delivery runs (inside the store's writer), which once broke redis-py's
    timeouts ("Timeout should be used inside a task")."""
    import json

    from chatd.server import ChatServer
    from chatd.store.redis import RedisStore
    from tests.helpers import SECRET as TEST_SECRET
    from tests.helpers import TEST_CONFIG

    server = ChatServer(TEST_CONFIG, RedisStore(redis_url), TEST_SECRET)
    await server.start()
    try:
        c = await Client.connect(server.port)
        try:
            await c.ok("login", user="ann")
            await c.ok("room.create", room="dev")
            first = (await c.ok("msg.send", room="dev", text="a"))["message"]
            frames = []
            for i in range(10):  # within the send burst (30)
                frames.append({"cmd": "msg.send", "id": f"s{i}", "room": "dev", "text": f"m{i}"})
                frames.append({"cmd": "msg.edit", "id": f"e{i}", "message_id": first["id"],
                               "text": f"a{i}"})  # fmt: skip
                frames.append({"cmd": "room.history", "id": f"h{i}", "room": "dev", "limit": 2})
            await c.send_raw(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
            for f in frames:
                reply = await c.reply(f["id"])
                assert reply["type"] == "ok", reply
        finally:
            await c.close()
    finally:
        await server.stop()
