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
from typing import Any

from bench.common import Line, Server, new_loop, open_line, percentile, pin_self

ROOM = "bench"


def latency_probe(latencies: list[float]) -> Callable[[bytes], None]:
    """A member's line handler: appends each message event's delay (its text starts with
    its send time, read on the same machine's clock) to ``latencies``."""

    def probe(line: bytes) -> None:
        if b'"event":"message"' in line:
            text = json.loads(line)["data"]["text"]
            latencies.append(time.monotonic() - float(text.split()[0]))

    return probe


async def open_members(
    port: int, count: int, user: str, room: str, *,
    probe: Callable[[bytes], None] | None = None, create: bool = False,
) -> list[Line]:  # fmt: skip
    """``count`` connections, guests ``<user>0``... each in ``room`` (with ``create``, the
    first makes it, ephemeral); the first gets ``probe``. RuntimeError if one cannot."""
    conns: list[Line] = []
    for i in range(count):
        c = await open_line(port, probe if i == 0 else None)
        conns.append(c)
        await c.call({"cmd": "login", "id": 1, "user": f"{user}{i}"})
        if create and i == 0:
            reply = await c.call({"cmd": "room.create", "id": 2, "room": room, "ephemeral": True})
        else:
            reply = await c.call({"cmd": "room.join", "id": 2, "room": room})
        if reply["type"] != "ok":
            close_all(conns)
            raise RuntimeError(f"{user}{i} cannot join {room} on its node: {reply}")
    return conns


async def publish(publishers: list[Line], room: str, seconds: float, window: int) -> tuple[int, int]:
    """Each publisher keeps ``window`` sends into ``room`` in flight for ``seconds``, then
    waits (bounded) for the last replies. Returns (sends answered ok, sends answered)."""
    ok = answered = 0
    stop_at = time.monotonic() + seconds

    async def one(c: Line) -> None:
        nonlocal ok, answered
        n = 0
        inflight: set[asyncio.Future[dict[str, Any]]] = set()

        def count(done: set[asyncio.Future[dict[str, Any]]]) -> None:
            nonlocal ok, answered
            answered += len(done)
            ok += sum(1 for f in done if f.result()["type"] == "ok")

        while time.monotonic() < stop_at:
            while len(inflight) < window:
                n += 1
                inflight.add(asyncio.ensure_future(c.call(
                    {"cmd": "msg.send", "id": n, "room": room,
                     "text": f"{time.monotonic():.6f} hello fan-out"})))  # fmt: skip
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            count(done)
        if inflight:
            done, _ = await asyncio.wait(inflight, timeout=30)
            count(done)

    await asyncio.gather(*(one(c) for c in publishers))
    return ok, answered


def lines(conns: list[Line]) -> int:
    """Lines (replies and events) these connections have received so far."""
    return sum(c.lines for c in conns)


def close_all(conns: list[Line]) -> None:
    for c in conns:
        assert c.transport is not None
        c.transport.close()


async def run(
    port: int,
    subs: int,
    pubs: int,
    seconds: float,
    window: int,
    cpu: Callable[[], float] | None = None,
) -> dict[str, float]:
    latencies: list[float] = []
    members = await open_members(port, subs, "sub", ROOM, probe=latency_probe(latencies), create=True)
    publishers = await open_members(port, pubs, "pub", ROOM)
    everyone = members + publishers
    audience = subs + pubs
    before = lines(everyone)
    cpu0 = cpu() if cpu else 0.0
    t0 = time.monotonic()
    _, sent = await publish(publishers, ROOM, seconds, window)
    # Let the last deliveries land (bounded).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lines(everyone) - before >= sent * audience + sent:  # + the publishers' replies
            break
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    server_cpu = (cpu() - cpu0) / elapsed if cpu else float("nan")
    got = lines(everyone) - before - sent
    close_all(everyone)
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
