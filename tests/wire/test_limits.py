"""Limits and faults over real sockets (limits.md): slow consumers, the soft outbox limit,
the unauthenticated idle timeout, and connection caps."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from chatd.server import ChatServer, ConnectionProtocol
from tests.helpers import TIMEOUT, Client, advance, deaf_client, fake_clock, running_server

TEXT = "x" * 4000
SMALL_OUTBOX: dict[str, Any] = {
    "rate_limit": 0,
    "outbox_soft": 8 * 1024,
    "outbox_low": 2 * 1024,
}


async def connect_from(port: int, source: str) -> Client:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    r, w = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
    return Client(r, w)


def conn_of(srv: ChatServer, user: str) -> ConnectionProtocol:
    for conn in srv.connections:
        pipe = conn.pipe
        if pipe is not None and pipe.session is not None and pipe.session.user == user:
            return conn
    raise AssertionError(f"no connection of {user}")


async def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def read_to_end(c: Client, timeout: float = TIMEOUT) -> list[bytes]:
    """Every line until EOF or reset; the last one may be partial."""
    lines: list[bytes] = []

    async def run() -> None:
        while True:
            try:
                line = await c.reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            except ValueError:  # a line over the reader's limit: skip it
                continue
            if not line:
                return
            lines.append(line)

    await asyncio.wait_for(run(), timeout)
    return lines


async def expect_closed(c: Client, timeout: float = TIMEOUT) -> None:
    lines = await read_to_end(c, timeout)
    assert lines == [], lines


# --- outbox limits -------------------------------------------------------------------


async def test_a_client_that_never_reads_is_dropped_while_others_receive_everything() -> None:
    async with running_server(**SMALL_OUTBOX, outbox_hard=64 * 1024) as srv:
        sender = await Client.connect(srv.port)
        await sender.guest("sender")
        await sender.ok("room.create", room="lobby")
        reader = await Client.connect(srv.port)
        await reader.guest("reader")
        await reader.ok("room.join", room="lobby")
        slow = await deaf_client(srv.port)
        await slow.guest("slow")
        await slow.ok("room.join", room="lobby")
        slow_conn = conn_of(srv, "slow")
        await sender.event("member.joined")
        await sender.event("member.joined")
        await reader.event("member.joined")

        received: list[int] = []

        async def collect() -> None:
            while True:
                frame = await reader.recv()
                if frame.get("event") == "message":
                    received.append(frame["data"]["id"])
                else:
                    reader.events.append(frame)

        collector = asyncio.create_task(collect())
        sent: list[int] = []
        try:
            for _ in range(5000):
                data = await sender.ok("msg.send", room="lobby", text=TEXT)
                sent.append(data["message"]["id"])
                if slow_conn.dead:
                    break
            assert slow_conn.dead, "the non-reading client was never dropped"
            await wait_until(lambda: slow_conn not in srv.connections)
            # Everyone else got every message, in order.
            await wait_until(lambda: len(received) >= len(sent))
            assert received == sent
            # The sender is still served and sees the slow client leave.
            left = await sender.event("member.left")
            assert left == {"room": "lobby", "user": "slow", "reason": "disconnected"}
            members = await sender.ok("room.members", room="lobby")
            assert members["members"] == ["reader", "sender"]
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
        # The dropped client finds its stream ended; slow_consumer, if it got through, last.
        lines = await read_to_end(slow)
        complete = [line for line in lines if line.endswith(b"\n")]
        assert len(complete) < len(sent)
        slow_frames = [i for i, line in enumerate(lines) if b'"slow_consumer"' in line]
        assert slow_frames in ([], [len(lines) - 1])
        for c in (sender, reader, slow):
            await c.close()


async def test_soft_limit_pauses_reading_of_that_client_only() -> None:
    async with running_server(**SMALL_OUTBOX, outbox_hard=256 * 1024 * 1024) as srv:
        sender = await Client.connect(srv.port)
        await sender.guest("sender")
        await sender.ok("room.create", room="lobby")
        slow = await deaf_client(srv.port)
        await slow.guest("slow")
        await slow.ok("room.join", room="lobby")
        await sender.event("member.joined")
        slow_conn = conn_of(srv, "slow")
        sent = 0
        while not slow_conn.pipe.paused:
            assert sent < 5000, "the server never stopped reading the non-reading client"
            await sender.ok("msg.send", room="lobby", text=TEXT)
            sent += 1
        assert slow_conn.transport is not None and not slow_conn.transport.is_reading()
        sender_conn = conn_of(srv, "sender")
        assert sender_conn.transport is not None and sender_conn.transport.is_reading()
        # A command from the paused client is not read: it is still in the room.
        await slow.send({"cmd": "room.leave", "id": "leave", "room": "lobby"})
        await asyncio.sleep(0.3)  # a bounded wait for an absence
        assert slow_conn.pipe.session is not None and srv.app.rooms.rooms_of(slow_conn.pipe.session)
        assert slow_conn.pipe.paused
        assert (await sender.ok("ping")) == {"pong": True}
        other = await Client.connect(srv.port)
        assert (await other.ok("ping")) == {"pong": True}
        # Once it reads again it gets everything, in order, then the reply, and is resumed.
        got = 0
        while True:
            frame = await slow.recv()
            if frame["type"] == "event":
                assert frame["event"] == "message"
                got += 1
                continue
            assert frame["id"] == "leave" and frame["type"] == "ok"
            break
        assert got == sent
        left = await sender.event("member.left")
        assert left == {"room": "lobby", "user": "slow", "reason": "left"}
        assert not slow_conn.dead and slow_conn.pipe.paused == 0
        assert (await slow.ok("ping")) == {"pong": True}
        for c in (sender, slow, other):
            await c.close()


# --- idle connections ------------------------------------------------------------------


async def test_unauthenticated_idle_connection_is_closed_and_pings_do_not_extend_it() -> None:
    async with running_server(idle_timeout=1.0, clock=fake_clock()) as srv:
        c = await Client.connect(srv.port)
        for _ in range(5):  # a ping every 0.19 s: open until the timeout, not extended
            await c.send({"cmd": "ping", "id": "p"})
            frame = await c.recv()
            assert frame == {"type": "ok", "id": "p", "data": {"pong": True}}
            await advance(srv, 0.19)
        await c.no_frame(0.05)  # 0.95 s: still open
        await advance(srv, 0.1)
        frame = await c.recv()
        assert frame["type"] == "error", "never closed"
        assert frame["code"] == "unauthorized" and frame["id"] is None
        await expect_closed(c)
        await c.close()
        await wait_until(lambda: not srv.connections)


async def test_a_logged_in_connection_is_not_closed_when_idle() -> None:
    async with running_server(idle_timeout=1.0, clock=fake_clock()) as srv:
        c = await Client.connect(srv.port)
        await c.guest("ann")
        for _ in range(3):  # several idle timeouts pass while bound
            await advance(srv, 1.0)
        await c.no_frame(0.1)
        assert (await c.ok("ping")) == {"pong": True}
        await c.close()


async def test_the_idle_timer_restarts_when_a_connection_is_unbound() -> None:
    async with running_server(idle_timeout=1.0, clock=fake_clock()) as srv:
        c = await Client.connect(srv.port)
        await c.guest("ann")
        for _ in range(2):  # the first deadline passes while bound
            await advance(srv, 1.1)
        await c.no_frame(0.1)
        await c.ok("logout")
        # A full idle timeout from the logout: not before, and then at once.
        await advance(srv, 0.9)
        await c.no_frame(0.1)
        await advance(srv, 0.2)
        frame = await c.recv()
        assert frame["type"] == "error" and frame["code"] == "unauthorized"
        assert frame["id"] is None
        await expect_closed(c)
        await c.close()


# --- connection caps -------------------------------------------------------------------


async def refused(c: Client) -> dict[str, Any]:
    frame = await c.recv()
    assert frame["type"] == "error" and frame["code"] == "rate_limited", frame
    assert frame["id"] is None
    assert isinstance(frame["retry_after"], (int, float)) and frame["retry_after"] > 0
    await expect_closed(c)
    return frame


async def test_max_connections_refuses_the_next_one_with_rate_limited() -> None:
    async with running_server(max_connections=2) as srv:
        a = await Client.connect(srv.port)
        b = await Client.connect(srv.port)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        extra = Client(r, w)
        await refused(extra)  # instead of hello
        await extra.close()
        assert (await a.ok("ping")) == {"pong": True}
        assert (await b.ok("ping")) == {"pong": True}
        await b.close()
        await wait_until(lambda: len(srv.connections) == 1)
        c = await Client.connect(srv.port)  # a slot came free
        assert (await c.ok("ping")) == {"pong": True}
        for x in (a, c):
            await x.close()


async def test_refused_connections_do_not_free_per_ip_slots() -> None:
    # 127.0.0.2 is not exempt (limits.md): only 127.0.0.1 and ::1 are.
    async with running_server(per_ip_connections=2) as srv:
        kept = []
        for _ in range(2):
            c = await connect_from(srv.port, "127.0.0.2")
            assert (await c.recv())["event"] == "hello"
            kept.append(c)
        for _ in range(3):
            c = await connect_from(srv.port, "127.0.0.2")
            await refused(c)
            await c.close()
        await kept.pop().close()
        await wait_until(lambda: len(srv.connections) == 1)
        c = await connect_from(srv.port, "127.0.0.2")
        assert (await c.recv())["event"] == "hello"
        kept.append(c)
        # Loopback 127.0.0.1 is exempt.
        local = await Client.connect(srv.port)
        for x in [*kept, local]:
            await x.close()


@pytest.mark.parametrize("cap", [1])
async def test_a_refused_client_never_gets_hello(cap: int) -> None:
    async with running_server(max_connections=cap) as srv:
        a = await Client.connect(srv.port)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        extra = Client(r, w)
        lines = await read_to_end(extra)
        assert len(lines) == 1 and b'"hello"' not in lines[0] and b"rate_limited" in lines[0]
        await extra.close()
        await a.close()


async def test_a_stuck_writer_is_dropped_after_the_write_deadline() -> None:
    config = {**SMALL_OUTBOX, "outbox_hard": 256 * 1024 * 1024, "write_deadline": 1.0}
    async with running_server(**config) as srv:
        sender = await Client.connect(srv.port)
        await sender.guest("sender")
        await sender.ok("room.create", room="lobby")
        stuck = await deaf_client(srv.port)
        await stuck.guest("stuck")
        await stuck.ok("room.join", room="lobby")
        conn = conn_of(srv, "stuck")
        sent = 0
        while not conn.pipe.paused:
            assert sent < 5000
            await sender.ok("msg.send", room="lobby", text=TEXT)
            sent += 1
        start = time.monotonic()
        await wait_until(lambda: conn.dead, timeout=4.0)
        assert time.monotonic() - start >= 0.9
        left = await sender.event("member.left")
        assert left == {"room": "lobby", "user": "stuck", "reason": "disconnected"}
        assert (await sender.ok("ping")) == {"pong": True}
        await read_to_end(stuck)
        for c in (sender, stuck):
            await c.close()


async def test_accepted_connections_have_tcp_keepalive(server, connect) -> None:
    """limits.md: idle 60 s, interval 15 s, 4 probes (set once on the listener, inherited)."""
    import socket

    c = await connect()
    await c.ok("ping")
    conn = next(iter(server.connections))
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


async def test_a_throttled_command_behind_a_finished_send_still_runs() -> None:
    """A command held behind a send, then throttled by the per-connection rate when the
    send finishes, runs once the bucket refills (the connection never wedges)."""
    async with running_server(command_rate=50.0, command_burst=5, rate_limit=0) as srv:
        c = await Client.connect(srv.port)
        try:
            await c.guest("busy")
            await c.ok("room.create", room="r")
            frames = [{"cmd": "whoami", "id": f"w{i}"} for i in range(5)]
            frames.append({"cmd": "msg.send", "id": "s", "room": "r", "text": "hi"})
            frames += [{"cmd": "whoami", "id": f"v{i}"} for i in range(3)]
            frames.append({"cmd": "whoami", "id": "final"})
            await c.send_raw(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
            ids = []
            while not ids or ids[-1] != "final":
                frame = await c.recv()
                if frame["type"] != "event":
                    assert frame["type"] == "ok", frame
                    ids.append(frame["id"])
            assert ids == [f["id"] for f in frames]
            assert (await c.ok("ping")) == {"pong": True}
        finally:
            await c.close()
