"""Fakes for driving the core without sockets: a peer, a scheduler and a hand-built App."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from chatd.app import App
from chatd.auth import PasswordHasher, TokenService, new_jti
from chatd.clock import FakeClock
from chatd.config import Config
from chatd.dispatch import Dispatcher, Driver, Outcome, Pending, command_table
from chatd.session import Session
from chatd.store.base import Store, UserRecord
from chatd.store.sqlite import SQLiteStore

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
UNIT_CONFIG = Config(db=":memory:", argon2_memory_kib=1024, argon2_time_cost=1)


async def drive(pending: Pending, timeout: float = 5) -> Outcome:
    """Finish a waiting command as the server does: with the one production Driver."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Outcome] = loop.create_future()
    Driver(loop.call_soon).start(pending, lambda _tag, outcome: done.set_result(outcome), None)
    return await asyncio.wait_for(done, timeout)


class FakePeer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[dict[str, Any]]:
        out = [json.loads(b) for b in self.sent]
        self.sent.clear()
        return out


class FakeTimer:
    def __init__(self, delay: float, fn: Callable[[], None]) -> None:
        self.delay = delay
        self.fn = fn
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled and not self.fired
        self.fired = True
        self.fn()


class FakeScheduler:
    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []
        self.spawned: list[Coroutine[Any, Any, Any]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(delay, fn)
        self.timers.append(t)
        return t

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.spawned.append(coro)

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.fired]

    def close(self) -> None:
        for coro in self.spawned:
            coro.close()


class Core:
    """An App and its Dispatcher over fakes."""

    def __init__(self, config: Config = UNIT_CONFIG, store: Store | None = None) -> None:
        # What the host says of its closing chores (App's `closing`): a test sets it.
        self.closing = False
        self.clock = FakeClock()
        self.scheduler = FakeScheduler()
        self.tokens = TokenService(SECRET, self.clock)
        self.hasher = PasswordHasher(memory_kib=1024, time_cost=1, workers=1)
        self.app = App(
            config, self.clock, store or SQLiteStore(":memory:"), self.tokens, self.hasher,
            self.scheduler, closing=lambda: self.closing,
        )
        self.dispatcher = Dispatcher(self.app, command_table())

    def session(self) -> tuple[Session, FakePeer]:
        peer = FakePeer()
        return self.app.open_session(peer, "127.0.0.1"), peer

    def add_user(self, name: str, uid: int, *, admin: bool = False) -> UserRecord:
        user = UserRecord(id=uid, name=name, pw_hash="", admin=admin, token_version=0)
        self.app.accounts.adopt(name.lower(), user)  # as the store has it (`chatd user add`)
        return user

    def token(self, user: UserRecord, grants: tuple[str, ...] = (), ttl: int = 3600) -> str:
        token, _ = self.tokens.mint(user.name, new_jti(user.id, user.token_version), grants, ttl)
        return token

    def close(self) -> None:
        self.scheduler.close()
        self.hasher.close()


@contextmanager
def core(config: Config = UNIT_CONFIG, store: Store | None = None) -> Iterator[Core]:
    c = Core(config, store)
    try:
        yield c
    finally:
        c.close()
