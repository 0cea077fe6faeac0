"""The asyncio edge: listening, admission, TLS, one Protocol adapter per connection around
the sans-I/O pipeline (chatd.connection), sweeps for idle and stuck connections, and
ordered shutdown.

A frame's path: ConnectionProtocol.data_received → Connection.receive_data (split, run
through Dispatcher.prepare/execute, replies in order into its outbox) → one flush per loop
turn (ChatServer.flush_all: many frames, one write). ARCHITECTURE.md draws it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import heapq
import itertools
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from chatd.app import VERSION, App
from chatd.auth import PasswordHasher, TokenService
from chatd.clock import Clock, SystemClock
from chatd.config import Config, redis_address
from chatd.connection import SLOW_CONSUMER, Connection
from chatd.dispatch import Dispatcher, Driver, command_table
from chatd.errors import RateLimited, StorageFailed, Unauthorized
from chatd.protocol.events import ServerShutdown
from chatd.protocol.frames import error_frame
from chatd.session import Cancellable, Session
from chatd.stats import Stats
from chatd.store.base import Store
from chatd.tls import server_context

log = logging.getLogger("chatd")

_LOOPBACK = ("127.0.0.1", "::1")
# Chores done per loop turn for connections that closed or sent EOF (leaving rooms,
# running what is left, closing): when thousands drop at once, everyone else is served
# between the batches (issue 13, item 2). A closed connection already takes no input and
# sends no output, so its cleanup can wait a few turns. Counted, not timed: a close chore
# is cheap in Python, but the socket close it starts costs uvloop several µs on the next
# turn (a 4 ms slice closed 3,600 sockets at once and made that turn 35 ms).
_CHORES_PER_TURN = 256


class ConnectionProtocol(asyncio.Protocol):
    """The asyncio side of one connection, a thin adapter around the sans-I/O pipeline
    (chatd.connection.Connection, ``pipe``): it admits the client, feeds the pipeline what
    the transport reads, gives it the transport as its `Sink` (the pipeline writes there
    once per loop turn, when ChatServer.flush_all flushes it), and carries out its
    decisions: reading on and off, close, drop. It is the pipeline's `Edge`."""

    __slots__ = ("accepted", "counted", "ip", "pipe", "srv", "transport")

    def __init__(self, srv: ChatServer) -> None:
        self.srv = srv
        self.transport: asyncio.Transport | None = None
        self.pipe: Connection | None = None  # made when the connection speaks frames
        self.ip = ""
        self.counted = False  # holds a per-IP slot (admitted)
        self.accepted: float | None = None  # TLS: when accepted (the idle clock's start)

    # --- lifecycle -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # uvloop's transport is not a subclass
        if self.counted:
            # TLS: admitted at accept (ChatServer.accept_tls), and its handshake is done.
            self.opened(t, self.accepted)
            return
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) else ""
        refusal = self.srv.admit(self.ip)
        if refusal is not None:
            t.write(error_frame(None, refusal))
            t.close()
            return
        self.counted = True
        self.opened(t)

    def opened(self, t: asyncio.Transport, accepted: float | None = None) -> None:
        """The connection speaks frames now (at once, or after its TLS handshake; then
        its unauthenticated idle time counts from `accepted`)."""
        srv = self.srv
        self.transport = t
        c = srv.config
        t.set_write_buffer_limits(high=c.outbox_soft, low=c.outbox_low)
        pipe = self.pipe = Connection(srv, self, t, self.ip)
        srv.connections[self] = None
        session = pipe.open(accepted)
        srv.watch_idle(session)

    def connection_lost(self, exc: Exception | None) -> None:
        # Reset at once, thousands of connections are lost in one loop turn: here only
        # nothing more is written to it; the rest is a chore (issue 13, item 2).
        pipe = self.pipe
        if pipe is not None:
            pipe.gone()
        self.srv.later(self.forget)

    def forget(self) -> None:
        """The closed connection's clean-up: its slots, then its session (a chore)."""
        srv = self.srv
        srv.connections.pop(self, None)
        srv.stalled.pop(self, None)
        self.release()
        if self.pipe is not None:
            self.pipe.lost()

    def release(self) -> None:
        """Give back the per-IP slot (once; a refused connection never took one)."""
        if self.counted:
            self.counted = False
            self.srv.forget_ip(self.ip)

    @property
    def dead(self) -> bool:
        return self.pipe is None or self.pipe.dead

    # --- from the transport ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        if pipe is not None:
            pipe.receive_data(data)

    def eof_received(self) -> bool | None:
        if self.pipe is None:
            return None
        keep_open = self.pipe.receive_eof()
        # Over TLS the transport closes itself after an EOF whatever this returns (True
        # only earns a warning per connection); the close chore then finds it closed.
        return True if keep_open and self.srv.tls is None else None

    def pause_writing(self) -> None:
        t = self.transport
        # The stuck-writer sweep watches it from now (protocol.md Limits, --write-deadline).
        self.srv.stalled[self] = [t.get_write_buffer_size() if t else 0, time.monotonic()]
        if self.pipe is not None:
            self.pipe.write_paused(True)

    def resume_writing(self) -> None:
        self.srv.stalled.pop(self, None)
        if self.pipe is not None:
            self.pipe.write_paused(False)

    # --- the pipeline's Edge ---------------------------------------------------------

    def set_reading(self, on: bool) -> None:
        t = self.transport
        if t is not None:
            if on:
                t.resume_reading()
            else:
                t.pause_reading()

    def close(self) -> None:
        t = self.transport
        if t is None:
            return
        t.close()
        if t.get_write_buffer_size():
            # close() waits for the buffer to drain; a peer that never reads must not pin it.
            self.srv.abort_later(t)

    def drop(self) -> None:
        t = self.transport
        if t is None:
            return
        # The notice goes straight to the socket, ahead of what is queued. Never under
        # TLS: plain bytes there would be written past the TLS layer into the record
        # stream; the notice is best effort (contract), so it is skipped.
        sock = t.get_extra_info("socket") if self.srv.tls is None else None
        try:
            # "\n" first: it ends whatever partial line the kernel already holds.
            if sock is not None:
                os.write(sock.fileno(), b"\n" + SLOW_CONSUMER)
        except OSError:
            pass
        t.abort()


