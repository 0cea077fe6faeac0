"""Persisted msg.send/s, each acknowledged only after its commit (group commit), against
one commit per message (--commit-batch 1).

    python3 dev.py bench persist [--clients 50] [--seconds 5] [--window 32]

Every client is alone in its own room, so the figure is the store's, not fan-out's.
The database is a real file with synchronous=FULL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from collections.abc import Callable

from bench.common import Line, Server, new_loop, open_line, percentile, pin_self


async def run(
    port: int,
    clients: int,
    seconds: float,
    window: int,
    cpu: Callable[[], float] | None = None,
    name: str = "writer",
) -> dict[str, float]:
    conns: list[Line] = []
    frames: list[dict[str, object]] = []
    tag = str(time.time_ns() % 100000)
    for i in range(clients):
        c = await open_line(port)
        await c.call({"cmd": "login", "id": 1, "user": f"{name}{i}"})
        room = f"{name}{tag}-{i}"
        await c.call({"cmd": "room.create", "id": 2, "room": room, "ephemeral": True})
        conns.append(c)
        frames.append({"cmd": "msg.send", "room": room, "text": "persist me " + "x" * 40})
    acked = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    loop = asyncio.get_running_loop()

    def lean(c: Line, frame: dict[str, object]) -> asyncio.Future[None]:
        """Keep `window` sends in flight on c, counting acks straight from the bytes."""
        line = json.dumps(frame, separators=(",", ":")).encode() + b"\n"
        sent_at: collections.deque[float] = collections.deque()
        done: asyncio.Future[None] = loop.create_future()
        assert c.transport is not None
        transport = c.transport

        def refill() -> None:
            now = time.monotonic()
            if now >= stop_at:
                if not sent_at and not done.done():
                    done.set_result(None)
                return
            k = window - len(sent_at)
            if k > 0:
                sent_at.extend([now] * k)
                transport.write(line * k)

        tail = b""

        def on_data(chunk: bytes) -> None:
            nonlocal acked, tail
            # A pattern split across two reads is still counted once.
            data = tail + chunk
            tail = data[-11:]
            oks = data.count(b'{"type":"ok"')
            errors = data.count(b'{"type":"error"')
            if errors:
                raise RuntimeError(data[:300])
            now = time.monotonic()
            for _ in range(oks):
                latencies.append(now - sent_at.popleft())
            acked += oks
            refill()

        c.raw = on_data
        refill()
        return done

    cpu0 = cpu() if cpu else 0.0
    t0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(lean(c, f) for c, f in zip(conns, frames, strict=True))), seconds + 60
    )
    elapsed = time.monotonic() - t0
    server_cpu = (cpu() - cpu0) / elapsed if cpu else float("nan")
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {
        "clients": clients,
        "acked": acked,
        "seconds": round(elapsed, 2),
        "sends_per_s": round(acked / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "server_cpu": round(server_cpu, 2),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args(argv)
    pin_self()
    results = []
    for label, flags in (("group commit", []), ("one commit per message", ["--commit-batch", "1"])):
        with Server(*flags) as srv:
            loop = new_loop()
            try:
                cpu = srv.cpu_seconds
                r = loop.run_until_complete(
                    run(srv.port, args.clients, args.seconds, args.window, cpu)
                )
            finally:
                loop.close()
        r["mode"] = label  # type: ignore[assignment]
        print(json.dumps(r))
        results.append(r)
    return results


if __name__ == "__main__":
    main()
