"""Mass disconnect from one big room (issue 13, item 2): K guests join one room, then all
drop at once (a network blip, a load balancer restart). A bystander outside the room keeps
one `ping` in flight the whole time; its latency while the server cleans up is the figure.
A watcher that stays in the room counts the `member.left` events: the run ends when it has
one per departed user (every remaining member must get them all), or at the time bound.

    python3 dev.py bench mass_leave [--members 10000] [--reset] [--timeout 120]

--reset drops the connections with RST (SO_LINGER 0) instead of FIN.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import struct
import time
from typing import Any

from bench.common import Line, Server, against_server, open_line, percentile

ROOM = "big"


async def run(srv: Server, members: int, reset: bool, timeout: float) -> dict[str, Any]:
    port = srv.port
    left = 0
    all_left = asyncio.get_running_loop().create_future()

    def on_line(line: bytes) -> None:
        nonlocal left
        if b'"member.left"' in line:
            left += 1
            if left >= members and not all_left.done():
                all_left.set_result(None)

    watcher = await open_line(port, on_line)
    await watcher.call({"cmd": "login", "id": 1, "user": "watcher"})
    await watcher.call({"cmd": "room.create", "id": 2, "room": ROOM})
    bystander = await open_line(port)
    await bystander.call({"cmd": "login", "id": 1, "user": "bystander"})

    t0 = time.monotonic()
    conns: list[Line] = []
    for i in range(0, members, 250):
        n = min(250, members - i)
        # Spread over 127.0.0.2-127.0.0.33 (the bench turns per-IP limits off).
        chunk = await asyncio.gather(
            *(open_line(port, source=f"127.0.0.{2 + (i + k) % 32}") for k in range(n))
        )
        await asyncio.gather(
            *(c.call({"cmd": "login", "id": 1, "user": f"m{i + k}"}, 120) for k, c in enumerate(chunk))
        )
        await asyncio.gather(*(c.call({"cmd": "room.join", "id": 2, "room": ROOM}, 120) for c in chunk))
        conns += chunk
    # Every member.joined has been written once the watcher's own ping comes back.
    await watcher.call({"cmd": "ping", "id": 3}, 120)
    setup = time.monotonic() - t0

    latencies: list[float] = []
    stop = False

    async def pinger() -> None:
        n = 10
        while not stop:
            t = time.monotonic()
            await bystander.call({"cmd": "ping", "id": n}, timeout + 30)
            latencies.append(time.monotonic() - t)
            n += 1

    for c in conns:
        assert c.transport is not None
        if reset:
            sock = c.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.transport.abort()
    t1 = time.monotonic()
    ping_task = asyncio.ensure_future(pinger())
    try:
        await asyncio.wait_for(all_left, timeout)
        finished = True
    except TimeoutError:
        finished = False
    cleanup = time.monotonic() - t1
    stop = True
    await asyncio.wait_for(ping_task, timeout + 30)
    rss = srv.rss_kib()
    for c in (watcher, bystander):
        assert c.transport is not None
        c.transport.close()
    return {
        "members": members,
        "reset": reset,
        "setup_seconds": round(setup, 1),
        "finished": finished,
        "member_left_seen": left,
        "cleanup_seconds": round(cleanup, 3),
        "pings": len(latencies),
        "ping_p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
        "ping_p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "ping_max_ms": round(max(latencies, default=float("nan")) * 1e3, 2),
        "server_rss_kib": rss,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--reset", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    members = min(args.members, hard - 200)
    return against_server(
        lambda srv: run(srv, members, args.reset, args.timeout),
        "--max-connections", str(members + 50), "--db", ":memory:",
        cpu=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
