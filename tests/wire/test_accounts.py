"""Accounts and JWT sessions over real sockets (wire contract, "Identity and tokens",
commands register, login, auth, refresh, logout, whoami, user.delete; limits.md, login
failures, password length, token length, JWT leeway)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest

from chatd.auth import PasswordHasher
from chatd.config import ALL_GRANTS, DEFAULT_LOGIN_GRANTS
from chatd.server import ChatServer
from chatd.store.sqlite import SQLiteStore
from tests.helpers import (
    SECRET,
    TEST_CONFIG,
    TIMEOUT,
    Client,
    advance,
    fake_clock,
    running_server,
)

Connect = Callable[[], Awaitable[Client]]
PASSWORD = "correct horse battery"
DEFAULT = list(DEFAULT_LOGIN_GRANTS)


# --- helpers ---------------------------------------------------------------------------


async def account(c: Client, name: str, password: str = PASSWORD, **login: Any) -> dict[str, Any]:
    """Register `name` and log this connection in as it."""
    assert (await c.ok("register", user=name, password=password)) == {"user": name}
    data = await c.ok("login", user=name, password=password, **login)
    c.token = data["token"]
    return data


async def add_admin(server: ChatServer, name: str, password: str = PASSWORD) -> None:
    """An admin account made through the store, as `chatd user add --admin` would."""
    user = await server.store.create_user(name, server.hasher.hash_sync(password), admin=True)
    assert user is not None
    await server.app.refresh_user(name.lower())  # seen at once, as the contract says


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: dict[str, Any], key: bytes | None, alg: str = "HS256", **header: Any) -> str:
    """A JWT built by hand, so any header, payload or key can be tried (PyJWT refuses
    some of them, e.g. a PEM key as an HMAC secret)."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT", **header}).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = f"{head}.{body}".encode()
    if key is None:
        sig = b""
    else:
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        sig = hmac.new(key, signing_input, digest.get(alg, hashlib.sha256)).digest()
    return f"{head}.{body}.{b64(sig)}"


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False}, issuer="chatd"
    )
    return payload


async def fresh_whoami(port: int, token: str) -> dict[str, Any]:
    """whoami with `token` from a new connection: the reply frame."""
    c = await Client.connect(port)
    try:
        return await c.call("whoami", token=token)
    finally:
        await c.close()


async def member_left(c: Client) -> dict[str, Any]:
    return await c.event("member.left")


@asynccontextmanager
async def spied_server(**changes: Any) -> AsyncIterator[tuple[ChatServer, list[str]]]:
    """A server whose password hasher records every hash and verify it is asked for."""
    calls: list[str] = []
    cfg = TEST_CONFIG.replace(**changes)

    class Spy(PasswordHasher):
        async def hash(self, password: str) -> str:
            calls.append("hash")
            return await super().hash(password)

        async def verify(self, pw_hash: str | None, password: str) -> bool:
            calls.append("verify")
            return await super().verify(pw_hash, password)

    hasher = Spy(memory_kib=cfg.argon2_memory_kib, time_cost=cfg.argon2_time_cost)
    server = ChatServer(cfg, SQLiteStore(cfg.db), SECRET, hasher=hasher)
    await server.start()
    try:
        yield server, calls
    finally:
        await server.stop()


# --- register --------------------------------------------------------------------------


async def test_register_then_login_shows_the_name_as_first_written(connect: Connect) -> None:
    c = await connect()
    assert await c.ok("register", user="Alice", password=PASSWORD) == {"user": "Alice"}
    data = await c.ok("login", user="aLiCe", password=PASSWORD)
    assert data["user"] == "Alice"
    assert (await c.ok("whoami"))["user"] == "Alice"


async def test_registering_a_taken_name_in_any_case_is_conflict(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="bob", password=PASSWORD)
    await c.error("register", "conflict", user="BOB", password="another password")


@pytest.mark.parametrize(
    "name",
    ["", "a" * 33, ".dot", "-dash", "has space", "é", "a/b", "tab\t", "semi;colon"],
)
async def test_invalid_names_are_bad_request(connect: Connect, name: str) -> None:
    c = await connect()
    frame = await c.error("register", "bad_request", user=name, password=PASSWORD)
    assert "user" in frame["message"]
    await c.error("login", "bad_request", user=name, password=PASSWORD)
    await c.error("login", "bad_request", user=name)


async def test_valid_name_shapes_register(connect: Connect) -> None:
    c = await connect()
    for name in ["a", "x" * 32, "_under", "0digit", "a.b-c_d", "Z.9"]:
        assert await c.ok("register", user=name, password=PASSWORD) == {"user": name}


async def test_register_missing_or_mistyped_fields_are_bad_request(connect: Connect) -> None:
    c = await connect()
    frame = await c.error("register", "bad_request", user="carol")
    assert "password" in frame["message"]
    frame = await c.error("register", "bad_request", password=PASSWORD)
    assert "user" in frame["message"]
    await c.error("register", "bad_request", user="carol", password=12345678)
    await c.error("register", "bad_request", user=7, password=PASSWORD)


async def test_password_length_bounds_on_register_and_login() -> None:
    async with spied_server() as (server, calls):
        c = await Client.connect(server.port)
        for bad in ["", "x" * 7, "x" * 1025, "é" * 513, "éééé"]:
            await c.error("register", "bad_request", user="pw", password=bad)
            await c.error("login", "bad_request", user="pw", password=bad)
        # Rejected before any KDF run (limits.md): a 60 KB password costs nothing.
        await c.error("register", "bad_request", user="pw", password="y" * 60_000)
        await c.error("login", "bad_request", user="pw", password="y" * 60_000)
        assert calls == []
        for i, good in enumerate(["x" * 8, "x" * 1024, "é" * 512, "ééééaaaa"]):
            await c.ok("register", user=f"pw{i}", password=good)
            await c.ok("login", user=f"pw{i}", password=good)
            await c.ok("logout")
        assert calls.count("hash") == 4 and calls.count("verify") == 4
        await c.close()


async def test_registering_while_logged_in_as_someone_else_is_allowed(connect: Connect) -> None:
    c = await connect()
    await account(c, "dave")
    await c.ok("register", user="erin", password=PASSWORD)
    assert (await c.ok("whoami"))["user"] == "dave"


# --- login and tokens ------------------------------------------------------------------


