"""Persisted msg.send/s through the store alone (issue 11): RedisStore on its own
redis-server (appendfsync always, AOF in a temporary directory) against SQLiteStore on a
file (synchronous=FULL). Each send is counted when its future resolved, i.e. after Redis
replied / after COMMIT; `--inflight` sends are kept in flight (as many connections'
sends would be), so both stores group them (pipeline + one script per 500 / group commit).

    python3 dev.py bench redis_store [--seconds 5] [--messages 300000] [--inflight 2000]
        [--appendfsync always|everysec]

Bounded: stops at --seconds or --messages, whichever comes first. redis-server on core 0
(with the store's client on core 1) when the machine has two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from bench.common import SERVER_CORE, new_loop, pin_self
from chatd.store.base import NewMessage, RoomRecord, Store


def cpu_seconds(pid: int) -> float:
    """User+system CPU a process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(store: Store, seconds: float, messages: int, inflight: int) -> dict[str, Any]:
    room = await store.create_room(RoomRecord(0, "bench", "", "ann", time.time(), False, False))
    count = 0
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker(w: int) -> None:
        nonlocal count
        i = 0
        while count < messages and time.monotonic() < deadline:
            i += 1
            began = time.monotonic()
            text = "persist me " + "x" * 40
            await store.add_message(
                NewMessage(room.id, "ann", None, text, time.time(), f"{w}.{i}", "ann#1")
            )
            count += 1
            if i % 16 == 0:
                latencies.append(time.monotonic() - began)

    t0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(asyncio.ensure_future(worker(w)) for w in range(inflight))), seconds + 60
    )
    elapsed = time.monotonic() - t0
    latencies.sort()
    return {
        "acked": count,
        "seconds": round(elapsed, 2),
        "sends_per_s": round(count / elapsed),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
    }


def start_redis(directory: str, appendfsync: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
           "--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""]  # fmt: skip
    if (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", str(SERVER_CORE), *cmd] if shutil.which("taskset") else cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 15
    while True:  # a bench, not a test: polling for the port is fine here
        try:
            with redis.Redis(port=port, socket_timeout=1) as r:
                if r.ping():
                    return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--messages", type=int, default=300_000)
    ap.add_argument("--inflight", type=int, default=2_000)
    ap.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    args = ap.parse_args(argv)
    pin_self()
    from chatd.store.redis import RedisStore
    from chatd.store.sqlite import SQLiteStore

    results = []
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        proc, port = start_redis(tmp, args.appendfsync)
        try:
            stores: list[tuple[str, Any]] = [
                (f"redis appendfsync {args.appendfsync}", RedisStore(f"redis://127.0.0.1:{port}/0")),
                ("sqlite synchronous=FULL", SQLiteStore(os.path.join(tmp, "bench.db"))),
            ]
            for label, store in stores:
                loop = new_loop()
                try:
                    store.open()
                    cpu0, own0 = cpu_seconds(proc.pid), time.process_time()
                    r = loop.run_until_complete(
                        drive(store, args.seconds, args.messages, args.inflight)
                    )
                    # Who was busy: redis-server's core, and this process (store client,
                    # producers; for SQLite also its writer thread).
                    r["redis_cpu"] = round((cpu_seconds(proc.pid) - cpu0) / r["seconds"], 2)
                    r["client_cpu"] = round((time.process_time() - own0) / r["seconds"], 2)
                    loop.run_until_complete(store.close())
                finally:
                    loop.close()
                r["store"] = label
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            proc.terminate()
            proc.wait(10)
    return results


if __name__ == "__main__":
    main()