class _ClockTimer:
    """A core timer on an injected clock (ChatServer.call_later under a FakeClock)."""

    __slots__ = ("cancelled", "fn", "seq", "when")

    def __init__(self, when: float, seq: int, fn: Callable[[], None]) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def __lt__(self, other: _ClockTimer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class ChatServer:
    """Owns the listening socket, every connection and every background task."""

    def __init__(
        self,
        config: Config,
        store: Store,
        secret: str,
        *,
        clock: Clock | None = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.hasher = hasher or PasswordHasher(
            memory_kib=config.argon2_memory_kib,
            time_cost=config.argon2_time_cost,
            parallelism=config.argon2_parallelism,
            queue=config.hash_queue,
            register_queue=config.register_hash_queue,
        )
        tokens = TokenService(
            secret, self.clock, max_bytes=config.max_token_bytes, iat_leeway=config.iat_leeway
        )
        self.stats = Stats()
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = server_context(config.tls_cert, config.tls_key)  # TLSSetupError
            self.stats.tls = True
        self.app = App(
            config, self.clock, store, tokens, self.hasher, self, self.stats,
            closing=lambda: bool(self.chores),
        )  # fmt: skip
        shared_budgets = getattr(store, "shared_budgets", None)  # several nodes (Redis)
        if shared_budgets is not None:
            self.app.limits.share(shared_budgets())
        self.dispatcher = Dispatcher(self.app, command_table())
        self.connections: dict[ConnectionProtocol, None] = {}
        # TLS: connections admitted and still shaking hands, with their handshake tasks;
        # the listening sockets and their accept loops.
        self.handshakes: dict[ConnectionProtocol, asyncio.Task[None]] = {}
        self.listeners: list[socket.socket] = []
        self.acceptors: list[asyncio.Task[None]] = []
        self.metrics: Any = None  # the Prometheus endpoint (chatd.metrics), when on
        self.cluster: Any = None  # chatd.cluster.Cluster, with the Redis store
        self._refusal_log = _LogGate()
        # Connections whose writes are paused: [unsent bytes, since when] (the stuck-writer
        # sweep), here rather than two fields on every connection.
        self.stalled: dict[ConnectionProtocol, list[float]] = {}
        self.dirty: list[Connection] = []  # flushed at the end of the turn (Host.dirty)
        self.chores: collections.deque[Callable[[], None]] = collections.deque()
        self._chores_scheduled = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.driver = Driver(self.loop.call_soon)
        self.commands = self.driver.running  # shutdown waits for these
        self.per_ip: dict[str, int] = {}
        self.ip_new: dict[str, collections.deque[float]] = {}
        # (deadline, tiebreak, session, unbound_since): a heap, since a logout's deadline
        # can be earlier than one queued before it.
        self.idle: list[tuple[float, int, Session, float]] = []
        self._idle_seq = itertools.count()
        # The core's timers on an injected clock (chatd.clock.FakeClock in tests), due when
        # `run_due` sees them; None under the system clock: then loop.call_later, as ever.
        self._timers: list[_ClockTimer] | None = (
            None if isinstance(self.clock, SystemClock) else []
        )
        self.server: asyncio.AbstractServer | None = None
        self.max_connections = config.max_connections
        self.stopping = False
        self._pruning = False
        self.port = 0

    # --- Scheduler (for the core) ----------------------------------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> Cancellable:
        if self._timers is None or delay <= 0:
            return self.loop.call_later(delay, fn)  # a TimerHandle is already Cancellable
        timer = _ClockTimer(self.clock.now() + delay, next(self._idle_seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def run_due(self) -> None:
        """Under an injected clock (tests): run the timers and idle deadlines that are due
        at its `now`, in deadline order. A test calls it after moving its FakeClock, instead
        of waiting real seconds; with the system clock there is nothing to run here."""
        timers = self._timers
        if timers is None:
            return
        now = self.clock.now()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.fn()
        self.sweep_idle(now)

    # --- Host (for the connections) --------------------------------------------------

    def soon(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon(fn)

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.loop.call_later(delay, fn)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- output batching -------------------------------------------------------------

    def schedule_flush(self) -> None:
        self.loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        dirty = self.dirty
        self.dirty = []
        written = 0
        for conn in dirty:
            written += conn.flush()
        self.stats.bytes_out += written

    # --- closed connections ----------------------------------------------------------

    def later(self, chore: Callable[[], None]) -> None:
        """Run a closing connection's chore within a few loop turns, in order, at most
        _CHORES_PER_TURN per turn."""
        self.chores.append(chore)
        if not self._chores_scheduled:
            self._chores_scheduled = True
            self.loop.call_soon(self._run_chores)

    def _run_chores(self) -> None:
        chores = self.chores
        for _ in range(min(len(chores), _CHORES_PER_TURN)):
            chore = chores.popleft()
            try:
                chore()
            except Exception:  # one connection's cleanup must not stop the others'
                log.exception("closing a connection failed")
        if chores:
            self.loop.call_soon(self._run_chores)
        else:
            self._chores_scheduled = False

    # --- admission -------------------------------------------------------------------

    def admit(self, ip: str) -> RateLimited | None:
        """The refusal for a new connection from `ip`, or None (then it holds a per-IP
        slot until ``forget_ip``). Counted and logged by reason."""
        reason, refusal = self._admission(ip)
        if refusal is not None:
            self.stats.refuse(reason)
            self._refusal_log.log(
                (reason, ip), logging.WARNING,
                "refused connection from %s: %s", ip, refusal.message,
                event="connection_refused", reason=reason, ip=ip,
            )  # fmt: skip
        return refusal

    def _admission(self, ip: str) -> tuple[str, RateLimited | None]:
        c = self.config
        if self.stopping:
            return "shutting_down", RateLimited("the server is shutting down", 5.0)
        if len(self.connections) + len(self.handshakes) >= self.max_connections:
            return "full", RateLimited("the server is full; try again later", 5.0)
        if c.per_ip_connections and ip not in _LOOPBACK:
            if self.per_ip.get(ip, 0) >= c.per_ip_connections:
                return "per_ip", RateLimited("too many connections from your address", 5.0)
            now = time.monotonic()
            recent = self.ip_new.setdefault(ip, collections.deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= c.per_ip_new_per_minute:
                return "per_ip_rate", RateLimited(
                    "connecting too often from your address", 60 - (now - recent[0])
                )
            recent.append(now)
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return "", None

    # --- TLS -------------------------------------------------------------------------

    async def accept_tls(self, listener: socket.socket) -> None:
        """The accept loop of a TLS listener. Each connection is admitted (per-IP and
        connection limits) before its handshake costs anything, then shakes hands in a
        task of its own, bounded by the handshake timeout.

        Not create_server(ssl=…): its protocol learns the peer only after the handshake.
        Not start_tls on an accepted transport: uvloop loses the ClientHello if it came
        before the upgrade (MagicStack/uvloop#707), and the handshake hangs."""
        loop = self.loop
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: pause accepting (protocol.md Limits), as
                    # asyncio's own accept loop does, until some are freed.
                    self._refusal_log.log(
                        ("accept", exc.errno), logging.ERROR,
                        "cannot accept connections: %s; pausing 1 s", exc.strerror,
                        event="accept_failed", error=exc.strerror,
                    )  # fmt: skip
                    await asyncio.sleep(1.0)
                elif exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    return  # the listener itself is gone
                continue  # ECONNABORTED and friends: that one client is gone
            ip = addr[0] if isinstance(addr, tuple) else ""
            refusal = self.admit(ip)
            if refusal is not None:
                sock.close()  # not worth a handshake: the connection just closes
                continue
            conn = ConnectionProtocol(self)
            conn.ip = ip
            conn.counted = True
            conn.accepted = self.clock.now()
            self.stats.handshaking += 1
            self.handshakes[conn] = loop.create_task(self._handshake(conn, sock))

    async def _handshake(self, conn: ConnectionProtocol, sock: socket.socket) -> None:
        c = self.config
        opened = False
        try:
            await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=self.tls,
                # Within the idle timeout too: an unauthenticated connection gets no more.
                ssl_handshake_timeout=max(0.1, min(c.tls_handshake_timeout, c.idle_timeout)),
            )  # fmt: skip
            opened = True
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self.stats.tls_failures += 1
            reason = _tls_reason(exc)
            self._refusal_log.log(
                ("tls", conn.ip), logging.INFO,
                "TLS handshake from %s failed: %s", conn.ip, reason,
                event="tls_failed", ip=conn.ip, error=reason,
            )  # fmt: skip
        except Exception:  # a bug, not a client: say so, and the connection is gone
            self.stats.tls_failures += 1
            log.exception("TLS handshake from %s failed unexpectedly", conn.ip)
        finally:
            # Failed, timed out or cancelled (shutdown): the loop closed the socket; the
            # slot is given back here, as connection_lost never comes.
            self.handshakes.pop(conn, None)
            self.stats.handshaking -= 1
            if not opened:
                conn.release()

    def forget_ip(self, ip: str) -> None:
        n = self.per_ip.get(ip)
        if n is not None:
            if n <= 1:
                del self.per_ip[ip]
            else:
                self.per_ip[ip] = n - 1

    def tune_socket(self, sock: Any) -> None:
        c = self.config
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, c.keepalive_idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, c.keepalive_interval)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, c.keepalive_count)
        except OSError:
            pass

    def watch_idle(self, s: Session) -> None:
        self._idle_at(s.unbound_since + self.config.idle_timeout, s, s.unbound_since)

    def _idle_at(self, deadline: float, s: Session, since: float) -> None:
        heapq.heappush(self.idle, (deadline, next(self._idle_seq), s, since))

    # --- sweeps ----------------------------------------------------------------------

    def sweep_idle(self, now: float) -> None:
        """Close the connections not logged in within the idle timeout by `now`."""
        idle = self.idle
        while idle and idle[0][0] <= now:
            _, _, s, since = heapq.heappop(idle)
            if s.closed:
                continue
            if s.user_key is None and s.unbound_since == since:
                self.stats.idle_closed += 1
                self._refusal_log.log(
                    ("idle", s.ip), logging.INFO,
                    "closed connection from %s: not logged in within %g s", s.ip,
                    self.config.idle_timeout,
                    event="connection_closed", reason="idle", ip=s.ip,
                )  # fmt: skip
                s.send(error_frame(None, Unauthorized("not logged in in time; closing")))
                s.peer.close()
            elif s.user_key is None:
                self.watch_idle(s)
            else:
                # Bound now, but logout or expiry may unbind it later (protocol.md Limits: "or of
                # being unbound"): look again, so it is not forgotten.
                self._idle_at(now + max(self.config.idle_timeout, 1.0), s, -1.0)

    def sweep(self) -> None:
        """Once a second: unauthenticated idle connections, stuck writers, a sample of
        the counters for the rates."""
        self.stats.sample()
        self.sweep_idle(self.clock.now())
        mono = time.monotonic()
        for conn, stall in list(self.stalled.items()):
            t = conn.transport
            if t is None or conn.pipe is None or conn.pipe.dead:
                self.stalled.pop(conn, None)
                continue
            size = t.get_write_buffer_size()
            if size < stall[0]:
                stall[0], stall[1] = size, mono
            elif mono - stall[1] > self.config.write_deadline:
                self.stalled.pop(conn, None)
                self.stats.stuck_writers += 1
                conn.pipe.drop_slow(
                    f"stuck writer (no progress for {self.config.write_deadline:g} s)",
                    "stuck_writer",
                )

    async def _every(self, seconds: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except StorageFailed:
                pass  # the server is stopping, and says why once (cli: "stopping: ...")
            except Exception:
                if not self.stopping:
                    log.exception("periodic task failed")

    async def _poll_users(self) -> None:
        version = await self.store.users_version()
        if version != self.app.users_version:
            version, users = await self.store.reload_users()
            self.app.apply_users(version, users)

    async def _purge(self) -> None:
        now = int(self.clock.now())
        # Expired revocations, lapsed holds, refilled send buckets (each owner its own).
        self.app.purge(now)
        mono = time.monotonic()
        self.ip_new = {ip: d for ip, d in self.ip_new.items() if d and mono - d[-1] <= 60}
        await self.store.purge_expired(now)

    async def prune_history(self) -> int:
        """Retention (--history-days, --history-max; off when both are 0): one pass, in
        small writes through the writer. Returns how many messages left history."""
        c = self.config
        if not (c.history_days > 0 or c.history_max > 0) or self._pruning:
            return 0
        self._pruning = True  # a slow pass is not overtaken by the next tick
        try:
            n = await self.store.prune(
                self.clock.now(), c.history_days * 86400.0, c.history_max, c.prune_batch
            )
        finally:
            self._pruning = False
        if n:
            log.info("retention: %d messages removed from history", n)
        return n

    # --- start and stop --------------------------------------------------------------

    async def start(self) -> None:
        clustered = _redis_url(self.store) is not None
        if clustered:
            # Ephemeral rooms may have members on other nodes: the cluster decides.
            self.store.drop_ephemeral = False  # type: ignore[attr-defined]
        snap = await self.loop.run_in_executor(None, self.store.open)
        self.app.load(snap)
        if clustered:
            from chatd.cluster import Cluster

            self.cluster = Cluster(
                self.app, cast(Any, self.store), self.end_connections, self.config.node_ttl
            )
            try:
                await self.cluster.start()
            except BaseException:
                await self.store.close()
                raise
        self.max_connections = min(self.config.max_connections, _raise_nofile() - 64)
        sockets: list[Any] = []
        try:
            if self.tls is not None:
                self.listeners = sockets = _listen(self.config.host, self.config.port, 4096)
            else:
                server = await self.loop.create_server(
                    lambda: ConnectionProtocol(self),
                    self.config.host,
                    self.config.port,
                    reuse_address=True,
                    backlog=4096,
                )
                self.server = server
                sockets = list(server.sockets)
        except BaseException:
            await self.store.close()  # and its lock: the database is free again
            raise
        for sock in sockets:
            # Accepted sockets inherit these from the listener (Linux), so each new
            # connection costs no setsockopt calls of its own.
            self.tune_socket(sock)
        addr = sockets[0].getsockname()
        self.port = addr[1]
        for listener in self.listeners:
            self.acceptors.append(self.loop.create_task(self.accept_tls(listener)))
        self.spawn(self._every(1.0, self.sweep))
        self.spawn(self._every(self.config.db_poll_interval, self._poll_users))
        if self.app.limits.shared is not None:
            self.spawn(self._every(self.config.limits_sync, self.app.limits.settle))
        self.spawn(self._every(60.0, self._purge))
        if self.config.history_days > 0 or self.config.history_max > 0:
            self.spawn(self.prune_history())  # once at start, then periodically
            self.spawn(self._every(self.config.prune_interval, self.prune_history))
        if self.config.metrics_port is not None:
            from chatd.metrics import MetricsServer

            try:
                self.metrics = MetricsServer(
                    self.config.metrics_host, self.config.metrics_port, self.loop,
                    self.stats_report,
                )  # fmt: skip
            except BaseException:
                await self._stop_listening()
                await self.store.close()
                raise
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        settings = self.settings()
        log.info(
            "chatd listening on %s:%d (%s)", host, self.port,
            ", ".join(f"{k} {v}" for k, v in settings.items()),
            extra={"event": "start", "host": addr[0], "port": self.port, **settings},
        )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """What an operator wants to see in the start line."""
        c = self.config
        m = self.metrics
        url = _redis_url(self.store)
        store = {"redis": redis_address(url)} if url is not None else {"db": c.db}
        return {
            "version": VERSION,
            "tls": "on" if self.tls is not None else "off",
            **store,
            "guests": "on" if c.guests else "off",
            "max_connections": self.max_connections,
            "per_ip_connections": c.per_ip_connections,
            "idle_timeout": c.idle_timeout,
            "rate_limit": c.rate_limit,
            "token_ttl": c.token_ttl,
            "metrics": f"http://{m.host}:{m.port}/metrics" if m is not None else "off",
        }

    def end_connections(self, reason: str) -> None:
        """End every client connection with `server.shutdown` (the node keeps running:
        clients reconnect and sync; chatd/cluster.py, after a Redis outage)."""
        for conn in self._notify_shutdown(reason):
            conn.close()

    def _notify_shutdown(self, reason: str) -> list[Any]:
        """`server.shutdown` to every connection (one frame for all), flushed; the
        connections it went to."""
        frame = ServerShutdown(reason=reason).json_frame()
        conns = list(self.connections)
        for conn in conns:
            if conn.pipe is not None:
                conn.pipe.stop(frame)
        self.flush_all()
        return conns

    async def stats_report(self) -> dict[str, Any]:
        """The `stats` figures (for the metrics endpoint; the command builds the same)."""
        return self.stats.report(self.app, await self.store.count_messages())

    async def stop(self, reason: str = "shutting down") -> None:
        """Stop accepting, tell everyone, commit what is queued, give writers a grace
        period, then abort whatever is left (protocol.md Limits, shutdown)."""
        if self.stopping:
            return
        self.stopping = True
        began = time.monotonic()
        open_at_stop = len(self.connections)
        log.info("chatd stopping (%s): %d connections open", reason, open_at_stop,
                 extra={"event": "stopping", "reason": reason, "connections": open_at_stop})
        await self._stop_listening()
        shaking = list(self.handshakes.values())
        for task in shaking:
            task.cancel()  # a half-done TLS handshake gets no notice, just the close
        if shaking:
            await asyncio.wait(shaking, timeout=self.config.shutdown_grace)
        self._notify_shutdown(reason)
        # Commands already running (a send waiting for its commit) get to finish.
        deadline = time.monotonic() + self.config.shutdown_grace / 2
        while self.commands and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.app.suspend_holds()  # queued before the store closes: their writes land
        for t in list(self.tasks):
            t.cancel()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.store.close()
        if self.app.limits.shared is not None:
            await self.app.limits.shared.close()
        self.flush_all()
        deadline = time.monotonic() + self.config.shutdown_grace
        for conn in list(self.connections):
            if conn.transport is not None and conn.pipe is not None and not conn.pipe.dead:
                conn.pipe.dead = True
                conn.transport.close()
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.hasher.close()
        if self.metrics is not None:
            await self.loop.run_in_executor(None, self.metrics.close)
        st = self.stats
        log.info(
            "chatd stopped in %.1f s after %.0f s up: %d commands, %d messages posted, "
            "rev %d", time.monotonic() - began, time.monotonic() - st.started, st.commands,
            st.messages, self.store.rev,
            extra={"event": "stopped", "uptime": round(time.monotonic() - st.started, 3),
                   "commands": st.commands, "messages": st.messages},
        )  # fmt: skip

    async def _stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.acceptors:
            task.cancel()
        await asyncio.gather(*self.acceptors, return_exceptions=True)
        self.acceptors.clear()
        for listener in self.listeners:  # after their accept loops let go of them
            listener.close()
        self.listeners.clear()

    def abort_later(self, transport: asyncio.Transport) -> None:
        # close() waits for the buffer to drain; a peer that never reads must not pin it.
        self.loop.call_later(self.config.shutdown_grace, transport.abort)


def _redis_url(store: Store) -> str | None:
    """The Redis store's URL, None for another store: the one test of "is it Redis" (the
    store, not the config: a test may hand a server a Redis store of its own)."""
    if type(store).__module__.startswith("chatd.store.redis"):
        return cast(str, store.url)  # type: ignore[attr-defined]
    return None


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address of `host`, as loop.create_server makes them
    (SO_REUSEADDR; IPv6 sockets IPv6-only, so 0.0.0.0 and :: can share a port)."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


class _LogGate:
    """Log lines about connections that may come in floods (refusals, failed handshakes,
    idle closes): at most one line a second per key; the lines held back are counted
    and the next line for that key says how many."""

    __slots__ = ("last",)
    PERIOD = 1.0
    MAX_KEYS = 4096

    def __init__(self) -> None:
        self.last: dict[Any, list[float]] = {}  # key -> [time of last line, held back]

    def log(self, key: Any, level: int, msg: str, *args: Any, **extra: Any) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        seen = self.last.get(key)
        if seen is not None and now - seen[0] < self.PERIOD:
            seen[1] += 1
            return
        held = int(seen[1]) if seen is not None else 0
        if len(self.last) >= self.MAX_KEYS:
            self.last = {k: v for k, v in self.last.items() if now - v[0] < self.PERIOD}
        self.last[key] = [now, 0]
        if held:
            msg += " (and %d more like it in the last second)"
            args = (*args, held)
        log.log(level, msg, *args, extra={**extra, "held_back": held})


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft

