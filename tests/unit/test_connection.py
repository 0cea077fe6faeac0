"""The sans-I/O connection pipeline (chatd.connection), driven without sockets or an event
loop: bytes in, bytes out, and the decisions it asks its Edge to carry out.

Commands that wait await store `Deferred`s the test resolves by hand: a Deferred runs the
driver's callback at once, so every step below is synchronous and deterministic."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chatd.app import App
from chatd.config import Config
from chatd.connection import MAX_WAITING, PAUSE_BACKLOG, Connection
from chatd.dispatch import Dispatcher, Driver, Request, Spec
from chatd.protocol import commands as c
from chatd.stats import Stats
from chatd.store.deferred import Deferred
from tests.unit.fakes import UNIT_CONFIG, Core

CONFIG = UNIT_CONFIG.replace(command_rate=0)


class FakeLoop:
    """Just what a Deferred asks of its loop (callbacks added after it resolved)."""

    def call_soon(self, fn: Callable[..., Any], *args: Any, context: Any = None) -> None:
        fn(*args)


class Host:
    """The server side every connection shares, over hand-run queues: `soon` and `later`
    run when the test says a loop turn passed, `after` when the test fires the timers."""

    def __init__(self, core: Core, table: list[Spec]) -> None:
        self.core = core
        self.app: App = core.app
        self.config: Config = core.app.config
        self.stats: Stats = core.app.stats
        self.dispatcher = Dispatcher(core.app, table)
        self.next_turn: list[Callable[[], None]] = []
        self.driver = Driver(lambda fn, *a: self.next_turn.append(lambda: fn(*a)))
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.dirty: list[Connection] = []
        self.flush_asked = 0  # schedule_flush calls (the test's turn flushes anyway)

    def soon(self, fn: Callable[[], None]) -> None:
        self.next_turn.append(fn)

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((delay, fn))

    def later(self, chore: Callable[[], None]) -> None:
        self.next_turn.append(chore)

    def schedule_flush(self) -> None:
        self.flush_asked += 1

    def turn(self) -> None:
        """One loop turn: what was asked for runs, then every dirty connection flushes."""
        todo, self.next_turn = self.next_turn, []
        for fn in todo:
            fn()
        self.flush()

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            self.stats.bytes_out += conn.flush()

    def fire_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _delay, fn in timers:
            fn()


class Edge:
    """The socket side (Edge and Sink): a kernel that takes `drains` bytes a write (all
    when None)."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.wire = bytearray()  # what reached the client
        self.kernel = 0  # written and not yet sent
        self.drains: int | None = None
        self.reading = True
        self.closed = False
        self.dropped = False

    def write(self, data: bytes) -> None:
        self.kernel += len(data)
        sent = self.kernel if self.drains is None else min(self.drains, self.kernel)
        self.kernel -= sent
        self.wire += data  # order is all the tests look at

    def get_write_buffer_size(self) -> int:
        return self.kernel

    def set_reading(self, on: bool) -> None:
        self.reading = on

    def close(self) -> None:
        self.closed = True

    def drop(self) -> None:
        self.dropped = True

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in bytes(self.wire).splitlines()]

    def ids(self) -> list[Any]:
        return [f.get("id") for f in self.frames() if f["type"] != "event"]


gates: dict[Any, Deferred[Any]] = {}


def ping(app: App, req: Request, cmd: Any) -> Any:
    return {"pong": True}


async def waits(app: App, req: Request, cmd: Any) -> Any:
    """Waits for the test to resolve gates[cmd.id] (as a send waits for its commit)."""
    gate: Deferred[Any] = Deferred(FakeLoop())  # type: ignore[arg-type]
    gates[cmd.id] = gate
    return {"got": await gate}


TABLE = [
    Spec(c.Ping, ping, "ping", auth=False),  # at once
    Spec(c.Help, waits, "help", auth=False, overlap=True),  # waits, overlaps (a send)
    Spec(c.Stats, waits, "stats", auth=False),  # waits, a barrier (an edit)
]


def frame(cmd: str, rid: Any) -> bytes:
    return json.dumps({"cmd": cmd, "id": rid}).encode() + b"\n"


@pytest.fixture(autouse=True)
def _no_gates() -> Iterator[None]:
    gates.clear()
    yield
    gates.clear()


class Rig:
    def __init__(self, config: Config = CONFIG) -> None:
        self.core = Core(config)
        self.host = Host(self.core, TABLE)
        self.edge = Edge()
        self.conn = Connection(self.host, self.edge, self.edge, "127.0.0.1")
        self.edge.conn = self.conn
        self.conn.open()
        self.host.flush()
        assert self.edge.frames()[0]["event"] == "hello"
        self.edge.wire.clear()

    def close(self) -> None:
        self.core.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def test_replies_go_out_in_frame_order_when_a_later_command_finishes_first(rig: Rig) -> None:
    rig.conn.receive_data(frame("help", 1) + frame("help", 2) + frame("ping", 3))
    rig.host.flush()
    assert rig.edge.ids() == []  # 1 waits, so 2 and 3 wait behind it
    gates[2].set_result("two")
    rig.host.flush()
    assert rig.edge.ids() == []
    gates[1].set_result("one")
    rig.host.flush()
    assert rig.edge.ids() == [1, 2, 3]
    assert [f.get("data") for f in rig.edge.frames()] == [
        {"got": "one"}, {"got": "two"}, {"pong": True},
    ]  # fmt: skip
    assert rig.conn.slots is None and rig.conn.waiting == 0  # freed when empty


