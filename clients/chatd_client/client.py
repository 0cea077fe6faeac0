
"""The asyncio client: one awaitable method per command, events as an async iterator,
and a reconnect loop that recovers what was missed (wire contract, "Revisions").

Shape (STYLE 11):
- a ``_Link`` is one TCP connection: a reader task, a pending map of request id -> future.
  When it dies every pending future fails at once with ``ConnectionLost``.
- the ``Client`` owns the current link, a supervisor task that notices the link dying and
  reconnects with an injectable backoff, and the event subscriptions.
- after reconnecting it re-authenticates, re-joins its rooms and runs ``sync`` from the
  highest revision it has seen; live message events that arrive meanwhile are held back and
  merged with the sync pages, so the application sees every change once, in revision order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import random
import ssl as _ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from chatd.protocol import commands as c
from chatd.protocol.framing import TOO_LARGE, LineSplitter
from chatd.protocol.models import Message, RoomInfo
from chatd_client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    RequestTimeout,
    ServerError,
    SessionEnded,
    TokenExpired,
    Unauthorized,
    error_from_wire,
)
from chatd_client.types import (
    DISCONNECTED,
    EPOCH_CHANGED,
    EVENTS_DROPPED,
    MESSAGE_EVENTS,
    RECONNECTED,
    REJOIN_FAILED,
    AuthResult,
    Channel,
    CommandHelp,
    Event,
    Hello,
    HistoryPage,
    JoinResult,
    LoginResult,
    Members,
    RefreshResult,
    SyncPage,
)

log = logging.getLogger("chatd_client")
T = TypeVar("T")
# data: {"code", "message"}: the server refused the session; the client closes itself next
# (its calls and event iteration raise SessionEnded).
AUTH_FAILED = "auth.failed"


# --- options and backoff ------------------------------------------------------------------


Backoff = Callable[[int], Awaitable[None]]
"""Waits before reconnect attempt ``n`` (1, 2, …). Injectable: tests gate it on an event."""


class ExponentialBackoff:
    """``base * factor**(n-1)`` capped at ``cap``, minus up to ``jitter`` of itself at random
    so that many clients dropped together do not come back in lockstep.

    The default cap is 0.8 s, so a client tries again within 0.8 s of the server being back
    however long the outage was (issue 12): a refused connect to a local port costs the
    server nothing, and the jitter still spreads a crowd over 0.4-0.8 s."""

    def __init__(
        self,
        base: float = 0.1,
        factor: float = 2.0,
        cap: float = 0.8,
        jitter: float = 0.5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base, self.factor, self.cap, self.jitter, self.rng = base, factor, cap, jitter, rng

    def delay(self, attempt: int) -> float:
        d = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        return d * (1.0 - self.jitter * self.rng())

    async def __call__(self, attempt: int) -> None:
        await asyncio.sleep(self.delay(attempt))


@dataclass(frozen=True)
class Options:
    """Limits and timings, each with a default that says why."""

    # Every request has one; a reply slower than this is as good as lost for a chat UI.
    request_timeout: float = 10.0
    # How long ``send`` waits for a connection during an outage, then for its reply, before
    # ``RequestTimeout`` (``close()`` ends the wait sooner). Well above 3x the backoff's cap
    # (0.8 s), so a server restart never loses a typed message. None: until close().
    send_timeout: float | None = 30.0
    connect_timeout: float = 5.0
    reconnect: bool = True
    # A ping every 30 s with 10 s to answer notices a dead peer long before TCP keepalive.
    ping_interval: float | None = 30.0
    ping_timeout: float = 10.0
    # Events buffered per subscription before the oldest are dropped (and reported).
    max_events: int = 10_000
    # History and sync pages may be up to 512 KiB (server's history_page_bytes).
    max_frame: int = 8 * 1024 * 1024
    read_chunk: int = 64 * 1024


# --- wire frames --------------------------------------------------------------------------


class _Frame(msgspec.Struct):
    type: str
    id: int | str | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")
    event: str = ""
    code: str = ""
    message: str = ""
    retry_after: float | None = None


class _MessageReply(msgspec.Struct, frozen=True):
    message: Message


class _RoomReply(msgspec.Struct, frozen=True):
    room: RoomInfo


class _RoomsReply(msgspec.Struct, frozen=True):
    rooms: list[RoomInfo]
    more: bool = False
    next: str | None = None


class _ChannelsReply(msgspec.Struct, frozen=True):
    channels: list[Channel]
    more: bool = False
    next: str | None = None


class _HelpReply(msgspec.Struct, frozen=True):
    commands: list[CommandHelp]


class _Empty(msgspec.Struct, frozen=True):
    pass


_frame_decoder = msgspec.json.Decoder(_Frame)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def encode_command(cmd: c.Command, request_id: int) -> bytes:
    """One client frame: flat fields beside ``cmd`` and ``id``, unset optionals omitted."""
    fields = msgspec.to_builtins(cmd)
    fields["id"] = request_id
    return _encoder.encode({k: v for k, v in fields.items() if v is not None}) + b"\n"


def _tombstone(data: dict[str, Any]) -> Message:
    return Message(
        id=int(data["id"]),
        rev=int(data["rev"]),
        room=data.get("room"),
        to=data.get("to"),
        from_="",
        deleted=True,
    )


# --- one connection -----------------------------------------------------------------------


class _Link:
    """One TCP connection and the requests in flight on it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_dead: Callable[[_Link], None],
    ) -> None:
        self.on_dead = on_dead
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[_Frame]] = {}
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = loop.create_future()
        self.dead: asyncio.Future[str] = loop.create_future()
        # While resuming, live message events are held back to be merged with sync pages.
        self.recovering = False
        self.held: list[Event] = []

    @property
    def alive(self) -> bool:
        return not self.dead.done()

    def fail(self, reason: str, exc: Callable[[str], ConnectionLost] = ConnectionLost) -> None:
        """Mark dead, fail every pending request at once, drop the socket."""
        if self.dead.done():
            return
        self.dead.set_result(reason)
        self.on_dead(self)
        if not self.hello.done():
            self.hello.set_exception(exc(reason))
            self.hello.exception()  # retrieved: nobody may be waiting any more
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc(reason))
        self.writer.transport.abort()  # never wait for a peer that does not read


