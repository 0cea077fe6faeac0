"""ChatServer's timers on an injected clock: what tests.helpers.advance relies on."""

from __future__ import annotations

import asyncio

from chatd.clock import FakeClock, SystemClock
from chatd.server import ChatServer
from chatd.store.sqlite import SQLiteStore
from tests.helpers import SECRET, TEST_CONFIG


async def test_timers_fire_when_the_fake_clock_reaches_them_in_deadline_order() -> None:
    clock = FakeClock()
    srv = ChatServer(TEST_CONFIG, SQLiteStore(":memory:"), SECRET, clock=clock)
    fired: list[str] = []
    srv.call_later(2.0, lambda: fired.append("b"))
    srv.call_later(1.0, lambda: fired.append("a"))
    srv.call_later(1.5, lambda: fired.append("never")).cancel()
    await asyncio.sleep(0.05)  # real time does not move them
    srv.run_due()
    assert fired == []
    clock.advance(1.99)
    srv.run_due()
    assert fired == ["a"]
    clock.advance(0.01)
    srv.run_due()
    assert fired == ["a", "b"]


async def test_a_zero_delay_runs_on_the_next_loop_turn_and_the_system_clock_uses_the_loop() -> None:
    fired: list[str] = []
    srv = ChatServer(TEST_CONFIG, SQLiteStore(":memory:"), SECRET, clock=FakeClock())
    srv.call_later(0, lambda: fired.append("now"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fired == ["now"]
    real = ChatServer(TEST_CONFIG, SQLiteStore(":memory:"), SECRET, clock=SystemClock())
    handle = real.call_later(60, lambda: None)
    assert isinstance(handle, asyncio.TimerHandle)
    handle.cancel()
    real.run_due()  # nothing to run under the system clock
