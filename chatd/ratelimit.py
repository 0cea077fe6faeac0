"""Token buckets on an injected clock (no sleeping, so tests drive them directly)."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token. Returns 0.0 on success, else the seconds until one is available."""
        # A wall clock may step back: that must not drain the bucket below empty.
        tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        # The epsilon absorbs float error, so waiting exactly the advised delay succeeds.
        if tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, tokens - 1.0)
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled: dropping it changes nothing."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst
