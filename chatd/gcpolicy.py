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
  unfrozen and collected once, then frozen again.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


class Collector:
    """The policy above; `tick` is called every `every` seconds by the serve loop."""

    def __init__(self, every: float, full_every: float, quiet: Callable[[], bool]) -> None:
        self.every = every
        self.full_every = full_every
        self.quiet = quiet
        self.last_full = 0.0
        self.full_passes = 0

    def start(self) -> None:
        """After start-up: what was loaded (accounts, rooms) is frozen at once."""
        gc.collect()
        gc.freeze()
        self.last_full = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_full >= self.full_every and self.quiet():
            gc.unfreeze()
            self.last_full = now
            self.full_passes += 1
        gc.collect()
        gc.freeze()

    def stop(self) -> None:
        gc.unfreeze()
