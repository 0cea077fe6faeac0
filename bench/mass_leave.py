"""Mass disconnect from one big room (issue 13, item 2): K guests join one room, then all
drop at once (a network blip, a load balancer restart). A bystander outside the room keeps
one `ping` in flight the whole time; its latency while the server cleans up is the figure.
A watcher that stays in the room counts the `member.left` events: the run ends when it has
one per departed user (every remaining member must get them all), or at the time bound.
The bystander is a separate process (blocking socket), so the load generator's own work
closing K sockets does not count as server latency.

    python3 dev.py bench mass_leave [--members 10000] [--reset] [--timeout 120]

--reset drops the connections with RST (SO_LINGER 0) instead of FIN. With
CHATD_BENCH_ENTRY=bench/probe.py CHATD_PROBE_OUT=FILE it also reports the server's longest
loop stall and its garbage collection passes during the cleanup (bench/probe.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from bench.common import Line, Server, against_server, open_line, percentile
from bench.probe import summary

ROOM = "big"
# The bystander: pings back to back until its stdin closes, then prints
# [[sent_at, seconds], ...] (time.monotonic is system-wide, so comparable with ours).
PINGER = r"""
import json, socket, sys, threading, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = sock.makefile("rb")
f.readline()  # hello
stop = []
threading.Thread(target=lambda: (sys.stdin.read(), stop.append(1)), daemon=True).start()
out = []
print("ready", flush=True)
while not stop:
    t = time.monotonic()
    sock.sendall(b'{"cmd":"ping","id":1}\n')
    f.readline()
    out.append([t, time.monotonic() - t])
    time.sleep(0.001)
print(json.dumps(out), flush=True)
"""


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

    t0 = time.monotonic()
    conns: list[Line] = []
    for i in range(0, members, 250):
        n = min(250, members - i)
        # Spread over 127.0.0.2-127.0.0.33 (the bench turns per-IP limits off).
        chunk = await asyncio.gather(
            *(open_line(port, source=f"127.0.0.{2 + (i + k) % 32}") for k in range(n))
        )
        replies = await asyncio.gather(
            *(c.call({"cmd": "login", "id": 1, "user": f"m{i + k}"}, 120) for k, c in enumerate(chunk))
        )
        replies += await asyncio.gather(
            *(c.call({"cmd": "room.join", "id": 2, "room": ROOM}, 120) for c in chunk)
        )
        # A refused login (a limit the bench forgot to lift) would quietly shrink the room.
        refused = [r for r in replies if r["type"] != "ok"]
        if refused:
            raise RuntimeError(f"{len(refused)} logins or joins refused, e.g. {refused[0]}")
        conns += chunk
    # Every member.joined has been written once the watcher's own ping comes back.
    await watcher.call({"cmd": "ping", "id": 3}, 120)
    setup = time.monotonic() - t0

    pinger = subprocess.Popen(  # noqa: ASYNC220 (started once, before the measurement)
        [sys.executable, "-c", PINGER, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert pinger.stdout is not None and pinger.stdin is not None
    loop = asyncio.get_running_loop()
    assert (await loop.run_in_executor(None, pinger.stdout.readline)).strip() == "ready"
    await asyncio.sleep(0.2)
    t1 = time.monotonic()
    for c in conns:
        assert c.transport is not None
        if reset:
            sock = c.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.transport.abort()
    try:
        await asyncio.wait_for(all_left, timeout)
        finished = True
    except TimeoutError:
        finished = False
    t2 = time.monotonic()
    cleanup = t2 - t1
    pinger.stdin.close()
    samples = json.loads(await loop.run_in_executor(None, pinger.stdout.read))
    pinger.wait(30)
    # Pings that were in flight at any moment of the cleanup.
    latencies = [d for t, d in samples if t + d >= t1 and t <= t2]
    before = [d for t, d in samples if t + d < t1]
    rss = srv.rss_kib()
    assert watcher.transport is not None
    watcher.transport.close()
    probed: dict[str, Any] = {}
    if os.environ.get("CHATD_PROBE_OUT"):  # run under bench/probe.py
        await asyncio.sleep(0.2)
        probed = summary(os.environ["CHATD_PROBE_OUT"], t1, t2)
    return {
        "members": members,
        "reset": reset,
        "setup_seconds": round(setup, 1),
        "finished": finished,
        "member_left_seen": left,
        "cleanup_seconds": round(cleanup, 3),
        "ping_before_max_ms": round(max(before, default=float("nan")) * 1e3, 2),
        "pings": len(latencies),
        "ping_p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
        "ping_p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "ping_max_ms": round(max(latencies, default=float("nan")) * 1e3, 2),
        "server_rss_kib": rss,
        **probed,
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