# --- event subscriptions ------------------------------------------------------------------


class EventStream:
    """An async iterator of events over a bounded buffer.

    Past ``max_events`` the oldest are dropped and an ``events.dropped`` notice with the
    count comes before the next event (never silent, never blocking the connection).
    Iteration ends when the client is closed.
    """

    def __init__(self, client: Client, maxsize: int, rooms: frozenset[str] | None) -> None:
        self._client = client
        self._items: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._rooms = rooms
        self._dropped = 0
        self._wake = asyncio.Event()
        self._closed = False

    def _put(self, ev: Event) -> None:
        if self._rooms is not None and not ev.is_client_notice:
            if ev.room is None or ev.room.lower() not in self._rooms:
                return
        if len(self._items) >= self._maxsize:
            self._items.popleft()
            self._dropped += 1
        self._items.append(ev)
        self._wake.set()

    def _end(self) -> None:
        self._closed = True
        self._wake.set()

    def close(self) -> None:
        """Stop receiving (a filtered stream unsubscribes)."""
        self._client._unsubscribe(self)
        self._end()

    def pending(self) -> int:
        return len(self._items)

    async def get(self, timeout: float | None = None) -> Event:
        """The next event. Raises ``TimeoutError`` after ``timeout``; ``ClientClosed``
        once the client is closed and the buffer is empty (``SessionEnded`` if the server
        refused the session)."""
        async with asyncio.timeout(timeout):
            while not self._items and not self._dropped:
                if self._closed:
                    raise self._client._closed_error()
                self._wake.clear()
                await self._wake.wait()
        if self._dropped:
            n, self._dropped = self._dropped, 0
            return Event(EVENTS_DROPPED, {"count": n})
        return self._items.popleft()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """Iteration ends quietly after ``close()``; a refused session raises
        ``SessionEnded`` instead, so a bot does not exit as if all were well."""
        try:
            return await self.get()
        except SessionEnded:
            raise
        except ClientClosed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# --- the client ---------------------------------------------------------------------------


