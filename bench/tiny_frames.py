"""Tiny-frame flood (issue 13, item 3): N connections each send B bytes of 3-byte lines
(`{}` and a newline: each one a frame the server must answer) without reading a reply,
then close. Reports the server's resident memory before, at its peak during the flood
(sampled every 0.1 s), and after every flooding connection has gone. limits.md: input
memory per connection is at most max frame + one read chunk, and a closed connection
holds none.

    python3 dev.py bench tiny_frames [--conns 1000] [--kib 256] [--settle 10]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from typing import Any

from bench.common import Line, Server, against_server, open_line

LINE = b"{}\n"


async def run(srv: Server, conns: int, kib: int, settle: float) -> dict[str, Any]:
    port = srv.port
    probe = await open_line(port)
    lines: list[Line] = []
    for i in range(0, conns, 250):
        lines += await asyncio.gather(
            *(open_line(port, source=f"127.0.0.{2 + (i + k) % 32}") for k in range(min(250, conns - i)))
        )
    await probe.call({"cmd": "ping", "id": 1})
    base = srv.rss_kib()
    flood = LINE * (kib * 1024 // len(LINE))
    peak = base
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, srv.rss_kib())
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    t0 = time.monotonic()
    for c in lines:
        assert c.transport is not None
        c.transport.write(flood)
        c.transport.close()  # after the flood is handed over (or the server drops us)
    closed = asyncio.gather(*(c.closed for c in lines))
    try:
        await asyncio.wait_for(closed, 120)
    except TimeoutError:
        pass
    for c in lines:
        if c.transport is not None and not c.closed.done():
            c.transport.abort()
    flood_s = time.monotonic() - t0
    await probe.call({"cmd": "ping", "id": 2}, 120)
    await asyncio.sleep(1.0)
    after_1s = srv.rss_kib()
    await asyncio.sleep(max(0.0, settle - 1.0))
    after = srv.rss_kib()
    sampling = False
    await sampler
    assert probe.transport is not None
    probe.transport.close()
    return {
        "connections": conns,
        "kib_each": kib,
        "flood_seconds": round(flood_s, 1),
        "rss_base_kib": base,
        "rss_peak_kib": peak,
        "rss_after_1s_kib": after_1s,
        f"rss_after_{settle:g}s_kib": after,
        "kept_after_kib": after - base,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--kib", type=int, default=256)
    ap.add_argument("--settle", type=float, default=10.0)
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = min(args.conns, hard - 200)
    return against_server(
        lambda srv: run(srv, conns, args.kib, args.settle),
        "--max-connections", str(conns + 50), "--db", ":memory:",
        cpu=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
