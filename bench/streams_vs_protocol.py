"""Why chatd's edge is an asyncio Protocol and not `asyncio.start_server` streams: the same
line echo server written both ways (hello on connect, one fixed reply per line), under
the same load as `bench ping` (C clients, one request in flight each), then N idle
connections for the memory each costs. Server pinned to core 0 on uvloop, as chatd runs.

    python3 dev.py bench streams_vs_protocol [--clients 50] [--seconds 5] [--idle 5000]

Only the edge differs: no JSON, no dispatcher; what is measured is what each way costs
per read and per connection (streams: a Task, a StreamReader and a StreamWriter each, a
readline and a drain per line; a Protocol: one object and a callback per read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time

HELLO = b'{"type":"event","event":"hello","data":{}}\n'
PONG = b'{"type":"ok","id":1,"data":{"pong":true}}\n'


# --- the two servers (run in the child process) ----------------------------------------


class _Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(HELLO)

    def data_received(self, data: bytes) -> None:
        n = data.count(b"\n")  # the bench's requests never split across reads
        if n:
            self.transport.write(PONG * n)


async def _stream_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(HELLO)
    try:
        while await reader.readline():
            writer.write(PONG)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve(mode: str) -> None:
    loop = asyncio.get_running_loop()
    if mode == "streams":
        server = await asyncio.start_server(_stream_client, "127.0.0.1", 0, backlog=4096)
    else:
        server = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"{mode} edge listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()  # until terminated


def _child() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode = os.environ["CHATD_EDGE_MODE"]
    try:
        import uvloop

        uvloop.run(_serve(mode))
    except ImportError:
        asyncio.run(_serve(mode))


# --- the load (this process) -----------------------------------------------------------


def _measure(mode: str, clients: int, seconds: float, idle: int) -> dict[str, object]:
    from bench.common import Server, new_loop, open_line, pin_self
    from bench.ping import round_trips

    os.environ["CHATD_EDGE_MODE"] = mode
    os.environ["CHATD_BENCH_ENTRY"] = os.path.abspath(__file__)
    pin_self()
    with Server() as srv:
        loop = new_loop()
        try:

            async def run() -> dict[str, object]:
                conns = [await open_line(srv.port) for _ in range(clients)]
                cpu0 = srv.cpu_seconds()
                r: dict[str, object] = dict(await round_trips(conns, b'{"cmd":"ping","id":1}\n', seconds))
                r["server_cpu"] = round((srv.cpu_seconds() - cpu0) / float(r["seconds"]), 2)  # type: ignore[arg-type]
                base = srv.rss_kib()
                lines = []
                for i in range(0, idle, 500):
                    lines += await asyncio.gather(
                        *(open_line(srv.port) for _ in range(min(500, idle - i)))
                    )
                await asyncio.sleep(1.0)
                r["idle_kib_per_conn"] = round((srv.rss_kib() - base) / max(1, len(lines)), 2)
                for c in lines:
                    assert c.transport is not None
                    c.transport.close()
                return r

            result = loop.run_until_complete(run())
        finally:
            loop.close()
    return {"edge": mode, **result}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--idle", type=int, default=5000)
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = min(args.idle, hard - args.clients - 100)
    out: dict[str, object] = {}
    for mode in ("protocol", "streams"):
        r = _measure(mode, args.clients, args.seconds, idle)
        print(json.dumps(r), flush=True)
        out[mode] = r
        time.sleep(0.5)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _child()
    else:
        main()
