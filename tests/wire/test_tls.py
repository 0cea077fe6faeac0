"""TLS over real sockets with real handshakes (`chatd serve --tls-cert --tls-key`): the
same frames, admission before the handshake, handshake timeout, plain clients refused
without harm to others, the slow-consumer notice never written past the TLS layer, and
the client library with ``ssl=``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from typing import Any

import pytest
from chatd_client import connect as client_connect

import chatd.server
from tests.helpers import TIMEOUT, Client, running_server
from tests.tlsutil import Certs, certs
from tests.wire.test_limits import SMALL_OUTBOX, conn_of, wait_until

__all__ = ["certs"]  # the fixture
TEXT = "x" * 4000


async def raw_socket(port: int, source: str | None = None, rcvbuf: int | None = None) -> socket.socket:
    """A connected plain TCP socket (from `source`, with a small receive buffer if asked)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    return sock


async def tls_client(
    port: int, ctx: ssl.SSLContext, source: str | None = None, rcvbuf: int | None = None,
    sock: socket.socket | None = None,
) -> Client:
    """A line client over a real TLS handshake that verifies the server's certificate."""
    sock = sock or await raw_socket(port, source, rcvbuf)
    r, w = await asyncio.wait_for(
        asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="127.0.0.1", limit=16 * 1024 * 1024
        ),
        TIMEOUT,
    )
    c = Client(r, w)
    c.hello = await c.recv()
    assert c.hello["event"] == "hello", c.hello
    return c


def tls_config(certs: Certs, **more: Any) -> dict[str, Any]:
    return {"tls_cert": certs.cert, "tls_key": certs.key, **more}


async def test_a_tls_server_speaks_the_same_frames_after_a_verified_handshake(
    certs: Certs,
) -> None:
    async with running_server(**tls_config(certs)) as srv:
        a = await tls_client(srv.port, certs.client())
        tls = a.writer.get_extra_info("ssl_object")
        assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
        assert a.hello["data"]["server"] == "chatd"
        assert await a.ok("ping") == {"pong": True}
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        b = await tls_client(srv.port, certs.client())
        await b.guest("bob")
        await b.ok("room.join", room="lobby")
        sent = await b.ok("msg.send", room="lobby", text="over tls")
        got = await a.event("message")
        assert got == sent["message"]
        # An over-long line is handled as on plain TCP (the splitter sees the same bytes).
        await a.send_raw(b"y" * (srv.config.max_frame + 10) + b"\n")
        assert (await a.recv())["code"] == "frame_too_large"
        assert await a.ok("ping") == {"pong": True}
        await a.close()
        await b.close()


async def test_a_client_refuses_a_server_it_does_not_trust(certs: Certs) -> None:
    async with running_server(**tls_config(certs)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_client(srv.port, ssl.create_default_context())  # system CAs only
        # The failed handshake cost the server nothing lasting.
        await wait_until(lambda: not srv.handshakes)
        assert srv.stats.tls_failures == 1
        ok = await tls_client(srv.port, certs.client())
        assert await ok.ok("ping") == {"pong": True}
        await ok.close()


async def test_a_plain_tcp_client_on_a_tls_port_fails_fast_and_harms_nobody(
    certs: Certs,
) -> None:
    async with running_server(**tls_config(certs)) as srv:
        good = await tls_client(srv.port, certs.client())
        await good.guest("ann")
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b'{"cmd":"ping","id":1}\n')  # what nc would send
        began = time.monotonic()
        try:
            data = await asyncio.wait_for(r.read(), 2.0)  # well under the 10 s handshake timeout
        except ConnectionResetError:
            data = b""
        assert time.monotonic() - began < 2.0
        # No hello, no JSON: at most a TLS alert record (content type 21), then the end.
        assert b"hello" not in data and (data == b"" or data[0] == 21), data
        w.close()
        assert srv.stats.tls_failures == 1
        assert await good.ok("ping") == {"pong": True}
        assert (await good.ok("whoami"))["user"] == "ann"
        late = await tls_client(srv.port, certs.client())
        assert await late.ok("ping") == {"pong": True}
        for c in (good, late):
            await c.close()


async def test_a_silent_connection_is_closed_at_the_handshake_timeout(certs: Certs) -> None:
    async with running_server(**tls_config(certs, tls_handshake_timeout=0.5)) as srv:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        await wait_until(lambda: srv.stats.handshaking == 1)
        began = time.monotonic()
        try:
            data = await asyncio.wait_for(r.read(), TIMEOUT)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert 0.3 <= time.monotonic() - began < 3.0
        await wait_until(lambda: srv.stats.handshaking == 0 and srv.stats.tls_failures == 1)
        w.close()


