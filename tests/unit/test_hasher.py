"""PasswordHasher scheduling (issue 13, item 4): logins never queue behind registrations.

A fake argon2 whose hashes block on events orders the work; no sleeps, every wait bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from chatd.auth import PasswordHasher
from chatd.errors import RateLimited

WAIT = 5.0


class GatedArgon:
    """argon2's hash/verify: a password starting with "block" holds its thread until
    `gate` opens; every call is recorded in the order the threads ran it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.order: list[str] = []
        self.blocked = 0
        self._lock = threading.Lock()
        self._blocking: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self) -> asyncio.Event:
        """An asyncio event set whenever a blocking hash has started on its thread."""
        self._loop = asyncio.get_running_loop()
        self._blocking = asyncio.Event()
        return self._blocking

    def _record(self, what: str) -> None:
        with self._lock:
            self.order.append(what)

    def hash(self, password: str) -> str:
        if password.startswith("block"):
            with self._lock:
                self.blocked += 1
            if self._loop is not None and self._blocking is not None:
                self._loop.call_soon_threadsafe(self._blocking.set)
            assert self.gate.wait(WAIT)
        self._record(f"hash {password}")
        return f"h:{password}"

    def verify(self, pw_hash: str, password: str) -> bool:
        self._record(f"verify {password}")
        return pw_hash == f"h:{password}"


@pytest.fixture
def argon() -> Iterator[GatedArgon]:
    a = GatedArgon()
    yield a
    a.gate.set()  # never leave a thread blocked


def hasher_with(argon: GatedArgon, **kw: Any) -> PasswordHasher:
    h = PasswordHasher(argon=argon, **kw)
    argon.order.clear()  # the dummy hash made at construction
    return h


async def test_waiting_logins_run_before_waiting_registrations(argon: GatedArgon) -> None:
    hasher = hasher_with(argon, workers=1)
    started = argon.watch()
    try:
        blocker = asyncio.ensure_future(hasher.hash("block"))
        await asyncio.wait_for(started.wait(), WAIT)  # the only thread is busy
        regs = [asyncio.ensure_future(hasher.hash(f"reg{i}")) for i in range(3)]
        logins = [asyncio.ensure_future(hasher.verify("h:pw", "pw")) for _ in range(2)]
        await asyncio.sleep(0)  # a loop turn: every job is queued
        assert hasher.waiting("register") == 3 and hasher.waiting("login") == 2
        argon.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *regs, *logins), WAIT)
        assert argon.order == [
            "hash block", "verify pw", "verify pw", "hash reg0", "hash reg1", "hash reg2"
        ]  # fmt: skip
        assert all(f.result() is True for f in logins)
    finally:
        hasher.close()


async def test_registrations_leave_a_thread_to_logins(argon: GatedArgon) -> None:
    hasher = hasher_with(argon, workers=2)
    started = argon.watch()
    try:
        blocker = asyncio.ensure_future(hasher.hash("block-a"))
        await asyncio.wait_for(started.wait(), WAIT)
        # A second registration waits although a thread is free: that one is the logins'.
        queued = asyncio.ensure_future(hasher.hash("block-b"))
        await asyncio.sleep(0)
        assert hasher.waiting("register") == 1
        # A login finishes while the registration still holds its thread.
        assert await asyncio.wait_for(hasher.verify("h:pw", "pw"), WAIT) is True
        assert argon.blocked == 1 and not blocker.done()
        argon.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, queued), WAIT)
    finally:
        hasher.close()


async def test_a_full_registration_queue_refuses_registrations_not_logins(
    argon: GatedArgon,
) -> None:
    hasher = hasher_with(argon, workers=1, queue=2, register_queue=1)
    started = argon.watch()
    try:
        blocker = asyncio.ensure_future(hasher.hash("block"))
        await asyncio.wait_for(started.wait(), WAIT)
        waiting = asyncio.ensure_future(hasher.hash("reg"))
        await asyncio.sleep(0)
        with pytest.raises(RateLimited, match="registrations"):
            await hasher.hash("one too many")
        logins = [asyncio.ensure_future(hasher.verify("h:pw", "pw")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RateLimited, match="logins"):  # the logins' own bound
            await hasher.verify("h:pw", "pw")
        argon.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, waiting, *logins), WAIT)
    finally:
        hasher.close()


async def test_a_cancelled_waiting_job_gives_its_place_back(argon: GatedArgon) -> None:
    hasher = hasher_with(argon, workers=1, register_queue=1)
    started = argon.watch()
    try:
        blocker = asyncio.ensure_future(hasher.hash("block"))
        await asyncio.wait_for(started.wait(), WAIT)
        doomed = asyncio.ensure_future(hasher.hash("doomed"))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert hasher.waiting("register") == 0
        after = asyncio.ensure_future(hasher.hash("after"))
        argon.gate.set()
        assert await asyncio.wait_for(after, WAIT) == "h:after"
        await asyncio.wait_for(blocker, WAIT)
        assert "hash doomed" not in argon.order
    finally:
        hasher.close()


async def test_the_real_argon2_still_hashes_and_verifies() -> None:
    hasher = PasswordHasher(memory_kib=1024, time_cost=1, workers=2)
    try:
        h = await hasher.hash("a good password")
        assert await hasher.verify(h, "a good password") is True
        assert await hasher.verify(h, "wrong password!") is False
        assert await hasher.verify(None, "anything at all") is False
    finally:
        hasher.close()


async def test_closing_cancels_the_jobs_still_queued(argon: GatedArgon) -> None:
    hasher = hasher_with(argon, workers=1)
    started = argon.watch()
    blocker = asyncio.ensure_future(hasher.hash("block"))
    await asyncio.wait_for(started.wait(), WAIT)
    queued = [asyncio.ensure_future(hasher.verify("h:pw", "pw")), asyncio.ensure_future(hasher.hash("r"))]
    await asyncio.sleep(0)
    hasher.close()
    for f in queued:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(f, WAIT)
    argon.gate.set()
    await asyncio.wait_for(blocker, WAIT)  # the running one finishes
