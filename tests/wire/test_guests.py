"""Guests over the wire (wire contract, "Decided for the next round": guest names come back,
guest grants): a guest holds its name while connected and for --guest-grace after; guests
cannot vandalize by default. Also the logout/refresh race of issue 13 item 7."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from chatd.config import Config
from tests.helpers import (
    GUEST_DEFAULTS,
    TIMEOUT,
    Client,
    advance,
    fake_clock,
    running_server,
    until,
)
from tests.process import chatd_run, chatd_serving

PASSWORD = "correct horse battery"


async def fresh_auth(port: int, token: str) -> dict[str, Any]:
    """`auth` with `token` on a new connection: the reply frame."""
    c = await Client.connect(port)
    try:
        return await c.call("auth", token=token)
    finally:
        await c.close()


async def guest_login(port: int, name: str) -> dict[str, Any]:
    """A guest login of `name` on a new connection, which is then closed: the reply frame."""
    c = await Client.connect(port)
    try:
        return await c.call("login", user=name)
    finally:
        await c.close()


# --- guest names come back -------------------------------------------------------------


async def test_a_guest_name_is_held_while_connected_and_the_conflict_says_so() -> None:
    async with running_server(GUEST_DEFAULTS) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        await a.guest("ann")
        frame = await b.error("login", "conflict", user="ann")
        assert "while" in frame["message"] and "connected" in frame["message"], frame
        frame = await b.error("register", "conflict", user="ANN", password=PASSWORD)
        assert "while" in frame["message"], frame
        await a.close()
        await b.close()


async def test_a_guest_name_comes_back_when_the_grace_ends() -> None:
    async with running_server(GUEST_DEFAULTS, guest_grace=2, clock=fake_clock()) as server:
        a = await Client.connect(server.port)
        token = (await a.guest("bea"))["token"]
        await a.close()
        # Within the grace the name is held, and the conflict says until when.
        frame = await until(
            lambda: _conflict_with(server.port, "bea", "until"), within=TIMEOUT
        )
        assert "T" in frame["message"] and "Z" in frame["message"], frame
        await advance(server, 1.9)  # the grace is 2 s
        assert await _conflict_with(server.port, "bea", "until"), "released too early"
        # Then it is released (the hold ends on a whole second): another guest gets it,
        # the old token has stopped working.
        await advance(server, 1.2)
        await until(lambda: _ok_guest(server.port, "bea"), within=TIMEOUT)
        frame = await fresh_auth(server.port, token)
        assert frame["code"] == "unauthorized", frame
        assert frame["message"] == "guest session ended", frame


async def _conflict_with(port: int, name: str, text: str) -> dict[str, Any] | None:
    frame = await guest_login(port, name)
    return frame if frame.get("code") == "conflict" and text in frame["message"] else None


async def _ok_guest(port: int, name: str) -> bool:
    return (await guest_login(port, name))["type"] == "ok"


async def test_a_guest_that_reconnects_within_the_grace_keeps_its_name() -> None:
    async with running_server(GUEST_DEFAULTS) as server:  # grace 120 s
        a = await Client.connect(server.port)
        token = (await a.guest("cid"))["token"]
        await a.close()
        await until(lambda: _conflict_with(server.port, "cid", "until"))
        a = await Client.connect(server.port)
        assert (await a.ok("auth", token=token))["user"] == "cid"
        frame = await guest_login(server.port, "cid")
        assert frame["code"] == "conflict" and "connected" in frame["message"], frame
        await a.close()


async def test_with_no_grace_a_closed_guest_name_is_free_at_once() -> None:
    async with running_server(GUEST_DEFAULTS, guest_grace=0) as server:
        a = await Client.connect(server.port)
        token = (await a.guest("dot"))["token"]
        await a.close()
        await until(lambda: _ok_guest(server.port, "dot"))
        assert (await fresh_auth(server.port, token))["code"] == "unauthorized"


async def test_logout_frees_a_guest_name_at_once_despite_the_grace() -> None:
    async with running_server(GUEST_DEFAULTS) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        token = (await a.guest("eve"))["token"]
        await a.ok("logout")
        assert (await b.guest("eve"))["user"] == "eve"
        assert (await fresh_auth(server.port, token))["code"] == "unauthorized"
        await a.close()
        await b.close()


async def test_a_restart_gives_every_held_name_a_fresh_grace(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        a = await Client.connect(server.port)
        token = (await a.guest("fay"))["token"]
        # Still connected when the server stops.
    await a.close()
    async with running_server(GUEST_DEFAULTS, db=db, guest_grace=1, clock=fake_clock()) as server:
        # Held from the start (a client reconnecting keeps its name) ...
        frame = await guest_login(server.port, "fay")
        assert frame["code"] == "conflict" and "until" in frame["message"], frame
        # ... until the fresh grace ends (watched without touching the hold: a probe that
        # binds its token would start it anew) ...
        w = await Client.connect(server.port)
        await w.guest("watcher")
        await advance(server, 0.9)  # the grace is 1 s
        assert not await _not_listed(w, "fay"), "released too early"
        await advance(server, 1.2)
        await until(lambda: _not_listed(w, "fay"))
        await w.close()
        frame = await fresh_auth(server.port, token)
        assert frame["code"] == "unauthorized" and frame["message"] == "guest session ended"
    # ... and the release was written: after another restart the name is free at once.
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        assert (await guest_login(server.port, "fay"))["type"] == "ok"


async def _not_listed(c: Client, name: str) -> bool:
    return name not in [ch["name"] for ch in (await c.ok("channels"))["channels"]]


async def test_a_guest_reconnecting_after_a_restart_keeps_its_name(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        a = await Client.connect(server.port)
        token = (await a.guest("gil"))["token"]
        await a.close()
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        a = await Client.connect(server.port)
        assert (await a.ok("auth", token=token))["user"] == "gil"
        frame = await guest_login(server.port, "gil")
        assert frame["code"] == "conflict" and "connected" in frame["message"], frame
        await a.close()


@pytest.mark.one_node('`chatd user add` on one SQLite file beside a server process')
async def test_user_add_takes_a_guest_name_once_its_grace_has_lapsed(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    secret = "cli-test-secret-that-is-long-enough-for-hs256"
    async with chatd_serving("serve", "--port", "0", "--db", db, "--guest-grace", "1",
                             CHATD_SECRET=secret) as srv:  # fmt: skip
        a = await Client.connect(srv.port)
        await a.guest("hal")
        rc, _, err = await chatd_run("user", "add", "hal", "--password-stdin", "--db", db,
                                     stdin=PASSWORD + "\n", CHATD_SECRET=secret)  # fmt: skip
        assert rc == 2 and "connected" in err, err
        await a.close()
        await add_once_the_hold_lapses(db, "hal", ("until", "connected"), 15, CHATD_SECRET=secret)
        c = await Client.connect(srv.port)
        assert (await c.ok("login", user="hal", password=PASSWORD))["user"] == "hal"
        await c.close()


@pytest.mark.one_node('`chatd user add` on one SQLite file after a server process stops')
async def test_user_add_after_a_clean_stop_waits_only_for_the_grace(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    async with running_server(GUEST_DEFAULTS, db=db, guest_grace=0.5) as server:
        a = await Client.connect(server.port)
        await a.guest("ida")
        # Stopped while the guest is connected: its grace starts at the stop.
    await a.close()
    await add_once_the_hold_lapses(db, "ida", ("until",), 10)


async def add_once_the_hold_lapses(
    db: str, name: str, refusals: tuple[str, ...], within: float, **env: str
) -> None:
    """`chatd user add name` tried until it works (bounded by `within` seconds); until
    then it may only be refused for a guest's hold, saying one of `refusals`."""

    async def added() -> bool:
        rc, _, err = await chatd_run("user", "add", name, "--password-stdin", "--db", db,
                                     stdin=PASSWORD + "\n", **env)  # fmt: skip
        assert rc == 0 or any(r in err for r in refusals), err
        return rc == 0

    await until(added, within=within)


# --- guest grants ----------------------------------------------------------------------


async def test_guests_get_room_create_and_their_own_messages_only() -> None:
    async with running_server(GUEST_DEFAULTS) as server:
        a, b = await Client.connect(server.port), await Client.connect(server.port)
        assert (await a.guest("vandal"))["grants"] == ["room:create", "msg:edit", "msg:delete"]
        await b.ok("register", user="owner", password=PASSWORD)
        await b.ok("login", user="owner", password=PASSWORD)
        await b.ok("room.create", room="hall")
        await a.ok("room.join", room="hall")
        theirs = (await b.ok("msg.send", room="hall", text="mine"))["message"]
        mine = (await a.ok("msg.send", room="hall", text="oops"))["message"]
        await a.error("msg.edit", "forbidden", message_id=theirs["id"], text="defaced")
        await a.error("msg.delete", "forbidden", message_id=theirs["id"])
        await a.error("room.edit", "forbidden", room="hall", topic="pwned")
        await a.error("room.delete", "forbidden", room="hall")
        await a.ok("msg.edit", message_id=mine["id"], text="fixed")
        await a.ok("msg.delete", message_id=mine["id"])
        await a.ok("room.create", room="guestroom")
        # A guest may ask for fewer: the intersection, as for logins.
        c = await Client.connect(server.port)
        data = await c.ok("login", user="shy", grants=["msg:edit", "room:delete"])
        assert data["grants"] == ["msg:edit"]
        for x in (a, b, c):
            await x.close()


