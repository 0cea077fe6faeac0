"""Limits.settle's bookkeeping with an in-memory SharedBudgets (no Redis: the Redis one is
tests/store/test_redis_budgets.py): what is spent while a settle is in flight is not lost,
a settle that fails keeps the spends for the next, and the single-node path records
nothing."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from chatd.clock import FakeClock
from chatd.config import Config
from chatd.domain.limits import Limits
from chatd.errors import RateLimited
from chatd.session import Session

CONFIG = Config(rate_limit=1.0)  # burst 3


class _Conn:
    def __init__(self, sid: int) -> None:
        self.id = sid
        self.ip = "192.0.2.1"


S = cast(Session, _Conn(1))


def conn(sid: int) -> Session:
    """A connection of its own: its per-connection budget is not the one under test."""
    return cast(Session, _Conn(sid))


class Ledger:
    """A shared budget kept in memory: every settle's spends, and the tokens it answers."""

    def __init__(self, left: float) -> None:
        self.left = left
        self.calls: list[list[tuple[str, float, float, int]]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def settle(self, spent: list[tuple[str, float, float, int]]) -> list[float]:
        self.calls.append(spent)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("down")
        return [self.left for _ in spent]

    async def close(self) -> None:
        pass


async def test_spends_during_a_settle_count_against_the_shared_answer() -> None:
    limits = Limits(CONFIG, FakeClock())
    ledger = Ledger(left=2.0)  # the shared bucket, once this node's 1 spend is in: 2 left
    limits.share(ledger)
    limits.spend_send("ann", conn(1))
    ledger.gate = asyncio.Event()
    settling = asyncio.ensure_future(limits.settle())
    await asyncio.sleep(0)
    limits.spend_send("ann", conn(2))  # while the settle is in flight
    ledger.gate.set()
    await settling
    assert ledger.calls == [[("s:ann", 1.0, 3.0, 1)]]
    # 2 left in the shared bucket less the 1 spent meanwhile: one more send, then refused.
    limits.spend_send("ann", conn(3))
    with pytest.raises(RateLimited):
        limits.spend_send("ann", conn(4))
    ledger.gate = None
    await limits.settle()
    assert ledger.calls[-1] == [("s:ann", 1.0, 3.0, 2)]  # the two not yet told


async def test_a_failed_settle_keeps_the_spends_for_the_next() -> None:
    limits = Limits(CONFIG, FakeClock())
    ledger = Ledger(left=3.0)
    limits.share(ledger)
    limits.spend_send("bob", S)
    ledger.fail = True
    await limits.settle()  # logged, not raised
    limits.spend_send("bob", S)
    ledger.fail = False
    await limits.settle()
    assert ledger.calls[-1] == [("s:bob", 1.0, 3.0, 2)]


async def test_alone_nothing_is_recorded_or_settled() -> None:
    limits = Limits(CONFIG, FakeClock())
    for _ in range(3):
        limits.spend_send("cid", S)
    await limits.settle()
    state: Any = limits
    assert limits.shared is None and state._unshared == {}
