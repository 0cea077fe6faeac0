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

from bench.common import SERVER_CORE, Line, new_loop, pin_self
from bench.ping import round_trips


async def run(port: int, clients: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(Line, "127.0.0.1", port))[1] for _ in range(clients)]
    result = await round_trips(conns, b"PING\r\n", seconds)
    return {"server": "redis", **result}  # type: ignore[dict-item]


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
