"""Property: however a byte stream is cut into reads, the frames and the replies are the
same (issue 13, "Also"). The splitter alone against a model, then the whole connection
pipeline (Connection + Dispatcher) over a fake transport: no sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.protocol.framing import TOO_LARGE, LineSplitter
from chatd.server import ChatServer, ConnectionProtocol
from chatd.store.sqlite import SQLiteStore
from tests.helpers import SECRET, TEST_CONFIG

MAX = 64

_frames = st.one_of(
    st.integers(0, 2**63 - 1).map(lambda i: b'{"cmd":"ping","id":%d}' % i),
    st.sampled_from(
        [
            b'{"cmd":"help","id":"h"}',
            b'{"cmd":"whoami","id":"w"}',  # unauthorized, at once
            b'{"cmd":"no.such","id":3}',
            b'{"cmd":"ping","cmd":"ping","id":4}',
            b'{"cmd":"sync","id":5,"since":1e400}',
            b"nope",
            b"[]",
            b"{}",
            b"",
            b"   ",
            b"\t",
            b"x" * MAX,  # exactly max_frame: accepted (and bad JSON)
        ]
    ),
    st.integers(1, 3 * MAX).map(lambda n: b"y" * (MAX + n)),  # too large
)
_lines = st.tuples(_frames, st.sampled_from([b"\n", b"\r\n"])).map(lambda t: t[0] + t[1])
_tails = st.sampled_from([b"", b'{"cmd":"ping","id":"partial"}', b"z" * (MAX + 5)])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream of lines (and maybe a partial one), and one way to cut it into reads."""
    data = b"".join(draw(st.lists(_lines, max_size=40))) + draw(_tails)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=30))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, [c for c in chunks if c]


def model(data: bytes) -> list[object]:
    """What the contract says a stream holds, line by line."""
    *complete, tail = data.split(b"\n")
    out: list[object] = []
    for line in complete:
        line = line.removesuffix(b"\r")
        if len(line) > MAX:
            out.append(TOO_LARGE)
        elif line.strip():
            out.append(line)
    if len(tail) > MAX + 1:  # reported before its end arrives (and never run)
        out.append(TOO_LARGE)
    return out


@given(streams(), st.data())
def test_any_chunking_splits_into_the_same_frames(
    stream: tuple[bytes, list[bytes]], data: st.DataObject
) -> None:
    whole, chunks = stream
    sp = LineSplitter(MAX)
    out: list[object] = []
    for chunk in chunks:
        sp.push(chunk)
        # Frames taken at any moment, some now and the rest after later reads.
        for _ in range(data.draw(st.integers(0, 3))):
            item = sp.next()
            if item is not None:
                out.append(item)
    while (item := sp.next()) is not None:
        out.append(item)
    assert sp.buffered <= MAX + 1  # drained: at most a partial line is left
    assert out == model(whole)
    assert sp.work <= len(whole)  # each byte searched once


class FakeTransport:
    """What ConnectionProtocol uses of an asyncio transport; records what it is told."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    abort = close


async def _run(srv: ChatServer, chunks: list[bytes]) -> list[dict[str, Any]]:
    """Feed reads as a transport would (never while reading is paused), then EOF; return
    every frame sent, up to the close. The byte counters count exactly what was read and
    written (they are added up per read and per flush, not per frame)."""
    bytes_in, bytes_out = srv.stats.bytes_in, srv.stats.bytes_out
    conn = ConnectionProtocol(srv)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    pending = list(chunks)
    for _ in range(100_000):
        if t.closed:
            break
        if t.reading and pending:
            conn.data_received(pending.pop(0))
        elif t.reading and pending == []:
            pending = None  # type: ignore[assignment]
            if not conn.eof_received():
                t.close()  # what a transport does when eof_received says so
        await asyncio.sleep(0)
    assert t.closed, "the connection must close after answering everything"
    conn.connection_lost(None)
    assert srv.stats.bytes_in - bytes_in == sum(map(len, chunks))
    assert srv.stats.bytes_out - bytes_out == len(t.out)
    return [json.loads(line) for line in bytes(t.out).splitlines()]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_any_chunking_gets_the_same_replies_and_every_frame_is_answered(
    stream: tuple[bytes, list[bytes]],
) -> None:
    whole, chunks = stream

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        config = TEST_CONFIG.replace(max_frame=MAX, frames_per_batch=4)
        store = SQLiteStore(config.db)
        srv = ChatServer(config, store, SECRET)
        srv.app.load(await srv.loop.run_in_executor(None, store.open))
        try:
            return await _run(srv, chunks), await _run(srv, [whole] if whole else [])
        finally:
            await store.close()
            srv.hasher.close()

    cut, one_read = asyncio.run(scenario())
    assert cut == one_read
    assert cut[0]["event"] == "hello"
    replies = cut[1:]
    expected = model(whole)
    assert len(replies) == len(expected)
    for reply, frame in zip(replies, expected, strict=True):
        if frame is TOO_LARGE:
            assert reply["code"] == "frame_too_large"
        elif frame == b'{"cmd":"ping","id":"partial"}':
            raise AssertionError("a partial frame ran")
