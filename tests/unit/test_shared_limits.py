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
from chatd.errors import Internal, RateLimited
from chatd.session import Session

CONFIG = Config(rate_limit=1.0)  # burst 3


class _Conn:
    def __init__(self, sid: int) -> None:
        self.id = sid
        self.ip = "192.0.2.1"
        self.closed = False


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


class Unanswering(Ledger):
    """A shared store whose admits get no answer (a reply timeout) while `down`."""

    node = "n1"
    lease = 5.0

    def __init__(self) -> None:
        super().__init__(left=3.0)
        self.down = True
        self.admits = 0
        self.released: list[str] = []

    async def admit(self, check: str, keys: list[tuple[str, int]], window: float) -> bool:
        self.admits += 1
        if self.down:
            raise ConnectionError("Redis: Timeout reading from socket")
        return True

    async def release(self, check: str, names: list[str]) -> None:
        if self.down:
            raise ConnectionError("Redis: Connection refused")
        self.released.append(check)

    async def renew(self) -> None:
        pass


async def test_unanswered_admits_are_released_later_and_bounded_meanwhile() -> None:
    """Each admit that got no answer is released at the next settle that reaches the store;
    meanwhile at most 1,024 wait, then checks answer internal without asking (an outage
    under a flood of logins must not grow memory)."""
    limits = Limits(CONFIG, FakeClock())
    shared = Unanswering()
    limits.share(cast(Any, shared))
    for i in range(1_100):
        with pytest.raises(Internal):
            await limits.admit_login(conn(i), "ann")
    assert shared.admits == 1_024
    await limits.settle()  # still down: kept
    assert shared.released == []
    shared.down = False
    await limits.settle()
    assert shared.released == [f"n1:{i}" for i in range(1, 1_025)]
    check = await limits.admit_login(conn(2_000), "ann")  # asks the store again
    assert shared.admits == 1_025 and check.id == "n1:1101"
