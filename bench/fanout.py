"""Fan-out: P publishers send into one room with S subscribers; deliveries/s and latency.

    python3 dev.py bench fanout [--subs 500] [--pubs 4] [--seconds 10] [--window 64]

A delivery is one `message` event arriving at one member connection. Latency is measured
by a probe member from the send time carried in the text (one clock: same machine).
The server runs pinned to core 0, this load generator to core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable

from bench.common import Line, Server, new_loop, open_line, percentile, pin_self


async def run(
    port: int,
    subs: int,
    pubs: int,
    seconds: float,
    window: int,
    cpu: Callable[[], float] | None = None,
) -> dict[str, float]:
    latencies: list[float] = []

    def probe(line: bytes) -> None:
        if b'"event":"message"' in line:
            text = json.loads(line)["data"]["text"]
            latencies.append(time.monotonic() - float(text.split()[0]))

    members: list[Line] = []
    for i in range(subs):
        c = await open_line(port, probe if i == 0 else None)
        await c.call({"cmd": "login", "id": 1, "user": f"sub{i}"})
        if i == 0:
            await c.call({"cmd": "room.create", "id": 2, "room": "bench", "ephemeral": True})
        else:
            await c.call({"cmd": "room.join", "id": 2, "room": "bench"})
        members.append(c)
    publishers: list[Line] = []
    for i in range(pubs):
        c = await open_line(port)
        await c.call({"cmd": "login", "id": 1, "user": f"pub{i}"})
        await c.call({"cmd": "room.join", "id": 2, "room": "bench"})
        publishers.append(c)
    audience = subs + pubs
    sent = 0
    stop_at = time.monotonic() + seconds

    async def publish(c: Line) -> None:
        nonlocal sent
        n = 0
        inflight: set[asyncio.Future[dict[str, object]]] = set()
        while time.monotonic() < stop_at:
            while len(inflight) < window:
                n += 1
                fut = asyncio.ensure_future(
                    c.call({"cmd": "msg.send", "id": n, "room": "bench",
                            "text": f"{time.monotonic():.6f} hello fan-out"})
                )
                inflight.add(fut)
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            sent += len(done)
        if inflight:
            await asyncio.wait(inflight, timeout=30)
            sent += len(inflight)

    before = sum(m.lines for m in members) + sum(p.lines for p in publishers)
    cpu0 = cpu() if cpu else 0.0
    t0 = time.monotonic()
    await asyncio.gather(*(publish(p) for p in publishers))
    # Let the last deliveries land (bounded).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = sum(m.lines for m in members) + sum(p.lines for p in publishers)
        if got - before >= sent * audience + sent:  # + the publishers' ok replies
            break
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    server_cpu = (cpu() - cpu0) / elapsed if cpu else float("nan")
    got = sum(m.lines for m in members) + sum(p.lines for p in publishers) - before - sent
    for c in members + publishers:
        assert c.transport is not None
        c.transport.close()
    return {
        "subscribers": subs,
        "publishers": pubs,
        "messages": sent,
        "deliveries": got,
        "seconds": round(elapsed, 2),
        "deliveries_per_s": round(got / elapsed),
        "msgs_per_s": round(sent / elapsed),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "server_cpu": round(server_cpu, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subs", type=int, default=500)
    ap.add_argument("--pubs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--db", default=None)
    args = ap.parse_args(argv)
    pin_self()
    flags = ["--db", args.db] if args.db else []
    with Server(*flags) as srv:
        loop = new_loop()
        try:
            result = loop.run_until_complete(
                run(srv.port, args.subs, args.pubs, args.seconds, args.window, srv.cpu_seconds)
            )
        finally:
            loop.close()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