async def test_login_reply_and_token_claims(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="frank", password=PASSWORD)
    before = time.time()
    data = await c.ok("login", user="frank", password=PASSWORD)
    after = time.time()
    assert set(data) == {"token", "user", "grants", "expires_at"}
    assert data["user"] == "frank" and data["grants"] == DEFAULT
    assert "admin" not in data["grants"]
    header = jwt.get_unverified_header(data["token"])
    assert header["alg"] == "HS256"
    claims = claims_of(data["token"])
    assert set(claims) >= {"sub", "iat", "exp", "jti", "iss", "scope"}
    assert claims["sub"] == "frank" and claims["iss"] == "chatd"
    assert claims["scope"].split(" ") == DEFAULT
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int)
    assert claims["exp"] == data["expires_at"]
    # exp is rounded up: the token lives at least its ttl.
    assert before + 3600 <= claims["exp"] <= after + 3600 + 1
    assert 3600 <= claims["exp"] - claims["iat"] <= 3601
    # iat is never in the future (a client's JWT library may refuse that).
    assert before - 1 <= claims["iat"] <= after


async def test_wrong_password_and_unknown_user_look_the_same(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="gina", password=PASSWORD)
    wrong = await c.error("login", "unauthorized", user="gina", password="not the password")
    unknown = await c.error("login", "unauthorized", user="nobody", password=PASSWORD)
    assert wrong["message"] == unknown["message"]
    await c.error("whoami", "unauthorized")


async def test_tokens_of_two_logins_are_distinct_and_both_valid(connect: Connect) -> None:
    a, b = await connect(), await connect()
    first = await account(a, "hank")
    second = await b.ok("login", user="hank", password=PASSWORD)
    assert first["token"] != second["token"]
    assert claims_of(first["token"])["jti"] != claims_of(second["token"])["jti"]
    assert (await a.ok("whoami"))["user"] == "hank"
    assert (await b.ok("whoami"))["user"] == "hank"


async def test_requested_grants_give_the_intersection(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="ivy", password=PASSWORD)
    data = await c.ok("login", user="ivy", password=PASSWORD, grants=["msg:edit", "room:create"])
    # Contract order, whatever order was asked.
    assert data["grants"] == ["room:create", "msg:edit"]
    assert claims_of(data["token"])["scope"] == "room:create msg:edit"
    assert (await c.ok("whoami"))["grants"] == ["room:create", "msg:edit"]
    # admin is not the user's to ask for: the intersection drops it.
    data = await c.ok("login", user="ivy", password=PASSWORD, grants=["admin", "msg:delete"])
    assert data["grants"] == ["msg:delete"]
    data = await c.ok("login", user="ivy", password=PASSWORD, grants=["admin"])
    assert data["grants"] == [] and claims_of(data["token"])["scope"] == ""
    data = await c.ok("login", user="ivy", password=PASSWORD, grants=[])
    assert data["grants"] == []
    # A token without grants still authenticates; the grant checks then refuse.
    assert (await c.ok("whoami"))["grants"] == []
    await c.error("room.create", "forbidden", room="nogrant")


async def test_unknown_or_mistyped_grants_are_bad_request(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="jack", password=PASSWORD)
    frame = await c.error("login", "bad_request", user="jack", password=PASSWORD,
                          grants=["room:create", "root"])
    assert "root" in frame["message"]
    await c.error("login", "bad_request", user="jack", password=PASSWORD, grants="room:create")
    await c.error("login", "bad_request", user="jack", password=PASSWORD, grants=[1])
    # Checked before the password: an unknown grant is not a failed login.
    await c.error("login", "bad_request", user="jack", password="wrong password", grants=["x"])
    await c.error("login", "bad_request", user="jack", grants=["x"])


async def test_admin_account_login_gets_admin(server: ChatServer, connect: Connect) -> None:
    await add_admin(server, "root")
    c = await connect()
    data = await c.ok("login", user="root", password=PASSWORD)
    assert data["grants"] == list(ALL_GRANTS)
    data = await c.ok("login", user="root", password=PASSWORD, grants=["admin"])
    assert data["grants"] == ["admin"]
    data = await c.ok("login", user="root", password=PASSWORD, grants=["msg:edit"])
    assert data["grants"] == ["msg:edit"]


async def test_login_grants_are_server_configurable() -> None:
    async with running_server(login_grants=("room:create",)) as server:
        c = await Client.connect(server.port)
        await c.ok("register", user="kim", password=PASSWORD)
        data = await c.ok("login", user="kim", password=PASSWORD)
        assert data["grants"] == ["room:create"]
        data = await c.ok("login", user="kim", password=PASSWORD, grants=["msg:edit"])
        assert data["grants"] == []
        await c.ok("logout")
        # Guests have grants of their own (--guest-grants), not the logins'.
        assert (await c.guest("guesty"))["grants"] == list(TEST_CONFIG.guest_grants)
        await c.close()


@pytest.mark.parametrize("ttl", [0, -1, -3600])
async def test_nonpositive_ttl_is_bad_request(connect: Connect, ttl: int) -> None:
    c = await connect()
    await c.ok("register", user="leo", password=PASSWORD)
    await c.error("login", "bad_request", user="leo", password=PASSWORD, ttl=ttl)
    await c.error("login", "bad_request", user="guestleo", ttl=ttl)


async def test_mistyped_ttl_is_bad_request(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="leo", password=PASSWORD)
    for ttl in ["60", 1.5, True, [60]]:
        frame = await c.error("login", "bad_request", user="leo", password=PASSWORD, ttl=ttl)
        assert "ttl" in frame["message"]


async def test_ttl_is_honoured_and_clamped_to_token_ttl() -> None:
    async with running_server(token_ttl=120) as server:
        c = await Client.connect(server.port)
        await c.ok("register", user="mia", password=PASSWORD)
        now = time.time()
        short = await c.ok("login", user="mia", password=PASSWORD, ttl=30)
        assert now + 30 <= short["expires_at"] <= now + 32
        lifetime = claims_of(short["token"])["exp"] - claims_of(short["token"])["iat"]
        assert 30 <= lifetime <= 31
        default = await c.ok("login", user="mia", password=PASSWORD)
        assert now + 120 <= default["expires_at"] <= now + 122
        huge = await c.ok("login", user="mia", password=PASSWORD, ttl=10**9)
        assert now + 120 <= huge["expires_at"] <= now + 122
        await c.ok("logout")
        guest = await c.ok("login", user="gmia", ttl=10**6)
        assert now + 120 <= guest["expires_at"] <= now + 122
        await c.close()


# --- login failures --------------------------------------------------------------------


async def test_five_failed_logins_per_connection_then_rate_limited(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="nina", password=PASSWORD)
    # Different accounts: the limit is the connection's.
    for i in range(5):
        await c.error("login", "unauthorized", user=f"ghost{i}", password="wrong password")
    frame = await c.error("login", "rate_limited", user="nina", password=PASSWORD)
    assert 0 < frame["retry_after"] <= 60
    # Other connections are not affected, nor is the account (no failure against it).
    other = await connect()
    await other.ok("login", user="nina", password=PASSWORD)
    # Guest logins need no password, so they are not password guesses.
    await c.guest("guestnina")


