"""Token buckets on an injected clock (no sleeping, so tests drive them directly), buckets
by key with bounded memory, and the gate that counts password checks in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from chatd.clock import Clock
from chatd.errors import RateLimited


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> float:
        # A wall clock may step back: that must not drain the bucket below empty.
        return min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)

    def take(self, now: float) -> float:
        """Take one token. Returns 0.0 on success, else the seconds until one is available."""
        tokens = self._refill(now)
        self.stamp = now
        # The epsilon absorbs float error, so waiting exactly the advised delay succeeds.
        if tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, tokens - 1.0)
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: now), taking nothing. Lets a caller
        check several buckets before taking from any, so a refusal by one costs the
        others nothing."""
        tokens = self._refill(now)
        return 0.0 if tokens >= 1.0 - 1e-9 else (1.0 - tokens) / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled: dropping it changes nothing."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class KeyedBuckets:
    """One TokenBucket per key (an address, say), ``count`` per ``period`` seconds with a
    burst of ``count``. Full buckets are forgotten when the map grows, so keys that come
    and go (addresses) never grow memory beyond the ones active within a period."""

    def __init__(self, count: int, period: float, *, sweep_at: int = 10_000) -> None:
        self.count = count
        self.rate = count / period if count > 0 else 0.0
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._sweep_at = self._sweep_base = sweep_at

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until `key` may act (0.0: now); takes nothing. Always 0 when off."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None or self.count <= 0 else bucket.wait(now)

    def take(self, key: Hashable, now: float) -> None:
        if self.count <= 0:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.count, now)
        bucket.take(now)

    def _sweep(self, now: float) -> None:
        for k in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[k]
        # The next sweep waits until the map has doubled: with many active keys a sweep
        # per new key would cost O(n) each time.
        self._sweep_at = max(self._sweep_base, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: Hashable) -> TokenBucket | None:
        return self._buckets.get(key)


class FailureGate:
    """Failed attempts per key in a sliding window, with the attempts still being checked
    counted as failures until they are proven otherwise (issue 13, item 6).

    A key (an account, a connection, an address) may have at most ``limit`` failures in
    ``window`` seconds. An attempt is admitted only while failures plus attempts in flight
    stay under the limit for every one of its keys; past that it waits for the attempts in
    flight to finish (a correct password frees its place, a wrong one becomes a failure),
    and once the failures alone reach the limit it is refused with ``RateLimited``. So the
    limit holds however many guesses arrive at once, and correct logins arriving at once
    are delayed, never refused.
    """

    def __init__(self, window: float, clock: Clock, *, sweep_at: int = 10_000) -> None:
        self.window = window
        self._clock = clock
        self._failures: dict[Hashable, list[float]] = {}
        self._in_flight: dict[Hashable, int] = {}
        self._waiters: dict[Hashable, list[asyncio.Future[None]]] = {}
        self._sweep_at = self._sweep_base = sweep_at

    def _recent(self, key: Hashable, now: float) -> list[float]:
        failures = self._failures.get(key)
        if failures is None:
            return []
        failures[:] = [t for t in failures if now - t < self.window]
        if not failures:
            del self._failures[key]
        return failures

    def failures(self, key: Hashable, now: float) -> int:
        return len(self._recent(key, now))

    def refuse_if_spent(self, keys: Sequence[tuple[Hashable, int]], now: float) -> None:
        """Raise RateLimited when failures alone have reached a key's limit."""
        for key, limit in keys:
            if limit <= 0:
                continue
            recent = self._recent(key, now)
            if len(recent) >= limit:
                raise RateLimited(
                    "too many failed logins; wait before trying again",
                    self.window - (now - recent[0]),
                )

    def _blocking(self, keys: Sequence[tuple[Hashable, int]], now: float) -> Hashable | None:
        for key, limit in keys:
            if limit > 0 and len(self._recent(key, now)) + self._in_flight.get(key, 0) >= limit:
                return key
        return None

    async def admit(self, keys: Sequence[tuple[Hashable, int]]) -> None:
        """Wait for a place for one attempt under every (key, limit); limit 0 = no limit.
        Raises RateLimited once the failures of a key have reached its limit. The caller
        must call ``finish`` with the same keys after the attempt."""
        while True:
            now = self._clock.now()
            self.refuse_if_spent(keys, now)
            blocking = self._blocking(keys, now)
            if blocking is None:
                break
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiters.setdefault(blocking, [])
            queue.append(waiter)
            try:
                await waiter
            finally:
                if waiter in queue:
                    queue.remove(waiter)
                if not queue and self._waiters.get(blocking) is queue:
                    del self._waiters[blocking]
        for key, _ in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def finish(self, keys: Sequence[tuple[Hashable, int]], *, failed: bool) -> None:
        """The attempt admitted for `keys` is over; a failure is remembered for each key."""
        now = self._clock.now()
        if failed and len(self._failures) >= self._sweep_at:
            # Guessing at random names must not grow memory: forget stale keys (and sweep
            # again only once the map has doubled, so the sweeps cost O(1) per failure).
            for k in list(self._failures):
                self._recent(k, now)
            self._sweep_at = max(self._sweep_base, 2 * len(self._failures))
        for key, _ in keys:
            n = self._in_flight.get(key, 0) - 1
            if n > 0:
                self._in_flight[key] = n
            else:
                self._in_flight.pop(key, None)
            if failed:
                self._failures.setdefault(key, []).append(now)
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def forget(self, key: Hashable) -> None:
        """Drop a key's failures (a connection that closed)."""
        self._failures.pop(key, None)
