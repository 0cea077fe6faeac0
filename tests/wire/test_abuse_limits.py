"""Budgets against abuse over real sockets (issue 13, items 4, 5, 6 and 10): registrations
per connection and address, logins never starved by registrations, failed logins under any
concurrency, a send budget per connection, guest logins per connection and address, rooms
per user, and paged room.list / channels."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from chatd.server import ChatServer
from tests.helpers import TIMEOUT, Client, running_server

PASSWORD = "correct horse battery"


async def connect_from(port: int, source: str) -> Client:
    """A connection from another loopback address (only 127.0.0.1 and ::1 are exempt
    from per-address connection limits)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    r, w = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
    c = Client(r, w)
    c.hello = await c.recv()
    assert c.hello["event"] == "hello", c.hello
    return c


async def closing(*clients: Client) -> None:
    for c in clients:
        await c.close()


async def add_user(srv: ChatServer, name: str, *, admin: bool = False) -> None:
    """An account made as `chatd user add` would (no registration budget spent)."""
    user = await srv.store.create_user(name, srv.hasher.hash_sync(PASSWORD), admin=admin)
    assert user is not None
    await srv.app.refresh_user(name.lower())  # seen at once, as the contract says


# --- item 4: registrations -------------------------------------------------------------


async def test_a_burst_of_registers_on_one_connection_is_rate_limited() -> None:
    async with running_server(register_per_connection=3, register_per_ip=0) as srv:
        c = await Client.connect(srv.port)
        for i in range(3):
            await c.ok("register", user=f"burst{i}", password=PASSWORD)
        frame = await c.error("register", "rate_limited", user="burst3", password=PASSWORD)
        # Three an hour: the next one comes back in about twenty minutes.
        assert 1000 < frame["retry_after"] <= 1200, frame
        assert "connection" in frame["message"]
        # A taken name or a bad password is answered as before: no hash, no budget.
        await c.error("register", "conflict", user="burst0", password=PASSWORD)
        await c.error("register", "bad_request", user="burst9", password="short")
        # Nothing was created past the limit; another connection still may register.
        other = await Client.connect(srv.port)
        await other.ok("register", user="burst3", password=PASSWORD)
        await closing(c, other)


async def test_a_burst_of_registers_from_one_address_is_rate_limited() -> None:
    async with running_server(register_per_ip=4) as srv:
        results = []
        clients = [await Client.connect(srv.port) for _ in range(6)]
        for i, c in enumerate(clients):  # one register per connection, all from 127.0.0.1
            results.append(await c.call("register", user=f"flood{i}", password=PASSWORD))
        assert [r["type"] for r in results] == ["ok"] * 4 + ["error"] * 2, results
        for r in results[4:]:
            assert r["code"] == "rate_limited" and r["retry_after"] > 600, r
            assert "address" in r["message"]
        # Another address has its own budget.
        far = await connect_from(srv.port, "127.0.0.2")
        await far.ok("register", user="far", password=PASSWORD)
        await closing(*clients, far)


async def test_a_register_flood_never_refuses_logins() -> None:
    # Shared queue of 8 before the fix: the flood filled it and logins got rate_limited.
    cfg: dict[str, Any] = {
        "hash_queue": 8,
        "register_hash_queue": 8,
        "register_per_ip": 0,
        "register_per_connection": 0,
    }
    async with running_server(**cfg) as srv:
        for i in range(4):
            await add_user(srv, f"real{i}")
        flooders = [await Client.connect(srv.port) for _ in range(40)]
        users = [await Client.connect(srv.port) for _ in range(4)]
        floods = [c.call("register", user=f"fl{i}", password=PASSWORD) for i, c in enumerate(flooders)]
        logins = [c.call("login", user=f"real{i}", password=PASSWORD) for i, c in enumerate(users)]
        done = await asyncio.wait_for(asyncio.gather(*floods, *logins), 30)
        flood_codes = {r.get("code", "ok") for r in done[:40]}
        assert "rate_limited" in flood_codes  # the flood did overflow its own queue ...
        assert [r["type"] for r in done[40:]] == ["ok"] * 4, done[40:]  # ... not the logins'
        await closing(*flooders, *users)


# --- item 6: failed logins under concurrency ---------------------------------------------


async def test_parallel_wrong_logins_get_at_most_the_limit_checked() -> None:
    async with running_server() as srv:
        await add_user(srv, "victim")
        await add_user(srv, "bystander")
        guessers = [await Client.connect(srv.port) for _ in range(100)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(g.call("login", user="victim", password=f"guess-{i:04}") for i, g in enumerate(guessers))
            ),
            60,
        )
        codes = [r["code"] for r in results]
        assert set(codes) <= {"unauthorized", "rate_limited"}, codes
        assert codes.count("unauthorized") <= 5, codes.count("unauthorized")
        assert all(0 < r["retry_after"] <= 60 for r in results if r["code"] == "rate_limited")
        # The right password for the victim is refused too while the limit holds ...
        late = await Client.connect(srv.port)
        await late.error("login", "rate_limited", user="victim", password=PASSWORD)
        # ... while another account logs in from the same address.
        await late.ok("login", user="bystander", password=PASSWORD)
        await closing(*guessers, late)


async def test_parallel_correct_logins_are_delayed_not_refused() -> None:
    async with running_server() as srv:
        await add_user(srv, "popular")
        clients = [await Client.connect(srv.port) for _ in range(12)]
        results = await asyncio.wait_for(
            asyncio.gather(*(c.call("login", user="popular", password=PASSWORD) for c in clients)), 30
        )
        assert [r["type"] for r in results] == ["ok"] * 12, results
        await closing(*clients)


async def test_failed_logins_are_limited_per_address_across_accounts() -> None:
    async with running_server(login_failures_per_ip=3) as srv:
        results = []
        for i in range(4):  # fresh connection, fresh account name each time
            c = await connect_from(srv.port, "127.0.0.3")
            results.append(await c.call("login", user=f"nobody{i}", password="wrong password"))
            await c.close()
        assert [r["code"] for r in results] == ["unauthorized"] * 3 + ["rate_limited"]
        assert 0 < results[-1]["retry_after"] <= 60
        # Another address is not affected.
        await add_user(srv, "elsewhere")
        c = await connect_from(srv.port, "127.0.0.4")
        await c.ok("login", user="elsewhere", password=PASSWORD)
        await c.close()


# --- item 10: rotating guest names ---------------------------------------------------------


async def test_rotating_guest_names_does_not_refill_the_send_budget() -> None:
    async with running_server(rate_limit=1) as srv:  # burst 3
        owner = await Client.connect(srv.port)
        await owner.guest("owner")
        await owner.ok("room.create", room="open", open=True)
        c = await Client.connect(srv.port)
        await c.guest("rot0")
        for i in range(3):
            await c.ok("msg.send", room="open", text=f"m{i}")
        await c.error("msg.send", "rate_limited", room="open", text="one too many")
        await c.ok("logout")
        await c.guest("rot1")  # a fresh user, but the same connection
        frame = await c.error("msg.send", "rate_limited", room="open", text="again")
        assert 0 < frame["retry_after"] <= 1.0
        # The new user's own budget is untouched: from another connection it may send.
        other = await Client.connect(srv.port)
        await other.ok("auth", token=c.token)
        await other.ok("msg.send", room="open", text="from elsewhere")
        await closing(owner, c, other)


async def test_guest_logins_are_limited_per_connection() -> None:
    async with running_server(guest_logins_per_connection=2) as srv:
        c = await Client.connect(srv.port)
        for name in ("g0", "g1"):
            await c.guest(name)
            await c.ok("logout")
        frame = await c.error("login", "rate_limited", user="g2")
        assert 0 < frame["retry_after"] <= 30 and "connection" in frame["message"]
        other = await Client.connect(srv.port)  # a new connection may
        await other.guest("g2")
        await closing(c, other)


async def test_guest_logins_are_limited_per_address_and_loopback_is_exempt() -> None:
    async with running_server(guest_logins_per_ip=2) as srv:
        far = [await connect_from(srv.port, "127.0.0.5") for _ in range(3)]
        await far[0].guest("far0")
        await far[1].guest("far1")
        frame = await far[2].error("login", "rate_limited", user="far2")
        assert "address" in frame["message"]
        near = [await Client.connect(srv.port) for _ in range(3)]
        for i, c in enumerate(near):
            await c.guest(f"near{i}")
        await closing(*far, *near)


# --- item 5: rooms per user, paged lists -----------------------------------------------------


async def test_rooms_per_user_are_capped_and_admins_are_exempt() -> None:
    async with running_server(max_rooms_per_user=2) as srv:
        c = await Client.connect(srv.port)
        await c.guest("maker")
        await c.ok("room.create", room="one")
        await c.ok("room.create", room="two", ephemeral=True)  # ephemeral ones count too
        frame = await c.error("room.create", "forbidden", room="three")
        assert "2 rooms" in frame["message"]
        await c.ok("room.delete", room="one")  # needs room:delete ... a guest has it here
        await c.ok("room.create", room="three")
        # The ephemeral room goes when emptied, and frees its place.
        await c.ok("room.leave", room="two")
        await c.ok("room.create", room="four")
        await add_user(srv, "boss", admin=True)
        admin = await Client.connect(srv.port)
        await admin.ok("login", user="boss", password=PASSWORD)
        for i in range(4):
            await admin.ok("room.create", room=f"boss{i}")
        await closing(c, admin)


async def test_parallel_creates_cannot_pass_the_room_cap() -> None:
    async with running_server(max_rooms_per_user=3) as srv:
        first = await Client.connect(srv.port)
        token = (await first.guest("racer"))["token"]
        clients = [first] + [await Client.connect(srv.port) for _ in range(7)]
        for c in clients[1:]:
            await c.ok("auth", token=token)
        results = await asyncio.wait_for(
            asyncio.gather(*(c.call("room.create", room=f"race{i}") for i, c in enumerate(clients))),
            TIMEOUT,
        )
        codes = sorted(r.get("code", "ok") for r in results)
        assert codes == ["forbidden"] * 5 + ["ok"] * 3, codes
        await closing(*clients)


async def test_room_list_pages_by_name_with_a_cursor() -> None:
    async with running_server() as srv:
        c = await Client.connect(srv.port)
        await c.guest("lister")
        names = ["delta", "Alpha", "charlie", "Echo", "bravo"]
        for n in names:
            await c.ok("room.create", room=n)
        whole = await c.ok("room.list")
        # Without paging fields: every room, as before, and `more` false (no `next`).
        assert set(whole) == {"rooms", "more"} and whole["more"] is False
        assert [r["name"] for r in whole["rooms"]] == ["Alpha", "bravo", "charlie", "delta", "Echo"]
        seen: list[str] = []
        page = await c.ok("room.list", limit=2)
        while True:
            seen += [r["name"] for r in page["rooms"]]
            if not page["more"]:
                assert "next" not in page
                break
            assert page["next"] == seen[-1] and len(page["rooms"]) == 2
            page = await c.ok("room.list", limit=2, after=page["next"])
        assert seen == [r["name"] for r in whole["rooms"]]
        # The cursor is a name compared case-insensitively; it need not exist.
        assert [r["name"] for r in (await c.ok("room.list", after="BRAVO"))["rooms"]] == [
            "charlie", "delta", "Echo"
        ]
        assert (await c.ok("room.list", after="c"))["rooms"][0]["name"] == "charlie"
        await c.error("room.list", "bad_request", limit=0)
        await c.error("room.list", "bad_request", after="not a name")
        await c.close()


async def test_room_list_reply_stays_under_the_page_budget() -> None:
    async with running_server(history_page_bytes=4096, max_rooms_per_user=0) as srv:
        c = await Client.connect(srv.port)
        await c.guest("big")
        for i in range(40):
            await c.ok("room.create", room=f"r{i:02}", topic="\u0001" * 256)  # 6 bytes each escaped
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            rid = f"p{pages}"
            fields: dict[str, Any] = {"cmd": "room.list", "id": rid}
            if after is not None:
                fields["after"] = after
            await c.send(fields)
            line = await asyncio.wait_for(c.reader.readline(), TIMEOUT)
            assert len(line) <= 4096, len(line)
            data = json.loads(line)["data"]
            pages += 1
            seen += [r["name"] for r in data["rooms"]]
            if not data["more"]:
                break
            after = data["next"]
        assert seen == [f"r{i:02}" for i in range(40)] and pages > 1
        await c.close()


async def test_channels_pages_rooms_then_users() -> None:
    async with running_server() as srv:
        c = await Client.connect(srv.port)
        await c.guest("carl")
        await c.ok("room.create", room="b-room")
        await c.ok("room.create", room="A-room")
        await add_user(srv, "amy")
        whole = await c.ok("channels")
        assert set(whole) == {"channels", "more"} and whole["more"] is False
        expected = [
            {"name": "A-room", "type": "room"},
            {"name": "b-room", "type": "room"},
            {"name": "amy", "type": "user"},
            {"name": "carl", "type": "user"},
        ]
        assert whole["channels"] == expected
        got: list[dict[str, str]] = []
        cursors = []
        page = await c.ok("channels", limit=1)
        while True:
            got += page["channels"]
            if not page["more"]:
                break
            cursors.append(page["next"])
            page = await c.ok("channels", limit=1, after=page["next"])
        assert got == expected
        assert cursors == ["room:A-room", "room:b-room", "user:amy"]
        assert (await c.ok("channels", after="room:zzz"))["channels"] == expected[2:]
        for bad in ("A-room", "chan:A-room", "user:bad name"):
            await c.error("channels", "bad_request", after=bad)
        await c.error("channels", "bad_request", limit=0)
        await c.close()


# --- flags -------------------------------------------------------------------------------


def test_the_abuse_limits_are_flags_with_documented_defaults() -> None:
    from chatd.cli import build_parser, config_from

    defaults = config_from(build_parser().parse_args(["serve"]))
    assert (
        defaults.register_per_connection,
        defaults.register_per_ip,
        defaults.login_failures_per_ip,
        defaults.guest_logins_per_connection,
        defaults.guest_logins_per_ip,
        defaults.max_rooms_per_user,
    ) == (10, 20, 20, 30, 60, 100)
    flags = [
        "serve", "--register-per-connection", "1", "--register-per-ip", "2",
        "--login-failures-per-ip", "3", "--guest-logins-per-connection", "4",
        "--guest-logins-per-ip", "0", "--max-rooms-per-user", "6",
    ]  # fmt: skip
    cfg = config_from(build_parser().parse_args(flags))
    assert (
        cfg.register_per_connection,
        cfg.register_per_ip,
        cfg.login_failures_per_ip,
        cfg.guest_logins_per_connection,
        cfg.guest_logins_per_ip,
        cfg.max_rooms_per_user,
    ) == (1, 2, 3, 4, 0, 6)
