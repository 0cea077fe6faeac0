"""The per-connection pipeline, free of I/O: bytes in → commands; outcomes → bytes out.

A `Connection` is fed what the socket read (`receive_data`, `receive_eof`) and what the
socket did (`write_paused`, `lost`); what it has to send it writes, once per loop turn, into
its `Sink` (`flush`: the transport's own write, so a flush costs one Python call), and it
asks its `Edge` to act: pause or resume reading, close, drop. It owns, as plain state:

- reply order: commands may finish out of order (a send waits for its group commit while
  a later ping is answered at once), replies go out in frame order (`_Slot`s);
- pipelining limits: at most ``_MAX_WAITING`` commands in flight, and a command that does
  not overlap (``Spec.overlap``) waits until everything before it finished (a barrier);
- fairness and input memory: at most ``frames_per_batch`` frames per turn, then a yield;
  frames are split out lazily, one at a time, and reading stays paused while complete
  frames wait, so input memory is one read chunk plus one partial line (protocol.md Limits);
- the throttle hold (fakelag): a command over the connection's rate is held, reading
  pauses, and it runs when the host's timer says so;
- the outbox: bytes queued here plus bytes the edge reports still unsent; above the soft
  limit the edge pauses writing (and this pauses reading), past the hard limit the
  connection is dropped as a slow consumer (protocol.md Limits, outbox).

Nothing here knows of asyncio: the `Host` (one per server) gives time-based scheduling and
the shared services, the `Edge` (one per connection) carries out its decisions, the `Sink`
takes its bytes. Unit tests drive a Connection with fakes of all three
(tests/unit/test_connection.py); the asyncio edge is chatd/server.py's
`ConnectionProtocol`, and its transport is the sink.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from chatd.bus import deliver, others_now
from chatd.dispatch import Driver, Outcome, Pending, Throttle
from chatd.errors import FrameTooLarge
from chatd.protocol.decode import ONE_CMD_MIN_CHUNK, one_cmd_per_line
from chatd.protocol.events import SlowConsumer
from chatd.protocol.frames import error_frame
from chatd.protocol.framing import TOO_LARGE, LineSplitter

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.config import Config
    from chatd.dispatch import Dispatcher, Spec
    from chatd.protocol.commands import Command
    from chatd.session import Session
    from chatd.stats import Stats

log = logging.getLogger("chatd")

PAUSE_WRITE = 1  # the client does not read: outbox above the soft limit
PAUSE_BACKLOG = 2  # frames read but not yet run (input memory stays bounded)
PAUSE_THROTTLE = 4  # per-connection command rate spent (fakelag)
PAUSE_STOP = 8  # the server is shutting down: never read again
# The client shut its write side: nothing more to read (reading never resumes), but every
# complete frame already read still runs and is answered, then the connection closes.
PAUSE_EOF = 16
# Pauses that do not stop commands from running (pump goes on through them).
_RUNS_THROUGH = PAUSE_BACKLOG | PAUSE_EOF
_TOO_LARGE_ERR = FrameTooLarge("frame too large; the line was skipped")
SLOW_CONSUMER = SlowConsumer().json_frame()
# Commands of one connection waiting for the store at once. A pipelining client still
# fills a group commit, but one commit's replies and events for it stay well under the
# outbox hard limit (64 x two 4,000-character frames is about 0.5 MiB).
MAX_WAITING = 64
# A connection that has sent this many bad frames is logged once (it is not closed: a bad
# frame never closes a connection, contract "Error codes").
BAD_FRAMES_LOGGED = 100


class Host(Protocol):
    """What every connection shares: the command table, the counters, the limits, and
    scheduling (the server implements it over its event loop; tests over a fake clock)."""

    @property
    def app(self) -> App: ...
    @property
    def config(self) -> Config: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def driver(self) -> Driver: ...
    @property
    def stats(self) -> Stats: ...

    # Connections with bytes queued this turn. The contract, kept inline in `send` (it runs
    # for every reply): the first connection into an empty list calls `schedule_flush`; the
    # host then, at the end of the turn, takes the list whole (a new one in its place),
    # calls `flush` on each and adds what they wrote to ``stats.bytes_out``.
    dirty: list[Connection]

    def schedule_flush(self) -> None:
        """Flush every connection in `dirty` at the end of this loop turn."""

    def soon(self, fn: Callable[[], None]) -> None:
        """Call `fn` on the next loop turn (after other connections had theirs)."""

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Call `fn` once `delay` seconds have passed."""

    def later(self, chore: Callable[[], None]) -> None:
        """Call `fn` within a few turns, in order, a bounded number per turn (the
        clean-up of closed connections, so a mass disconnect does not stall the rest)."""



class Sink(Protocol):
    """Where a connection's bytes go (the asyncio transport itself)."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent."""


class Edge(Protocol):
    """What one connection asks of its socket side."""

    def set_reading(self, on: bool) -> None:
        """Stop or go on reading the client's input."""

    def close(self) -> None:
        """Close after what was written is sent (the connection flushed first)."""

    def drop(self) -> None:
        """Abort at once, with a best-effort ``slow_consumer`` notice ahead of the queue."""


class _Slot(msgspec.Struct, eq=False):
    """A reply position: commands may finish out of order, replies go out in order.
    ``_Slot(overlap)``; a Struct, as Outcome is (one per waiting command)."""

    overlap: bool
    outcome: Outcome | None = None


class Connection:
    """One client's pipeline (see the module docstring). It is the session's Peer:
    ``send`` queues bytes, ``close`` flushes and closes."""

    __slots__ = (
        "bad",
        "barriers",
        "dead",
        "edge",
        "hard",
        "held",
        "host",
        "ip",
        "one_cmd",
        "out",
        "out_bytes",
        "paused",
        "session",
        "sink",
        "slots",
        "splitter",
        "unsent",
        "waiting",
    )

    def __init__(self, host: Host, edge: Edge, sink: Sink, ip: str = "") -> None:
        self.host = host
        self.edge = edge
        self.sink = sink
        self.ip = ip
        self.session: Session | None = None
        self.splitter = LineSplitter(host.config.max_frame)
        # Every frame still in the splitter is from one read chunk that passed
        # one_cmd_per_line (so decode skips its per-frame repeated-"cmd" check).
        self.one_cmd = False
        self.slots: collections.deque[_Slot] | None = None  # made when a command waits
        self.held: tuple[Command, Spec] | None = None
        self.paused = 0  # PAUSE_* bits; reading is on when none is set
        self.out: list[bytes] = []  # emptied by each flush, kept (fan-out appends per turn)
        self.out_bytes = 0
        self.unsent = 0  # bytes the sink took and has not sent yet (as it last said)
        self.hard = host.config.outbox_hard  # read on every send: kept at hand
        self.dead = False
        self.waiting = 0  # commands started and not finished
        self.barriers = 0  # of those, the ones later commands must wait for
        self.bad = 0  # bad frames so far (logged once past BAD_FRAMES_LOGGED)

    def open(self, since: float | None = None) -> Session:
        """Start speaking frames: a session, and the hello. `since`: when the
        unauthenticated idle time started (TLS: at accept, before the handshake)."""
        app = self.host.app
        s = self.session = app.open_session(self, self.ip)
        if since is not None:
            s.unbound_since = since
        self.send(app.hello().json_frame())
        return s

    @property
    def wants_read(self) -> bool:
        return not self.paused and not self.dead

    # --- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.dead:
            return
        size = len(data)
        self.host.stats.bytes_in += size
        # Frames are split out one at a time as pump runs them; while any are left,
        # reading stays paused, so input memory is one read chunk plus one partial line
        # however small the frames are (protocol.md Limits, input memory).
        splitter = self.splitter
        if splitter.buf or splitter.discarding or type(data) is not bytes:
            self.one_cmd = False  # frames may now span two chunks
            splitter.push(data)
        else:
            splitter.buf = data  # push's usual case, inlined (LineSplitter's docstring)
            # (the size test inlined: a one-frame chunk, a ping's, pays no call for it)
            self.one_cmd = size >= ONE_CMD_MIN_CHUNK and one_cmd_per_line(data)
        self.pump()

    def receive_eof(self) -> bool:
        """Half-close (`nc -N`): run every complete frame already read, send every reply,
        then close (pump does, once nothing is left). A partial frame left in the
        splitter is never executed. True: keep the write side open for the replies."""
        if self.dead:
            return False
        if not self.splitter.buffered and not self.waiting and self.held is None:
            # Nothing left to answer (how a client usually goes): close as a chore, so
            # when thousands go at once their sockets close a bounded number per loop
            # turn, not all in the turn that read their EOFs (issue 13, item 2).
            self.paused |= PAUSE_EOF
            self.host.later(self.close)
            return True
        self.paused |= PAUSE_EOF  # the edge stopped reading; never resume it
        self.host.later(self.pump)
        return True

    def gone(self) -> None:
        """The socket is gone: nothing is written to it from now; `lost` follows."""
        self.dead = True

    def lost(self) -> None:
        """The socket is gone. Frames read and not run die with it; free them now, not
        when the session is let go (issue 13, item 3); the session closes as a chore."""
        self.dead = True
        self.splitter.clear()
        self.held = None
        self.out.clear()
        self.out_bytes = 0
        if self.session is not None:
            host = self.host
            host.later(functools.partial(host.app.close_session, self.session))

    def stop(self, notice: bytes) -> None:
        """Server shutdown: nothing read after the notice runs (replies would follow
        ``server.shutdown``); what is already running may still answer."""
        self.pause(PAUSE_STOP)
        self.splitter.clear()
        self.held = None
        self.send(notice)

    def pump(self) -> None:
        """Run buffered frames in order, at most frames_per_batch per turn (fairness)."""
        session = self.session
        if self.dead or session is None:
            return
        host = self.host
        dispatcher = host.dispatcher
        budget = host.config.frames_per_batch
        splitter = self.splitter
        while True:
            held = self.held
            if held is not None:
                cmd, spec = held
            else:
                if not splitter.buf:
                    break  # drained (the usual end: no call to find that out)
                if budget <= 0:
                    self.pause(PAUSE_BACKLOG)
                    host.soon(self._continue)
                    return
                line = splitter.next()
                if line is None:
                    break
                budget -= 1
                if line is TOO_LARGE:
                    host.stats.bad_frames += 1
                    self.bad_frame("frame too large")
                    self.reply(Outcome(error_frame(None, _TOO_LARGE_ERR)))
                    continue
                prepared = dispatcher.prepare(line, self.one_cmd)  # type: ignore[arg-type]  # bytes here
                if type(prepared) is Outcome:
                    self.bad_frame(prepared.reply)
                    self.reply(prepared)
                    continue
                cmd, spec = prepared  # type: ignore[misc]  # the tuple, as checked above
            if self.waiting and (self.barriers or not spec.overlap or self.waiting >= MAX_WAITING):
                self.held = (cmd, spec)  # starts when what is in flight has finished
                self.pause(PAUSE_BACKLOG)
                return
            if held is not None:
                self.held = None
            result = dispatcher.execute(session, cmd, spec)
            kind = type(result)
            if kind is Outcome:
                if self.slots:
                    self.reply(result)  # type: ignore[arg-type]
                else:
                    self.deliver(result)  # type: ignore[arg-type]
            elif kind is Pending:
                pending: Pending = result  # type: ignore[assignment]  # (tested above)
                slot = _Slot(pending.overlap)
                slots = self.slots
                if slots is None:
                    slots = self.slots = collections.deque()
                slots.append(slot)
                self.waiting += 1
                if not pending.overlap:
                    self.barriers += 1
                host.driver.start(pending, self.finished, slot)
            else:
                assert isinstance(result, Throttle)
                self.held = (cmd, spec)
                self.pause(PAUSE_THROTTLE)
                host.after(result.delay, self._unthrottle)
                return
            if self.dead:
                return
        if self.paused:
            self.resume(PAUSE_BACKLOG)
            if self.paused & PAUSE_EOF and not self.waiting:
                # Every complete frame ran and every reply is queued. With several nodes
                # the events of its own commands come back through the change stream:
                # close once this node has applied it (bounded), so they are sent too.
                wait = host.app.bus.caught_up()
                if wait is None:
                    self.close()
                else:
                    host.app.scheduler.spawn(self._close_after(wait))

    async def _close_after(self, wait: Awaitable[None]) -> None:
        await wait
        self.close()

    def _continue(self) -> None:
        if self.paused == PAUSE_BACKLOG:
            self.paused = 0
            if not self.dead:
                self.edge.set_reading(True)
        self.pump()

    def _unthrottle(self) -> None:
        self.resume(PAUSE_THROTTLE)

    def bad_frame(self, what: bytes | str) -> None:
        """Count a bad frame; log the connection once when it passes the threshold."""
        self.bad += 1
        if self.bad == BAD_FRAMES_LOGGED:
            user = self.session.user if self.session is not None else None
            text = what.decode("utf-8", "replace").strip() if isinstance(what, bytes) else what
            log.warning(
                "connection from %s (user %s) has sent %d bad frames; the last got %s",
                self.ip, user or "-", self.bad, text[:200],
                extra={"event": "bad_frames", "ip": self.ip, "user": user, "count": self.bad},
            )  # fmt: skip

    # --- reading on and off ----------------------------------------------------------

    def pause(self, flag: int) -> None:
        if not self.paused and not self.dead:
            self.edge.set_reading(False)
        self.paused |= flag

    def resume(self, flag: int) -> None:
        if not self.paused & flag:
            return
        self.paused &= ~flag
        if not self.paused and not self.dead:
            self.edge.set_reading(True)
        # A backlog is pump's own business: with only that left, pump picks up the held
        # command (a throttled one behind a finished send would otherwise wait forever).
        if flag != PAUSE_BACKLOG and not self.paused & ~_RUNS_THROUGH:
            self.pump()

    def write_paused(self, on: bool) -> None:
        """The edge's buffer crossed the soft limit (on) or fell below low water (off)."""
        if on:
            self.pause(PAUSE_WRITE)
        else:
            self.resume(PAUSE_WRITE)

    # --- replies, in order -----------------------------------------------------------

    def reply(self, outcome: Outcome) -> None:
        if self.slots:
            slot = _Slot(False)
            slot.outcome = self._others_now(outcome)
            self.slots.append(slot)
        else:
            self.deliver(outcome)

    # --- delivery: the one place the pipeline hands an outcome's events and closes to
    # the Bus (chatd.bus), which resolves their audiences --------------------------------

    def _others_now(self, outcome: Outcome) -> Outcome:
        """Deliver a finished command's events and closes to the other connections at
        once, so every connection sees changes in commit (revision) order; keep this
        connection's own share to follow its reply, which waits for the replies before it."""
        if outcome.events or outcome.closes:
            others_now(self.host.app.bus, outcome, self.session)
        return outcome

    def deliver(self, outcome: Outcome) -> None:
        """The reply, then the events and closes it caused. The reply is queued first, so
        the caller's own copies may go with everyone else's, in one pass per event (the
        fan-out loop then has nobody to skip)."""
        self.send(outcome.reply)
        if outcome.events or outcome.closes:
            deliver(self.host.app.bus, outcome)

    def finished(self, slot: _Slot, outcome: Outcome) -> None:
        """A waiting command is done (called by the command driver)."""
        slots: collections.deque[_Slot] = self.slots  # type: ignore[assignment]  # slot's
        self.waiting -= 1
        if not slot.overlap:
            self.barriers -= 1
        if slots[0] is slot:  # the first in line (the usual case): its reply goes now
            slots.popleft()
            self.deliver(outcome)
        else:
            slot.outcome = self._others_now(outcome)
        while slots and slots[0].outcome is not None:
            self.deliver(slots.popleft().outcome)  # type: ignore[arg-type]  # (tested)
        if not slots:
            self.slots = None  # most connections wait for nothing most of the time
        if self.paused & PAUSE_THROTTLE:
            return  # its timer resumes pump
        if (self.held is not None or self.splitter.buf or self.paused & PAUSE_EOF) and (
            not slots or self.waiting < MAX_WAITING
        ):
            self.pump()

    # --- output ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes; flushed once per loop turn. Never waits: past the hard limit the
        connection is dropped (protocol.md Limits, outbox hard limit)."""
        if self.dead:
            return
        out = self.out
        if not out:
            dirty = self.host.dirty  # Host.want_flush, inlined (see Host.dirty)
            if not dirty:
                self.host.schedule_flush()
            dirty.append(self)
        out.append(data)
        queued = self.out_bytes = self.out_bytes + len(data)
        if queued + self.unsent > self.hard:
            # A burst within one loop turn (a group commit fanning out many messages) is
            # not a slow consumer: hand it to the sink first, judge what is left after.
            self.host.stats.bytes_out += self.flush()
            if self.unsent > self.hard:
                self.host.stats.slow_consumers += 1
                self.drop_slow()

    def flush(self) -> int:
        """Write everything queued to the sink, as one write, and note what the sink
        has still not sent (the outbox's other half). Returns the bytes written, for
        the caller to add to ``stats.bytes_out`` (the host's flush of a turn adds them
        up and counts once)."""
        out = self.out
        if not out or self.dead:
            return 0
        sink = self.sink
        sink.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        written = self.out_bytes
        self.out_bytes = 0
        self.unsent = sink.get_write_buffer_size()
        return written

    def close(self) -> None:
        """Flush what is queued, then close (the Peer interface)."""
        if self.dead:
            return
        self.host.stats.bytes_out += self.flush()
        self.dead = True
        self.edge.close()

    def drop_slow(self, why: str = "slow consumer", reason: str = "slow_consumer") -> None:
        """Best effort slow_consumer, then abort: never wait for a client that does not read."""
        if self.dead:
            return
        self.dead = True
        queued = self.out_bytes + self.unsent
        self.out.clear()
        self.out_bytes = 0
        user = self.session.user if self.session is not None else None
        log.warning(
            "closed connection from %s (user %s): %s, %d bytes queued",
            self.ip, user or "-", why, queued,
            extra={"event": "connection_closed", "reason": reason,
                   "ip": self.ip, "user": user, "queued": queued},
        )  # fmt: skip
        self.edge.drop()
