"""`chatd user|token|stats|backup --redis` as real processes beside `chatd serve --redis`
nodes on a real redis-server (issue 11; wire contract, "Several nodes": the CLI commands
take --redis too). The same behaviour and messages as the SQLite path
(tests/wire/test_cli_accounts.py)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import jwt
import pytest

from tests.helpers import Client
from tests.process import chatd_run, chatd_serving

pytestmark = pytest.mark.one_node("command-line tools and node processes on their own Redis")

SECRET = "a-secret-shared-by-every-node-0123456789"
PASSWORD = "correct horse battery"


def node(url: str, *extra: str) -> tuple[str, ...]:
    return ("serve", "--redis", url, "--port", "0", "--secret", SECRET, *extra)


async def add_user(url: str, name: str, *extra: str) -> tuple[int, str, str]:
    return await chatd_run(
        "user", "add", name, "--password-stdin", "--redis", url, "--secret", SECRET, *extra,
        stdin=PASSWORD + "\n",
    )  # fmt: skip


async def test_user_add_on_redis_logs_in_at_once_on_every_running_node(redis_url: str) -> None:
    async with chatd_serving(*node(redis_url)) as a, chatd_serving(*node(redis_url)) as b:
        rc, out, err = await add_user(redis_url, "Bob")
        assert rc == 0 and out.strip() == "Bob", err
        # Right after the command exits, no waiting for a poll, on either node.
        for port in (a.port, b.port):
            c = await Client.connect(port)
            data = await c.ok("login", user="bob", password=PASSWORD)
            assert data["user"] == "Bob" and "admin" not in data["grants"]
            await c.close()
        rc, _, err = await add_user(redis_url, "Root", "--admin")
        assert rc == 0, err
        c = await Client.connect(b.port)
        assert "admin" in (await c.ok("login", user="root", password=PASSWORD))["grants"]
        await c.error("register", "conflict", user="BOB", password=PASSWORD)
        await c.close()
    rc, out, _ = await chatd_run("user", "list", "--redis", redis_url)
    assert rc == 0 and out.splitlines() == ["Bob", "Root"]


async def test_user_add_on_redis_refuses_as_on_sqlite(redis_url: str) -> None:
    async with chatd_serving(*node(redis_url)) as srv:
        assert (await add_user(redis_url, "ann"))[0] == 0
        rc, _, err = await add_user(redis_url, "ANN")
        assert rc == 2 and "user 'ANN' already exists" in err
        guest = await Client.connect(srv.port)
        await guest.ok("login", user="visitor")  # a guest holds the name while connected
        rc, _, err = await add_user(redis_url, "Visitor")
        assert rc == 2 and "held by a guest while it is connected" in err
        await guest.close()
        rc, _, err = await chatd_run(
            "user", "add", "x y", "--password-stdin", "--redis", redis_url, stdin="short\n"
        )
        assert rc == 2 and "password" in err
    # The guest's grace (120 s by default) outlives the node: the name is held until then.
    rc, _, err = await add_user(redis_url, "visitor")
    assert rc == 2 and "held by a guest until" in err


async def test_the_cli_on_a_redis_without_chatd_data_creates_nothing(redis_url: str) -> None:
    for args in (("user", "list"), ("user", "delete", "x"), ("token", "x", "--secret", SECRET)):
        rc, out, err = await chatd_run(*args, "--redis", redis_url)
        assert rc == 2 and out == "" and "no chatd data in Redis at" in err, (args, err)
    import redis

    with redis.Redis.from_url(redis_url) as r:
        assert r.dbsize() == 0
    rc, _, err = await chatd_run("user", "list", "--redis", "redis://127.0.0.1:1/0")
    assert rc == 2 and "cannot use Redis" in err


async def test_user_delete_on_redis_closes_that_users_connections_on_every_node(
    redis_url: str,
) -> None:
    async with chatd_serving(*node(redis_url)) as a, chatd_serving(*node(redis_url)) as b:
        assert (await add_user(redis_url, "frank"))[0] == 0
        on_a, on_b = await Client.connect(a.port), await Client.connect(b.port)
        token = (await on_a.ok("login", user="frank", password=PASSWORD))["token"]
        await on_b.ok("auth", token=token)
        watcher = await Client.connect(a.port)
        await watcher.ok("login", user="gina")
        await watcher.ok("room.create", room="cafe")
        await on_a.ok("room.join", room="cafe")
        await watcher.event("member.joined")
        rc, _, err = await chatd_run("user", "delete", "FRANK", "--redis", redis_url)
        assert rc == 0, err
        for conn in (on_a, on_b):
            with pytest.raises(EOFError):
                while True:
                    await conn.recv(timeout=3)
        assert await watcher.event("member.left", timeout=3) == {
            "room": "cafe", "user": "frank", "reason": "deleted"
        }
        other = await Client.connect(b.port)
        await other.error("auth", "unauthorized", token=token)
        await other.error("login", "unauthorized", user="frank", password=PASSWORD)
        for conn in (other, watcher, on_a, on_b):
            await conn.close()
    rc, _, err = await chatd_run("user", "delete", "frank", "--redis", redis_url)
    assert rc == 2 and "no user 'frank'" in err


async def test_token_and_stats_on_redis(redis_url: str) -> None:
    async with chatd_serving(*node(redis_url)) as srv:
        assert (await add_user(redis_url, "bot"))[0] == 0
        rc, out, err = await chatd_run(
            "token", "bot", "--grants", "room:create", "--redis", redis_url, "--secret", SECRET
        )
        assert rc == 0, err
        claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"], issuer="chatd")
        assert claims["sub"] == "bot" and claims["scope"] == "room:create"
        c = await Client.connect(srv.port)
        assert (await c.ok("auth", token=out.strip()))["user"] == "bot"
        await c.close()
        # No file beside a database to find the secret in: it must be given.
        rc, out, err = await chatd_run("token", "bot", "--redis", redis_url)
        assert rc == 2 and out == "" and "pass --secret or set CHATD_SECRET" in err
        rc, _, err = await chatd_run("stats", "--port", str(srv.port), "--redis", redis_url,
                                     "--secret", SECRET)  # fmt: skip
        assert rc == 2 and "no admin account in redis://127.0.0.1" in err
        assert (await add_user(redis_url, "boss", "--admin"))[0] == 0
        # The secret from the environment, as the nodes may take it.
        rc, out, err = await chatd_run("stats", "--port", str(srv.port), "--json",
                                       "--redis", redis_url, CHATD_SECRET=SECRET)  # fmt: skip
        assert rc == 0, err
        assert json.loads(out)["connections"] >= 1


async def test_backup_on_redis_writes_an_sqlite_file_that_copy_restores(
    redis_url: str, tmp_path: Path
) -> None:
    from tests.redisutil import RedisServer

    async with chatd_serving(*node(redis_url)) as srv:
        assert (await add_user(redis_url, "ann"))[0] == 0
        c = await Client.connect(srv.port)
        await c.ok("login", user="ann", password=PASSWORD)
        await c.ok("room.create", room="dev")
        for i in range(5):
            await c.ok("msg.send", room="dev", text=f"m{i}")
        # Taken while the node runs (nothing is writing at this moment).
        dest = str(tmp_path / "b.db")
        rc, _, err = await chatd_run("backup", dest, "--redis", redis_url)
        assert rc == 0 and "(5 messages)" in err, err
        await c.close()
    assert oct(os.stat(dest).st_mode & 0o777) == "0o600"
    with sqlite3.connect(dest) as db:
        assert [r[0] for r in db.execute("SELECT text FROM messages ORDER BY id")] == [
            f"m{i}" for i in range(5)
        ]
    other = RedisServer().start()
    try:
        rc, _, err = await chatd_run("copy", "--from", dest, "--to", other.url)
        assert rc == 0, err
        async with chatd_serving(*node(other.url)) as srv:
            c = await Client.connect(srv.port)
            await c.ok("login", user="ann", password=PASSWORD)
            await c.ok("room.join", room="dev")
            page = await c.ok("room.history", room="dev")
            assert [m["text"] for m in page["messages"]] == [f"m{i}" for i in range(5)]
            assert c.hello["data"]["rev"] == 5
            await c.close()
    finally:
        other.close()
    rc, _, err = await chatd_run("backup", str(tmp_path), "--redis", redis_url)
    assert rc == 2 and "is a directory" in err