@pytest.mark.one_node('a `chatd serve` process of its own')
async def test_guest_grants_flag_sets_the_list_and_refuses_admin(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")
    rc, _, err = await chatd_run("serve", "--port", "0", "--db", db,
                                 "--guest-grants", "room:create,admin")  # fmt: skip
    assert rc == 2 and "admin" in err and "guest" in err, err
    async with chatd_serving("serve", "--port", "0", "--db", db,
                             "--guest-grants", "room:create,room:delete") as srv:  # fmt: skip
        c = await Client.connect(srv.port)
        assert (await c.guest("wide"))["grants"] == ["room:create", "room:delete"]
        await c.close()


def test_guest_defaults_are_the_contracts() -> None:
    assert Config().guest_grants == ("room:create", "msg:edit", "msg:delete")
    assert Config().guest_grace == 120


# --- issue 13 item 7: logout racing refresh ------------------------------------------


async def test_guest_logout_racing_refresh_leaves_no_working_token_and_no_hold(
    tmp_path: Any,
) -> None:
    db = str(tmp_path / "race.db")
    names = [f"racer{i}" for i in range(6)]
    tokens: list[str] = []
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        for name in names:
            a, b = await Client.connect(server.port), await Client.connect(server.port)
            token = (await a.guest(name))["token"]
            await b.ok("auth", token=token)
            # Both frames leave before either reply is read: the server runs them together.
            b.writer.write(json.dumps({"cmd": "refresh", "id": "r"}).encode() + b"\n")
            a.writer.write(json.dumps({"cmd": "logout", "id": "l"}).encode() + b"\n")
            await asyncio.gather(b.writer.drain(), a.writer.drain())
            assert (await a.reply("l"))["type"] == "ok"
            refreshed = await b.reply("r")
            tokens.append(token)
            if refreshed["type"] == "ok":
                tokens.append(refreshed["data"]["token"])
            # An acknowledged logout: no token of that guest works any more.
            for t in tokens[-2:]:
                assert (await fresh_auth(server.port, t))["code"] == "unauthorized"
            await a.close()
            await b.close()
    # And the released holds stay released across a restart.
    async with running_server(GUEST_DEFAULTS, db=db) as server:
        for name in names:
            frame = await guest_login(server.port, name)
            assert frame["type"] == "ok", frame
        for t in tokens:
            assert (await fresh_auth(server.port, t))["code"] == "unauthorized"