class Client:
    """A chatd connection that survives disconnects. Use :func:`connect`.

    Every command method raises a :class:`~chatd_client.errors.ServerError` subclass for
    an ``error`` reply, ``ConnectionLost`` if the connection drops with the request in
    flight (or there is none), ``RequestTimeout`` after the timeout, ``ClientClosed``
    after :meth:`close`. Only :meth:`send` waits across a reconnect (its nonce makes a
    retry safe).

    A token the server refuses is never replaced by a guest login of the same name: with
    the password the client logs in again as that account; without one it closes itself,
    and every call (and the event iterator, once drained) raises ``SessionEnded``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        options: Options | None = None,
        backoff: Backoff | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
    ) -> None:
        self.host, self.port = host, port
        # TLS (`chatd serve --tls-cert …`): True verifies against the system's CAs; an
        # SSLContext as given (chatd.tls.client_context(cafile) for a private CA).
        self.ssl = ssl or None
        self.options = options or Options()
        self._backoff: Backoff = backoff or ExponentialBackoff()
        self._user = user
        self._password = password
        self._token = token
        self._authed = False  # whether the session should be restored after a reconnect
        self._guest = False  # logged in as a guest by this client: close() logs it out
        self._ended: SessionEnded | None = None  # why the server refused the session
        self._closing = False
        self._rooms: dict[str, str] = {}  # lower -> display name, to re-join
        self._link: _Link | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._primary = EventStream(self, self.options.max_events, None)
        self._streams: list[EventStream] = [self._primary]
        self._epoch: str | None = None
        self._rev = 0  # highest revision seen: the sync cursor and the dedupe bound
        self._max_id = 0
        self.hello: Hello | None = None
        self.grants: list[str] = []
        self.expires_at: int | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Client:
        """Connect, read ``hello``, authenticate with what was given. Raises
        ``ConnectionLost`` if the server cannot be reached, or the login's ServerError."""
        try:
            link = await self._open()
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        assert self.hello is not None
        self._epoch = self.hello.epoch
        self._rev = self.hello.rev
        self._link = link
        try:
            if self._token is not None or self._user is not None:
                await self._authenticate(link)
        except BaseException:
            await self.close()
            raise
        self._ready.set()
        self._supervisor = self._spawn(self._supervise())
        return self

    async def close(self, *, logout: bool | None = None) -> None:
        """Close for good. Returns promptly whatever state the client is in (also while
        reconnecting); pending requests fail with ``ClientClosed``; event iteration ends.

        ``logout`` (default: only for a guest this client logged in) first sends ``logout``
        if connected, waiting at most 2 s, so a guest's name is free at once instead of
        after the server's guest grace. A registered user's token stays valid unless
        ``logout=True``."""
        if self._closed or self._closing:
            return
        self._closing = True
        if logout is None:
            logout = self._guest
        if logout and self._authed and self.connected:
            with contextlib.suppress(ClientError, TimeoutError):
                await self._call(c.Logout(), _Empty, min(2.0, self.options.request_timeout))
        self._closed = True
        self._ready.set()  # wakes whoever waits for a connection; they see _closed
        if self._link is not None:
            self._link.fail("client closed", lambda _: self._closed_error())
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for s in self._streams:
            s._end()

    def _closed_error(self) -> ClientClosed:
        """What a call on the closed client raises: ``SessionEnded`` when the server refused
        the session, else ``ClientClosed`` (a fresh instance each time)."""
        if self._ended is not None:
            return SessionEnded(self._ended.message, code=self._ended.code)
        return ClientClosed("client closed")

    async def _end_session(self, refusal: ServerError) -> None:
        """The server refused the token and no password can log the same account in again:
        report it and close, never log in as a guest of the same name (issue 12)."""
        if self._closed:
            return
        self._ended = SessionEnded(
            f"the server refused the session of {self._user!r} ({refusal.code}: "
            f"{refusal.message}); not logging in as anyone else",
            code=refusal.code,
        )
        log.warning("%s", self._ended)
        self._authed = False
        self._emit(Event(AUTH_FAILED, {"code": refusal.code, "message": refusal.message}))
        await self.close(logout=False)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self._closed

    @property
    def user(self) -> str | None:
        """The name the server knows us by (as first written), once authenticated."""
        return self._user

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def rooms(self) -> list[str]:
        """Rooms this client is in (and re-joins after a reconnect)."""
        return list(self._rooms.values())

    @property
    def rev(self) -> int:
        """The highest revision seen; recovery runs ``sync since=rev``."""
        return self._rev

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until connected and resumed. Raises ``TimeoutError``, or ``ClientClosed``."""
        async with asyncio.timeout(timeout):
            while not self._ready.is_set():
                if self._closed:
                    raise self._closed_error()
                await self._ready.wait()
        if self._closed:
            raise self._closed_error()

    def events(self, *rooms: str) -> EventStream:
        """The event stream. Without rooms: the client's main stream, buffered since
        connect. With rooms: a new stream of events concerning those rooms (plus client
        notices), from now on; close it when done."""
        if not rooms:
            return self._primary
        stream = EventStream(self, self.options.max_events, frozenset(r.lower() for r in rooms))
        if self._closed:
            stream._end()
        else:
            self._streams.append(stream)
        return stream

    def _unsubscribe(self, stream: EventStream) -> None:
        if stream is not self._primary and stream in self._streams:
            self._streams.remove(stream)

    def _emit(self, ev: Event) -> None:
        for s in self._streams:
            s._put(ev)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("chatd_client task failed", exc_info=task.exception())

    # --- connection --------------------------------------------------------------------

    async def _open(self) -> _Link:
        o = self.options
        async with asyncio.timeout(o.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
            link = _Link(reader, writer, self._link_dead)
            self._spawn(self._read(link))
            try:
                self.hello = await link.hello
            except BaseException:
                link.fail("no hello")
                raise
        if o.ping_interval:
            self._spawn(self._keepalive(link, o.ping_interval))
        return link

    def _link_dead(self, link: _Link) -> None:
        if link is self._link and not self._closed:
            self._ready.clear()  # at once: a retrying send must wait, not spin

    async def _read(self, link: _Link) -> None:
        splitter = LineSplitter(self.options.max_frame)
        reason = "connection closed by the server"
        try:
            while link.alive:
                data = await link.reader.read(self.options.read_chunk)
                if not data:
                    break
                for line in splitter.feed(data):
                    if line is TOO_LARGE:
                        log.warning("skipped a server frame over %d bytes", splitter.max_frame)
                        continue
                    assert isinstance(line, bytes)
                    self._on_frame(link, line)
        except (OSError, EOFError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        finally:
            link.fail(reason)

    def _on_frame(self, link: _Link, line: bytes) -> None:
        try:
            frame = _frame_decoder.decode(line)
        except msgspec.DecodeError:
            log.warning("ignored an undecodable server frame")
            return
        if frame.type == "event":
            try:
                self._on_event(link, frame)
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                log.warning("ignored a malformed %r event", frame.event)
            return
        if isinstance(frame.id, int):
            fut = link.pending.pop(frame.id, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
                return
        if frame.type == "error":
            # id null: frame_too_large, or the server closing us (e.g. not logged in in time)
            log.warning("server error %s: %s", frame.code, frame.message)

    def _on_event(self, link: _Link, frame: _Frame) -> None:
        name = frame.event
        if name == "hello":
            if not link.hello.done():
                link.hello.set_result(msgspec.json.decode(frame.data, type=Hello))
            return
        if name in ("message", "message.edited"):
            msg = msgspec.json.decode(frame.data, type=Message)
            self._change(link, Event(name, msgspec.to_builtins(msg), msg.room or None, msg))
            return
        data: dict[str, Any] = _any_decoder.decode(frame.data)
        if name == "message.deleted":
            msg = _tombstone(data)
            self._change(link, Event(name, data, msg.room, msg))
            return
        room = data.get("room") if isinstance(data.get("room"), str) else None
        if name == "room.updated":
            room = data["name"]
            prev = data.get("previous_name")
            if isinstance(prev, str) and prev.lower() in self._rooms:
                del self._rooms[prev.lower()]
                self._rooms[room.lower()] = room
        elif name == "room.closed" and room is not None:
            self._rooms.pop(room.lower(), None)
        elif name == "session.expiring" and link is self._link:
            self._spawn(self._refresh_quietly(link))
        elif name == "session.expired" and link is self._link:
            self.expires_at = None
            revoked = data.get("reason") == "logout"
            if self._password is not None and not revoked:
                self._spawn(self._relogin(link))
            elif self._authed:
                # Expired beyond refresh, or revoked: nothing proves this identity again.
                why = "token revoked (logout)" if revoked else "token expired"
                self._spawn(self._end_session(Unauthorized(why, code="unauthorized")))
        self._emit(Event(name, data, room))

    def _change(self, link: _Link, ev: Event) -> None:
        if link.recovering:
            link.held.append(ev)
        else:
            self._deliver(ev)

    def _deliver(self, ev: Event) -> None:
        msg = ev.message
        assert msg is not None
        # One connection sees changes in revision order (contract), and sync pages are
        # merged by revision: anything at or below the highest revision seen is a repeat.
        if msg.rev <= self._rev:
            return
        self._rev = msg.rev
        self._max_id = max(self._max_id, msg.id)
        self._emit(ev)

    async def _keepalive(self, link: _Link, interval: float) -> None:
        while link.alive:
            try:
                await asyncio.wait_for(asyncio.shield(link.dead), interval)
                return
            except TimeoutError:
                pass
            try:
                await self._call(c.Ping(), _Any, self.options.ping_timeout, link=link)
            except RequestTimeout:
                link.fail("missed ping")
            except ConnectionLost:
                return

    async def _supervise(self) -> None:
        """Wait for the link to die; reconnect with backoff; resume. Runs until close()."""
        while not self._closed:
            link = self._link
            assert link is not None
            reason = await asyncio.shield(link.dead)
            self._ready.clear()
            self._emit(Event(DISCONNECTED, {"reason": reason}))
            if not self.options.reconnect:
                await self.close()
                return
            attempt = 0
            while True:
                attempt += 1
                await self._backoff(attempt)
                try:
                    new = await self._open()
                except (OSError, TimeoutError, ConnectionLost) as exc:
                    log.info("reconnect attempt %d failed: %s", attempt, exc)
                    continue
                try:
                    if await self._resume(new, attempt) is not None:
                        break
                except _Refused as refused:
                    new.fail("session refused")
                    await self._end_session(refused.error)
                    return
                except (TimeoutError, ConnectionLost, RequestTimeout, ServerError) as exc:
                    # ServerError: a re-join or sync refused mid-resume; the next attempt
                    # re-authenticates and finds out whether the session is still good.
                    log.info("resume after attempt %d failed: %s", attempt, exc)
                new.fail("resume failed")

    async def _resume(self, link: _Link, attempts: int, *, notice: bool = True) -> bool | None:
        """Re-authenticate, re-join, sync from the highest revision seen. Live changes
        arriving meanwhile are held and merged with the sync pages by revision."""
        assert self.hello is not None
        hello = self.hello
        epoch_changed = hello.epoch != self._epoch
        link.recovering = True
        since = self._rev
        if epoch_changed:
            # A new store: the old cursor means nothing there (contract, "Revisions").
            since = hello.rev
        changes: list[Event] = []
        if self._authed:
            try:
                await self._authenticate(link)
            except (Unauthorized, TokenExpired) as exc:
                raise _Refused(exc) from exc
            except ServerError as exc:  # rate_limited, internal (e.g. storage full): transient
                log.info("re-login failed (%s): %s", exc.code, exc)
                return None  # the next attempt, after the backoff
            await self._rejoin(link)
            changes = await self._sync_all(link, since)
        if not link.alive:
            return None
        # From here to the end nothing awaits: the switch is atomic for the application.
        if epoch_changed:
            self._emit(Event(EPOCH_CHANGED, {"old": self._epoch, "new": hello.epoch}))
            self._epoch = hello.epoch
            self._rev = since
            self._max_id = 0
        self._link = link
        if notice:
            self._emit(Event(RECONNECTED, {"attempts": attempts, "epoch_changed": epoch_changed}))
        merged = sorted(changes + link.held, key=lambda e: e.message.rev if e.message else 0)
        link.held = []
        link.recovering = False
        for ev in merged:
            self._deliver(ev)
        self._rev = max(self._rev, since)
        self._ready.set()
        return epoch_changed

    async def _sync_all(self, link: _Link, since: int) -> list[Event]:
        out: list[Event] = []
        while True:
            page = await self._call(c.Sync(since=since), SyncPage, None, link=link)
            for m in page.changes:
                if m.deleted:
                    data = {"id": m.id, "rev": m.rev, "room": m.room, "to": m.to, "by": None}
                    name = "message.deleted"
                elif m.edited_ts is not None and m.id <= self._max_id:
                    name, data = "message.edited", msgspec.to_builtins(m)
                else:
                    name, data = "message", msgspec.to_builtins(m)
                out.append(Event(name, data, m.room, m, recovered=True))
            since = page.rev
            if not page.more:
                return out

    async def _rejoin(self, link: _Link) -> None:
        for key, name in list(self._rooms.items()):
            try:
                joined = await self._call(c.RoomJoin(room=name), JoinResult, None, link=link)
            except ServerError as exc:
                self._rooms.pop(key, None)
                self._emit(
                    Event(
                        REJOIN_FAILED,
                        {"room": name, "code": exc.code, "message": exc.message},
                        name,
                    )
                )
            else:
                self._rooms.pop(key, None)
                self._rooms[joined.room.name.lower()] = joined.room.name

    async def _authenticate(self, link: _Link) -> None:
        """Token first (auth). A refused token is replaced only by a login with the
        password, which proves the same account; never by a guest login of the same name
        (issue 12: a deleted account must not come back as a guest). A guest login happens
        only when there was no token yet. Raises the refusal's ServerError."""
        if self._token is not None:
            try:
                r = await self._call(c.Auth(token=self._token), AuthResult, None, link=link)
            except (Unauthorized, TokenExpired):
                if self._user is None or self._password is None:
                    raise
            else:
                self._bound(r.user, r.grants, r.expires_at)
                return
        assert self._user is not None
        login = c.Login(user=self._user, password=self._password)
        res = await self._call(login, LoginResult, None, link=link)
        self._token = res.token
        self._guest = self._password is None
        self._bound(res.user, res.grants, res.expires_at)

    def _bound(self, user: str, grants: list[str], expires_at: int) -> None:
        self._user, self.grants, self.expires_at, self._authed = user, grants, expires_at, True

    async def _refresh_quietly(self, link: _Link) -> None:
        try:
            res = await self._call(c.Refresh(), RefreshResult, None, link=link)
        except (ServerError, ConnectionLost, RequestTimeout) as exc:
            log.info("token refresh failed: %s", exc)
            return
        self._token, self.expires_at = res.token, res.expires_at

    async def _relogin(self, link: _Link) -> None:
        """After session.expired the connection left its rooms: log in again, re-join,
        and sync what was missed meanwhile, like a reconnect on the same socket."""
        self._token = None
        self._ready.clear()
        try:
            if await self._resume(link, 0, notice=False) is None:
                link.fail("re-login failed")
        except _Refused as refused:
            link.fail("session refused")
            await self._end_session(refused.error)
        except (ConnectionLost, RequestTimeout, TimeoutError, ServerError) as exc:
            log.info("re-login failed: %s", exc)
            link.fail("re-login failed")

    # --- requests ----------------------------------------------------------------------

    def _current(self) -> _Link:
        if self._closed:
            raise self._closed_error()
        link = self._link
        if link is None or not link.alive or not self._ready.is_set():
            raise ConnectionLost("not connected")
        return link

    async def _call(
        self, cmd: c.Command, kind: type[T], timeout: float | None, *, link: _Link | None = None
    ) -> T:
        link = link or self._current()
        rid = next(self._ids)
        return await self._roundtrip(
            link, rid, encode_command(cmd, rid), c.command_name(type(cmd)), timeout, kind
        )

    async def _roundtrip(
        self,
        link: _Link,
        rid: int,
        frame_bytes: bytes,
        name: str,
        timeout: float | None,
        kind: type[T],
    ) -> T:
        if not link.alive:
            raise ConnectionLost("not connected")
        fut: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
        link.pending[rid] = fut
        try:
            async with asyncio.timeout(timeout or self.options.request_timeout):
                try:
                    link.writer.write(frame_bytes)
                    await link.writer.drain()
                except (OSError, RuntimeError) as exc:
                    link.fail(f"connection lost: {exc}")
                frame = await fut
        except TimeoutError:
            raise RequestTimeout(f"no reply to {name} in time") from None
        finally:
            link.pending.pop(rid, None)
        if frame.type == "error":
            raise error_from_wire(frame.code, frame.message, frame.retry_after)
        return msgspec.json.decode(frame.data, type=kind)

    # --- commands (wire contract, "Commands") -------------------------------------------

    async def request(
        self, cmd: str, fields: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Escape hatch for a command this library has no method for (e.g. newer than it):
        the reply's ``data`` as plain JSON values. Raises like every other method."""
        link = self._current()
        rid = next(self._ids)
        frame = _encoder.encode({**(fields or {}), "cmd": cmd, "id": rid}) + b"\n"
        return await self._roundtrip(link, rid, frame, cmd, timeout, _Any)

    async def ping(self, *, timeout: float | None = None) -> bool:
        return (await self._call(c.Ping(), dict[str, bool], timeout)).get("pong", False)

    async def help(self, *, timeout: float | None = None) -> list[CommandHelp]:
        return (await self._call(c.Help(), _HelpReply, timeout)).commands

    async def register(self, user: str, password: str, *, timeout: float | None = None) -> str:
        """Create an account; returns the name. Does not log in."""
        data = await self._call(c.Register(user=user, password=password), dict[str, str], timeout)
        return data["user"]

    async def login(
        self,
        user: str,
        password: str | None = None,
        *,
        grants: list[str] | None = None,
        ttl: int | None = None,
        timeout: float | None = None,
    ) -> LoginResult:
        """Log in (a guest login without password); remembered for reconnects."""
        cmd = c.Login(user=user, password=password, grants=grants, ttl=ttl)
        res = await self._call(cmd, LoginResult, timeout)
        self._password = password
        self._token = res.token
        self._guest = password is None
        self._bound(res.user, res.grants, res.expires_at)
        return res

    async def auth(self, token: str, *, timeout: float | None = None) -> AuthResult:
        """Bind the connection to a token; remembered for reconnects."""
        res = await self._call(c.Auth(token=token), AuthResult, timeout)
        self._token = token
        self._guest = False  # not known from a token: close() keeps it unless asked
        self._bound(res.user, res.grants, res.expires_at)
        return res

    async def refresh(self, *, timeout: float | None = None) -> RefreshResult:
        res = await self._call(c.Refresh(), RefreshResult, timeout)
        self._token, self.expires_at = res.token, res.expires_at
        return res

    async def logout(self, *, all: bool = False, timeout: float | None = None) -> None:
        """Revoke the token; the client forgets its credentials and rooms."""
        await self._call(c.Logout(all=all), _Empty, timeout)
        self._token = self._password = None
        self._authed = self._guest = False
        self._rooms.clear()

    async def whoami(self, *, timeout: float | None = None) -> AuthResult:
        return await self._call(c.WhoAmI(), AuthResult, timeout)

    async def room_create(
        self,
        room: str,
        *,
        topic: str | None = None,
        ephemeral: bool = False,
        open: bool = False,
        timeout: float | None = None,
    ) -> RoomInfo:
        """Create a room; the creator joins it (and re-joins it after a reconnect)."""
        cmd = c.RoomCreate(room=room, topic=topic, ephemeral=ephemeral, open=open)
        info = (await self._call(cmd, _RoomReply, timeout)).room
        self._rooms[info.name.lower()] = info.name
        return info

    async def room_edit(
        self,
        room: str,
        *,
        topic: str | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> RoomInfo:
        info = (
            await self._call(c.RoomEdit(room=room, topic=topic, name=name), _RoomReply, timeout)
        ).room
        if room.lower() in self._rooms:
            del self._rooms[room.lower()]
            self._rooms[info.name.lower()] = info.name
        return info

    async def room_delete(self, room: str, *, timeout: float | None = None) -> None:
        await self._call(c.RoomDelete(room=room), _Empty, timeout)
        self._rooms.pop(room.lower(), None)

    async def room_list(self, *, timeout: float | None = None) -> list[RoomInfo]:
        """Every room, following the server's pages (`after` = the reply's `next`)."""
        page = await self._call(c.RoomList(), _RoomsReply, timeout)
        rooms = list(page.rooms)
        while page.more and page.next is not None:
            page = await self._call(c.RoomList(after=page.next), _RoomsReply, timeout)
            rooms += page.rooms
        return rooms

    async def join(self, room: str, *, timeout: float | None = None) -> JoinResult:
        """Join (idempotent); the room is re-joined after a reconnect."""
        res = await self._call(c.RoomJoin(room=room), JoinResult, timeout)
        self._rooms[res.room.name.lower()] = res.room.name
        return res

    async def leave(self, room: str, *, timeout: float | None = None) -> None:
        await self._call(c.RoomLeave(room=room), _Empty, timeout)
        self._rooms.pop(room.lower(), None)

    async def members(self, room: str, *, timeout: float | None = None) -> list[str]:
        return (await self._call(c.RoomMembers(room=room), Members, timeout)).members

    async def history(
        self,
        room: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> HistoryPage:
        cmd = c.RoomHistory(room=room, before=before, after=after, limit=limit)
        return await self._call(cmd, HistoryPage, timeout)

    async def send(
        self,
        text: str,
        *,
        room: str | None = None,
        to: str | None = None,
        nonce: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Post to a room or a user; returns the message as stored.

        Every send carries a nonce (a fresh one unless given). A send made while
        disconnected waits for the reconnect, and one whose reply was lost to a drop is
        sent again on the next connection: the server answers a repeated nonce with the
        original message, so a message is never posted twice.

        ``timeout`` bounds the whole wait, outage included (default
        ``Options.send_timeout``, 30 s; ``math.inf`` waits until ``close()``). Raises
        ``RequestTimeout`` after it, ``ClientClosed`` (``SessionEnded``) if the client
        closes first.
        """
        cmd = c.MsgSend(text=text, room=room, to=to, nonce=nonce or uuid.uuid4().hex)
        loop = asyncio.get_running_loop()
        limit = self.options.send_timeout if timeout is None else timeout
        deadline = None if limit is None or math.isinf(limit) else loop.time() + limit
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise RequestTimeout("message not confirmed in time")
            try:
                await self.wait_connected(left)
                left = None if deadline is None else max(1e-3, deadline - loop.time())
                return (await self._call(cmd, _MessageReply, left)).message
            except TimeoutError:
                raise RequestTimeout("message not confirmed in time") from None
            except ClientClosed:
                raise
            except ConnectionLost:
                if not self.options.reconnect:
                    raise
                continue  # same nonce on the next connection

    async def edit(self, message_id: int, text: str, *, timeout: float | None = None) -> Message:
        return (
            await self._call(c.MsgEdit(message_id=message_id, text=text), _MessageReply, timeout)
        ).message

    async def delete(self, message_id: int, *, timeout: float | None = None) -> None:
        await self._call(c.MsgDelete(message_id=message_id), _Empty, timeout)

    async def dm_history(
        self,
        with_: str | None = None,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> HistoryPage:
        cmd = c.DmHistory(with_=with_, before=before, after=after, limit=limit)
        return await self._call(cmd, HistoryPage, timeout)

    async def sync(
        self, since: int, *, limit: int | None = None, timeout: float | None = None
    ) -> SyncPage:
        """One raw sync page (the client runs its own sync after reconnecting)."""
        return await self._call(c.Sync(since=since, limit=limit), SyncPage, timeout)

    async def channels(self, *, timeout: float | None = None) -> list[Channel]:
        """Every room and known user, following the server's pages."""
        page = await self._call(c.Channels(), _ChannelsReply, timeout)
        out = list(page.channels)
        while page.more and page.next is not None:
            page = await self._call(c.Channels(after=page.next), _ChannelsReply, timeout)
            out += page.channels
        return out

    async def user_delete(self, user: str, *, timeout: float | None = None) -> None:
        await self._call(c.UserDelete(user=user), _Empty, timeout)


_Any = dict[str, Any]


class _Refused(Exception):
    """Inside the resume path: the server refused the session (not a transient fault)."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error


class _Connect:
    """``await connect(...)`` or ``async with connect(...) as chat``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.start().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.start()

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()


def connect(
    host: str = "127.0.0.1",
    port: int = 7777,
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    options: Options | None = None,
    backoff: Backoff | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
) -> _Connect:
    """Connect to chatd. With ``token``: ``auth``; with ``user`` and ``password``: ``login``;
    with ``user`` alone: a guest login; with nothing: connected but not logged in.
    ``ssl``: TLS, verified against the system's CAs (True) or as the SSLContext says
    (``chatd.tls.client_context(cafile)`` trusts a private or self-signed certificate).
    Raises ``ConnectionLost`` if unreachable, a ``ServerError`` if authentication fails."""
    return _Connect(
        Client(
            host, port, user=user, password=password, token=token, options=options,
            backoff=backoff, ssl=ssl,
        )
    )


async def iter_messages(chat: Client, room: str | None = None) -> AsyncIterator[Message]:
    """New messages only (not edits or deletions), optionally of one room."""
    stream = chat.events(room) if room else chat.events()
    async for ev in stream:
        if ev.name == "message" and ev.message is not None:
            yield ev.message


__all__ = [
    "AUTH_FAILED",
    "MESSAGE_EVENTS",
    "Client",
    "EventStream",
    "ExponentialBackoff",
    "Options",
    "connect",
]
