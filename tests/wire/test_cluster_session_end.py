"""A connection's session ends across nodes as on one server (issue 11): what was written
anywhere before a `logout` (plain, `all`, a guest's), a `passwd`, a `user.delete` or the
token's expiry reaches the connections it ends before their reply, `session.expired` or
close. On one
server those events went out as they were stored, before the session ended; on several
nodes the node ending it first applies the change stream up to then (App.caught_up).
Two in-process nodes on one real redis-server; the race is made certain by holding the
ending node's stream reader while another node writes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import Client, clients, until
from tests.wire.test_cluster_membership import Readers, two_nodes

pytestmark = pytest.mark.one_node("starts its own nodes on its own Redis")

PASSWORD = "correct horse battery"


def catching_up(node: Any) -> Any:
    """A check for tests.helpers.until: the node waits for its reader to catch up (the
    command, or the expiry, has got as far as App.caught_up while the reader is held)."""

    async def check() -> bool:
        return bool(node.cluster._catching_up)

    return check


async def frames_until(c: Client, done: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """Every frame `c` gets up to and including the first for which `done` is true."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not got or not done(got[-1]):
        got.append(await c.recv(max(0.1, deadline - time.monotonic())))
    return got


def texts(frames: list[dict[str, Any]]) -> list[str]:
    return [f["data"]["text"] for f in frames if f.get("event") == "message"]


def expired(frame: dict[str, Any]) -> bool:
    return frame.get("event") == "session.expired"


@pytest.mark.parametrize("how", ["guest logout", "logout", "logout all", "passwd"])
async def test_what_another_node_wrote_before_a_session_ends_arrives_before_its_end(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, a.port, b.port) as (u1, u2, o):
        if how == "guest logout":
            token = (await u1.ok("login", user="Ula"))["token"]
            await u2.ok("auth", token=token)  # ends with the hold
        else:
            await u1.ok("register", user="Ula", password=PASSWORD)
            token = (await u1.ok("login", user="Ula", password=PASSWORD))["token"]
            if how == "logout":
                await u2.ok("auth", token=token)  # the revoked token: ends too
            else:
                await u2.ok("login", user="Ula", password=PASSWORD)  # another token
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        for u in (u1, u2):
            await u.ok("room.join", room="dev")
        await readers.hold(a)  # node a hears nothing from b for now
        await o.ok("msg.send", room="dev", text="before")  # stored before the command
        if how == "passwd":
            cmd = {"cmd": "passwd", "password": PASSWORD, "new_password": PASSWORD + "!"}
        else:
            cmd = {"cmd": "logout", "all": True} if how == "logout all" else {"cmd": "logout"}
        await u1.send({**cmd, "id": "end"})
        await until(catching_up(a))
        readers.release(a)
        ended = await frames_until(u1, lambda f: f.get("id") == "end")
        assert ended[-1]["type"] == "ok", ended[-1]
        if how != "passwd":  # (passwd keeps its own connection bound: it gets it anyway)
            assert texts(ended) == ["before"], ended
        others = await frames_until(u2, expired)
        assert texts(others) == ["before"], others
        assert others[-1]["data"] == {"reason": "logout"}
        assert (await o.ok("room.members", room="dev"))["members"] == (
            ["Obs", "Ula"] if how == "passwd" else ["Obs"]
        )


