"""Where Redis spends its time per persisted send (issue 11: 50,000 sends/s needs Redis at
<= 20 µs of CPU per send). RedisStore alone (no chatd server) sends `--messages` messages,
`--inflight` at a time, with a nonce each, into a private redis-server, once with the AOF at
`appendfsync always` and once without the AOF; for each: redis-server's user and system CPU
per send (from /proc: independent of how busy the machine is), AOF bytes per send, memory
per stored message, and INFO commandstats per send (µs measured by Redis itself, wall time
inside each command: inflated when the machine is busy; the script's own share is EVALSHA's
time less that of the commands it called).

Then what sharing rate budgets between nodes costs (chatd/store/redis/limits.py): one
budget script call per send, as an exact shared limit would need, against the batched
settle chatd does (100 users' spends in one call); node and Redis CPU per send.

    python3 dev.py bench redis_cost [--messages 40000] [--inflight 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from bench.common import new_loop, pin_self
from bench.nodes import redis_server
from chatd.store.base import NewMessage, RoomRecord


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _send(store: Any, room_name: str, n: int, inflight: int) -> None:
    room = await store.create_room(RoomRecord(0, room_name, "", "ann", time.time(), False, False))
    sent = 0

    async def worker(w: int) -> None:
        nonlocal sent
        i = 0
        while sent < n:
            i += 1
            sent += 1
            await store.add_message(NewMessage(
                room.id, "ann", None, "persist me " + "x" * 40, time.time(), f"{w}.{i}", "ann#1"
            ))  # fmt: skip

    await asyncio.gather(*(worker(w) for w in range(inflight)))


def _one(aof: bool, messages: int, inflight: int) -> dict[str, Any]:
    from chatd.store.redis import RedisStore

    with redis_server("always", core="0") as redis, redis.client() as r:
        if not aof:
            r.config_set("appendonly", "no")
        store = RedisStore(redis.url)
        store.open()
        loop = new_loop()
        try:
            loop.run_until_complete(_send(store, "warm", 2_000, inflight))
            r.config_resetstat()
            aof0 = int(r.info("persistence").get("aof_current_size", 0))
            (u0, s0), t0 = _cpu(redis.proc.pid), time.monotonic()
            loop.run_until_complete(_send(store, "bench", messages, inflight))
            (u1, s1), t1 = _cpu(redis.proc.pid), time.monotonic()
            aof1 = int(r.info("persistence").get("aof_current_size", 0))
            stats = r.info("commandstats")
            memory = int(r.info("memory")["used_memory"])
            loop.run_until_complete(store.close())
        finally:
            loop.close()
    per = {k.removeprefix("cmdstat_"): round(v["usec"] / messages, 2) for k, v in stats.items()}
    inner = sum(v for k, v in per.items() if k != "evalsha")
    return {
        "aof": "appendfsync always" if aof else "off",
        "sends": messages,
        "sends_per_s": round(messages / (t1 - t0)),
        "redis_user_us_per_send": round((u1 - u0) / messages * 1e6, 2),
        "redis_sys_us_per_send": round((s1 - s0) / messages * 1e6, 2),
        "aof_bytes_per_send": round((aof1 - aof0) / messages, 1),
        "memory_bytes_per_message": round(memory / (messages + 2_000)),
        "commandstats_us_per_send": {k: v for k, v in per.items() if v >= 0.05},
        "script_own_us_per_send": round(per.get("evalsha", 0.0) - inner, 2),
    }


async def _budgets(url: str, pid: int) -> dict[str, Any]:
    from chatd.store.redis.limits import RedisBudgets

    budgets = RedisBudgets(url)
    one = [("s:ann", 10.0, 30.0, 1)]
    await budgets.settle(one)
    n = 2_000
    c0, r0, t0 = time.process_time(), sum(_cpu(pid)), time.perf_counter()
    for _ in range(n):
        await budgets.settle(one)
    c1, r1, t1 = time.process_time(), sum(_cpu(pid)), time.perf_counter()
    many = [(f"s:u{i}", 10.0, 30.0, 3) for i in range(100)]
    calls = 200
    c2, r2 = time.process_time(), sum(_cpu(pid))
    for _ in range(calls):
        await budgets.settle(many)
    c3, r3 = time.process_time(), sum(_cpu(pid))
    await budgets.close()
    sends = calls * 100 * 3
    return {
        "budgets": "one script call per send / one settle per 100 users x 3 sends",
        "per_send_round_trip_us": round((t1 - t0) / n * 1e6),
        "per_send_node_cpu_us": round((c1 - c0) / n * 1e6, 1),
        "per_send_redis_cpu_us": round((r1 - r0) / n * 1e6, 1),
        "batched_node_cpu_us_per_send": round((c3 - c2) / sends * 1e6, 2),
        "batched_redis_cpu_us_per_send": round((r3 - r2) / sends * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--inflight", type=int, default=2_000)
    args = ap.parse_args(argv)
    pin_self()
    results = []
    for aof in (True, False):
        r = _one(aof, args.messages, args.inflight)
        print(json.dumps(r), flush=True)
        results.append(r)
    with redis_server("always", core="0") as redis:
        r = asyncio.run(_budgets(redis.url, redis.proc.pid))
    print(json.dumps(r), flush=True)
    results.append(r)
    return results


if __name__ == "__main__":
    main()