def test_a_non_overlapping_command_waits_for_the_earlier_ones(rig: Rig) -> None:
    rig.conn.receive_data(frame("help", 1) + frame("stats", 2) + frame("help", 3))
    assert set(gates) == {1}  # the barrier has not started
    assert rig.conn.held is not None and not rig.edge.reading
    gates[1].set_result(1)
    assert set(gates) == {1, 2}  # now it has; what follows it waits for it in turn
    gates[2].set_result(2)
    assert set(gates) == {1, 2, 3}
    gates[3].set_result(3)
    rig.host.flush()
    assert rig.edge.ids() == [1, 2, 3]
    assert rig.edge.reading


def test_at_most_max_waiting_commands_wait_at_once(rig: Rig) -> None:
    n = MAX_WAITING + 6
    rig.conn.receive_data(b"".join(frame("help", i) for i in range(n)))
    for _ in range(3):
        rig.host.turn()
    assert len(gates) == MAX_WAITING and rig.conn.waiting == MAX_WAITING
    assert not rig.edge.reading  # the rest stays unread in the splitter, not in memory
    gates[0].set_result(0)
    assert len(gates) == MAX_WAITING + 1 and rig.conn.waiting == MAX_WAITING
    for i in range(1, n):
        while i not in gates:
            rig.host.turn()
        gates[i].set_result(i)
    rig.host.flush()
    assert rig.edge.ids() == list(range(n))
    assert rig.edge.reading


def test_the_backlog_budget_yields_to_other_connections() -> None:
    r = Rig(CONFIG.replace(frames_per_batch=4))
    try:
        r.conn.receive_data(b"".join(frame("ping", i) for i in range(10)))
        r.host.flush()
        assert r.edge.ids() == [0, 1, 2, 3]
        assert not r.edge.reading and r.conn.paused == PAUSE_BACKLOG
        assert len(r.host.next_turn) == 1  # "call me again next turn"
        r.host.turn()
        assert r.edge.ids() == list(range(8))
        r.host.turn()
        assert r.edge.ids() == list(range(10))
        assert r.edge.reading and r.conn.paused == 0 and not r.host.next_turn
    finally:
        r.close()


def test_a_write_stall_pauses_reading_and_its_end_resumes_it(rig: Rig) -> None:
    """The edge says when its buffer crosses the soft limit and when it falls below low
    water (asyncio's write-buffer water marks, set from outbox_soft and outbox_low)."""
    rig.conn.write_paused(True)
    assert not rig.edge.reading and not rig.conn.wants_read
    rig.conn.write_paused(False)
    assert rig.edge.reading and rig.conn.wants_read
    # A stall and a backlog together: reading comes back only when both are over.
    rig.conn.receive_data(frame("help", 1) + frame("stats", 2))
    rig.conn.write_paused(True)
    gates[1].set_result(1)
    assert not rig.edge.reading
    gates[2].set_result(2)
    assert not rig.edge.reading
    rig.conn.write_paused(False)
    assert rig.edge.reading


def test_past_the_hard_limit_a_connection_that_does_not_read_is_dropped() -> None:
    r = Rig(CONFIG.replace(outbox_soft=1024, outbox_low=256, outbox_hard=8192))
    try:
        r.edge.drains = 0  # the client reads nothing
        chunk = b"x" * 1000 + b"\n"
        for _ in range(8):
            r.conn.send(chunk)  # a burst within one turn is handed to the edge first
        assert not r.edge.dropped
        r.host.flush()
        for _ in range(2):
            r.conn.send(chunk)
        assert r.edge.dropped and r.conn.dead
        assert r.host.stats.slow_consumers == 1
        r.conn.send(chunk)  # nothing more is queued for a dropped connection
        assert not r.conn.out
    finally:
        r.close()


def test_a_burst_the_client_keeps_up_with_is_not_a_slow_consumer() -> None:
    r = Rig(CONFIG.replace(outbox_soft=1024, outbox_low=256, outbox_hard=8192))
    try:
        for _ in range(100):
            r.conn.send(b"y" * 1000 + b"\n")
        assert not r.edge.dropped and len(r.edge.wire) + r.conn.out_bytes == 100 * 1001
    finally:
        r.close()


def test_a_throttled_command_is_held_until_its_timer_then_runs() -> None:
    r = Rig(UNIT_CONFIG.replace(command_rate=1, command_burst=2))
    try:
        r.conn.receive_data(frame("ping", 1) + frame("ping", 2) + frame("ping", 3))
        r.host.flush()
        assert r.edge.ids() == [1, 2]
        assert r.conn.held is not None and not r.edge.reading
        assert len(r.host.timers) == 1 and r.host.timers[0][0] > 0
        r.core.clock.advance(r.host.timers[0][0])
        r.host.fire_timers()
        r.host.flush()
        assert r.edge.ids() == [1, 2, 3]
        assert r.conn.held is None and r.edge.reading
    finally:
        r.close()


