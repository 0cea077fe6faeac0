"""Plumbing of the several-node benches (redis_fanout, redis_persist, redis_split): a
private redis-server, `chatd serve --redis` nodes pinned with taskset, and what Redis says
it spent (INFO commandstats, its CPU). Not a bench itself."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from bench.common import Server
from bench.redis_store import cpu_seconds, start_redis

SECRET = "bench-secret-bench-secret-bench-secret!"


class Redis:
    """redis-server on a free loopback port, AOF with ``appendfsync``, in a temp dir,
    pinned to ``core`` (start_redis pins it to the server core; taskset moves it)."""

    def __init__(self, appendfsync: str = "always", core: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="chatd-bench-redis-")
        self.proc, self.port = start_redis(self.dir, appendfsync)
        if core is not None and shutil.which("taskset"):
            subprocess.run(["taskset", "-pc", core, str(self.proc.pid)],
                           stdout=subprocess.DEVNULL, check=False)  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=10, decode_responses=True)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def commandstats(self) -> dict[str, dict[str, float]]:
        with self.client() as r:
            return {k.removeprefix("cmdstat_"): v for k, v in r.info("commandstats").items()}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def node(redis: Redis, core: str, *flags: str) -> Server:
    """`chatd serve --redis` pinned to ``core`` (the bench's usual flags: no rate limits)."""
    return Server("--redis", redis.url, *flags, core=core)


@contextlib.contextmanager
def redis_server(appendfsync: str = "always", core: str | None = None) -> Iterator[Redis]:
    r = Redis(appendfsync, core)
    try:
        yield r
    finally:
        r.close()


def stats_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                per: float) -> dict[str, dict[str, float]]:
    """Redis commands run between two INFO commandstats: calls and µs of Redis CPU, per
    ``per`` (say, per acknowledged send), the busiest first."""
    out: dict[str, dict[str, float]] = {}
    for name, a in after.items():
        b = before.get(name, {"calls": 0, "usec": 0})
        calls, usec = a["calls"] - b["calls"], a["usec"] - b["usec"]
        if calls:
            out[name] = {"calls_per": round(calls / per, 3), "usec_per": round(usec / per, 2),
                         "usec_per_call": round(usec / calls, 2)}  # fmt: skip
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["usec_per"]))
