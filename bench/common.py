"""Shared bench plumbing: start a real chatd process pinned to one core, and lean
load-generator connections (asyncio Protocols, uvloop when installed)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

SERVER_CORE = "0"
CLIENT_CORE = "1"


def pin_self(core: str = CLIENT_CORE) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(core)})


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class Server:
    """`chatd serve` on 127.0.0.1:0 pinned to SERVER_CORE; stops on exit from `with`."""

    def __init__(self, *flags: str, db: str | None = None, core: str = SERVER_CORE) -> None:
        self.tmp = tempfile.mkdtemp(prefix="chatd-bench-")
        self.db = db or os.path.join(self.tmp, "bench.db")
        entry = os.environ.get("CHATD_BENCH_ENTRY")
        cmd = [sys.executable, *([entry] if entry else ["-m", "chatd"]), "serve", "--port", "0", "--db", self.db,
               "--secret", "bench-secret-bench-secret-bench-secret!", "--rate-limit", "0",
               "--command-rate", "0", "--per-ip-connections", "0", "--guest-logins-per-ip", "0",
               *flags]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            cmd = ["taskset", "-c", core, *cmd]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.port = 0
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError("server exited")
        if not self.port:
            raise RuntimeError("server did not start")
        # Keep reading its log so a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "ERROR" in line or "Traceback" in line:
                sys.stderr.write("server: " + line)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User+system CPU the server has used so far (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Line(asyncio.Protocol):
    """A lean client connection: counts lines, optionally parses them, answers by id."""

    def __init__(self, on_line: Callable[[bytes], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.lines = 0
        self.on_line = on_line
        self.waiters: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.ready: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    raw: Callable[[bytes], None] | None = None  # when set, takes every chunk as it comes

    def data_received(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw(data)
            return
        self.lines += data.count(b"\n")
        if not self.waiters and self.on_line is None and self.ready.done():
            self.buf = data[data.rfind(b"\n") + 1 :] if b"\n" in data else self.buf + data
            return
        data = self.buf + data
        parts = data.split(b"\n")
        self.buf = parts.pop()
        for line in parts:
            if not self.ready.done():
                self.ready.set_result(None)
                continue
            if line.startswith((b'{"type":"ok"', b'{"type":"error"')):
                frame = json.loads(line)
                fut = self.waiters.pop(frame.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            elif self.on_line is not None:
                self.on_line(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, frame: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(frame, separators=(",", ":")).encode() + b"\n")

    async def call(self, frame: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[frame["id"]] = fut
        self.send(frame)
        return await asyncio.wait_for(fut, timeout)


async def open_line(
    port: int, on_line: Callable[[bytes], None] | None = None, source: str | None = None
) -> Line:
    """Connect and wait for hello. `source` picks the local address (a 127.x address),
    so a connection storm does not run out of ephemeral ports to TIME_WAIT."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: Line(on_line), "127.0.0.1", port,
        local_addr=(source, 0) if source else None,
    )  # fmt: skip
    await asyncio.wait_for(proto.ready, 10)
    return proto


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def against_server(
    run: Callable[[Server], Awaitable[dict[str, Any]]], *flags: str, cpu: bool = True
) -> dict[str, Any]:
    """Start a server with `flags`, pin this process to the client core, run `run(server)`
    on a fresh loop, add the server's CPU share over the run, print the figures as one
    JSON line and return them."""
    pin_self()
    with Server(*flags) as srv:
        loop = new_loop()
        try:
            cpu0 = srv.cpu_seconds()
            result = loop.run_until_complete(run(srv))
            if cpu and "seconds" in result and "server_cpu" not in result:
                result["server_cpu"] = round((srv.cpu_seconds() - cpu0) / result["seconds"], 2)
        finally:
            loop.close()
    print(json.dumps(result))
    return result
