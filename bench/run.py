"""Run one benchmark or all of them: python3 dev.py bench [fanout|persist|ping|idle|connect|history|mass_leave|tiny_frames|streams_vs_protocol|redis_store|redis_persist|redis_fanout|redis_split|redis_cost|inproc|all] [flags]

Each starts its own `chatd serve` on 127.0.0.1:0 pinned to core 0, drives it from this
process pinned to core 1, stops by itself, and prints one JSON line of figures.
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAMES = [
    "fanout", "persist", "ping", "redis_ping", "idle", "connect", "history", "mass_leave",
    "tiny_frames", "redis_store", "streams_vs_protocol", "redis_persist", "redis_fanout",
    "redis_split", "redis_cost", "inproc",
]


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "all"
    rest = argv[1:]
    names = NAMES if name == "all" else [name]
    for n in names:
        if n not in NAMES:
            print(f"unknown bench {n!r}; one of: {', '.join(NAMES)}, all", file=sys.stderr)
            return 2
        print(f"# {n}", flush=True)
        importlib.import_module(f"bench.{n}").main(rest if name != "all" else [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