async def test_five_failed_logins_per_account_then_rate_limited(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="oscar", password=PASSWORD)
    await c.ok("register", user="pam", password=PASSWORD)
    for _ in range(5):
        attacker = await connect()  # a fresh connection each time
        await attacker.error("login", "unauthorized", user="OSCAR", password="wrong password")
    victim = await connect()
    frame = await victim.error("login", "rate_limited", user="oscar", password=PASSWORD)
    assert 0 < frame["retry_after"] <= 60 and frame["message"]
    # Other accounts still log in from the same place.
    await victim.ok("login", user="pam", password=PASSWORD)


async def test_failed_logins_below_the_limit_do_not_block(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="quinn", password=PASSWORD)
    for _ in range(4):
        await c.error("login", "unauthorized", user="quinn", password="wrong password")
    await c.ok("login", user="quinn", password=PASSWORD)


# --- auth, whoami, binding -------------------------------------------------------------


async def test_auth_binds_a_connection_to_a_token(connect: Connect) -> None:
    a, b = await connect(), await connect()
    data = await account(a, "rita", grants=["msg:edit"])
    await b.error("whoami", "unauthorized")
    reply = await b.ok("auth", token=data["token"])
    assert reply == {"user": "rita", "grants": ["msg:edit"], "expires_at": data["expires_at"]}
    assert await b.ok("whoami") == reply


async def test_auth_needs_a_string_token(connect: Connect) -> None:
    c = await connect()
    frame = await c.error("auth", "bad_request")
    assert "token" in frame["message"]
    await c.error("auth", "bad_request", token=12)
    await c.error("auth", "unauthorized", token="")
    await c.error("auth", "unauthorized", token="not.a.jwt")
    await c.error("auth", "unauthorized", token="garbage")


async def test_first_valid_token_in_a_frame_binds_the_connection(connect: Connect) -> None:
    a, b = await connect(), await connect()
    data = await account(a, "sam")
    assert (await b.ok("whoami", token=data["token"]))["user"] == "sam"
    assert (await b.ok("whoami"))["user"] == "sam"  # now bound


async def test_a_bad_token_in_a_frame_does_not_bind(connect: Connect) -> None:
    c = await connect()
    await c.error("whoami", "unauthorized", token="junk")
    await c.error("whoami", "unauthorized")


async def test_frame_token_of_the_same_user_is_used_for_that_frame(connect: Connect) -> None:
    c = await connect()
    full = await account(c, "tara")
    narrow = await c.ok("login", user="tara", password=PASSWORD, grants=[])
    # The connection is now bound to the narrow token; a frame may carry the full one.
    assert (await c.ok("whoami"))["grants"] == []
    assert (await c.ok("whoami", token=full["token"]))["grants"] == DEFAULT
    assert (await c.ok("whoami"))["expires_at"] == narrow["expires_at"]


async def test_auth_with_another_token_of_the_same_user_rebinds(connect: Connect) -> None:
    a, b = await connect(), await connect()
    first = await account(a, "ursula")
    second = await b.ok("login", user="ursula", password=PASSWORD, grants=["msg:edit"])
    assert (await a.ok("auth", token=second["token"]))["grants"] == ["msg:edit"]
    assert (await a.ok("whoami"))["grants"] == ["msg:edit"]
    assert (await a.ok("auth", token=first["token"]))["grants"] == DEFAULT


