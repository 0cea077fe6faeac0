"""Server CPU per operation without sockets: a ChatServer in this process, its connection
adapters fed by fake transports, `time.process_time` around a fixed count of operations
(best of --reps). The kernel, the event loop's I/O and the load generator are left out, so
what is measured is chatd's own Python work per ping or per delivery — a figure that load
from other processes moves far less than throughput. Compare trees by running it in each.

    python3 dev.py bench inproc [ping|fanout] [--count N] [--reps 10]

ping: 50 connections, one `ping` each per round, a flush per round (as one loop turn).
fanout: 500 members of one room, one publisher pipelining `msg.send` 64 at a time; per
delivery (every line written to every member, replies included).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from typing import Any

from chatd.cli import build_parser, config_from
from chatd.server import ChatServer

try:
    from chatd.server import ConnectionProtocol
except ImportError:  # before the sans-I/O pipeline (1169749): one class did both
    from chatd.server import Connection as ConnectionProtocol  # type: ignore[attr-defined,no-redef]
from chatd.store.sqlite import SQLiteStore


class FakeTransport:
    """Just what ConnectionProtocol asks of a transport; counts the lines written."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lines = 0
        self.ok_replies = 0
        self.waiter: tuple[asyncio.Future[None], int] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (f"127.0.0.{self.n % 250 + 1}", self.n) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.lines += data.count(b"\n")
        if self.waiter is not None:
            self.ok_replies += data.count(b'"type":"ok"')
            fut, target = self.waiter
            if self.ok_replies >= target and not fut.done():
                fut.set_result(None)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def run(what: str, count: int, reps: int) -> dict[str, Any]:
    args = build_parser().parse_args([
        "serve", "--db", ":memory:", "--rate-limit", "0", "--command-rate", "0",
        "--per-ip-connections", "0", "--secret", "x" * 40,
    ])  # fmt: skip
    config = config_from(args)
    store = SQLiteStore(":memory:", max_batch=config.commit_batch)
    srv = ChatServer(config, store, "x" * 40)
    srv.app.load(store.open())
    loop = asyncio.get_running_loop()

    def connect(n: int) -> tuple[ConnectionProtocol, FakeTransport]:
        proto, t = ConnectionProtocol(srv), FakeTransport(n)
        proto.connection_made(t)  # type: ignore[arg-type]
        return proto, t

    best = float("inf")
    if what == "ping":
        conns = [connect(i) for i in range(50)]
        await asyncio.sleep(0.01)
        ping = b'{"cmd":"ping","id":1}\n'
        for _ in range(reps):
            gc.collect()
            c0 = time.process_time()
            for _ in range(count // 50):
                for proto, _t in conns:
                    proto.data_received(ping)
                srv.flush_all()
            best = min(best, (time.process_time() - c0) / (count // 50 * 50))
        return {"bench": "ping", "pings": count, "us_per_ping": round(best * 1e6, 3)}
    members = [connect(i) for i in range(500)]
    for i, (proto, _t) in enumerate(members):
        proto.data_received(b'{"cmd":"login","id":1,"user":"m%d"}\n' % i)
    await asyncio.sleep(0.3)  # the guest logins' store writes
    members[0][0].data_received(b'{"cmd":"room.create","id":2,"room":"bench","ephemeral":true}\n')
    await asyncio.sleep(0.05)
    for proto, _t in members[1:]:
        proto.data_received(b'{"cmd":"room.join","id":2,"room":"bench"}\n')
    await asyncio.sleep(0.2)
    srv.flush_all()
    publisher, pt = members[1]
    for _ in range(reps):
        before = sum(t.lines for _p, t in members)
        gc.collect()
        c0 = time.process_time()
        sent = 0
        while sent < count:
            batch = min(64, count - sent)
            target = pt.ok_replies + batch
            publisher.data_received(b"".join(
                b'{"cmd":"msg.send","id":%d,"room":"bench","text":"hello fan-out"}\n' % (sent + k)
                for k in range(batch)
            ))  # fmt: skip
            sent += batch
            if pt.ok_replies < target:
                fut: asyncio.Future[None] = loop.create_future()
                pt.waiter = (fut, target)
                await fut
        srv.flush_all()
        delivered = sum(t.lines for _p, t in members) - before
        best = min(best, (time.process_time() - c0) / delivered)
    return {"bench": "fanout", "messages": count, "us_per_delivery": round(best * 1e6, 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="ping", choices=["ping", "fanout"])
    ap.add_argument("--count", type=int, default=0, help="pings (50,000) or messages (2,000)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    count = args.count or (50_000 if args.what == "ping" else 2_000)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result: dict[str, Any] = runner(run(args.what, count, args.reps))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
