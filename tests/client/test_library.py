"""The library against a real in-process server: request/response, concurrency, errors."""

from __future__ import annotations

import asyncio
import time

import chatd_client as cc
import pytest
from chatd_client import connect
from chatd_client.errors import ERRORS, ServerError, error_from_wire

from chatd.auth import TokenService, new_jti
from tests.client.util import FAST, Proxy, T, make_admin, next_event
from tests.helpers import SECRET, running_server


async def test_every_command_returns_typed_data() -> None:
    async with running_server() as srv:
        async with (
            connect("127.0.0.1", srv.port, options=FAST) as ann,
            connect("127.0.0.1", srv.port, user="bob", options=FAST) as bob,
        ):
            assert await ann.ping() is True
            assert any(h.cmd == "msg.send" and h.usage for h in await ann.help())
            assert await ann.register("ann", "password1") == "ann"
            login = await ann.login("ann", "password1")
            assert login.user == "ann" and "msg:delete:any" in login.grants
            me = await ann.whoami()
            assert (me.user, me.expires_at) == ("ann", login.expires_at)
            room = await ann.room_create("lobby", topic="hi")
            assert (room.name, room.topic, room.owner, room.members) == ("lobby", "hi", "ann", 1)
            assert (await ann.room_edit("lobby", topic="new")).topic == "new"
            assert [r.name for r in await ann.room_list()] == ["lobby"]
            joined = await bob.join("LOBBY")
            assert joined.room.name == "lobby" and sorted(joined.members) == ["ann", "bob"]
            assert sorted(await ann.members("lobby")) == ["ann", "bob"]
            m = await ann.send("hello", room="lobby")
            assert (m.room, m.from_, m.text, m.deleted) == ("lobby", "ann", "hello", False)
            edited = await ann.edit(m.id, "hello!")
            assert edited.text == "hello!" and edited.edited_by == "ann" and edited.rev > m.rev
            page = await bob.history("lobby")
            assert [x.text for x in page.messages] == ["hello!"] and page.more is False
            dm = await bob.send("psst", to="ann")
            assert dm.to == "ann" and dm.room is None
            assert [x.text for x in (await ann.dm_history("bob")).messages] == ["psst"]
            await ann.delete(m.id)
            assert (await bob.history("lobby")).messages == []
            sync = await ann.sync(0)
            # oldest revision first: the DM, then the deletion (a tombstone)
            assert [(x.id, x.deleted) for x in sync.changes] == [(dm.id, False), (m.id, True)]
            assert sync.rev == sync.changes[-1].rev and sync.more is False
            assert {(c.name, c.type) for c in await ann.channels()} >= {
                ("lobby", "room"),
                ("bob", "user"),
            }
            old = ann.token
            fresh = await ann.refresh()
            assert fresh.token != old and ann.token == fresh.token
            await ann.leave("lobby")
            assert ann.rooms == []
            await ann.logout()
            with pytest.raises(cc.Unauthorized):
                await ann.whoami()


async def test_room_delete_and_user_delete() -> None:
    async with running_server() as srv:
        await make_admin(srv, "root", "password1")
        async with connect(
            "127.0.0.1", srv.port, user="root", password="password1", options=FAST
        ) as root:
            assert "admin" in root.grants
            await root.room_create("tmp")
            await root.room_delete("tmp")
            assert root.rooms == [] and await root.room_list() == []
            async with connect("127.0.0.1", srv.port, options=FAST) as eve:
                await eve.register("eve", "password1")
            await root.user_delete("eve")
            with pytest.raises(cc.NotFound):
                await root.dm_history("eve")


async def test_many_requests_in_flight_are_matched_by_id() -> None:
    async with running_server(rate_limit=0) as srv:
        async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
            await ann.room_create("lobby")
            sends = [ann.send(f"m{i}", room="lobby") for i in range(100)]
            members, pong, me, msgs = await asyncio.wait_for(
                asyncio.gather(
                    ann.members("lobby"), ann.ping(), ann.whoami(), asyncio.gather(*sends)
                ),
                T,
            )
            assert [m.text for m in msgs] == [f"m{i}" for i in range(100)]
            assert len({m.id for m in msgs}) == 100
            assert members == ["ann"] and pong is True and me.user == "ann"
            # and a failure in the middle fails only its own request
            ok1, bad, ok2 = await asyncio.gather(
                ann.ping(), ann.history("nope"), ann.ping(), return_exceptions=True
            )
            assert ok1 is True and ok2 is True and isinstance(bad, cc.NotFound)


def test_the_error_table_maps_every_wire_code() -> None:
    codes = {
        "bad_frame",
        "bad_request",
        "unknown_command",
        "unauthorized",
        "token_expired",
        "forbidden",
        "not_found",
        "conflict",
        "rate_limited",
        "frame_too_large",
        "internal",
    }
    assert set(ERRORS) == codes
    for code, cls in ERRORS.items():
        exc = error_from_wire(code, "text")
        assert type(exc) is cls and exc.code == code and isinstance(exc, ServerError)
    unknown = error_from_wire("brand_new", "text")
    assert type(unknown) is ServerError and unknown.code == "brand_new"


