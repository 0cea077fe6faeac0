"""Test helpers: an in-process server on 127.0.0.1:0 and a line client. Every wait has a
timeout (STYLE 9)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from chatd.clock import Clock, FakeClock
from chatd.config import DEFAULT_LOGIN_GRANTS, Config
from chatd.server import ChatServer
from chatd.store.sqlite import SQLiteStore

SECRET = "test-secret-that-is-long-enough-for-hs256!"
TIMEOUT = 5.0
# Cheap argon2 in tests: the cost is a parameter, the code path is the same.
TEST_CONFIG = Config(
    port=0,
    db=":memory:",
    argon2_memory_kib=1024,
    argon2_time_cost=1,
    idle_timeout=300.0,
    # Most tests use guests as full users for brevity; the guest defaults have tests of
    # their own (tests/wire/test_guests.py), which start from GUEST_DEFAULTS.
    guest_grants=DEFAULT_LOGIN_GRANTS,
)
GUEST_DEFAULTS = TEST_CONFIG.replace(
    guest_grants=Config().guest_grants, guest_grace=Config().guest_grace
)


# The two-node pass of the wire suite (tests/conftest.py sets it per test): servers of a
# :memory: config start as TWO nodes on one fresh Redis, each with its own ChatServer,
# RedisStore and bus (they share only Redis, and the test's FakeClock when it has one),
# and the `connect` fixture alternates its connections between them.
TWO_NODES = False
# Each first node -> every node of its service (the first included).
NODES: dict[ChatServer, list[ChatServer]] = {}
# In the two-node pass, a test's database file -> the Redis that stands for it, so a test
# that restarts its server on one file restarts both nodes on one Redis (emptied once, at
# the file's first use in the test; tests/conftest.py clears this per test).
REDIS_FOR_FILE: dict[str, str] = {}


def two_nodes(cfg: Config) -> bool:
    return TWO_NODES


def _store(cfg: Config, url: str | None = None) -> Any:
    """SQLite as configured; CHATD_TEST_STORE=redis runs the in-process servers of a
    :memory: config on the Redis store instead (a local check of RedisStore behind the
    whole wire suite; tests/redisutil.py starts the redis-server)."""
    if url is not None or (os.environ.get("CHATD_TEST_STORE") == "redis" and cfg.db == ":memory:"):
        from chatd.store.redis import RedisStore
        from tests.redisutil import fresh_redis_url

        return RedisStore(url or fresh_redis_url())
    return SQLiteStore(cfg.db)


def nodes_of(server: ChatServer) -> list[ChatServer]:
    """Every node of the service `server` is the first node of (one, usually)."""
    return NODES.get(server, [server])


@asynccontextmanager
async def running_server(
    config: Config | None = None, *, clock: Clock | None = None, **changes: Any
) -> AsyncIterator[ChatServer]:
    """An in-process server; with `clock=FakeClock(...)` its timers (expiry, notices,
    guest graces, idle deadlines) wait for `advance`, not for real time. In the two-node
    pass: the first of two nodes on one Redis (`nodes_of` gives both)."""
    cfg = (config or TEST_CONFIG).replace(**changes) if changes else (config or TEST_CONFIG)
    if not two_nodes(cfg):
        server = ChatServer(cfg, _store(cfg), SECRET, clock=clock)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
        return
    from tests.redisutil import fresh_redis_url

    if cfg.db == ":memory:":
        url = fresh_redis_url()
    else:
        url = REDIS_FOR_FILE.get(cfg.db) or REDIS_FOR_FILE.setdefault(cfg.db, fresh_redis_url())
    first = ChatServer(cfg, _store(cfg, url), SECRET, clock=clock)
    await first.start()
    second = ChatServer(cfg, _store(cfg, url), SECRET, clock=clock)
    try:
        await second.start()
    except BaseException:
        await first.stop()
        raise
    NODES[first] = [first, second]
    try:
        yield first
    finally:
        del NODES[first]
        await second.stop()
        await first.stop()


class Client:
    """One connection speaking JSON lines. Replies are matched by id; events are kept."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []
        self.hello: dict[str, Any] = {}
        self.token: str | None = None

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=16 * 1024 * 1024), TIMEOUT
        )
        c = cls(r, w)
        c.hello = await c.recv()
        assert c.hello["event"] == "hello", c.hello
        return c

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(frame).encode() + b"\n")

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("connection closed")
        result: dict[str, Any] = json.loads(line)
        return result

    async def reply(self, rid: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next reply with this id; events met on the way are kept in .events."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "event":
                self.events.append(frame)
                continue
            if frame.get("id") == rid:
                return frame
            raise AssertionError(f"unexpected frame {frame}")

    async def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        await self.send({"cmd": cmd, "id": rid, **fields})
        return await self.reply(rid)

    async def ok(self, cmd: str, **fields: Any) -> dict[str, Any]:
        frame = await self.call(cmd, **fields)
        assert frame["type"] == "ok", frame
        data: dict[str, Any] = frame["data"]
        return data

    async def error(self, cmd: str, code: str, **fields: Any) -> dict[str, Any]:
        frame = await self.call(cmd, **fields)
        assert frame["type"] == "error" and frame["code"] == code, frame
        return frame

    async def event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next event called `name` (from those kept, else from the socket)."""
        for i, e in enumerate(self.events):
            if e["event"] == name:
                return self.events.pop(i)["data"]  # type: ignore[no-any-return]
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "event" and frame["event"] == name:
                return frame["data"]  # type: ignore[no-any-return]
            if frame["type"] == "event":
                self.events.append(frame)
            else:
                raise AssertionError(f"unexpected frame {frame}")

    async def no_frame(self, within: float = 0.2) -> None:
        """Assert nothing arrives: a bounded wait for an absence."""
        try:
            frame = await self.recv(within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def guest(self, name: str) -> dict[str, Any]:
        data = await self.ok("login", user=name)
        self.token = data["token"]
        return data

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        except ssl.SSLError as exc:
            # Over TLS, an event the server wrote before our close_notify reached it
            # arrives after we sent ours; Python's unwrap calls that an error. Legal TLS.
            if exc.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                raise


Connect = Callable[[], Awaitable[Client]]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@asynccontextmanager
async def clients(*ports: int) -> AsyncIterator[list[Client]]:
    """One client per port, in order (several nodes: one on each); all closed after."""
    made: list[Client] = []
    try:
        for p in ports:
            made.append(await Client.connect(p))
        yield made
    finally:
        for c in made:
            await c.close()


async def guest(connect: Connect, name: str, **login: Any) -> Client:
    """A new connection logged in as guest `name`."""
    c = await connect()
    data = await c.ok("login", user=name, **login)
    c.token = data["token"]
    return c


async def second(connect: Connect, first: Client) -> Client:
    """Another connection of the same user."""
    c = await connect()
    await c.ok("auth", token=first.token)
    return c


async def admin(server: ChatServer, connect: Connect, name: str = "root") -> Client:
    """A connection logged in as a fresh admin account (made through the store)."""
    pw = "admin-password"
    await server.store.create_user(name, await server.app.hasher.hash(pw), True)
    await server.app.refresh_user(name.lower())  # as a `chatd user add` is seen at once
    c = await connect()
    data = await c.ok("login", user=name, password=pw)
    assert "admin" in data["grants"]
    c.token = data["token"]
    return c


async def until(check: Callable[[], Awaitable[Any]], within: float = TIMEOUT) -> Any:
    """Poll an async check until it returns something truthy: for effects no event
    announces (a periodic task, the server seeing `chatd user …`). Bounded by `within`."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not seen in time")
        await asyncio.sleep(0.02)


async def deaf_client(port: int, source: str | None = None) -> Client:
    """A client that reads only when told to: a small kernel receive buffer and a small
    StreamReader limit, so what it does not read piles up on the server."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if source is not None:
        sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    r, w = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    c = Client(r, w)
    c.hello = await c.recv()
    return c


def fake_clock() -> FakeClock:
    """A FakeClock starting at the real time (stored timestamps stay plausible)."""
    return FakeClock(time.time())


async def advance(server: ChatServer, seconds: float) -> None:
    """Move the server's FakeClock on by `seconds` and run what became due, as the event
    loop would have after a real wait; then one loop turn, so the frames it sent go out."""
    clock = server.clock
    assert isinstance(clock, FakeClock), "advance needs running_server(clock=fake_clock())"
    clock.advance(seconds)
    for node in nodes_of(server):
        node.run_due()
    await asyncio.sleep(0)
