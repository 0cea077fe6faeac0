"""Two nodes on two cores against one node on one core (issue 11): the same load split
between them, clients picking a node ("two ports, clients pick one"). Total rate, and each
node's CPU per operation (the figure that does not depend on how busy the machine is).

    python3 dev.py bench redis_split [--load ping|send] [--clients 100] [--seconds 5]

--load ping: each client keeps one `ping` in flight (bench/ping.py), the per-connection
work of every command. --load send: each client alone in its room keeps --window
persisted `msg.send` in flight (bench/persist.py), which also goes through Redis.
Nodes are `chatd serve --redis` on a private redis-server; one node on core 0, or nodes on
cores 0 and 1. redis-server and this load generator are not pinned: on a two-core machine
they share the nodes' cores, so the rates are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bench import persist
from bench.common import Line, Server, new_loop, open_line
from bench.nodes import node, redis_server
from bench.ping import PING, round_trips


async def _ping(ports: list[int], clients: int, seconds: float) -> dict[str, Any]:
    conns: list[Line] = [await open_line(ports[i % len(ports)]) for i in range(clients)]
    r = await round_trips(conns, PING, seconds)
    r["ops"] = r["round_trips"]
    return r


async def _send(ports: list[int], clients: int, seconds: float, window: int) -> dict[str, Any]:
    share = [clients // len(ports) + (1 if i < clients % len(ports) else 0) for i in range(len(ports))]
    # Names are one namespace across nodes: each node's writers get their own.
    parts = await asyncio.gather(*(
        persist.run(p, n, seconds, window, name=f"writer{k}x")
        for k, (p, n) in enumerate(zip(ports, share, strict=True))
    ))  # fmt: skip
    acked = sum(p["acked"] for p in parts)
    secs = max(p["seconds"] for p in parts)
    return {"clients": clients, "ops": acked, "seconds": secs, "sends_per_s": round(acked / secs),
            "p99_ms": max(p["p99_ms"] for p in parts)}  # fmt: skip


def _measure(servers: list[Server], args: argparse.Namespace, label: str) -> dict[str, Any]:
    ports = [s.port for s in servers]
    cpu0 = [s.cpu_seconds() for s in servers]
    loop = new_loop()
    try:
        if args.load == "ping":
            r = loop.run_until_complete(_ping(ports, args.clients, args.seconds))
        else:
            r = loop.run_until_complete(_send(ports, args.clients, args.seconds, args.window))
    finally:
        loop.close()
    used = [s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True)]
    r["layout"], r["load"] = label, args.load
    r["ops_per_s"] = round(r["ops"] / r["seconds"])
    r["node_cpu"] = [round(u / r["seconds"], 2) for u in used]
    r["node_us_per_op"] = round(sum(used) / max(1, r["ops"]) * 1e6, 2)
    print(json.dumps(r), flush=True)
    return r


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", default="ping", choices=["ping", "send"])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--window", type=int, default=16)
    args = ap.parse_args(argv)
    results = []
    with redis_server("always") as redis:
        with node(redis, "0") as one:
            results.append(_measure([one], args, "one node, core 0"))
    with redis_server("always") as redis:
        with node(redis, "0") as a, node(redis, "1") as b:
            results.append(_measure([a, b], args, "two nodes, cores 0 and 1"))
    return results


if __name__ == "__main__":
    main()
