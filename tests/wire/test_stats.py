"""The admin `stats` command, the Prometheus endpoint (scraped over HTTP) and the lines an
operator reads in the log, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.app import VERSION
from chatd.server import ChatServer
from tests.helpers import (
    TIMEOUT,
    Client,
    admin,
    advance,
    deaf_client,
    fake_clock,
    guest,
    nodes_of,
    running_server,
)
from tests.wire.test_limits import SMALL_OUTBOX, conn_of, connect_from, read_to_end, wait_until

CONTRACT_KEYS = {"version", "uptime", "connections", "users_online", "rooms", "messages", "rev"}


def connector(srv: ChatServer) -> Any:
    async def connect() -> Client:
        return await Client.connect(srv.port)

    return connect


async def test_stats_needs_the_admin_grant() -> None:
    async with running_server() as srv:
        anon = await Client.connect(srv.port)
        await anon.error("stats", "unauthorized")
        g = await guest(connector(srv), "ann")
        err = await g.error("stats", "forbidden")
        assert "admin" in err["message"]
        for c in (anon, g):
            await c.close()


async def test_stats_reports_the_contract_figures_and_the_counters() -> None:
    async with running_server(rate_limit=1.0) as srv:
        connect = connector(srv)
        root = await admin(srv, connect)
        ann = await guest(connect, "ann")
        bob = await guest(connect, "bob")
        idle = await Client.connect(srv.port)  # connected, not logged in
        await ann.ok("room.create", room="lobby")
        await bob.ok("room.join", room="lobby")
        await ann.event("member.joined")
        await ann.ok("msg.send", room="lobby", text="one")
        await bob.event("message")
        await ann.ok("msg.send", room="lobby", text="two")
        await bob.event("message")
        await ann.ok("msg.send", room="lobby", text="three")  # burst is 3
        await ann.error("msg.send", "rate_limited", room="lobby", text="four")
        await ann.ok("room.create", room="other")
        await ann.send_raw(b"not json\n")
        assert (await ann.recv())["code"] == "bad_frame"

        data = await root.ok("stats")
        assert CONTRACT_KEYS <= data.keys()
        assert data["version"] == VERSION
        assert isinstance(data["uptime"], float) and data["uptime"] >= 0
        assert data["connections"] == 4
        assert data["connections_logged_in"] == 3
        assert data["connections_guests"] == 2
        assert data["users_online"] == 3
        assert data["rooms"] == 2
        assert data["messages"] == 3
        assert data["rev"] == srv.store.rev == 3
        assert data["messages_total"] == 3
        # Each message went to both members' connections: 2 deliveries each, plus the
        # member.joined event for ann.
        assert data["deliveries_total"] == 3 * 2 + 1
        assert data["rate_limited"] == 1
        assert data["bad_frames"] == 1
        assert data["commands_total"] >= 10
        assert data["commands_per_s"] > 0 and data["messages_per_s"] > 0
        assert data["deliveries_per_s"] > 0
        assert data["bytes_in"] > 0 and data["bytes_out"] > data["bytes_in"]
        assert data["slow_consumers"] == 0
        assert data["refused"] == {"shutting_down": 0, "full": 0, "per_ip": 0, "per_ip_rate": 0}
        assert data["store_commit_p50_ms"] is not None
        assert data["store_commit_p99_ms"] >= data["store_commit_p50_ms"] > 0
        assert data["rss_bytes"] > 1_000_000
        assert data["tls"] is False
        for c in (root, ann, bob, idle):
            await c.close()


async def test_stats_counts_refused_connections_by_reason() -> None:
    async with running_server(per_ip_connections=1) as srv:
        root = await admin(srv, connector(srv))
        kept = await connect_from(srv.port, "127.0.0.2")
        assert (await kept.recv())["event"] == "hello"
        extra = await connect_from(srv.port, "127.0.0.2")
        lines = await read_to_end(extra)
        assert b"rate_limited" in lines[0]
        data = await root.ok("stats")
        assert data["refused"]["per_ip"] == 1
        for c in (root, kept, extra):
            await c.close()


async def test_stats_counts_a_slow_consumer_and_logs_its_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with running_server(**SMALL_OUTBOX, outbox_hard=64 * 1024) as srv:
        connect = connector(srv)
        root = await admin(srv, connect)
        sender = await guest(connect, "sender")
        await sender.ok("room.create", room="lobby")
        slow = await deaf_client(srv.port)
        await slow.guest("slow")
        await slow.ok("room.join", room="lobby")
        slow_conn = conn_of(srv, "slow")
        for _ in range(5000):
            await sender.ok("msg.send", room="lobby", text="x" * 4000)
            if slow_conn.dead:
                break
        assert slow_conn.dead
        assert (await root.ok("stats"))["slow_consumers"] == 1
        drops = [r for r in caplog.records if getattr(r, "event", None) == "connection_closed"]
        assert len(drops) == 1
        assert drops[0].reason == "slow_consumer"  # type: ignore[attr-defined]
        assert "127.0.0.1" in drops[0].getMessage() and "slow" in drops[0].getMessage()
        for c in (root, sender, slow):
            await c.close()


# --- Prometheus ------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


async def scrape(srv: ChatServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics over HTTP, parsed by prometheus_client's own parser."""
    assert srv.metrics is not None
    url = f"http://127.0.0.1:{srv.metrics.port}/metrics"
    status, ctype, text = await asyncio.to_thread(_get, url)
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_are_off_by_default() -> None:
    async with running_server() as srv:
        assert srv.metrics is None


