"""Persisted msg.send/s through a real server: `chatd serve --redis` on a private
redis-server with `appendfsync always` against `chatd serve` on SQLite (synchronous=FULL),
the very same load (bench/persist.py: every client alone in its room, `--window` sends in
flight each, an ack only after the store has the write). Also: where Redis spent its time
(INFO commandstats per acknowledged send), each process's CPU per send and the AOF bytes
written per send.

    python3 dev.py bench redis_persist [--clients 50] [--seconds 5] [--window 32]
        [--appendfsync always|everysec|no]

The node is pinned to core 0; redis-server and this load generator share core 1 (a
two-core machine has no third): compare the CPU per send, not only the rates; `redis_cpu`
plus `loadgen_cpu` near 1.0 means core 1, not the node, was the bound.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench import persist
from bench.common import Server, new_loop, pin_self
from bench.nodes import node, redis_server, stats_delta


def _aof_size(redis: Any) -> int:
    with redis.client() as r:
        return int(r.info("persistence").get("aof_current_size", 0))


def _one(srv: Server, args: argparse.Namespace) -> dict[str, Any]:
    loop = new_loop()
    try:
        return loop.run_until_complete(
            persist.run(srv.port, args.clients, args.seconds, args.window, srv.cpu_seconds)
        )
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    args = ap.parse_args(argv)
    pin_self()
    results = []
    with redis_server(args.appendfsync, core="1") as redis:
        with node(redis, "0") as srv:
            stats0, cpu0, aof0 = redis.commandstats(), redis.cpu(), _aof_size(redis)
            own0 = time.process_time()
            r = _one(srv, args)
            # The load generator shares core 1 with redis-server: their sum is that core's load.
            r["loadgen_cpu"] = round((time.process_time() - own0) / r["seconds"], 2)
            acked = max(1, r["acked"])
            r["aof_bytes_per_send"] = round((_aof_size(redis) - aof0) / acked, 1)
            r["redis_cpu"] = round((redis.cpu() - cpu0) / r["seconds"], 2)
            r["redis_us_per_send"] = round((redis.cpu() - cpu0) / acked * 1e6, 2)
            r["node_us_per_send"] = round(r["server_cpu"] * r["seconds"] / acked * 1e6, 2)
            r["redis_commands"] = stats_delta(stats0, redis.commandstats(), acked)
            r["store"] = f"redis appendfsync {args.appendfsync}"
        print(json.dumps(r), flush=True)
        results.append(r)
    with Server() as srv:
        r = _one(srv, args)
        r["node_us_per_send"] = round(r["server_cpu"] * r["seconds"] / max(1, r["acked"]) * 1e6, 2)
        r["store"] = "sqlite synchronous=FULL"
    print(json.dumps(r), flush=True)
    results.append(r)
    return results


if __name__ == "__main__":
    main()