async def test_a_handshake_holds_its_per_ip_slot_and_a_refusal_costs_no_handshake(
    certs: Certs,
) -> None:
    # 127.0.0.2 is not exempt from the per-IP limit (limits.md).
    async with running_server(**tls_config(certs, per_ip_connections=1)) as srv:
        loop = asyncio.get_running_loop()
        first = socket.socket()
        first.bind(("127.0.0.2", 0))
        first.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(first, ("127.0.0.1", srv.port)), TIMEOUT)
        # It has not started its handshake, yet it holds the address's only slot.
        await wait_until(lambda: srv.per_ip.get("127.0.0.2") == 1 and srv.stats.handshaking == 1)
        with pytest.raises((ConnectionError, ssl.SSLError, EOFError, OSError)):
            await tls_client(srv.port, certs.client(), source="127.0.0.2")
        assert srv.stats.refused["per_ip"] == 1
        assert srv.stats.handshaking == 1  # the refused one never got to a handshake
        first.close()
        await wait_until(lambda: "127.0.0.2" not in srv.per_ip)
        again = await tls_client(srv.port, certs.client(), source="127.0.0.2")
        assert await again.ok("ping") == {"pong": True}
        await again.close()


async def test_the_idle_time_counts_from_accept_not_from_the_handshake(certs: Certs) -> None:
    async with running_server(**tls_config(certs)) as srv:
        sock = await raw_socket(srv.port)
        await wait_until(lambda: srv.stats.handshaking == 1)
        accepted_by = srv.clock.now()
        await asyncio.sleep(0.3)  # a slow client: the handshake starts 0.3 s after accept
        began = srv.clock.now()
        c = await tls_client(srv.port, certs.client(), sock=sock)
        conn = next(iter(srv.connections))
        assert conn.pipe is not None and conn.pipe.session is not None
        assert conn.pipe.session.unbound_since <= accepted_by < began
        await c.close()


async def test_a_tls_slow_consumer_is_dropped_without_raw_bytes_past_tls(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        written.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(chatd.server.os, "write", spy)
    async with running_server(**tls_config(certs, **SMALL_OUTBOX, outbox_hard=64 * 1024)) as srv:
        sender = await tls_client(srv.port, certs.client())
        await sender.guest("sender")
        await sender.ok("room.create", room="lobby")
        slow = await tls_client(srv.port, certs.client(), rcvbuf=4096)
        await slow.guest("slow")
        await slow.ok("room.join", room="lobby")
        await sender.event("member.joined")
        slow.writer.transport.pause_reading()  # from now on it reads nothing
        slow_conn = conn_of(srv, "slow")
        for _ in range(5000):
            await sender.ok("msg.send", room="lobby", text=TEXT)
            if slow_conn.dead:
                break
        assert slow_conn.dead, "the non-reading client was never dropped"
        assert srv.stats.slow_consumers == 1
        assert not [w for w in written if b"slow_consumer" in w]
        left = await sender.event("member.left")
        assert left["user"] == "slow"
        assert await sender.ok("ping") == {"pong": True}
        await sender.close()
        slow.writer.transport.abort()


async def test_the_client_library_connects_with_ssl(certs: Certs) -> None:
    async with running_server(**tls_config(certs)) as srv:
        async with client_connect("127.0.0.1", srv.port, user="ann", ssl=certs.client()) as chat:
            assert chat.user == "ann"
            await chat.room_create("lobby")
            msg = await chat.send("hello over tls", room="lobby")
            assert msg.text == "hello over tls"
            assert await chat.ping() is not None


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_clients_closing_cleanly_log_no_warning(
    certs: Certs, loop_factory: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean TLS close (close_notify, then EOF) is how most clients go: it must not log
    "returning true from eof_received() has no effect when using ssl" each time."""
    factory = asyncio.new_event_loop
    if loop_factory == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    async def close_cleanly() -> None:
        async with running_server(**tls_config(certs)) as srv:
            clients = [await tls_client(srv.port, certs.client()) for _ in range(3)]
            await clients[0].guest("ann")
            for c in clients:
                await c.close()
            await wait_until(lambda: not srv.connections)
            late = await tls_client(srv.port, certs.client())  # the server still serves
            await late.guest("bob")
            await late.close()
            await wait_until(lambda: not srv.connections)

    caplog.set_level(logging.WARNING)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(close_cleanly())
    noisy = [r.getMessage() for r in caplog.records if "eof_received" in r.getMessage()]
    assert noisy == []
