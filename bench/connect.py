"""Connect + login + join per second: W workers each loop connect → hello → guest login →
room.join → close, for a fixed time (ids are fresh names, so each login takes a name and
writes its hold to the store).

    python3 dev.py bench connect [--workers 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

from bench.common import against_server, open_line, percentile


async def run(
    port: int, workers: int, seconds: float, rooms: int = 1, token: bool = False
) -> dict[str, float]:
    setup = await open_line(port)
    bot_token = ""
    if token:
        # A bot's way in: one account, a token minted once, `auth` on every connection.
        await setup.call({"cmd": "register", "id": 0, "user": "bot", "password": "bench-password"})
        reply = await setup.call(
            {"cmd": "login", "id": 1, "user": "bot", "password": "bench-password"}
        )
        bot_token = reply["data"]["token"]  # type: ignore[index]
    else:
        await setup.call({"cmd": "login", "id": 1, "user": "host"})
    for r in range(rooms):
        await setup.call({"cmd": "room.create", "id": 2, "room": f"lobby{r}"})
    names = itertools.count()
    done = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            t = time.monotonic()
            # Spread over 127.0.0.2-127.0.0.33 (the bench turns per-IP limits off).
            c = await open_line(port, source=f"127.0.0.{2 + done % 32}")
            if token:
                r = await c.call({"cmd": "auth", "id": 1, "token": bot_token})
            else:
                r = await c.call({"cmd": "login", "id": 1, "user": f"u{next(names)}"})
            assert r["type"] == "ok", r
            r = await c.call({"cmd": "room.join", "id": 2, "room": f"lobby{done % rooms}"})
            assert r["type"] == "ok", r
            assert c.transport is not None
            c.transport.close()
            latencies.append(time.monotonic() - t)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.monotonic() - t0
    assert setup.transport is not None
    setup.transport.close()
    return {
        "workers": workers,
        "rooms": rooms,
        "login": "auth with a token" if token else "guest login",
        "sessions": done,
        "seconds": round(elapsed, 2),
        "connect_login_join_per_s": round(done / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--token", action="store_true", help="auth with a bot token, not a guest login")
    ap.add_argument("--rooms", type=int, default=1,
                    help="joins spread over this many rooms (1: everyone sees every join)")
    args = ap.parse_args(argv)
    # Every worker logs in from 127.0.0.1: the per-address guest login limit is not what
    # is measured here.
    return against_server(
        lambda srv: run(srv.port, args.workers, args.seconds, args.rooms, args.token),
        "--guest-logins-per-ip", "0",
    )


if __name__ == "__main__":
    main()
