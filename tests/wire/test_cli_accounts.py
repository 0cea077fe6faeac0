"""`chatd user …` and `chatd token` as real processes, beside a server on the same database
(wire contract, "Running (command line)" and "Identity and tokens")."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest

from chatd.server import ChatServer
from tests.helpers import SECRET, Client, running_server, until
from tests.process import chatd_run, chatd_serving

pytestmark = pytest.mark.one_node("`chatd user` on one SQLite file beside a running server")

PASSWORD = "correct horse battery"


chatd = chatd_run


async def add_user(db: str, name: str, *extra: str, password: str = PASSWORD) -> None:
    rc, _, err = await chatd(
        "user", "add", name, "--password-stdin", "--db", db, "--secret", SECRET, *extra,
        stdin=password + "\n",
    )  # fmt: skip
    assert rc == 0, err


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


@asynccontextmanager
async def server_on(tmp_path: Path) -> AsyncIterator[tuple[ChatServer, str]]:
    db = str(tmp_path / "x.db")
    async with running_server(db=db) as server:
        yield server, db


async def try_login(port: int, name: str, password: str = PASSWORD) -> dict[str, Any] | None:
    c = await Client.connect(port)
    try:
        frame = await c.call("login", user=name, password=password)
    finally:
        await c.close()
    return frame if frame["type"] == "ok" else None


async def seen(port: int, name: str) -> dict[str, Any]:
    """Wait until the server knows account `name` (listed in `channels`; polling with
    logins would count failed logins against the account), then log in as it."""
    watcher = await Client.connect(port)
    await watcher.guest(f"w{os.getpid()}{int(time.monotonic() * 1000) % 100000}")

    async def listed() -> bool:
        channels = (await watcher.ok("channels"))["channels"]
        return name in [ch["name"] for ch in channels]

    await until(listed)
    await watcher.ok("logout")
    await watcher.close()
    frame = await try_login(port, name)
    assert frame is not None
    return frame


# --- user add --------------------------------------------------------------------------


async def test_user_added_by_the_cli_can_log_in_on_a_running_server(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        c = await Client.connect(server.port)
        await c.error("login", "unauthorized", user="bob", password=PASSWORD)
        started = time.monotonic()
        rc, _, err = await chatd(
            "user", "add", "bob", "--password-stdin", "--db", db, "--secret", SECRET,
            stdin=PASSWORD + "\n",
        )  # fmt: skip
        assert rc == 0, err
        frame = await seen(server.port, "bob")
        # Seen within about a second of the command finishing.
        assert time.monotonic() - started < 5
        assert frame["data"]["user"] == "bob" and "admin" not in frame["data"]["grants"]
        # ... and listed like any account, and its name is taken.
        channels = (await c.ok("login", user="visitor"))["token"]
        assert "bob" in [ch["name"] for ch in (await c.ok("channels", token=channels))["channels"]]
        await c.error("register", "conflict", user="BOB", password=PASSWORD)
        await c.close()


async def test_admin_added_by_the_cli_gets_the_admin_grant(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        await add_user(db, "root", "--admin")
        frame = await seen(server.port, "root")
        assert "admin" in frame["data"]["grants"]


async def test_user_add_refuses_a_taken_name_a_bad_name_and_a_bad_password(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "carol")
    rc, _, err = await chatd("user", "add", "CAROL", "--password-stdin", "--db", db,
                             stdin=PASSWORD + "\n")
    assert rc != 0 and "exists" in err
    rc, _, err = await chatd("user", "add", "-bad", "--password-stdin", "--db", db,
                             stdin=PASSWORD + "\n")
    assert rc != 0 and "name" in err
    rc, _, err = await chatd("user", "add", "dan", "--password-stdin", "--db", db,
                             stdin="short\n")
    assert rc != 0 and "password" in err
    rc, out, _ = await chatd("user", "list", "--db", db)
    assert rc == 0 and out.split() == ["carol"]


async def test_user_add_refuses_a_name_an_online_guest_holds(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        g = await Client.connect(server.port)
        await g.guest("squatter")
        rc, _, err = await chatd("user", "add", "Squatter", "--password-stdin", "--db", db,
                                 "--secret", SECRET, stdin=PASSWORD + "\n")
        assert rc != 0 and "guest" in err
        # Once the guest logs out the name is free.
        await g.ok("logout")
        await add_user(db, "Squatter")
        await seen(server.port, "Squatter")
        await g.close()


async def test_a_cli_password_is_checked_like_register(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    rc, _, err = await chatd("user", "add", "eve", "--password-stdin", "--db", db,
                             stdin="x" * 1025 + "\n")
    assert rc != 0 and "password" in err
    # Eight characters of more than one byte each are fine, as on the wire.
    await add_user(db, "eve", password="éééééééé")
    async with running_server(db=db) as server:
        assert await try_login(server.port, "eve", "éééééééé")


# --- user list and delete --------------------------------------------------------------


async def test_user_list_prints_one_name_a_line(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    rc, out, err = await chatd("user", "list", "--db", db)
    assert rc == 2 and out == "" and "no database" in err  # a typo makes no empty database
    for name in ("Zed", "amy", "Bob"):
        await add_user(db, name)
    rc, out, _ = await chatd("user", "list", "--db", db)
    assert rc == 0 and out.splitlines() == ["amy", "Bob", "Zed"]


async def test_user_list_shows_accounts_registered_over_the_wire(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        c = await Client.connect(server.port)
        await c.ok("register", user="wired", password=PASSWORD)
        await c.close()
        rc, out, _ = await chatd("user", "list", "--db", db)
        assert rc == 0 and out.splitlines() == ["wired"]


async def test_user_delete_closes_that_users_connections(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        victim, victim2, watcher = [await Client.connect(server.port) for _ in range(3)]
        await victim.ok("register", user="frank", password=PASSWORD)
        token = (await victim.ok("login", user="frank", password=PASSWORD))["token"]
        await victim2.ok("auth", token=token)
        await watcher.ok("register", user="gina", password=PASSWORD)
        await watcher.ok("login", user="gina", password=PASSWORD)
        await watcher.ok("room.create", room="cafe")
        await victim.ok("room.join", room="cafe")
        await watcher.event("member.joined")
        rc, _, err = await chatd("user", "delete", "FRANK", "--db", db, "--secret", SECRET)
        assert rc == 0, err
        for conn in (victim, victim2):
            with pytest.raises(EOFError):
                while True:
                    await conn.recv(timeout=3)
        assert await watcher.event("member.left", timeout=3) == {
            "room": "cafe", "user": "frank", "reason": "deleted"
        }
        other = await Client.connect(server.port)
        await other.error("auth", "unauthorized", token=token)
        await other.error("login", "unauthorized", user="frank", password=PASSWORD)
        rc, out, _ = await chatd("user", "list", "--db", db)
        assert out.splitlines() == ["gina"]
        for conn in (other, watcher, victim, victim2):
            await conn.close()


async def test_user_delete_of_an_unknown_user_fails(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "somebody")
    rc, _, err = await chatd("user", "delete", "nobody", "--db", db)
    assert rc != 0 and "nobody" in err


# --- token -----------------------------------------------------------------------------


async def test_token_prints_a_bot_token_usable_with_auth(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        await add_user(db, "bot")
        before = time.time()
        rc, out, err = await chatd("token", "bot", "--grants", "room:create,msg:edit",
                                   "--ttl", "120", "--db", db, "--secret", SECRET)
        assert rc == 0, err
        lines = out.splitlines()
        assert len(lines) == 1  # the token alone on stdout
        token = lines[0]
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="chatd")
        assert claims["sub"] == "bot" and claims["scope"] == "room:create msg:edit"
        c = await Client.connect(server.port)
        data = await until(lambda: _auth(c, token))
        assert data["user"] == "bot" and data["grants"] == ["room:create", "msg:edit"]
        assert before + 120 <= data["expires_at"] <= time.time() + 122
        await c.ok("room.create", room="botroom")
        await c.close()


async def _auth(c: Client, token: str) -> dict[str, Any] | None:
    frame = await c.call("auth", token=token)
    return frame["data"] if frame["type"] == "ok" else None


async def test_token_grants_are_intersected_with_the_account(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "plain")
    await add_user(db, "boss", "--admin")
    rc, out, _ = await chatd("token", "plain", "--grants", "admin,msg:edit", "--db", db,
                             "--secret", SECRET)
    assert rc == 0
    assert jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["scope"] == "msg:edit"
    rc, out, _ = await chatd("token", "boss", "--grants", "admin", "--db", db, "--secret", SECRET)
    assert rc == 0 and jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["scope"] == "admin"
    rc, out, _ = await chatd("token", "boss", "--db", db, "--secret", SECRET)
    assert "admin" in jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["scope"].split()


async def test_token_refuses_bad_input(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "hal")
    rc, out, err = await chatd("token", "nobody", "--db", db, "--secret", SECRET)
    assert rc != 0 and out == "" and "nobody" in err
    rc, out, err = await chatd("token", "hal", "--grants", "root", "--db", db, "--secret", SECRET)
    assert rc != 0 and out == "" and "root" in err
    for ttl in ("0", "-5"):
        rc, out, err = await chatd("token", "hal", "--ttl", ttl, "--db", db, "--secret", SECRET)
        assert rc != 0 and out == "" and "ttl" in err


async def test_a_token_for_a_deleted_user_stops_working(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        await add_user(db, "ivan")
        rc, out, _ = await chatd("token", "ivan", "--db", db, "--secret", SECRET)
        token = out.strip()
        c = await Client.connect(server.port)
        await until(lambda: _auth(c, token))
        await c.close()
        rc, _, _ = await chatd("user", "delete", "ivan", "--db", db)
        assert rc == 0

        async def refused() -> bool:
            d = await Client.connect(server.port)
            try:
                return bool((await d.call("auth", token=token))["type"] == "error")
            finally:
                await d.close()

        await until(refused)


# --- secrets ---------------------------------------------------------------------------


async def test_a_secret_shorter_than_32_bytes_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "jo")
    short = "s" * 31
    rc, out, err = await chatd("token", "jo", "--db", db, "--secret", short)
    assert rc != 0 and out == "" and "32" in err and "Traceback" not in err
    rc, out, err = await chatd("token", "jo", "--db", db, CHATD_SECRET=short)
    assert rc != 0 and out == "" and "32" in err and "Traceback" not in err
    # 32 bytes is enough, counted in UTF-8 bytes.
    rc, out, _ = await chatd("token", "jo", "--db", db, "--secret", "é" * 16)
    assert rc == 0 and out.strip()
    rc, out, err = await chatd("token", "jo", "--db", db, "--secret", "é" * 15)
    assert rc != 0 and "32" in err


async def test_a_short_secret_in_the_file_beside_the_db_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "kay")
    with open(db + ".secret", "w") as f:  # noqa: ASYNC230 - a tiny local file
        f.write("tooshort\n")
    rc, out, err = await chatd("token", "kay", "--db", db, CHATD_SECRET="")
    assert rc != 0 and out == "" and "32" in err


async def test_empty_chatd_secret_counts_as_unset_and_the_file_is_used(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    await add_user(db, "lou")
    rc, out, err = await chatd("token", "lou", "--db", db, CHATD_SECRET="")
    assert rc == 0, err
    secret_file = db + ".secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    secret = read_text(secret_file)
    assert len(secret.encode()) >= 32
    jwt.decode(out.strip(), secret, algorithms=["HS256"])
    # The same file is used again, and by a server started the same way.
    rc, again, _ = await chatd("token", "lou", "--db", db, CHATD_SECRET="")
    jwt.decode(again.strip(), secret, algorithms=["HS256"])
    assert read_text(secret_file) == secret
    async with chatd_serving("serve", "--port", "0", "--db", db, CHATD_SECRET="") as srv:
        c = await Client.connect(srv.port)
        assert (await c.ok("auth", token=out.strip()))["user"] == "lou"
        await c.close()


async def test_a_token_signed_with_another_secret_is_refused(tmp_path: Path) -> None:
    async with server_on(tmp_path) as (server, db):
        await add_user(db, "max")
        rc, out, _ = await chatd("token", "max", "--db", db, "--secret", "o" * 40)
        assert rc == 0
        c = await Client.connect(server.port)
        await seen(server.port, "max")
        await c.error("auth", "unauthorized", token=out.strip())
        await c.close()
