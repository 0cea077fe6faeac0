"""Input over real sockets: memory held per connection (limits.md, input memory) and
half-close (issue 13, items 3 and 8)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

from chatd.connection import Connection
from chatd.protocol.framing import LineSplitter
from chatd.server import ChatServer
from tests.helpers import TIMEOUT, Client, running_server, until

# asyncio's and uvloop's transports read at most this much per data_received.
READ_CHUNK = 256 * 1024


class _Spy(LineSplitter):
    """Records the most input the connection held after taking in a read."""

    __slots__ = ("peak",)

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self.peak = 0

    def push(self, data: bytes) -> None:
        super().push(data)
        self.peak = max(self.peak, self.buffered)


async def _only_connection(server: ChatServer) -> Connection:
    await until(lambda: _async(len(server.connections) == 1))
    pipe = next(iter(server.connections)).pipe
    assert pipe is not None
    return pipe


async def _async(value: Any) -> Any:
    return value


def _count_prepared(server: ChatServer) -> list[int]:
    """Count the frames the server has decoded (run or answered) so far."""
    count = [0]
    prepare = server.dispatcher.prepare

    def counting(line: bytes, one_cmd: bool = False) -> Any:
        count[0] += 1
        return prepare(line, one_cmd)

    server.dispatcher.prepare = counting  # type: ignore[method-assign]
    return count


async def _read_until(c: Client, marker: bytes) -> bytes:
    """Raw bytes up to and including the line holding `marker` (no JSON per line)."""
    data = bytearray()
    while marker not in data:
        chunk = await asyncio.wait_for(c.reader.read(1 << 20), TIMEOUT)
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return bytes(data)


async def test_a_flood_of_tiny_frames_holds_one_read_chunk_not_a_frame_object_each(
    server: ChatServer,
) -> None:
    c = await Client.connect(server.port)
    try:
        conn = await _only_connection(server)
        spy = conn.splitter = _Spy(server.config.max_frame)
        prepared = _count_prepared(server)
        n = 200_000  # 600 KB of 3-byte frames, each answered bad_request
        await c.send_raw(b"{}\n" * n + b'{"cmd":"ping","id":"last"}\n')
        data = await _read_until(c, b'"id":"last"')
        assert data.count(b"\n") == n + 1
        assert data.count(b'"code":"bad_request"') == n
        assert prepared[0] == n + 1
        # Reading pauses while complete frames wait: one read plus one partial line.
        assert 0 < spy.peak <= READ_CHUNK + server.config.max_frame + 1
        assert spy.buffered == 0
    finally:
        await c.close()


async def test_a_reset_connection_frees_the_frames_it_left_unrun(server: ChatServer) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), TIMEOUT)
    conn = await _only_connection(server)
    prepared = _count_prepared(server)
    n = 170_000  # 510 KB: about two reads of frames
    await asyncio.wait_for(loop.sock_sendall(sock, b"{}\n" * n), TIMEOUT)
    # RST, not FIN: the server learns of it as soon as it writes a reply.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await until(lambda: _async(conn.edge not in server.connections))
    assert prepared[0] < n  # it went with frames still unrun...
    assert conn.splitter.buffered == 0 and conn.held is None  # ...and they were freed
    assert not conn.out and conn.out_bytes == 0


async def _half_close(port: int, frames: list[bytes], tail: bytes = b"") -> list[dict[str, Any]]:
    """Send frames (and an unterminated tail), shut the write side as `nc -N` does, and
    read every frame until the server closes."""
    c = await Client.connect(port)
    try:
        await c.guest("half")
        await c.ok("room.create", room="halfroom")
        c.writer.write(b"".join(frames) + tail)
        c.writer.write_eof()  # socket.shutdown(SHUT_WR)
        data = await asyncio.wait_for(c.reader.read(), TIMEOUT)  # to EOF: the server closed
    finally:
        await c.close()
    return [json.loads(line) for line in data.splitlines()]


def _replies(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] != "event"]


async def test_half_close_answers_every_complete_frame_then_closes() -> None:
    async with running_server(rate_limit=0) as srv:
        frames = []
        for i in range(200):
            if i % 2:
                frame = {"cmd": "msg.send", "id": i, "room": "halfroom", "text": f"m{i}"}
            else:
                frame = {"cmd": "ping", "id": i}
            frames.append(json.dumps(frame).encode() + b"\n")
        tail = b'{"cmd":"msg.send","id":"partial","room":"halfroom","text":"never"}'
        got = await _half_close(srv.port, frames, tail)
        replies = _replies(got)
        assert [r["id"] for r in replies] == list(range(200))
        assert all(r["type"] == "ok" for r in replies), [r for r in replies if r["type"] != "ok"]
        assert sum(1 for f in got if f.get("event") == "message") == 100
        c = await Client.connect(srv.port)
        try:
            await c.guest("reader")
            history = await c.ok("room.history", room="halfroom", limit=500)
            assert [m["text"] for m in history["messages"]] == [f"m{i}" for i in range(1, 200, 2)]
        finally:
            await c.close()


async def test_half_close_waits_for_throttled_commands() -> None:
    async with running_server(command_rate=100.0, command_burst=5) as srv:
        frames = [b'{"cmd":"whoami","id":%d}\n' % i for i in range(20)]
        replies = _replies(await _half_close(srv.port, frames))
        assert [r["id"] for r in replies] == list(range(20))
        assert all(r["type"] == "ok" for r in replies)


async def test_out_of_range_numbers_and_a_repeated_cmd_are_bad_request_with_the_id(
    server: ChatServer,
) -> None:
    """Issue 13, item 13 (protocol.md, "Client frames")."""
    c = await Client.connect(server.port)
    try:
        await c.guest("numbers")
        for raw, rid in [
            (b'{"cmd":"sync","id":41,"since":1e400}', 41),
            (b'{"cmd":"sync","id":"n","since":-1e400}', "n"),
            (b'{"cmd":"ping","cmd":"ping","id":42}', 42),
            (b'{"cmd":"ping","\\u0063md":"help","id":43}', 43),
        ]:
            await c.send_raw(raw + b"\n")
            frame = await c.recv()
            assert frame["type"] == "error" and frame["code"] == "bad_request", (raw, frame)
            assert frame["id"] == rid
        assert (await c.ok("ping")) == {"pong": True}
    finally:
        await c.close()


async def test_a_repeated_cmd_among_pipelined_frames_is_still_caught(server: ChatServer) -> None:
    """Pipelined frames are checked for a repeated "cmd" once per read chunk where the
    chunk proves it exact: a frame with two, evened out by one with none, is still caught."""
    c = await Client.connect(server.port)
    try:
        await c.guest("pipelined")
        pad = b',"pad":"' + b"x" * 300 + b'"'
        await c.send_raw(
            b'{"cmd":"ping","id":1' + pad + b"}\n"
            b'{"cmd":"ping","cmd":"ping","id":2}\n{"id":3}\n{"cmd":"ping","id":4}\n'
        )
        frames = [await c.recv() for _ in range(4)]
        assert [(f["id"], f["type"]) for f in frames] == [
            (1, "ok"), (2, "error"), (3, "error"), (4, "ok"),
        ]  # fmt: skip
        assert "more than once" in frames[1]["message"]
    finally:
        await c.close()
