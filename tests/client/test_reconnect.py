"""Reconnect: kill the server mid-conversation, restart it on the same port and database;
the client comes back, re-authenticates, re-joins and recovers every change once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import chatd_client as cc
import pytest
from chatd_client import connect

from chatd.server import ChatServer
from tests.client.util import FAST, Gate, Proxy, T, collect_until, fast_backoff, next_event
from tests.helpers import running_server


def _is(text: str) -> Callable[[cc.Event], bool]:
    return lambda e: e.message is not None and e.message.text == text


@asynccontextmanager
async def killable(db: str, port: int = 0) -> AsyncIterator[tuple[ChatServer, AsyncExitStack]]:
    """A server that the test may stop early (stack.aclose()); stopped at the end anyway."""
    async with AsyncExitStack() as stack:
        srv = await stack.enter_async_context(running_server(db=db, port=port, rate_limit=0))
        yield srv, stack


async def test_changes_made_while_down_arrive_once_in_revision_order(tmp_path: Path) -> None:
    db = str(tmp_path / "chat.db")
    gate = Gate()
    async with killable(db) as (srv1, stack1):
        port = srv1.port
        async with connect("127.0.0.1", port, options=FAST) as boot:
            await boot.register("ann", "password1")
            await boot.register("mod", "password1")
        ann = await connect(
            "127.0.0.1", port, user="ann", password="password1", options=FAST, backoff=gate
        )
        async with ann:
            events = ann.events()
            await ann.room_create("lobby")
            m1 = await ann.send("one", room="lobby")
            m2 = await ann.send("two", room="lobby")
            await collect_until(events, _is("two"))
            await stack1.aclose()  # the server goes away mid-conversation
            assert (await next_event(events, "disconnected")).data["reason"]
            async with running_server(db=db, port=port, rate_limit=0) as srv2:
                # While ann is held back by the gate, someone else changes things.
                async with connect(
                    "127.0.0.1", srv2.port, user="mod", password="password1", options=FAST
                ) as mod:
                    await mod.join("lobby")
                    m3 = await mod.send("three", room="lobby")
                    e1 = await mod.edit(m1.id, "one, edited")  # msg:edit:any
                    await mod.delete(m2.id)  # msg:delete:any
                    m4 = await mod.send("four", room="lobby")
                    gate.open.set()  # now ann may reconnect
                    got = await collect_until(events, _is("four"))
                    assert "reconnected" in [e.name for e in got]
                    changes = [e for e in got if e.message is not None]
                    assert [(e.name, e.message.id) for e in changes] == [  # type: ignore[union-attr]
                        ("message", m3.id),
                        ("message.edited", m1.id),
                        ("message.deleted", m2.id),
                        ("message", m4.id),
                    ]
                    revs = [e.message.rev for e in changes]  # type: ignore[union-attr]
                    assert revs == sorted(revs) and len(set(revs)) == 4
                    edited = changes[1].message
                    assert edited is not None and (edited.text, edited.rev) == (
                        "one, edited",
                        e1.rev,
                    )
                    assert all(e.recovered for e in changes)
                    # Live again afterwards, and nothing is repeated.
                    m5 = await mod.send("five", room="lobby")
                    after = await collect_until(events, _is("five"))
                    assert [e.message.id for e in after if e.message] == [m5.id]
                    assert ann.rooms == ["lobby"] and (await ann.whoami()).user == "ann"
                    assert sorted(await ann.members("lobby")) == ["ann", "mod"]
                    assert (await ann.send("back", room="lobby")).text == "back"


async def test_live_and_recovered_changes_are_merged_without_repeats(tmp_path: Path) -> None:
    # No gate: the client races the other writer; whatever the timing, each change once.
    db = str(tmp_path / "chat.db")
    async with killable(db) as (srv1, stack1):
        port = srv1.port
        ann = await connect("127.0.0.1", port, user="ann", options=FAST, backoff=fast_backoff)
        async with ann:
            events = ann.events()
            await ann.room_create("lobby")
            await ann.send("before", room="lobby")
            await stack1.aclose()
            await next_event(events, "disconnected")
            async with running_server(db=db, port=port, rate_limit=0) as srv2:
                async with connect("127.0.0.1", srv2.port, user="bob", options=FAST) as bob:
                    await bob.join("lobby")
                    sent = [await bob.send(f"m{i}", room="lobby") for i in range(30)]
                    got = await collect_until(events, _is("m29"))
                    ids = [e.message.id for e in got if e.name == "message" and e.message]
                    assert ids[-30:] == [m.id for m in sent] and len(ids) == len(set(ids))


async def test_a_send_whose_reply_was_lost_is_not_posted_twice() -> None:
    async with running_server() as srv, Proxy(srv.port) as proxy:
        async with connect(
            "127.0.0.1", proxy.port, user="ann", options=FAST, backoff=fast_backoff
        ) as ann:
            await ann.room_create("lobby")
            events = ann.events()
            # The server stores the message; its reply is lost with the connection.
            proxy.cut_when = lambda line: b'"type":"ok"' in line and b'"message":{' in line
            msg = await ann.send("exactly once", room="lobby", timeout=T)
            assert proxy.cuts.is_set()
            page = await ann.history("lobby")
            assert [(m.id, m.text) for m in page.messages] == [(msg.id, "exactly once")]
            got = await collect_until(events, lambda e: e.name == "reconnected")
            got += await collect_until(events, _is("exactly once"))
            await ann.ping()
            while events.pending():
                got.append(await events.get(T))
            assert [e.message.id for e in got if e.message] == [msg.id]


async def test_other_requests_in_flight_fail_at_once_and_the_client_recovers() -> None:
    async with running_server() as srv, Proxy(srv.port) as proxy:
        opts = cc.Options(request_timeout=30.0, ping_interval=None)
        async with connect(
            "127.0.0.1", proxy.port, user="ann", options=opts, backoff=fast_backoff
        ) as ann:
            proxy.silent = True
            call = asyncio.ensure_future(ann.room_list())
            await asyncio.sleep(0)
            started = time.monotonic()
            proxy.silent = False
            proxy.reset_all()
            with pytest.raises(cc.ConnectionLost):
                await asyncio.wait_for(call, T)
            assert time.monotonic() - started < 2.0
            await ann.wait_connected(T)
            assert await ann.ping() is True


async def test_missed_pings_mean_a_dead_connection() -> None:
    async with running_server() as srv, Proxy(srv.port) as proxy:
        opts = cc.Options(ping_interval=0.1, ping_timeout=0.2)
        async with connect(
            "127.0.0.1", proxy.port, user="ann", options=opts, backoff=fast_backoff
        ) as ann:
            events = ann.events()
            proxy.silent = True  # the peer goes quiet without closing anything
            ev = await next_event(events, "disconnected")
            assert ev.data["reason"] == "missed ping"
            proxy.silent = False
            await next_event(events, "reconnected")
            assert await ann.ping() is True


async def test_server_shutdown_is_seen_then_reconnected(tmp_path: Path) -> None:
    db = str(tmp_path / "chat.db")
    gate = Gate()
    async with killable(db) as (srv1, stack1):
        port = srv1.port
        async with connect("127.0.0.1", port, user="ann", options=FAST, backoff=gate) as ann:
            events = ann.events()
            await stack1.aclose()
            assert (await next_event(events, "server.shutdown")).data["reason"]
            await next_event(events, "disconnected")
            with pytest.raises(cc.ConnectionLost):
                await ann.ping()  # not connected: fails at once
            async with running_server(db=db, port=port):
                gate.open.set()
                ev = await next_event(events, "reconnected")
                assert ev.data["epoch_changed"] is False
                assert (await ann.whoami()).user == "ann"  # the guest token still holds


async def test_a_new_store_is_reported_not_papered_over(tmp_path: Path) -> None:
    gate = Gate()
    async with killable(str(tmp_path / "a.db")) as (srv1, stack1):
        port = srv1.port
        async with connect("127.0.0.1", port, options=FAST) as boot:
            await boot.register("ann", "password1")
        async with connect(
            "127.0.0.1", port, user="ann", password="password1", options=FAST, backoff=gate
        ) as ann:
            events = ann.events()
            await ann.room_create("lobby")
            await ann.send("old world", room="lobby")
            await stack1.aclose()
            await next_event(events, "disconnected")
            async with running_server(db=str(tmp_path / "b.db"), port=port):
                async with connect("127.0.0.1", port, options=FAST) as boot:
                    await boot.register("ann", "password1")  # the same account, new store
                gate.open.set()
                got = await collect_until(events, lambda e: e.name == "reconnected")
                names = [e.name for e in got]
                assert "epoch.changed" in names
                failed = [e for e in got if e.name == "rejoin.failed"]
                assert failed and failed[0].data["room"] == "lobby"  # the room is gone
                assert ann.rooms == [] and (await ann.whoami()).user == "ann"
                assert got[-1].data["epoch_changed"] is True


async def test_close_during_reconnect_returns_promptly(tmp_path: Path) -> None:
    never = Gate()  # reconnect attempts wait forever
    async with killable(str(tmp_path / "c.db")) as (srv, stack):
        ann = await connect("127.0.0.1", srv.port, user="ann", options=FAST, backoff=never)
        events = ann.events()
        await ann.room_create("lobby")
        await stack.aclose()
        await next_event(events, "disconnected")
        await asyncio.wait_for(never.waiting.wait(), T)
        pending_send = asyncio.ensure_future(ann.send("never", room="lobby", timeout=30))
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(ann.close(), T)
        assert time.monotonic() - started < 1.5
        with pytest.raises(cc.ClientClosed):
            await asyncio.wait_for(pending_send, T)


async def test_session_expiring_refreshes_the_token() -> None:
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, options=FAST) as ann:
            await ann.register("ann", "password1")
            events = ann.events()
            first = await ann.login("ann", "password1", ttl=30)  # within the 60 s notice
            await next_event(events, "session.expiring")
            # The refresh is sent by a task the event started; it is on the wire before
            # the second ping at the latest, and replies come in order.
            await ann.ping()
            await ann.ping()
            assert ann.token != first.token
            assert (await ann.whoami()).user == "ann"


async def test_sends_queued_while_down_go_out_once_in_the_order_they_were_made(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "chat.db")
    gate = Gate()
    async with killable(db) as (srv1, stack1):
        port = srv1.port
        ann = await connect("127.0.0.1", port, user="ann", options=FAST, backoff=gate)
        async with ann:
            events = ann.events()
            await ann.room_create("lobby")
            await stack1.aclose()
            await next_event(events, "disconnected")
            typed = [asyncio.ensure_future(ann.send(f"q{i}", room="lobby")) for i in range(5)]
            await asyncio.wait_for(gate.waiting.wait(), T)
            async with running_server(db=db, port=port, rate_limit=0):
                gate.open.set()
                got = await collect_until(events, lambda e: e.name == "reconnected")
                sent = [await asyncio.wait_for(t, T) for t in typed]
                assert [m.text for m in sent] == [f"q{i}" for i in range(5)]
                ids = [m.id for m in sent]
                assert ids == sorted(ids)  # posted in the order they were typed
                got += await collect_until(events, _is("q4"))
                page = await ann.history("lobby")
                assert [m.text for m in page.messages] == [f"q{i}" for i in range(5)]
                assert [e.message.id for e in got if e.message] == ids
