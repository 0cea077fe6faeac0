"""Garbage collection for a server holding many long-lived objects (`chatd serve` only: it
changes the process-wide collector, so it is applied in the serve path, never on import).

CPython's full (generation 2) pass scans every tracked object. With 10,000 connections
open that is ~60-90 ms in one go, whenever allocations happen to trigger it — in the middle
of a mass disconnect, say, on top of the clean-up (issue 13, item 2). So, as CPython's
`gc.freeze` documentation suggests for processes with many long-lived objects:

- every `every` seconds: collect what is not frozen (only what appeared since the last
  freeze is scanned, so it is cheap), then freeze the survivors: automatic passes never
  rescan a connection, a room or an account again;
- a frozen object that dies is still freed by reference counting (closed connections leave
  no cycles behind: tests/unit/test_gcpolicy.py); only a cycle among objects frozen while
  alive would wait, so every `full_every` seconds, at a quiet moment (`quiet()`), all is
  unfrozen and collected once, then frozen again; after twice that without a quiet tick
  (continuous churn), at the next tick whatever the moment, so that garbage stays bounded;
- the youngest generation is collected after YOUNG_THRESHOLD net allocations, not
  CPython's 700. Under load every command in flight holds a few tracked objects (its
  coroutine, its Pending, its store future, its message) for a round trip to the store: with
  1,600 sends in flight, a young pass ran every ~25 sends, found them all alive, moved them
  on, and the middle generation's passes rescanned them: 3.3 µs of CPU per persisted send,
  one sixth of it (`python3 dev.py bench redis_persist`; gc.callbacks timing: 0.76 s of
  collections for 230,000 sends, 0.07 s with this). The ticks above bound what waits.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

# Below this a tick would collect and freeze nearly all the time.
MIN_EVERY = 0.1
# Net allocations of tracked objects between two young-generation passes (module doc);
# a pass over this many young objects takes a few milliseconds.
YOUNG_THRESHOLD = 20_000


class Collector:
    """The policy above; `tick` runs every `every` seconds (`start_ticking`, on the loop)."""

    def __init__(
        self, every: float, full_every: float, quiet: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        if not every >= MIN_EVERY:
            raise ValueError(f"the freeze interval must be at least {MIN_EVERY} s")
        self.every = every
        self.full_every = full_every
        self.quiet = quiet
        self.clock = clock
        self.last_full = 0.0
        self.full_passes = 0
        self._ticking: asyncio.Task[None] | None = None
        self._thresholds: tuple[int, int, int] | None = None

    def start(self) -> None:
        """After start-up: what was loaded (accounts, rooms) is frozen at once."""
        self._thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, *self._thresholds[1:])
        gc.collect()
        gc.freeze()
        self.last_full = self.clock()

    def start_ticking(self) -> None:
        """Tick every `every` seconds on the running loop, until `stop`."""
        self._ticking = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.tick()

    def tick(self) -> None:
        now = self.clock()
        due = now - self.last_full
        if due >= self.full_every and (self.quiet() or due >= 2 * self.full_every):
            gc.unfreeze()
            self.last_full = now
            self.full_passes += 1
        gc.collect()
        gc.freeze()

    def stop(self) -> None:
        """No more ticks (none freezes again during the shutdown); everything unfrozen,
        the thresholds as they were."""
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
        gc.unfreeze()
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