class _PastClock:
    def now(self) -> float:
        return time.time() - 7200


async def test_each_server_error_raises_its_class() -> None:
    async with running_server(rate_limit=1) as srv:
        async with connect("127.0.0.1", srv.port, options=FAST) as anon:
            with pytest.raises(cc.Unauthorized):
                await anon.whoami()
            with pytest.raises(cc.UnknownCommand):
                await anon.request("no.such.command")
            with pytest.raises(cc.BadRequest) as bad:
                await anon.register("ann", "short")
            assert bad.value.code == "bad_request"
            await anon.register("ann", "password1")
            with pytest.raises(cc.Conflict):
                await anon.register("ANN", "password1")
            with pytest.raises(cc.Unauthorized):
                await anon.login("ann", "wrong-password")
        uid = srv.app.accounts.user("ann").id  # type: ignore[union-attr]

        expired, _ = TokenService(SECRET, _PastClock()).mint(
            "ann", new_jti(uid, 0), ("msg:edit",), 60
        )
        with pytest.raises(cc.TokenExpired):
            await connect("127.0.0.1", srv.port, token=expired, options=FAST)
        async with (
            connect("127.0.0.1", srv.port, user="ann", password="password1", options=FAST) as ann,
            connect("127.0.0.1", srv.port, user="bob", options=FAST) as bob,
        ):
            await ann.room_create("lobby")
            with pytest.raises(cc.Forbidden):
                await bob.send("not a member", room="lobby")
            with pytest.raises(cc.NotFound):
                await bob.join("nowhere")
            with pytest.raises(cc.Forbidden):
                await bob.request("user.delete", {"user": "ann"})
            with pytest.raises(cc.RateLimited) as limited:
                for i in range(10):
                    await ann.send(f"flood {i}", room="lobby")
            assert limited.value.retry_after is not None and limited.value.retry_after > 0


async def test_requests_in_flight_fail_at_once_when_the_connection_drops() -> None:
    async with running_server() as srv, Proxy(srv.port) as proxy:
        opts = cc.Options(request_timeout=30.0, ping_interval=None, reconnect=False)
        async with connect("127.0.0.1", proxy.port, user="ann", options=opts) as ann:
            proxy.silent = True  # replies stop coming back …
            calls = [asyncio.ensure_future(ann.ping()) for _ in range(5)]
            await asyncio.sleep(0)
            assert ann._link is not None and len(ann._link.pending) == 5
            started = time.monotonic()
            proxy.reset_all()  # … then the connection is reset
            for call in calls:
                with pytest.raises(cc.ConnectionLost):
                    await asyncio.wait_for(call, T)
            assert time.monotonic() - started < 2.0  # at once, not after 30 s
            with pytest.raises(cc.ConnectionLost):
                await ann.ping()


async def test_event_streams_filter_by_room_and_end_on_close() -> None:
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, user="bob", options=FAST) as bob:
            async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
                await ann.room_create("a")
                await ann.room_create("b")
                await bob.join("a")
                await bob.join("b")
                only_b = bob.events("B")
                await ann.send("to a", room="a")
                await ann.send("to b", room="b")
                ev = await next_event(only_b, "message")
                assert ev.message is not None and ev.message.text == "to b"
                main = bob.events()
                first = await next_event(main, "message")
                assert first.message is not None and first.message.text == "to a"
                only_b.close()
        # after close, what was buffered is still delivered, then iteration ends
        rest = await asyncio.wait_for(_drain(main), T)
        assert [e.message.text for e in rest if e.message] == ["to b"]
        with pytest.raises(cc.ClientClosed):
            await asyncio.wait_for(main.get(), T)


async def _drain(stream: cc.EventStream) -> list[cc.Event]:
    return [ev async for ev in stream]


async def test_a_full_event_buffer_drops_the_oldest_and_says_so() -> None:
    async with running_server(rate_limit=0) as srv:
        opts = cc.Options(ping_interval=None, max_events=5)
        async with connect("127.0.0.1", srv.port, user="ann", options=opts) as ann:
            await ann.room_create("lobby")
            for i in range(12):
                await ann.send(f"m{i}", room="lobby")
            await ann.ping()
            stream = ann.events()
            dropped = await stream.get(T)
            assert dropped.name == cc.EVENTS_DROPPED and dropped.data["count"] == 7
            texts = [(await stream.get(T)).message.text for _ in range(5)]  # type: ignore[union-attr]
            assert texts == ["m7", "m8", "m9", "m10", "m11"]


async def test_connect_to_nothing_raises_connection_lost(unused_port: int) -> None:
    with pytest.raises(cc.ConnectionLost):
        await connect("127.0.0.1", unused_port, options=FAST)


@pytest.fixture
def unused_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_room_list_and_channels_follow_the_servers_pages() -> None:
    async with running_server(list_limit=2) as srv:
        async with connect("127.0.0.1", srv.port, user="pager", options=FAST) as c:
            names = [f"room{i}" for i in range(5)]
            for name in names:
                await c.room_create(name)
            assert [r.name for r in await c.room_list()] == names
            assert [(x.name, x.type) for x in await c.channels()] == [
                *((n, "room") for n in names),
                ("pager", "user"),
            ]
