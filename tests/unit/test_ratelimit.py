"""TokenBucket on an injected clock: no sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from chatd.clock import FakeClock
from chatd.errors import RateLimited
from chatd.ratelimit import FailureGate, KeyedBuckets, TokenBucket


def test_burst_then_empty() -> None:
    b = TokenBucket(rate=10.0, burst=3.0, now=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.1)


def test_refills_at_rate_and_is_capped_at_burst() -> None:
    b = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    for _ in range(4):
        assert b.take(0.0) == 0.0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0.0  # exactly one token came back
    assert b.take(0.5) == pytest.approx(0.5)
    # A long pause refills to the burst, not beyond.
    assert [b.take(1000.0) for _ in range(4)] == [0.0] * 4
    assert b.take(1000.0) > 0.0


def test_waiting_the_advised_delay_succeeds() -> None:
    b = TokenBucket(rate=3.0, burst=1.0, now=0.0)
    assert b.take(0.0) == 0.0
    now = 0.0
    for _ in range(10):
        delay = b.take(now)
        assert delay > 0.0
        now += delay
        assert b.take(now) == 0.0


def test_a_refused_take_does_not_spend() -> None:
    b = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    assert b.take(0.0) == 0.0
    for _ in range(5):
        assert b.take(0.5) == pytest.approx(0.5)
    assert b.take(1.0) == 0.0


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    b = TokenBucket(rate=1.0, burst=2.0, now=10.0)
    assert b.take(10.0) == 0.0
    assert b.take(10.0) == 0.0
    assert b.take(5.0) > 0.0


def test_clock_stepping_back_does_not_lock_the_bucket() -> None:
    b = TokenBucket(rate=1.0, burst=1.0, now=1000.0)
    assert b.take(1000.0) == 0.0
    b.take(0.0)  # the wall clock jumped back 1000 s
    assert b.take(1.0) == 0.0


# --- peeking, buckets by key, the failure gate (issue 13) -----------------------------


def test_wait_peeks_without_taking() -> None:
    b = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    assert b.wait(0.0) == 0.0 and b.wait(0.0) == 0.0
    assert b.take(0.0) == 0.0
    assert b.wait(0.25) == pytest.approx(0.75)
    assert b.wait(1.0) == 0.0


def test_keyed_buckets_limit_each_key_and_forget_full_ones() -> None:
    buckets = KeyedBuckets(2, 60.0, sweep_at=2)
    for _ in range(2):
        assert buckets.wait("a", 0.0) == 0.0
        buckets.take("a", 0.0)
    assert buckets.wait("a", 0.0) == pytest.approx(30.0)
    assert buckets.wait("b", 0.0) == 0.0
    buckets.take("b", 0.0)
    # Much later every bucket is full again: a new key sweeps them out.
    buckets.take("c", 1000.0)
    assert len(buckets) == 1
    off = KeyedBuckets(0, 60.0)
    for _ in range(10):
        off.take("a", 0.0)
    assert off.wait("a", 0.0) == 0.0 and len(off) == 0


def gate_keys(limit: int = 2) -> list[tuple[Hashable, int]]:
    return [(("account", "ann"), limit), (("ip", "10.0.0.1"), 0)]


async def test_attempts_in_flight_count_against_the_limit() -> None:
    clock = FakeClock()
    gate = FailureGate(60.0, clock)
    keys = gate_keys(2)
    await gate.admit(keys)
    await gate.admit(keys)
    third = asyncio.ensure_future(gate.admit(keys))
    await asyncio.sleep(0)
    assert not third.done()  # two checks in flight fill the limit of two
    gate.finish(keys, failed=True)
    await asyncio.sleep(0)
    assert not third.done()  # one failure and one in flight: still full
    gate.finish(keys, failed=True)
    with pytest.raises(RateLimited) as err:
        await asyncio.wait_for(third, 1.0)
    assert 60.0 <= err.value.retry_after <= 60.002
    clock.advance(60.0)
    await gate.admit(keys)  # the window has passed


async def test_a_success_in_flight_lets_the_next_attempt_in() -> None:
    gate = FailureGate(60.0, FakeClock())
    keys = gate_keys(1)
    await gate.admit(keys)
    waiting = asyncio.ensure_future(gate.admit(keys))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.finish(keys, failed=False)
    await asyncio.wait_for(waiting, 1.0)
    gate.finish(keys, failed=False)
    assert gate.failures(("account", "ann"), FakeClock().now()) == 0


async def test_other_keys_are_not_held_up() -> None:
    gate = FailureGate(60.0, FakeClock())
    await gate.admit(gate_keys(1))
    other = [(("account", "bob"), 1), (("ip", "10.0.0.1"), 0)]
    await asyncio.wait_for(gate.admit(other), 1.0)  # a limit of 0 is no limit


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    gate = FailureGate(60.0, FakeClock())
    keys = gate_keys(1)
    await gate.admit(keys)
    waiting = asyncio.ensure_future(gate.admit(keys))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.finish(keys, failed=False)
    await asyncio.wait_for(gate.admit(keys), 1.0)
