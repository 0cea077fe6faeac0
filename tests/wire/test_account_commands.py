"""passwd, user.list and help over the wire, and command-line account changes that count at
once (wire contract, "Decided for the next round")."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.auth import new_jti
from chatd.server import ChatServer
from tests.helpers import SECRET, Client, Connect, admin, running_server
from tests.process import chatd_run

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new password"


async def account(c: Client, name: str, password: str = PASSWORD) -> dict[str, Any]:
    await c.ok("register", user=name, password=password)
    data = await c.ok("login", user=name, password=password)
    c.token = data["token"]
    return data


def tokens_of_nobody(server: ChatServer) -> str:
    token, _ = server.app.tokens.mint("nobody", new_jti(99, 0), (), 60)
    return token


async def fresh_call(port: int, cmd: str, **fields: Any) -> dict[str, Any]:
    c = await Client.connect(port)
    try:
        return await c.call(cmd, **fields)
    finally:
        await c.close()


# --- passwd ----------------------------------------------------------------------------


async def test_passwd_gives_a_new_token_and_ends_every_other(
    server: ChatServer, connect: Connect
) -> None:
    a, b, watcher = await connect(), await connect(), await connect()
    first = await account(a, "pat")
    other = await b.ok("login", user="pat", password=PASSWORD, grants=["msg:edit"])
    await account(watcher, "wat")
    await watcher.ok("room.create", room="den")
    await b.ok("room.join", room="den")
    data = await a.ok("passwd", password=PASSWORD, new_password=NEW_PASSWORD)
    assert set(data) == {"token", "expires_at"} and data["token"] != first["token"]
    # The same grants and lifetime rules as refresh, bound to this connection.
    me = await a.ok("whoami")
    assert me["grants"] == first["grants"] and me["expires_at"] == data["expires_at"]
    assert (await fresh_call(server.port, "auth", token=data["token"]))["type"] == "ok"
    # Every other token stops working; their connections are told, as for `logout all`.
    assert await b.event("session.expired") == {"reason": "logout"}
    left = await watcher.event("member.left")
    assert left == {"room": "den", "user": "pat", "reason": "logout"}
    for token in (first["token"], other["token"]):
        assert (await fresh_call(server.port, "auth", token=token))["code"] == "unauthorized"
    await b.error("whoami", "unauthorized")
    # The new password logs in, the old one no longer does.
    assert (await fresh_call(server.port, "login", user="pat", password=PASSWORD))[
        "code"
    ] == "unauthorized"
    assert (await fresh_call(server.port, "login", user="pat", password=NEW_PASSWORD))[
        "type"
    ] == "ok"


async def test_passwd_with_a_wrong_password_counts_as_a_failed_login(connect: Connect) -> None:
    a = await connect()
    await account(a, "quin")
    for _ in range(5):  # limits.md: 5 failures a minute per connection and account
        frame = await a.error("passwd", "unauthorized", password="not the password",
                              new_password=NEW_PASSWORD)  # fmt: skip
        assert "password" in frame["message"]
    await a.error("passwd", "rate_limited", password=PASSWORD, new_password=NEW_PASSWORD)
    b = await connect()
    await b.error("login", "rate_limited", user="quin", password=PASSWORD)
    assert (await a.ok("whoami"))["user"] == "quin"  # the token still works


async def test_passwd_checks_lengths_and_refuses_guests(connect: Connect) -> None:
    a, g = await connect(), await connect()
    await account(a, "rae")
    frame = await a.error("passwd", "bad_request", password=PASSWORD, new_password="short")
    assert "8" in frame["message"]
    await a.error("passwd", "bad_request", password=PASSWORD, new_password="x" * 1025)
    await a.error("passwd", "bad_request", password=PASSWORD)  # a field missing
    # A short old password is simply wrong (contract: `unauthorized`), not a bad request.
    await a.error("passwd", "unauthorized", password="wrong", new_password=NEW_PASSWORD)
    await a.error("passwd", "bad_request", password="x" * 1025, new_password=NEW_PASSWORD)
    assert (await a.ok("whoami"))["user"] == "rae"  # nothing changed
    await g.guest("drifter")
    await g.error("passwd", "forbidden", password=PASSWORD, new_password=NEW_PASSWORD)
    c = await connect()
    await c.error("passwd", "unauthorized", password=PASSWORD, new_password=NEW_PASSWORD)


async def test_a_changed_password_survives_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "p.db")
    async with running_server(db=db) as server:
        a = await Client.connect(server.port)
        await account(a, "sal")
        await a.ok("passwd", password=PASSWORD, new_password=NEW_PASSWORD)
        await a.close()
    async with running_server(db=db) as server:
        frame = await fresh_call(server.port, "login", user="sal", password=NEW_PASSWORD)
        assert frame["type"] == "ok", frame


# --- user.list -------------------------------------------------------------------------


async def test_user_list_is_for_admins_sorted_and_registered_only(
    server: ChatServer, connect: Connect
) -> None:
    a, b, g = await connect(), await connect(), await connect()
    await account(a, "zed")
    await account(b, "Amy")
    await g.guest("ghost")
    root = await admin(server, connect, "Root")
    await a.error("user.list", "forbidden")
    await g.error("user.list", "forbidden")
    users = (await root.ok("user.list"))["users"]
    assert users == [
        {"name": "Amy", "admin": False},
        {"name": "Root", "admin": True},
        {"name": "zed", "admin": False},
    ]


# --- help ------------------------------------------------------------------------------


async def test_help_shows_each_commands_grant_and_a_one_line_summary(connect: Connect) -> None:
    c = await connect()
    commands = (await c.ok("help"))["commands"]
    by_name = {e["cmd"]: e for e in commands}
    assert by_name["msg.edit"]["grant"] == "msg:edit"
    assert by_name["msg.delete"]["grant"] == "msg:delete"
    assert by_name["user.list"]["grant"] == "admin"
    assert by_name["passwd"]["grant"] is None and by_name["passwd"]["auth"] is True
    assert by_name["ping"]["auth"] is False
    for e in commands:
        assert set(e) == {"cmd", "summary", "usage", "auth", "grant"}, e
        summary = e["summary"]
        assert summary.startswith(e["cmd"]) and "\n" not in summary and len(summary) < 120
        if e["grant"]:
            assert e["grant"] in summary
        assert ("no token" in summary) == (not e["auth"])
    # One command's entry alone, for reading in nc.
    assert (await c.ok("help", command="msg.edit"))["commands"] == [by_name["msg.edit"]]
    await c.error("help", "not_found", command="fly")


# --- command-line changes count at once ------------------------------------------------


@pytest.mark.one_node('`chatd user add` processes on one SQLite file beside a server process')
async def test_a_login_right_after_user_add_succeeds(tmp_path: Any) -> None:
    db = str(tmp_path / "u.db")
    # The poll for command-line changes is made slow, so only reading at once can pass.
    async with running_server(db=db, db_poll_interval=60) as server:
        for i in range(3):
            name = f"fresh{i}"
            rc, _, err = await chatd_run("user", "add", name, "--password-stdin", "--db", db,
                                         stdin=PASSWORD + "\n")  # fmt: skip
            assert rc == 0, err
            frame = await fresh_call(server.port, "login", user=name, password=PASSWORD)
            assert frame["type"] == "ok", frame
        # A token `chatd token` printed for an account just added works at once too.
        rc, _, err = await chatd_run("user", "add", "bot", "--password-stdin", "--db", db,
                                     stdin=PASSWORD + "\n")  # fmt: skip
        assert rc == 0, err
        rc, out, err = await chatd_run("token", "bot", "--db", db, "--secret", SECRET)
        assert rc == 0, err
        frame = await fresh_call(server.port, "auth", token=out.strip())
        assert frame["type"] == "ok", frame
        # ... and as the first frame's token of any command (it binds the connection).
        rc, _, err = await chatd_run("user", "add", "bot2", "--password-stdin", "--db", db,
                                     stdin=PASSWORD + "\n")  # fmt: skip
        assert rc == 0, err
        rc, out, err = await chatd_run("token", "bot2", "--db", db, "--secret", SECRET)
        assert rc == 0, err
        c = await Client.connect(server.port)
        assert (await c.ok("whoami", token=out.strip()))["user"] == "bot2"
        assert (await c.ok("whoami"))["user"] == "bot2"  # bound to it
        await c.close()
        # A token of an account that does not exist is still refused.
        frame = await fresh_call(server.port, "whoami", token=tokens_of_nobody(server))
        assert frame["code"] == "unauthorized", frame


@pytest.mark.one_node('`chatd user delete` processes on one SQLite file beside a server process')
async def test_a_login_right_after_user_delete_fails(tmp_path: Any) -> None:
    db = str(tmp_path / "u.db")
    rc, _, err = await chatd_run("user", "add", "gone", "--password-stdin", "--db", db,
                                 stdin=PASSWORD + "\n")  # fmt: skip
    assert rc == 0, err
    async with running_server(db=db, db_poll_interval=60) as server:
        frame = await fresh_call(server.port, "login", user="gone", password=PASSWORD)
        assert frame["type"] == "ok", frame
        rc, _, err = await chatd_run("user", "delete", "gone", "--db", db)
        assert rc == 0, err
        frame = await fresh_call(server.port, "login", user="gone", password=PASSWORD)
        assert frame["code"] == "unauthorized", frame