def test_half_close_answers_every_complete_frame_then_closes(rig: Rig) -> None:
    rig.conn.receive_data(frame("ping", 1) + frame("help", 2) + frame("help", 3))
    rig.conn.receive_data(b'{"cmd":"ping","id":"partial"}')  # no newline: never runs
    assert rig.conn.receive_eof() is True  # keep the write side open
    for _ in range(3):
        rig.host.turn()
    assert not rig.edge.closed  # 2 and 3 still wait
    gates[3].set_result(3)
    rig.host.turn()
    assert not rig.edge.closed
    gates[2].set_result(2)  # with nothing left the connection closes
    assert rig.edge.closed
    assert rig.edge.ids() == [1, 2, 3]  # flushed before the close; "partial" never ran


def test_eof_with_nothing_left_closes_as_a_chore(rig: Rig) -> None:
    """Not in the turn that read the EOF: when thousands go at once, their closes are
    spread over turns (issue 13, item 2)."""
    rig.conn.receive_data(frame("ping", 1))
    assert rig.conn.receive_eof() is True
    assert not rig.edge.closed
    rig.host.turn()
    assert rig.edge.closed and rig.edge.ids() == [1]


def test_a_partial_last_frame_never_runs(rig: Rig) -> None:
    rig.conn.receive_data(frame("ping", 1) + b'{"cmd":"ping","id":2}')
    rig.conn.receive_eof()
    rig.host.turn()
    assert rig.edge.ids() == [1] and rig.edge.closed


def test_input_held_never_exceeds_one_read_chunk_and_a_partial_line() -> None:
    r = Rig(CONFIG.replace(frames_per_batch=8, max_frame=512))
    try:
        stream = b"".join(frame("ping", i) for i in range(3000))
        chunk = 4096
        sent = peak = 0
        for _ in range(100_000):
            if sent >= len(stream):
                break
            if r.edge.reading:
                r.conn.receive_data(stream[sent : sent + chunk])
                sent += chunk
            peak = max(peak, r.conn.splitter.buffered)
            r.host.turn()
        assert sent >= len(stream)
        for _ in range(1000):
            if not r.host.next_turn:
                break
            r.host.turn()
        assert peak <= chunk + r.host.config.max_frame + 1
        assert r.edge.ids() == list(range(3000))
    finally:
        r.close()


def test_a_gone_connection_writes_nothing_until_its_clean_up(rig: Rig) -> None:
    """connection_lost only marks it gone (thousands may be reset in one turn); whatever
    runs before its clean-up chore queues nothing and never touches the edge."""
    rig.conn.gone()
    rig.conn.send(b"late\n")
    rig.conn.close()
    assert not rig.conn.out and not rig.edge.closed
    rig.conn.lost()
    rig.host.turn()
    assert rig.conn.session is not None and rig.conn.session.closed
    assert rig.edge.ids() == []


def test_a_lost_connection_frees_what_it_read_and_queued(rig: Rig) -> None:
    rig.conn.receive_data(frame("help", 1) + frame("stats", 2) + b"x" * 100)
    rig.conn.send(b"queued\n")
    rig.conn.lost()
    assert rig.conn.splitter.buffered == 0 and rig.conn.held is None
    assert not rig.conn.out and rig.conn.out_bytes == 0
    assert rig.conn.session is not None and not rig.conn.session.closed
    rig.host.turn()  # the session closes as a chore, a turn later
    assert rig.conn.session.closed
    gates[1].set_result(1)  # a command that finishes after the close sends nothing
    assert rig.edge.ids() == []


PAD = ',"pad":"' + "x" * 300 + '"'  # a chunk this big is checked for repeated "cmd"s at once


@pytest.mark.parametrize("in_two_reads", [False, True])
def test_a_repeated_cmd_is_rejected_in_a_chunk_of_many_frames(rig: Rig, in_two_reads: bool) -> None:
    # The repeated "cmd" in frame 2 and the missing one in frame 3 even out over the chunk.
    first = f'{{"cmd":"ping","id":1{PAD}}}\n'.encode()
    chunk = first + b'{"cmd":"ping","cmd":"ping","id":2}\n{"id":3}\n{"cmd":"ping","id":4}\n'
    if in_two_reads:  # the first read passes the chunk check and ends inside frame 2
        split = len(first) + len(b'{"cmd"')
        rig.conn.receive_data(chunk[:split])
        assert rig.conn.one_cmd
        rig.conn.receive_data(chunk[split:])
    else:
        rig.conn.receive_data(chunk)
    rig.host.flush()
    frames = rig.edge.frames()
    assert [f.get("id") for f in frames] == [1, 2, 3, 4]
    assert [f["type"] for f in frames] == ["ok", "error", "error", "ok"]
    assert "more than once" in frames[1]["message"]
