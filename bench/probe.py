"""`chatd serve` with two probes, for benches: run it with CHATD_BENCH_ENTRY=bench/probe.py and
CHATD_PROBE_OUT=FILE. It appends one JSON line per event to FILE, as it happens:

- {"kind": "stall", "at": T, "ms": M, "cpu_ms": C}: the event loop ran a 1 ms timer M ms
  late (M ≥ 2), C ms of it on the loop thread's CPU (M - C: other processes had the core);
- {"kind": "gc", "at": T, "gen": G, "ms": M, "collected": N}: a garbage collection pass of
  generation G took M ms (every generation-2 pass; younger ones from 1 ms).

T is time.monotonic() at the start (system-wide, so a bench can match it to its own window).
`summary(path, start, end)` sums up the events of a window.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summary(path: str, start: float, end: float) -> dict[str, Any]:
    stalls: list[float] = []
    stall_cpu: list[float] = []
    gcs: list[tuple[int, float]] = []
    for line in Path(path).read_text().splitlines():
        e = json.loads(line)
        if not start <= e["at"] <= end:
            continue
        if e["kind"] == "stall":
            stalls.append(e["ms"])
            stall_cpu.append(e["cpu_ms"])
        else:
            gcs.append((e["gen"], e["ms"]))
    full = [ms for gen, ms in gcs if gen == 2]
    return {
        "loop_stall_max_ms": round(max(stalls, default=0.0), 1),
        "loop_stall_cpu_max_ms": round(max(stall_cpu, default=0.0), 1),
        "loop_stalls_over_20ms": sum(ms > 20 for ms in stalls),
        "gc_full_passes": len(full),
        "gc_full_max_ms": round(max(full, default=0.0), 1),
        "gc_max_ms": round(max((ms for _, ms in gcs), default=0.0), 1),
    }


def _install(out_path: str) -> None:
    out = open(out_path, "a", buffering=1)
    began = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0], began[1] = time.perf_counter(), time.monotonic()
            return
        ms = (time.perf_counter() - began[0]) * 1e3
        if info["generation"] == 2 or ms >= 1.0:
            out.write(json.dumps({"kind": "gc", "at": began[1], "gen": info["generation"],
                                  "ms": round(ms, 2), "collected": info["collected"]}) + "\n")

    gc.callbacks.append(on_gc)

    async def lag() -> None:
        while True:
            t, cpu = time.monotonic(), time.thread_time()
            await asyncio.sleep(0.001)
            late = (time.monotonic() - t - 0.001) * 1e3
            if late >= 2.0:
                # cpu_ms: what the loop's thread itself ran meanwhile; the rest of `ms` is
                # time the machine gave to other processes (a loaded bench host).
                cpu_ms = (time.thread_time() - cpu) * 1e3
                out.write(json.dumps({"kind": "stall", "at": t, "ms": round(late, 2),
                                      "cpu_ms": round(cpu_ms, 2)}) + "\n")

    from chatd.server import ChatServer

    start = ChatServer.start

    async def probed_start(self: ChatServer) -> None:
        await start(self)
        self.spawn(lag())

    ChatServer.start = probed_start  # type: ignore[method-assign]


if __name__ == "__main__":
    _install(os.environ["CHATD_PROBE_OUT"])
    from chatd.cli import main

    raise SystemExit(main(sys.argv[1:]))
