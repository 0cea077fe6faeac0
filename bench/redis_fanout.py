"""Fan-out across nodes (issue 11): publishers on node A, subscribers on node B, against
the same load on one node. Deliveries/s, latency (p50/p99, from a probe subscriber), and
each node's CPU per delivery.

    python3 dev.py bench redis_fanout [--subs 200] [--pubs 4] [--seconds 5] [--window 16]

Nodes are `chatd serve --redis` on a private redis-server (appendfsync always); the one
node and node A on core 0, node B on core 1 (with redis-server and this load generator:
a two-core machine has no more). The room is created on A before B starts. Missing
deliveries (events that did not cross nodes) are counted and reported, never waited for
beyond --drain seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.common import Server, new_loop, open_line, percentile, pin_self
from bench.fanout import close_all, latency_probe, lines, open_members, publish
from bench.nodes import Redis, node, redis_server

ROOM = "fanout"


async def _setup_room(port: int) -> None:
    c = await open_line(port)
    await c.call({"cmd": "login", "id": 1, "user": "owner"})
    reply = await c.call({"cmd": "room.create", "id": 2, "room": ROOM})
    assert reply["type"] == "ok", reply
    assert c.transport is not None
    c.transport.close()


async def _run(
    pub_port: int, sub_port: int, subs: int, pubs: int, seconds: float, window: int,
    drain: float,
) -> dict[str, Any]:  # fmt: skip
    latencies: list[float] = []
    members = await open_members(sub_port, subs, "sub", ROOM, probe=latency_probe(latencies))
    try:
        publishers = await open_members(pub_port, pubs, "pub", ROOM)
    except RuntimeError:
        close_all(members)
        raise
    await asyncio.sleep(0.5)  # member.joined events of the set-up are out of the way
    before = lines(members)
    t0 = time.monotonic()
    sent, _ = await publish(publishers, ROOM, seconds, window)
    sent_for = time.monotonic() - t0
    expected = sent * subs
    deadline = time.monotonic() + drain  # bounded: events that never cross are not awaited
    while time.monotonic() < deadline and lines(members) - before < expected:
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    got = lines(members) - before
    close_all(members + publishers)
    return {
        "messages": sent,
        "deliveries": got,
        "missing": max(0, expected - got),
        "seconds": round(elapsed, 2),
        "publish_seconds": round(sent_for, 2),
        "deliveries_per_s": round(got / elapsed),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
    }


def _measure(
    redis: Redis, pub: Server, sub: Server, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    loop = new_loop()
    servers = [pub] if pub is sub else [pub, sub]
    cpu0 = [s.cpu_seconds() for s in servers]
    rcpu0 = redis.cpu()
    try:
        r = loop.run_until_complete(
            _run(pub.port, sub.port, args.subs, args.pubs, args.seconds, args.window, args.drain)
        )
    except RuntimeError as exc:
        r = {"error": str(exc)}
    finally:
        loop.close()
    r["layout"] = label
    r["subscribers"], r["publishers"] = args.subs, args.pubs
    if "seconds" in r:
        used = [s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True)]
        r["node_cpu"] = [round(u / r["seconds"], 2) for u in used]
        d = r["deliveries"]
        r["node_us_per_delivery"] = [round(u / d * 1e6, 2) for u in used] if d else None
        r["redis_cpu"] = round((redis.cpu() - rcpu0) / r["seconds"], 2)
        if r["missing"]:
            r["note"] = "deliveries missing: some events did not reach their subscribers"
    print(json.dumps(r), flush=True)
    return r


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subs", type=int, default=200)
    ap.add_argument("--pubs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--drain", type=float, default=5, help="seconds to wait for stragglers")
    args = ap.parse_args(argv)
    pin_self()
    results = []
    with redis_server("always", core="1") as redis:
        with node(redis, "0") as one:
            asyncio.run(_setup_room(one.port))
            results.append(_measure(redis, one, one, args, "one node"))
    with redis_server("always", core="1") as redis:
        with node(redis, "0") as a:
            asyncio.run(_setup_room(a.port))
            with node(redis, "1") as b:
                results.append(_measure(redis, a, b, args, "publishers on A, subscribers on B"))
    return results


if __name__ == "__main__":
    main()