async def test_the_metrics_endpoint_serves_the_stats_figures_in_prometheus_format() -> None:
    async with running_server(metrics_port=0, max_connections=3) as srv:
        assert srv.metrics is not None
        assert srv.metrics.httpd.server_address[0] == "127.0.0.1"  # loopback unless told
        connect = connector(srv)
        ann = await guest(connect, "ann")
        await ann.ok("room.create", room="lobby")
        await ann.ok("msg.send", room="lobby", text="hi")
        await ann.ok("msg.send", room="lobby", text="there")
        other = await Client.connect(srv.port)
        third = await Client.connect(srv.port)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        full = Client(r, w)
        assert b"the server is full" in (await read_to_end(full))[0]
        m = await scrape(srv)
        assert m["chatd_info"][(("tls", "false"), ("version", VERSION))] == 1.0
        assert m["chatd_connections"][()] == 3.0
        assert m["chatd_connections_logged_in"][()] == 1.0
        assert m["chatd_users_online"][()] == 1.0
        assert m["chatd_rooms"][()] == 1.0
        assert m["chatd_messages_stored"][()] == 2.0
        assert m["chatd_revision"][()] == 2.0
        assert m["chatd_messages_posted_total"][()] == 2.0
        assert m["chatd_refused_connections_total"][(("reason", "full"),)] == 1.0
        assert m["chatd_refused_connections_total"][(("reason", "per_ip"),)] == 0.0
        assert m["chatd_commands_total"][()] >= 4.0
        assert m["chatd_received_bytes_total"][()] > 0
        assert m["chatd_uptime_seconds"][()] >= 0
        assert m["chatd_resident_memory_bytes"][()] > 1_000_000
        assert m["chatd_store_commit_seconds"][(("quantile", "0.99"),)] > 0
        assert "chatd_messages_per_second" in m and "chatd_slow_consumer_drops_total" in m
        # Figures move between scrapes.
        await ann.ok("msg.send", room="lobby", text="again")
        assert (await scrape(srv))["chatd_messages_stored"][()] == 3.0
        # Only /metrics is served: a mistyped path is a 404, not a scrape.
        for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as err:
                await asyncio.to_thread(_get, f"http://127.0.0.1:{srv.metrics.port}{path}")
            err.value.close()  # an HTTPError holds the response's socket
            assert err.value.code == 404, path
        for c in (ann, other, third, full):
            await c.close()
    assert srv.metrics is not None
    with pytest.raises(OSError):  # stopped with the server
        await asyncio.to_thread(_get, f"http://127.0.0.1:{srv.metrics.port}/metrics")


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_the_metrics_endpoint_listens_on_an_ipv6_address() -> None:
    async with running_server(metrics_port=0, metrics_host="::1") as srv:  # before: refused
        assert srv.metrics is not None
        assert srv.metrics.httpd.socket.family == socket.AF_INET6
        status, _, text = await asyncio.to_thread(_get, f"http://[::1]:{srv.metrics.port}/metrics")
        assert status == 200 and "chatd_connections" in text


# --- operator logs -----------------------------------------------------------------------


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


async def test_a_failed_login_burst_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with running_server() as srv:
        connect = connector(srv)
        root = await admin(srv, connect)
        await root.ok("logout")
        c = await Client.connect(srv.port)
        for _ in range(5):
            await c.error("login", "unauthorized", user="root", password="wrong-password")
        for _ in range(3):
            await c.error("login", "rate_limited", user="root", password="wrong-password")
        lines = events(caplog, "login_failures")
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "root" in lines[0].getMessage() and "127.0.0.1" in lines[0].getMessage()
        root2 = await admin(srv, connect, "root2")
        assert (await root2.ok("stats"))["login_bursts"] == 1
        for x in (root, c, root2):
            await x.close()


async def test_idle_closes_and_refusals_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with running_server(idle_timeout=0.5, max_connections=1, clock=fake_clock()) as srv:
        c = await Client.connect(srv.port)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        refused = Client(r, w)
        await read_to_end(refused)
        await advance(srv, 0.6)
        assert (await c.recv(timeout=4.0))["code"] == "unauthorized"
        await wait_until(lambda: bool(events(caplog, "connection_closed")))
        idle = events(caplog, "connection_closed")
        assert [getattr(r, "reason", None) for r in idle] == ["idle"]
        refusals = events(caplog, "connection_refused")
        assert len(refusals) == 1 and refusals[0].reason == "full"  # type: ignore[attr-defined]
        assert srv.stats.idle_closed == 1
        for x in (c, refused):
            await x.close()


async def test_a_connection_sending_many_bad_frames_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with running_server(command_rate=0) as srv:
        c = await Client.connect(srv.port)
        await c.send_raw(b"garbage\n" * 250)
        for _ in range(250):
            assert (await c.recv())["code"] == "bad_frame"
        assert await c.ok("ping") == {"pong": True}  # still served
        lines = events(caplog, "bad_frames")
        assert len(lines) == 1 and "100 bad frames" in lines[0].getMessage()
        await c.close()


async def test_start_and_stop_are_logged_with_the_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with running_server(idle_timeout=42.0) as srv:
        ports = [node.port for node in nodes_of(srv)]  # one node, or two in the two-node pass
        on_redis = type(srv.store).__name__ == "RedisStore"  # the two-node pass (helpers.py)
    start = events(caplog, "start")
    assert len(start) == len(ports)
    store = "redis redis://127.0.0.1:" if on_redis else "db :memory:"  # the store it runs on
    for port, record in zip(ports, start, strict=True):
        msg = record.getMessage()
        assert f"listening on 127.0.0.1:{port}" in msg
        for part in ("tls off", store, "idle_timeout 42.0", "metrics off", VERSION):
            assert part in msg, msg
    assert len(events(caplog, "stopping")) == len(ports) == len(events(caplog, "stopped"))