async def test_what_another_node_wrote_before_a_token_expired_arrives_before_session_expired(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (u, o):
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        expires_at = (await u.ok("login", user="Ula", ttl=6))["expires_at"]
        await u.ok("room.join", room="dev")
        await readers.hold(a)
        await o.ok("msg.send", room="dev", text="before")
        assert time.time() < expires_at - 0.2, "too slow to test: the token expired first"
        await asyncio.sleep(max(0.0, expires_at - time.time()))  # the expiry timer is due
        await until(catching_up(a))
        readers.release(a)
        ended = await frames_until(u, expired)
        assert texts(ended) == ["before"], ended
        assert ended[-1]["data"] == {}
        left = await o.event("member.left")
        assert left == {"room": "dev", "user": "Ula", "reason": "expired"}


async def test_what_another_node_wrote_before_a_user_delete_arrives_before_the_close(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, a.port, b.port) as (adm, u, o):
        admin = await a.store.create_user("warden", a.hasher.hash_sync(PASSWORD), admin=True)
        assert admin is not None
        await adm.ok("login", user="warden", password=PASSWORD)
        await u.ok("register", user="Ula", password=PASSWORD)
        await u.ok("login", user="Ula", password=PASSWORD)
        await o.ok("login", user="Obs")
        await o.ok("room.create", room="dev")
        await u.ok("room.join", room="dev")
        await readers.hold(a)
        await o.ok("msg.send", room="dev", text="before")
        await adm.send({"cmd": "user.delete", "id": "del", "user": "Ula"})
        await until(catching_up(a))
        readers.release(a)
        assert (await adm.reply("del"))["type"] == "ok"
        got: list[dict[str, Any]] = []
        with pytest.raises(EOFError):  # closed (contract: no session.expired)
            while True:
                got.append(await u.recv())
        assert texts(got) == ["before"], got
        assert (await o.event("member.left"))["reason"] == "deleted"


@pytest.mark.parametrize("how", ["logout all", "passwd", "user.delete"])
async def test_what_another_node_wrote_after_it_ended_a_session_does_not_reach_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The mirror case: a session ended on another node (its account's tokens revoked, or
    the account deleted) gets nothing written after that, as on one server, even while
    its node still reads the account from Redis (made slow here)."""
    from chatd.store.redis.store import RedisStore

    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(b.port, a.port, b.port) as (u1, u2, o):
        admin = await b.store.create_user("warden", b.hasher.hash_sync(PASSWORD), admin=True)
        assert admin is not None
        await u1.ok("register", user="Ula", password=PASSWORD)
        await u1.ok("login", user="Ula", password=PASSWORD)
        await u2.ok("login", user="Ula", password=PASSWORD)  # on node a
        await o.ok("login", user="warden", password=PASSWORD)
        await o.ok("room.create", room="dev")
        await u2.ok("room.join", room="dev")
        get_user = RedisStore.get_user

        async def slow_get_user(self: RedisStore, name: str) -> Any:
            await asyncio.sleep(0.5)
            return await get_user(self, name)

        await readers.hold(a)
        monkeypatch.setattr(RedisStore, "get_user", slow_get_user)
        if how == "logout all":
            await u1.ok("logout", all=True)
        elif how == "passwd":
            await u1.ok("passwd", password=PASSWORD, new_password=PASSWORD + "!")
        else:
            await o.ok("user.delete", user="Ula")
        await o.ok("msg.send", room="dev", text="after")
        readers.release(a)  # a reads both entries now, the account's change first
        if how == "user.delete":
            got: list[dict[str, Any]] = []
            with pytest.raises(EOFError):
                while True:
                    got.append(await u2.recv())
        else:
            got = await frames_until(u2, expired)
        assert texts(got) == [], got


async def test_a_guest_logout_whose_session_ended_meanwhile_releases_nobody_s_hold(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest zed is on node a and node b (one token). b logs zed out and another guest
    takes the name there; a `logout` on a, sent before a has read that, is checked again
    once a has caught up: its session ended (session.expired), so it is `unauthorized`
    and the new guest's hold stays, as on one server, where the other logout came first."""
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port, b.port) as (z1, z2, new):
        token = (await z1.ok("login", user="zed"))["token"]
        await z2.ok("auth", token=token)
        await readers.hold(a)  # a hears nothing from b for now
        await z2.ok("logout")
        await new.ok("login", user="Zed")  # the name, taken again on b
        await z1.send({"cmd": "logout", "id": "late"})
        await until(catching_up(a))
        readers.release(a)
        frames = await frames_until(z1, lambda f: f.get("id") == "late")
        assert [f.get("event") for f in frames if f.get("type") == "event"] == ["session.expired"]
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "unauthorized", frames
        await new.ok("room.create", room="still-mine")  # the new guest is still logged in
        assert (await z1.error("login", "conflict", user="zed"))["message"].startswith(
            "the name 'zed' is held by a guest while connected"
        )
