"""Helpers for the client tests: waits with timeouts, gated backoff, a TCP proxy that can
cut a connection at a chosen frame or stop forwarding (a silent peer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from chatd_client import Client, Event, EventStream, Options

from chatd.server import ChatServer

T = 5.0
FAST = Options(request_timeout=5.0, ping_interval=None)


async def fast_backoff(attempt: int) -> None:
    await asyncio.sleep(0.02)  # a backoff, not a wait for a condition


class Gate:
    """A backoff that holds reconnects until opened: the test decides when it happens."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.attempts = 0
        self.waiting = asyncio.Event()

    async def __call__(self, attempt: int) -> None:
        self.attempts = attempt
        self.waiting.set()
        await self.open.wait()
        await asyncio.sleep(0.02)


async def next_event(stream: EventStream, *names: str, within: float = T) -> Event:
    """The next event with one of these names; others are skipped."""
    async with asyncio.timeout(within):
        while True:
            ev = await stream.get()
            if ev.name in names:
                return ev


async def collect_until(
    stream: EventStream, done: Callable[[Event], bool], within: float = T
) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(within):
        while True:
            ev = await stream.get()
            out.append(ev)
            if done(ev):
                return out


async def registered(
    srv: ChatServer, client: Client, user: str, password: str = "password1"
) -> None:
    await client.register(user, password)
    await client.login(user, password)


async def make_admin(srv: ChatServer, name: str, password: str) -> None:
    await srv.store.create_user(name, srv.hasher.hash_sync(password), True)
    srv.app.apply_users(*await srv.store.reload_users())


class Proxy:
    """127.0.0.1 relay to a server port. ``cut_when(line)`` (server → client lines) drops
    that line and aborts both sides, once. ``silent`` stops forwarding server → client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cut_when: Callable[[bytes], bool] | None = None
        self.silent = False
        self.cuts = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=T)
        await asyncio.wait_for(self._server.wait_closed(), T)

    def reset_all(self) -> None:
        """Abort every relayed connection, both sides (as a reset would)."""
        for w in self._writers:
            w.transport.abort()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target, limit=1 << 24)
        except OSError:
            cw.transport.abort()
            return
        self._writers += [cw, sw]
        for coro in (self._pump(cr, sw, cw, False), self._pump(sr, cw, sw, True)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        down: bool,
    ) -> None:
        try:
            while line := await r.readline():
                if down and self.cut_when is not None and self.cut_when(line):
                    self.cut_when = None
                    w.transport.abort()
                    other.transport.abort()
                    self.cuts.set()
                    return
                if down and self.silent:
                    continue
                w.write(line)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.transport.abort()
            other.transport.abort()