async def test_bound_connection_refuses_another_users_token_login_and_auth(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await account(a, "uma")
    bob = await account(b, "vic")
    await a.error("whoami", "forbidden", token=bob["token"])
    await a.error("auth", "forbidden", token=bob["token"])
    await a.error("login", "forbidden", user="vic", password=PASSWORD)
    await a.error("login", "forbidden", user="VIC", password="wrong password")
    await a.error("login", "forbidden", user="someguest")
    # Still bound to the first user, unchanged.
    assert (await a.ok("whoami"))["user"] == "uma"
    # The same user may log in again on its connection; log out first for another.
    await a.ok("login", user="UMA", password=PASSWORD)
    await a.ok("logout")
    assert (await a.ok("login", user="vic", password=PASSWORD))["user"] == "vic"
    assert (await a.ok("whoami"))["user"] == "vic"


async def test_forbidden_binding_is_not_a_failed_login(connect: Connect) -> None:
    a = await connect()
    await account(a, "walt")
    await a.ok("register", user="xena", password=PASSWORD)
    for _ in range(6):
        await a.error("login", "forbidden", user="xena", password="wrong password")
    b = await connect()
    await b.ok("login", user="xena", password=PASSWORD)


async def test_commands_that_need_a_token_say_unauthorized_without_one(connect: Connect) -> None:
    c = await connect()
    commands: list[dict[str, Any]] = [
        {"cmd": "refresh"},
        {"cmd": "logout"},
        {"cmd": "logout", "all": True},
        {"cmd": "whoami"},
        {"cmd": "user.delete", "user": "someone"},
        {"cmd": "room.create", "room": "r"},
        {"cmd": "room.list"},
        {"cmd": "room.join", "room": "r"},
        {"cmd": "channels"},
        {"cmd": "msg.send", "room": "r", "text": "hi"},
        {"cmd": "sync", "since": 0},
    ]
    for frame in commands:
        cmd = frame.pop("cmd")
        await c.error(cmd, "unauthorized", **frame)
    assert await c.ok("ping") == {"pong": True}
    assert (await c.ok("help"))["commands"]


async def test_fields_are_checked_before_the_token(connect: Connect) -> None:
    c = await connect()
    # No token at all, yet the malformed fields are reported first (contract order).
    await c.error("msg.send", "bad_request", room="r", text="   \n\t ")
    await c.error("msg.send", "bad_request", room="r")
    await c.error("msg.send", "bad_request", room="r", to="x", text="hi")
    await c.error("room.join", "bad_request", room="bad name")
    await c.error("user.delete", "bad_request")
    await c.error("logout", "bad_request", all="yes")
    await c.error("sync", "bad_request", since=-1)
    # ... and a bad token in the frame does not change that.
    await c.error("msg.send", "bad_request", room="r", text=" ", token="junk")
    await c.error("msg.send", "unauthorized", room="r", text="hi", token="junk")


async def test_whoami_reports_the_token_in_use(connect: Connect) -> None:
    c = await connect()
    data = await account(c, "yara", grants=["room:delete", "msg:delete:any"])
    assert await c.ok("whoami") == {
        "user": "yara",
        "grants": ["room:delete", "msg:delete:any"],
        "expires_at": data["expires_at"],
    }


# --- refresh ---------------------------------------------------------------------------


async def test_refresh_gives_a_new_token_with_same_grants_and_lifetime(connect: Connect) -> None:
    a, b = await connect(), await connect()
    old = await account(a, "zack", grants=["msg:edit"], ttl=100)
    await asyncio.sleep(1.1)  # a later whole second, so the new exp is visibly later
    new = await a.ok("refresh")
    assert set(new) == {"token", "expires_at"} and new["token"] != old["token"]
    assert new["expires_at"] > old["expires_at"]
    oc, nc = claims_of(old["token"]), claims_of(new["token"])
    assert nc["exp"] - nc["iat"] == oc["exp"] - oc["iat"]
    assert 100 <= oc["exp"] - oc["iat"] <= 101
    assert nc["scope"] == oc["scope"] == "msg:edit" and nc["sub"] == "zack"
    assert nc["jti"] != oc["jti"]
    # The connection is bound to the new token ...
    assert (await a.ok("whoami"))["expires_at"] == new["expires_at"]
    # ... and the old one stays valid until its own exp.
    assert (await b.ok("auth", token=old["token"]))["expires_at"] == old["expires_at"]


async def test_refreshing_repeatedly_keeps_the_same_lifetime(connect: Connect) -> None:
    c = await connect()
    first = await account(c, "amy", ttl=50)
    lifetimes = [claims_of(first["token"])["exp"] - claims_of(first["token"])["iat"]]
    for _ in range(5):
        data = await c.ok("refresh")
        cl = claims_of(data["token"])
        lifetimes.append(cl["exp"] - cl["iat"])
    assert len(set(lifetimes)) == 1 and 50 <= lifetimes[0] <= 51, lifetimes


async def test_refresh_never_exceeds_token_ttl() -> None:
    async with running_server(token_ttl=60) as server:
        c = await Client.connect(server.port)
        await account(c, "ben", ttl=60)
        now = time.time()
        data = await c.ok("refresh")
        assert now + 60 <= data["expires_at"] <= now + 62
        await c.close()


async def test_refresh_of_a_guest_keeps_its_name(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await a.ok("login", user="gcarl", ttl=30)
    data = await a.ok("refresh")
    assert claims_of(data["token"])["sub"] == "gcarl"
    await b.error("login", "conflict", user="gcarl")
    assert (await b.ok("auth", token=data["token"]))["user"] == "gcarl"


# --- logout ----------------------------------------------------------------------------


async def test_logout_revokes_this_token_only_and_unbinds(server: ChatServer, connect: Connect) -> None:
    a, b, watcher = await connect(), await connect(), await connect()
    first = await account(a, "cody")
    second = await b.ok("login", user="cody", password=PASSWORD)
    await account(watcher, "dana")
    await a.ok("room.create", room="lobby")
    await watcher.ok("room.join", room="lobby")
    assert await a.ok("logout") == {}
    # a left its rooms: cody's last connection in lobby.
    assert await member_left(watcher) == {"room": "lobby", "user": "cody", "reason": "logout"}
    await a.error("whoami", "unauthorized")
    assert (await fresh_whoami(server.port, first["token"]))["code"] == "unauthorized"
    await a.error("auth", "unauthorized", token=first["token"])
    # The other token of the same user still works, and its connection was not touched.
    assert (await b.ok("whoami"))["user"] == "cody"
    await b.no_frame()
    # The connection stays open and can log in again.
    assert (await a.ok("login", user="cody", password=PASSWORD))["user"] == "cody"
    assert second["token"] != first["token"]


async def test_logout_all_revokes_every_token_and_expires_other_connections(
    server: ChatServer, connect: Connect
) -> None:
    a, b, c, watcher = await connect(), await connect(), await connect(), await connect()
    await account(a, "eve")
    tb = (await b.ok("login", user="eve", password=PASSWORD))["token"]
    tc = (await c.ok("login", user="eve", password=PASSWORD))["token"]
    spare = (await watcher.ok("register", user="fay", password=PASSWORD))
    assert spare == {"user": "fay"}
    unused = (await watcher.ok("login", user="eve", password=PASSWORD))["token"]
    await watcher.ok("logout")
    await watcher.ok("login", user="fay", password=PASSWORD)
    await b.ok("room.create", room="hall")
    await watcher.ok("room.join", room="hall")
    assert await a.ok("logout", all=True) == {}
    for other in (b, c):
        assert await other.event("session.expired") == {"reason": "logout"}
        await other.error("whoami", "unauthorized")
    assert await member_left(watcher) == {"room": "hall", "user": "eve", "reason": "logout"}
    for token in (tb, tc, unused):
        assert (await fresh_whoami(server.port, token))["code"] == "unauthorized"
    await a.error("whoami", "unauthorized")
    # A new login after logout all works.
    fresh = await b.ok("login", user="eve", password=PASSWORD)
    assert (await fresh_whoami(server.port, fresh["token"]))["data"]["user"] == "eve"


async def test_logout_expires_other_connections_bound_to_the_same_token(connect: Connect) -> None:
    a, b, c = await connect(), await connect(), await connect()
    data = await account(a, "hal")
    await b.ok("auth", token=data["token"])
    await c.ok("login", user="hal", password=PASSWORD)
    await a.ok("logout")
    assert await b.event("session.expired") == {"reason": "logout"}
    await b.error("whoami", "unauthorized")
    await c.no_frame()
    assert (await c.ok("whoami"))["user"] == "hal"


async def test_logout_all_of_a_guest_frees_its_name_everywhere(connect: Connect) -> None:
    a, b, c = await connect(), await connect(), await connect()
    data = await a.guest("gnat")
    await b.ok("auth", token=data["token"])
    await a.ok("logout", all=True)
    assert await b.event("session.expired") == {"reason": "logout"}
    assert (await c.guest("gnat"))["user"] == "gnat"


async def test_logout_with_a_revoked_token_is_unauthorized(connect: Connect) -> None:
    c = await connect()
    data = await account(c, "gus")
    await c.ok("logout")
    await c.error("logout", "unauthorized", token=data["token"])
    await c.error("refresh", "unauthorized", token=data["token"])


async def test_logout_of_a_guest_frees_its_name(server: ChatServer, connect: Connect) -> None:
    a, b = await connect(), await connect()
    data = await a.guest("gdora")
    await b.error("login", "conflict", user="gdora")
    await a.ok("logout")
    assert (await fresh_whoami(server.port, data["token"]))["code"] == "unauthorized"
    assert (await b.guest("GDora"))["user"] == "GDora"


# --- guests ----------------------------------------------------------------------------


async def test_guest_login_without_password(connect: Connect) -> None:
    c = await connect()
    data = await c.guest("visitor")
    assert data["user"] == "visitor" and data["grants"] == DEFAULT
    assert claims_of(data["token"])["sub"] == "visitor"
    assert (await c.ok("whoami"))["user"] == "visitor"
    data = await c.ok("login", user="visitor", grants=["room:create"], ttl=60)
    assert data["grants"] == ["room:create"]


async def test_guest_login_as_a_registered_name_is_unauthorized(connect: Connect) -> None:
    c = await connect()
    await c.ok("register", user="hugo", password=PASSWORD)
    await c.error("login", "unauthorized", user="HUGO")


async def test_guest_login_as_a_held_name_is_conflict(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await a.guest("roamer")
    await b.error("login", "conflict", user="ROAMER")


async def test_a_guest_may_log_in_again_as_itself(connect: Connect) -> None:
    # Not "another guest": the holder itself gets a new token under the same hold.
    a, b = await connect(), await connect()
    first = await a.guest("ilse")
    again = await a.ok("login", user="ilse")
    assert again["user"] == "ilse" and again["token"] != first["token"]
    await b.error("login", "conflict", user="ilse")
    assert (await a.ok("whoami"))["user"] == "ilse"


async def test_registering_a_held_guest_name_is_conflict(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await a.guest("jade")
    await b.error("register", "conflict", user="Jade", password=PASSWORD)
    await a.ok("logout")
    await b.ok("register", user="Jade", password=PASSWORD)
    # ... and then the name is registered: no guest may take it.
    await a.error("login", "unauthorized", user="jade")


async def test_register_and_guest_login_racing_for_a_name_have_one_winner(
    connect: Connect,
) -> None:
    for i in range(5):
        a, b = await connect(), await connect()
        name = f"race{i}"
        await a.send({"cmd": "register", "id": "r", "user": name, "password": PASSWORD})
        await b.send({"cmd": "login", "id": "g", "user": name})
        reg, guest = await a.reply("r"), await b.reply("g")
        outcomes = sorted([reg["type"], guest["type"]])
        assert outcomes == ["error", "ok"], (reg, guest)
        loser = reg if reg["type"] == "error" else guest
        assert loser["code"] in ("conflict", "unauthorized"), loser


async def test_two_registers_of_one_name_have_one_winner(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await a.send({"cmd": "register", "id": 1, "user": "twin", "password": PASSWORD})
    await b.send({"cmd": "register", "id": 2, "user": "TWIN", "password": PASSWORD})
    first, second = await a.reply(1), await b.reply(2)
    assert sorted([first["type"], second["type"]]) == ["error", "ok"]
    assert (first if first["type"] == "error" else second)["code"] == "conflict"


async def test_guests_disabled_is_forbidden_and_checked_first() -> None:
    async with running_server(guests=False) as server:
        c = await Client.connect(server.port)
        await c.ok("register", user="karl", password=PASSWORD)
        frame = await c.error("login", "forbidden", user="karl")  # not unauthorized
        assert "guest" in frame["message"]
        await c.error("login", "forbidden", user="newcomer")
        await c.ok("login", user="karl", password=PASSWORD)  # passwords still work
        await c.close()


async def test_guests_disabled_is_forbidden_even_for_a_held_name(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        await c.guest("lena")
        await c.close()
    async with running_server(db=db, guests=False) as server:
        c = await Client.connect(server.port)
        await c.error("login", "forbidden", user="lena")
        await c.close()


async def test_online_guests_are_listed_in_channels(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await account(a, "max")
    await b.guest("Nomad")
    users = [ch for ch in (await a.ok("channels"))["channels"] if ch["type"] == "user"]
    assert {"name": "Nomad", "type": "user"} in users
    assert {"name": "max", "type": "user"} in users
    await b.ok("logout")
    names = [ch["name"] for ch in (await a.ok("channels"))["channels"]]
    assert "Nomad" not in names and "max" in names


async def test_an_expired_guest_token_starts_the_grace() -> None:
    # Contract, "Guest names come back": the hold lasts while a connection is bound to the
    # guest; its token expiring unbinds the last one, so (grace 0) the name is free.
    async with running_server(guest_grace=0, clock=fake_clock()) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        data = await a.ok("login", user="brief", ttl=1)
        await b.error("login", "conflict", user="brief")
        await advance(server, data["expires_at"] - server.clock.now())
        await a.event("session.expired", timeout=TIMEOUT)
        assert (await b.guest("brief"))["user"] == "brief"
        await a.close()
        await b.close()


async def test_guest_holds_its_name_across_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "hold.db")
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        data = await c.guest("wanderer")
        await c.close()
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        await c.error("login", "conflict", user="wanderer")
        await c.error("register", "conflict", user="wanderer", password=PASSWORD)
        assert (await c.ok("auth", token=data["token"]))["user"] == "wanderer"
        await c.close()


async def test_a_guest_cannot_delete_users(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await account(a, "olga")
    await b.guest("pest")
    await b.error("user.delete", "forbidden", user="olga")


# --- user.delete -----------------------------------------------------------------------


async def test_user_delete_needs_admin(connect: Connect) -> None:
    a, b = await connect(), await connect()
    await account(a, "pete")
    await account(b, "ruth")
    await a.error("user.delete", "forbidden", user="ruth")
    assert (await b.ok("whoami"))["user"] == "ruth"


async def test_admin_without_the_admin_grant_is_forbidden(server: ChatServer, connect: Connect) -> None:
    await add_admin(server, "boss")
    a, b = await connect(), await connect()
    await a.ok("login", user="boss", password=PASSWORD, grants=["room:create"])
    await account(b, "temp")
    await a.error("user.delete", "forbidden", user="temp")


async def test_user_delete_closes_connections_and_kills_tokens(
    server: ChatServer, connect: Connect
) -> None:
    await add_admin(server, "chief")
    admin, victim, victim2, watcher = await connect(), await connect(), await connect(), await connect()
    await admin.ok("login", user="chief", password=PASSWORD)
    data = await account(victim, "sid")
    await victim2.ok("login", user="sid", password=PASSWORD)
    await account(watcher, "tess")
    await victim.ok("room.create", room="den")
    await watcher.ok("room.join", room="den")
    await admin.ok("room.join", room="den")
    await watcher.event("member.joined")
    assert await admin.ok("user.delete", user="SID") == {}
    for conn in (victim, victim2):
        with pytest.raises(EOFError):
            while True:
                await conn.recv()
    assert await member_left(watcher) == {"room": "den", "user": "sid", "reason": "deleted"}
    assert (await fresh_whoami(server.port, data["token"]))["code"] == "unauthorized"
    await admin.error("login", "forbidden", user="sid", password=PASSWORD)
    other = await connect()
    await other.error("login", "unauthorized", user="sid", password=PASSWORD)
    # The name is free again; the old token stays dead for the new account.
    await other.ok("register", user="sid", password=PASSWORD)
    assert (await fresh_whoami(server.port, data["token"]))["code"] == "unauthorized"
    assert "sid" in [ch["name"] for ch in (await admin.ok("channels"))["channels"]]


async def test_an_admin_deleting_itself_gets_the_reply_then_is_closed(
    server: ChatServer, connect: Connect
) -> None:
    await add_admin(server, "selfish")
    c = await connect()
    await c.ok("login", user="selfish", password=PASSWORD)
    assert await c.ok("user.delete", user="selfish") == {}
    with pytest.raises(EOFError):
        await c.recv()


async def test_user_delete_unknown_or_invalid(server: ChatServer, connect: Connect) -> None:
    await add_admin(server, "mgr")
    c = await connect()
    await c.ok("login", user="mgr", password=PASSWORD)
    await c.error("user.delete", "not_found", user="nobody")
    await c.error("user.delete", "bad_request", user="not valid")
    guest = await connect()
    await guest.guest("drifter")
    await c.error("user.delete", "not_found", user="drifter")


# --- forged and malformed tokens -------------------------------------------------------


@pytest.fixture
async def real(connect: Connect) -> dict[str, Any]:
    """The claims of a genuine token of user `vera` (registered, logged in)."""
    c = await connect()
    data = await account(c, "vera")
    return claims_of(data["token"])


async def assert_refused(port: int, token: str, code: str = "unauthorized") -> None:
    c = await Client.connect(port)
    try:
        await c.error("whoami", code, token=token)
        await c.error("auth", code, token=token)
        await c.error("whoami", "unauthorized")  # nothing was bound
    finally:
        await c.close()


async def test_a_token_forged_with_the_real_secret_is_accepted(server: ChatServer, real: dict[str, Any]) -> None:
    # The control for the tests below: the forging helper itself is sound.
    reply = await fresh_whoami(server.port, forge(real, SECRET.encode()))
    assert reply["type"] == "ok" and reply["data"]["user"] == "vera"


async def test_alg_none_is_refused(server: ChatServer, real: dict[str, Any]) -> None:
    for alg in ("none", "None", "NONE"):
        await assert_refused(server.port, forge(real, None, alg=alg))
    # Unsigned but with the real signature's shape: still none.
    await assert_refused(server.port, forge(real, None, alg="none") + "AAAA")


async def test_hs256_with_another_key_is_refused(server: ChatServer, real: dict[str, Any]) -> None:
    await assert_refused(server.port, forge(real, b"another-secret-that-is-long-enough-too!!"))
    await assert_refused(server.port, jwt.encode(real, "x" * 40 + "other", algorithm="HS256"))


async def test_other_hmac_algorithms_with_the_right_secret_are_refused(
    server: ChatServer, real: dict[str, Any]
) -> None:
    # The verifier pins HS256.
    for alg in ("HS384", "HS512"):
        await assert_refused(server.port, forge(real, SECRET.encode(), alg=alg))


PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo
4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u
+qKhbwKfBstIs+bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyeh
kd3qqGElvW/VDL5AaWTg0nLVkjRo9z+40RQzuVaE8AkAFmxZzow3x+VJYKdjykkJ
0iT9wCS0DRTXu269V264Vf/3jvredZiKRkgwlL9xNAwxXFg0x/XFw005UWVRIkdg
cKWTjpBP2dPwVZ4WWC+9aGVd+Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbc
mwIDAQAB
-----END PUBLIC KEY-----
"""


async def test_rs_hs_key_confusion_is_refused(server: ChatServer, real: dict[str, Any]) -> None:
    # An RS256 token (the signature bytes do not matter: the algorithm is not accepted) ...
    head = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(real).encode())
    await assert_refused(server.port, f"{head}.{body}.{b64(os.urandom(256))}")
    # ... and the classic confusion: HS256 keyed with a public key, as an attacker would.
    await assert_refused(server.port, forge(real, PUBLIC_KEY.encode()))
    await assert_refused(server.port, forge(real, PUBLIC_KEY.strip().encode()))
    for alg in ("ES256", "PS256", "EdDSA"):
        await assert_refused(server.port, forge(real, PUBLIC_KEY.encode(), alg=alg))


@pytest.mark.parametrize("claim", ["sub", "iat", "exp", "jti", "iss", "scope"])
async def test_a_token_missing_a_claim_is_refused(server: ChatServer, real: dict[str, Any], claim: str) -> None:
    payload = {k: v for k, v in real.items() if k != claim}
    await assert_refused(server.port, forge(payload, SECRET.encode()))


async def test_expired_token_is_token_expired(server: ChatServer, real: dict[str, Any]) -> None:
    now = int(time.time())
    past = {**real, "iat": now - 100, "exp": now - 1}
    await assert_refused(server.port, forge(past, SECRET.encode()), code="token_expired")
    # exp 0 s leeway: a token whose exp is now is already expired.
    await assert_refused(server.port, forge({**real, "exp": now}, SECRET.encode()), code="token_expired")


async def test_iat_in_the_future(server: ChatServer, real: dict[str, Any]) -> None:
    now = int(time.time())
    far = {**real, "iat": now + 3600, "exp": now + 7200}
    await assert_refused(server.port, forge(far, SECRET.encode()))
    # 30 s of leeway for clocks: a few seconds ahead is fine.
    near = {**real, "iat": now + 5}
    assert (await fresh_whoami(server.port, forge(near, SECRET.encode())))["type"] == "ok"


async def test_tampered_payload_with_the_old_signature_is_refused(
    server: ChatServer, real: dict[str, Any], connect: Connect
) -> None:
    genuine = forge(real, SECRET.encode())
    head, _, sig = genuine.split(".")
    for change in (
        {"scope": " ".join(ALL_GRANTS)},
        {"sub": "somebody"},
        {"exp": real["exp"] + 100_000},
    ):
        body = b64(json.dumps({**real, **change}).encode())
        await assert_refused(server.port, f"{head}.{body}.{sig}")
    # A flipped signature byte.
    bad_sig = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    await assert_refused(server.port, f"{head}.{genuine.split('.')[1]}.{bad_sig}")


@pytest.mark.parametrize(
    "change",
    [
        {"exp": "9999999999"},
        {"iat": "0"},
        {"exp": 9999999999.5},
        {"exp": True},
        {"exp": None},
        {"scope": ["room:create", "msg:edit"]},
        {"scope": None},
        {"scope": "room:create superuser"},
        {"sub": 42},
        {"sub": ["vera"]},
        {"jti": 7},
        {"iss": "someone-else"},
        {"iss": ["chatd"]},
    ],
    ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()),
)
async def test_claims_of_the_wrong_type_or_value_are_refused(
    server: ChatServer, real: dict[str, Any], change: dict[str, Any]
) -> None:
    await assert_refused(server.port, forge({**real, **change}, SECRET.encode()))


async def test_sub_of_another_user_with_the_real_secret_is_refused(
    server: ChatServer, real: dict[str, Any], connect: Connect
) -> None:
    c = await connect()
    await account(c, "walter")
    # A genuine signature but the jti names vera's account: the accounts disagree.
    await assert_refused(server.port, forge({**real, "sub": "walter"}, SECRET.encode()))
    await assert_refused(server.port, forge({**real, "sub": "nosuchuser"}, SECRET.encode()))


async def test_a_token_over_4096_bytes_is_refused(server: ChatServer, real: dict[str, Any]) -> None:
    big = forge({**real, "pad": "x" * 4096}, SECRET.encode())
    assert len(big) > 4096
    await assert_refused(server.port, big)
    # Counted in bytes, not characters.
    weird = "€" * 1400 + "." + "x" * 10
    assert len(weird) <= 4096 < len(weird.encode())
    await assert_refused(server.port, weird)
    # Just under the limit with a valid signature is fine.
    n = 4096 - len(forge({**real, "pad": ""}, SECRET.encode()))
    fits = forge({**real, "pad": "x" * (n * 3 // 4 - 4)}, SECRET.encode())
    assert len(fits) <= 4096
    assert (await fresh_whoami(server.port, fits))["type"] == "ok"


async def test_malformed_tokens_are_unauthorized(server: ChatServer) -> None:
    for token in ["", ".", "..", "a.b.c", "a.b", "x" * 100, "eyJ.eyJ.", "\u00e9.\u00e9.\u00e9"]:
        await assert_refused(server.port, token)


# --- expiry mid-session ----------------------------------------------------------------


@pytest.mark.fake_clock
async def test_session_expires_on_its_own_and_the_connection_stays_open(
    server: ChatServer, connect: Connect
) -> None:
    a, watcher = await connect(), await connect()
    await a.ok("register", user="xander", password=PASSWORD)
    await account(watcher, "yolanda")
    await watcher.ok("room.create", room="plaza")
    await watcher.ok("room.create", room="alley")
    rid = 991
    await a.send({"cmd": "login", "id": rid, "user": "xander", "password": PASSWORD, "ttl": 1})
    # The reply comes before the events it causes (contract).
    first = await a.recv()
    assert first["type"] == "ok" and first["id"] == rid, first
    data = first["data"]
    await a.ok("room.join", room="plaza")
    await a.ok("room.join", room="alley")
    await watcher.event("member.joined")
    await watcher.event("member.joined")
    expiring = await a.event("session.expiring", timeout=TIMEOUT)
    assert expiring == {"expires_at": data["expires_at"]}
    await advance(server, data["expires_at"] - server.clock.now() - 0.01)
    await a.no_frame(0.05)  # not before its time
    await advance(server, 0.01)
    assert await a.event("session.expired", timeout=TIMEOUT) == {}
    assert server.clock.now() >= data["expires_at"]
    left = [await member_left(watcher), await member_left(watcher)]
    assert sorted(e["room"] for e in left) == ["alley", "plaza"]
    assert all(e["user"] == "xander" and e["reason"] == "expired" for e in left)
    # Unbound, open, and able to log in again.
    await a.error("whoami", "unauthorized")
    await a.error("whoami", "token_expired", token=data["token"])
    await a.error("auth", "token_expired", token=data["token"])
    assert await a.ok("ping") == {"pong": True}
    assert (await watcher.ok("room.members", room="plaza"))["members"] == ["yolanda"]
    await a.ok("login", user="xander", password=PASSWORD)
    assert (await a.ok("whoami"))["user"] == "xander"
    # session.expiring came once per token.
    assert not [e for e in a.events if e["event"] == "session.expiring"]


@pytest.mark.fake_clock
async def test_a_refreshed_session_does_not_expire_with_the_old_token(
    server: ChatServer, connect: Connect
) -> None:
    c = await connect()
    await c.ok("register", user="zelda", password=PASSWORD)
    old = await c.ok("login", user="zelda", password=PASSWORD, ttl=1)
    assert (await c.event("session.expiring"))["expires_at"] == old["expires_at"]
    await advance(server, max(0.0, old["expires_at"] - 1 - server.clock.now()) + 0.1)
    new = await c.ok("refresh")
    assert new["expires_at"] > old["expires_at"]
    # A new token: a new notice; the old token's expiry passes without session.expired.
    assert (await c.event("session.expiring"))["expires_at"] == new["expires_at"]
    await advance(server, max(0.0, old["expires_at"] - server.clock.now()) + 0.2)
    await c.no_frame(within=0.1)
    assert (await c.ok("whoami"))["expires_at"] == new["expires_at"]
    # The new token's own expiry is then honoured.
    await advance(server, new["expires_at"] - server.clock.now())
    assert await c.event("session.expired") == {}
    assert server.clock.now() >= new["expires_at"]


async def test_notice_comes_before_expiry_and_once_per_token() -> None:
    async with running_server(session_expiring_notice=1, clock=fake_clock()) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        await a.ok("register", user="noel", password=PASSWORD)
        data = await a.ok("login", user="noel", password=PASSWORD, ttl=2)
        await b.ok("auth", token=data["token"])
        await advance(server, data["expires_at"] - 1 - server.clock.now() - 0.01)
        await a.no_frame(within=0.1)
        await advance(server, 0.01)
        assert await a.event("session.expiring") == {"expires_at": data["expires_at"]}
        assert server.clock.now() >= data["expires_at"] - 1
        # auth again with the bound token: no second notice for the same token.
        await a.ok("auth", token=data["token"])
        await advance(server, data["expires_at"] - server.clock.now() - 0.01)
        await a.no_frame(within=0.1)  # not expired early
        await advance(server, 0.01)
        assert await a.event("session.expired") == {}
        assert await b.event("session.expiring") == {"expires_at": data["expires_at"]}
        assert await b.event("session.expired") == {}
        assert not a.events and not b.events
        await a.close()
        await b.close()


@pytest.mark.fake_clock
async def test_expiry_of_a_frame_token_does_not_unbind_the_connection(
    server: ChatServer, connect: Connect
) -> None:
    a, b = await connect(), await connect()
    await account(a, "abel")
    short = await b.ok("login", user="abel", password=PASSWORD, ttl=1)
    # a is bound to its own hour-long token; a frame with the short one is fine, then dies.
    assert (await a.ok("whoami", token=short["token"]))["expires_at"] == short["expires_at"]
    await advance(server, short["expires_at"] - server.clock.now())
    await b.event("session.expired")
    await a.error("whoami", "token_expired", token=short["token"])
    assert (await a.ok("whoami"))["user"] == "abel"


# --- restart ---------------------------------------------------------------------------


async def test_revocation_survives_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "x.db")
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        revoked = await account(c, "bea")
        await c.ok("logout")
        kept = await c.ok("login", user="bea", password=PASSWORD)
        await c.close()
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        await c.error("auth", "unauthorized", token=revoked["token"])
        assert (await c.ok("auth", token=kept["token"]))["user"] == "bea"
        await c.close()


async def test_logout_all_survives_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "x.db")
    async with running_server(db=db) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        await account(a, "cal")
        other = await b.ok("login", user="cal", password=PASSWORD)
        await a.ok("logout", all=True)
        await a.close()
        await b.close()
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        await c.error("auth", "unauthorized", token=other["token"])
        await c.ok("login", user="cal", password=PASSWORD)
        await c.close()


async def test_deleted_user_stays_deleted_across_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "x.db")
    async with running_server(db=db) as server:
        await add_admin(server, "op")
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        await a.ok("login", user="op", password=PASSWORD)
        gone = await account(b, "dex")
        await a.ok("user.delete", user="dex")
        await a.close()
        await b.close()
    async with running_server(db=db) as server:
        c = await Client.connect(server.port)
        await c.error("auth", "unauthorized", token=gone["token"])
        await c.error("login", "unauthorized", user="dex", password=PASSWORD)
        await c.close()


# --- load ------------------------------------------------------------------------------


async def test_login_storm_does_not_stall_other_clients(server: ChatServer, connect: Connect) -> None:
    setup = await connect()
    for i in range(5):
        await setup.ok("register", user=f"storm{i}", password=PASSWORD)
    clients = [await connect() for _ in range(50)]
    pinger = await connect()

    async def pings() -> int:
        for _ in range(20):
            assert await pinger.ok("ping") == {"pong": True}
            await asyncio.sleep(0.01)
        return 20

    async def storm() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(c.call("login", user=f"storm{i % 5}", password=PASSWORD) for i, c in enumerate(clients))
        )

    done, results = await asyncio.wait_for(asyncio.gather(pings(), storm()), 15)
    assert done == 20
    assert all(r["type"] == "ok" for r in results), [r for r in results if r["type"] != "ok"]


async def test_user_delete_reply_comes_before_member_left(server, connect) -> None:
    """Contract: a command's reply comes before the events it causes, on the caller's
    connection too (here: the admin shares a room with the deleted user)."""
    from chatd.auth import PasswordHasher

    admin = await connect()
    store = server.store
    hasher = PasswordHasher(memory_kib=1024, time_cost=1, workers=1)
    try:
        rec = await store.create_user("root", hasher.hash_sync("root-password"), admin=True)
    finally:
        hasher.close()
    assert rec is not None
    await server.app.refresh_user("root")
    await admin.ok("login", user="root", password="root-password")
    await admin.ok("room.create", room="shared")
    await admin.ok("register", user="doomed", password="doomed-password")
    other = await connect()
    await other.ok("login", user="doomed", password="doomed-password")
    await other.ok("room.join", room="shared")
    assert (await admin.event("member.joined"))["user"] == "doomed"
    rid = "del-1"
    await admin.send({"cmd": "user.delete", "id": rid, "user": "doomed"})
    first = await admin.recv()
    assert first["type"] == "ok" and first["id"] == rid, first
    left = await admin.event("member.left")
    assert left == {"room": "shared", "user": "doomed", "reason": "deleted"}


async def test_parallel_guesses_at_a_failing_account_stay_within_the_limit(
    server: ChatServer, connect: Connect
) -> None:
    setup = await connect()
    await setup.ok("register", user="target", password=PASSWORD)
    await setup.error("login", "unauthorized", user="target", password="wrong-guess-0")
    guessers = [await connect() for _ in range(30)]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(g.call("login", user="target", password=f"wrong-guess-{i}") for i, g in enumerate(guessers))
        ),
        15,
    )
    codes = [r["code"] for r in results]
    # One failure was already recorded: at most four more guesses may be checked.
    assert codes.count("unauthorized") <= 4, codes
    assert set(codes) <= {"unauthorized", "rate_limited"}


async def test_another_users_token_on_a_tokenless_command_is_forbidden(connect: Connect) -> None:
    ann = await connect()
    await ann.guest("ann-t")
    bob = await connect()
    bob_token = (await bob.guest("bob-t"))["token"]
    await ann.error("ping", "forbidden", token=bob_token)
    assert await ann.ok("ping", token=ann.token) == {"pong": True}
    assert await ann.ok("ping", token="not-a-token") == {"pong": True}  # not checked on ping


async def test_user_delete_reply_comes_before_the_callers_member_left(
    server: ChatServer, connect: Connect
) -> None:
    """protocol.md, user.delete: on the caller's own connection the reply comes first, then
    the `member.left` of the deleted user for a room the caller shares (contract: a reply
    comes before the events its command causes)."""
    await add_admin(server, "warden")
    admin, victim = await connect(), await connect()
    await admin.ok("login", user="warden", password=PASSWORD)
    await account(victim, "gone")
    await victim.ok("room.create", room="cell")
    await admin.ok("room.join", room="cell")
    await admin.send({"cmd": "user.delete", "id": "del", "user": "gone"})
    first, second = await admin.recv(), await admin.recv()
    assert first == {"type": "ok", "id": "del", "data": {}}, first
    assert second["event"] == "member.left" and second["data"]["reason"] == "deleted", second


@pytest.mark.parametrize("registered", [False, True], ids=["guest", "account"])
async def test_a_message_stored_before_a_logout_reaches_the_connection_before_its_reply(
    connect: Connect, registered: bool
) -> None:
    """Contract: a logout unbinds the connection from then on; what was stored before it
    (in the two-node pass: on the other node) still reaches it, before the reply."""
    ann, bob = await connect(), await connect()
    if registered:
        await account(ann, "ann-l")
    else:
        await ann.guest("ann-l")
    await bob.guest("bob-l")
    await ann.ok("room.create", room="bye")
    await bob.ok("room.join", room="bye")
    await bob.ok("msg.send", room="bye", text="last words")
    await ann.send({"cmd": "logout", "id": "out"})
    frames = []
    while not frames or frames[-1].get("id") != "out":
        frames.append(await ann.recv())
    texts = [f["data"]["text"] for f in frames if f.get("event") == "message"]
    assert texts == ["last words"], frames
