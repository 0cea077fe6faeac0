"""The floor under `mass_leave`: a trivial uvloop echo server (no chatd) with K connections
that all close at once. Its worst loop turn (a 1 ms timer's lateness, and the loop thread's
CPU meanwhile) is what uvloop itself costs to read K EOFs in one poll pass and close K
sockets, the part of chatd's worst turn no change to chatd's callbacks can remove.

    python3 dev.py bench eof_floor [--members 10000] [--keep-open]

--keep-open: eof_received keeps the socket open and closes it on the next turn (as chatd
does, which closes in chores); without it uvloop closes at once (its default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

import uvloop

from bench.common import CLIENT_CORE, SERVER_CORE, pin_self


class _Echo(asyncio.Protocol):
    keep_open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.keep_open:
            asyncio.get_running_loop().call_soon(self.transport.close)
            return True
        return None


async def _serve(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    stalls: list[tuple[float, float, float]] = []
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    end = time.monotonic() + seconds
    while not stop.done() and time.monotonic() < end:
        t, cpu = time.monotonic(), time.thread_time()
        await asyncio.sleep(0.001)
        late = (time.monotonic() - t - 0.001) * 1e3
        if late >= 2.0:
            stalls.append((t, late, (time.thread_time() - cpu) * 1e3))
    print(json.dumps(stalls), flush=True)


async def _drop_all(port: int, members: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    transports: list[Any] = []  # uvloop's transports are not asyncio.Transport subclasses
    for i in range(0, members, 500):
        made = await asyncio.gather(
            *(loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
              for _ in range(min(500, members - i)))
        )  # fmt: skip
        transports += [t for t, _ in made]
    await asyncio.sleep(1.0)
    t1 = time.monotonic()
    for t in transports:
        t.abort()
    await asyncio.sleep(2.0)
    return {"t1": t1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--keep-open", action="store_true")
    ap.add_argument("--serve", type=float, help=argparse.SUPPRESS)  # the server process
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.serve is not None:
        _Echo.keep_open = args.keep_open
        uvloop.run(_serve(args.serve))
        return {}
    members = min(args.members, hard - 200)
    cmd = [sys.executable, "-m", "bench.eof_floor", "--serve", "120",
           *(["--keep-open"] if args.keep_open else [])]  # fmt: skip
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", SERVER_CORE, *cmd]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    srv = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    assert srv.stdout is not None and srv.stdin is not None
    try:
        port = int(srv.stdout.readline())
        pin_self(CLIENT_CORE)
        t1 = uvloop.run(_drop_all(port, members))["t1"]
        srv.stdin.write("stop\n")
        srv.stdin.flush()
        stalls = json.loads(srv.stdout.readline())
    finally:
        srv.kill()
        srv.wait(10)
    after = [s for s in stalls if s[0] >= t1 - 0.01]
    worst = max(after, key=lambda s: s[2], default=(0.0, 0.0, 0.0))
    out = {
        "members": members,
        "keep_open": args.keep_open,
        "loop_stall_max_ms": round(max((s[1] for s in after), default=0.0), 1),
        "loop_stall_cpu_max_ms": round(worst[2], 1),
        "loop_stall_cpu_total_ms": round(sum(s[2] for s in after), 1),
        "cpu_us_per_connection": round(sum(s[2] for s in after) * 1e3 / members, 2),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
