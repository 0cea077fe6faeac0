"""Idle connections: open N connections (each gets its hello), and report the server's
resident memory per connection, and the same after each one logs in and joins a room.

    python3 dev.py bench idle [--conns 19000] [--rooms 1]

With one room (the default) every join tells every member already there (`member.joined`):
about N²/2 events while the figures are taken, whose transient buffers stay in the
allocator's high-water mark; `--rooms K` spreads the members over K rooms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import time

from bench.common import Line, Server, new_loop, open_line, pin_self


async def run(srv: Server, conns: int, rooms: int = 1) -> dict[str, float]:
    base = srv.rss_kib()
    lines: list[Line] = []
    t0 = time.monotonic()
    for i in range(0, conns, 500):
        lines += await asyncio.gather(*(open_line(srv.port) for _ in range(min(500, conns - i))))
    opened = time.monotonic() - t0
    await asyncio.sleep(1.0)
    idle = srv.rss_kib()
    # Now bind each to a user in one room: the state a chat member really holds.
    first = lines[0]
    await first.call({"cmd": "login", "id": 1, "user": "idle0"})
    for r in range(rooms):
        await first.call({"cmd": "room.create", "id": 2, "room": f"idle{r}", "ephemeral": True})
    for i in range(1, len(lines), 500):
        chunk = lines[i : i + 500]
        await asyncio.gather(
            *(c.call({"cmd": "login", "id": 1, "user": f"idle{i + k}"}) for k, c in enumerate(chunk))
        )
        await asyncio.gather(*(
            c.call({"cmd": "room.join", "id": 2, "room": f"idle{(i + k) % rooms}"})
            for k, c in enumerate(chunk)
        ))  # fmt: skip
    await asyncio.sleep(1.0)
    joined = srv.rss_kib()
    for c in lines:
        assert c.transport is not None
        c.transport.close()
    return {
        "connections": len(lines),
        "open_seconds": round(opened, 2),
        "server_rss_base_kib": base,
        "idle_kib_per_conn": round((idle - base) / len(lines), 2),
        "logged_in_joined_kib_per_conn": round((joined - base) / len(lines), 2),
        "rooms": rooms,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=19_000)
    ap.add_argument("--rooms", type=int, default=1, help="spread the members over this many rooms")
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = min(args.conns, hard - 100)
    pin_self()
    gc.disable()  # the load generator's own garbage collector is not what is measured
    with Server("--max-connections", str(conns + 10), "--db", ":memory:") as srv:
        loop = new_loop()
        try:
            r = loop.run_until_complete(run(srv, conns, max(1, args.rooms)))
        finally:
            loop.close()
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
