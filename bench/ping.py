"""Ping round trips: C clients, each with one `ping` in flight at a time (as
redis-benchmark -P 1 does), for a fixed time. Round trips/s and latency percentiles.

    python3 dev.py bench ping [--clients 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import Line, against_server, open_line, percentile

PING = b'{"cmd":"ping","id":1}\n'


async def run(port: int, clients: int, seconds: float) -> dict[str, float]:
    conns: list[Line] = [await open_line(port) for _ in range(clients)]
    return await round_trips(conns, PING, seconds)


async def round_trips(conns: list[Line], request: bytes, seconds: float) -> dict[str, float]:
    """Each connection keeps one `request` in flight (a reply is one line) for `seconds`;
    also used by redis_ping, so both servers see the very same load."""
    loop = asyncio.get_running_loop()
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    trips = 0
    finished: list[asyncio.Future[None]] = []

    def drive(c: Line) -> None:
        done: asyncio.Future[None] = loop.create_future()
        finished.append(done)
        assert c.transport is not None
        transport = c.transport
        sent = [time.monotonic()]

        def on_data(data: bytes) -> None:
            nonlocal trips
            now = time.monotonic()
            trips += data.count(b"\n")
            latencies.append(now - sent[0])
            if now >= stop_at:
                if not done.done():
                    done.set_result(None)
                return
            sent[0] = now
            transport.write(request)

        c.raw = on_data
        transport.write(request)

    for c in conns:
        drive(c)
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*finished), seconds + 30)
    elapsed = time.monotonic() - t0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {
        "clients": len(conns),
        "round_trips": trips,
        "seconds": round(elapsed, 2),
        "round_trips_per_s": round(trips / elapsed),
        "p50_us": round(percentile(latencies, 0.5) * 1e6),
        "p99_us": round(percentile(latencies, 0.99) * 1e6),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args(argv)
    return against_server(lambda srv: run(srv.port, args.clients, args.seconds))


if __name__ == "__main__":
    main()
