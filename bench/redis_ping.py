"""The same ping round-trip load as bench/ping.py, against redis-server (if installed),
pinned to the same core: the reference for chatd's round trips on this machine.

    python3 dev.py bench redis_ping [--clients 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import time

from bench.common import SERVER_CORE, new_loop, percentile, pin_self


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_data = lambda data: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.on_data(data)


async def run(port: int, clients: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    conns = [
        (await loop.create_connection(_Conn, "127.0.0.1", port))[1] for _ in range(clients)
    ]
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    trips = 0
    finished: list[asyncio.Future[None]] = []
    for c in conns:
        done: asyncio.Future[None] = loop.create_future()
        finished.append(done)
        assert c.transport is not None
        t = c.transport
        sent = [time.monotonic()]

        def on_data(data: bytes, t: asyncio.Transport = t, sent: list[float] = sent,
                    done: asyncio.Future[None] = done) -> None:
            nonlocal trips
            now = time.monotonic()
            trips += data.count(b"\n")
            latencies.append(now - sent[0])
            if now >= stop_at:
                if not done.done():
                    done.set_result(None)
                return
            sent[0] = now
            t.write(b"PING\r\n")

        c.on_data = on_data
        t.write(b"PING\r\n")
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*finished), seconds + 30)
    elapsed = time.monotonic() - t0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {
        "server": "redis",
        "clients": clients,
        "round_trips_per_s": round(trips / elapsed),
        "p50_us": round(percentile(latencies, 0.5) * 1e6),
        "p99_us": round(percentile(latencies, 0.99) * 1e6),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args(argv)
    exe = shutil.which("redis-server")
    if exe is None:
        print(json.dumps({"server": "redis", "skipped": "redis-server not installed"}))
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, exe, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        pin_self()
        loop = new_loop()
        try:
            r = loop.run_until_complete(run(port, args.clients, args.seconds))
        finally:
            loop.close()
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
