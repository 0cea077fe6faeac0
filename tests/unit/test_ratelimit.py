"""TokenBucket on an injected clock: no sleeping."""

from __future__ import annotations

import pytest

from chatd.ratelimit import TokenBucket


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
