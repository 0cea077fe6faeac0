"""The public asyncio API: one awaitable method per command, events as an async iterator,
and a reconnect loop with backoff. A thin layer over two sans-I/O parts:

- ``codec.py`` turns bytes into events and settles each request's future by id (the
  pending map); when a connection dies every pending future fails at once with
  ``ConnectionLost``.
- ``recovery.py`` owns the session state (credentials, rooms, the highest revision seen,
  queued sends) and says which commands restore it after a reconnect: re-auth, re-join,
  ``sync`` from that revision, resend of queued sends by nonce. This module only runs those
  commands on the socket and hands the resulting events to the application.

A ``_Link`` is one TCP connection: the socket, its codec, a reader task. The ``Client``
owns the current link, a supervisor task that notices the link dying and reconnects, and
the event subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import ssl as _ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

from chatd.protocol import commands as c
from chatd.protocol.models import Message, RoomInfo
from chatd.protocol.replies import (
    AuthReply,
    ChannelsReply,
    Empty,
    HelpReply,
    HistoryReply,
    LoginReply,
    MessageReply,
    PasswdReply,
    PingReply,
    RefreshReply,
    RegisterReply,
    RoomJoinReply,
    RoomListReply,
    RoomMembersReply,
    RoomReply,
    StatsReply,
    SyncReply,
    UserEntry,
    UserListReply,
    WhoAmIReply,
)
from chatd_client.codec import Codec, encode_command
from chatd_client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    RequestTimeout,
    ServerError,
    SessionEnded,
    Unauthorized,
)
from chatd_client.events import EventStream
from chatd_client.recovery import END, REFRESH, RELOGIN, Queued, Recovery, Refused, Resume, Step
from chatd_client.types import (
    DISCONNECTED,
    MESSAGE_EVENTS,
    Channel,
    CommandHelp,
    Event,
    Hello,
)

log = logging.getLogger("chatd_client")
T = TypeVar("T")
R = TypeVar("R")
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


# --- one connection -----------------------------------------------------------------------

class _Link:
    """One TCP connection: the socket, its codec (and the requests in flight on it)."""

    def __init__(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
        on_dead: Callable[[_Link], None],
    ) -> None:
        self.conn = conn  # numbers this client's connections: recovery tells them apart
        self.on_dead = on_dead
        self.reader = reader
        self.writer = writer
        self.codec = Codec(max_frame)
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = loop.create_future()
        self.dead: asyncio.Future[str] = loop.create_future()
        self.resume: Resume | None = None  # while resuming on this link

    @property
    def alive(self) -> bool:
        return not self.dead.done()

    @property
    def pending(self) -> Mapping[int, object]:
        """Requests in flight on this link, by id."""
        return self.codec.pending

    def fail(self, reason: str, exc: Callable[[str], ClientError] = ConnectionLost) -> None:
        """Mark dead, fail every pending request at once, drop the socket."""
        if self.dead.done():
            return
        self.dead.set_result(reason)
        self.on_dead(self)
        if not self.hello.done():
            self.hello.set_exception(exc(reason))
            self.hello.exception()  # retrieved: nobody may be waiting any more
        self.codec.fail(lambda: exc(reason))
        self.writer.transport.abort()  # never wait for a peer that does not read


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
        self._rec = Recovery(user=user, password=password, token=token)
        self._ended: SessionEnded | None = None  # why the server refused the session
        self._closing = False
        self._link: _Link | None = None
        self._conns = itertools.count(1)
        self._ready = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._primary = self._stream(None)
        self._streams: list[EventStream] = [self._primary]
        self.hello: Hello | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Client:
        """Connect, read ``hello``, authenticate with what was given. Raises
        ``ConnectionLost`` if the server cannot be reached, or the login's ServerError."""
        try:
            link = await self._open()
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        assert self.hello is not None
        self._rec.started(self.hello)
        self._link = link
        try:
            if self._rec.token is not None or self._rec.user is not None:
                await self._drive(link, self._rec.authenticate())
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
            logout = self._rec.guest
        if logout and self._rec.authed and self.connected:
            with contextlib.suppress(ClientError, TimeoutError):
                await self._call(c.Logout(), Empty, min(2.0, self.options.request_timeout))
        self._closed = True
        self._ready.set()  # wakes whoever waits for a connection; they see _closed
        if self._link is not None:
            self._link.fail("client closed", lambda _: self._closed_error())
        self._rec.outbox.fail_all(self._closed_error)
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

    async def _end_session(self, refused: Refused) -> None:
        """The server refused the token and no password can log the same account in again:
        report it and close, never log in as a guest of the same name (issue 12)."""
        if self._closed:
            return
        self._ended = refused.session_ended()
        log.warning("%s", self._ended)
        self._rec.ended()
        error = refused.error
        self._emit(Event(AUTH_FAILED, {"code": error.code, "message": error.message}))
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
        return self._rec.user

    @property
    def token(self) -> str | None:
        return self._rec.token

    @property
    def grants(self) -> list[str]:
        return self._rec.grants

    @property
    def expires_at(self) -> int | None:
        return self._rec.expires_at

    @property
    def rooms(self) -> list[str]:
        """Rooms this client is in (and re-joins after a reconnect)."""
        return list(self._rec.rooms.values())

    @property
    def rev(self) -> int:
        """The highest revision seen; recovery runs ``sync since=rev``."""
        return self._rec.rev

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until connected and resumed. Raises ``TimeoutError``, or ``ClientClosed``."""
        async with asyncio.timeout(timeout):
            while not self._ready.is_set():
                if self._closed:
                    raise self._closed_error()
                await self._ready.wait()
        if self._closed:
            raise self._closed_error()

    # --- events ------------------------------------------------------------------------

    def events(self, *rooms: str) -> EventStream:
        """The event stream. Without rooms: the client's main stream, buffered since
        connect. With rooms: a new stream of events concerning those rooms (plus client
        notices), from now on; close it when done."""
        if not rooms:
            return self._primary
        stream = self._stream(frozenset(r.lower() for r in rooms))
        if self._closed:
            stream._end()
        else:
            self._streams.append(stream)
        return stream

    def _stream(self, rooms: frozenset[str] | None) -> EventStream:
        return EventStream(
            self.options.max_events, rooms,
            closed_error=self._closed_error, unsubscribe=self._unsubscribe,
        )  # fmt: skip

    def _unsubscribe(self, stream: EventStream) -> None:
        if stream is not self._primary and stream in self._streams:
            self._streams.remove(stream)

    def _emit(self, ev: Event) -> None:
        for s in self._streams:
            s._put(ev)

    def _on_event(self, link: _Link, ev: Event) -> None:
        """An event from the codec: message changes are deduped by revision (or held while
        resuming); the rest keep the session state in step and may call for an action."""
        if ev.name in MESSAGE_EVENTS:
            if link.resume is not None:
                link.resume.hold(ev)
            elif self._rec.accept(ev):
                self._emit(ev)
            return
        action = self._rec.observe(ev, current=link is self._link)
        if action == REFRESH:
            self._spawn(self._refresh_quietly(link))
        elif action == RELOGIN:
            self._spawn(self._relogin(link))
        elif action == END:
            # Expired beyond refresh, or revoked: nothing proves this identity again.
            revoked = ev.data.get("reason") == "logout"
            why = "token revoked (logout)" if revoked else "token expired"
            refused = Refused(Unauthorized(why, code="unauthorized"), self._rec.user)
            self._spawn(self._end_session(refused))
        self._emit(ev)

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
            link = _Link(next(self._conns), reader, writer, o.max_frame, self._link_dead)
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
        reason = "connection closed by the server"
        try:
            while link.alive:
                data = await link.reader.read(self.options.read_chunk)
                if not data:
                    break
                for item in link.codec.feed(data):
                    if isinstance(item, Hello):
                        if not link.hello.done():
                            link.hello.set_result(item)
                    else:
                        self._on_event(link, item)
        except (OSError, EOFError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        finally:
            link.fail(reason)

    async def _keepalive(self, link: _Link, interval: float) -> None:
        while link.alive:
            try:
                await asyncio.wait_for(asyncio.shield(link.dead), interval)
                return
            except TimeoutError:
                pass
            try:
                await self._call(c.Ping(), PingReply, self.options.ping_timeout, link=link)
            except RequestTimeout:
                link.fail("missed ping")
            except (ConnectionLost, ServerError):
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
                    if await self._resume(new, attempt):
                        break
                except Refused as refused:
                    new.fail("session refused")
                    await self._end_session(refused)
                    return
                except (TimeoutError, ConnectionLost, RequestTimeout, ServerError) as exc:
                    # ServerError: a re-login (rate_limited, internal) or a sync refused
                    # mid-resume; the next attempt starts over.
                    log.info("resume after attempt %d failed: %s", attempt, exc)
                new.fail("resume failed")

    async def _resume(self, link: _Link, attempts: int, *, notice: bool = True) -> bool:
        """Run recovery's commands on ``link``, then switch to it. False if the link died
        meanwhile. Raises Refused, or what a command raised."""
        assert self.hello is not None
        resume = self._rec.resume(self.hello, conn=link.conn, attempts=attempts, notice=notice)
        link.resume = resume
        try:
            await self._drive(link, resume.steps())
            if not link.alive:
                return False
            # From here to the end nothing awaits: the switch is atomic for the application.
            events = resume.commit()
        finally:
            link.resume = None
        self._link = link
        for ev in events:
            self._emit(ev)
        self._ready.set()
        return True

    async def _drive(self, link: _Link, steps: Generator[Step, Any, R]) -> R:
        """Send each command a sans-I/O generator yields; send it back the reply (or throw
        in the ServerError). Connection faults propagate and end the generator."""
        try:
            step = next(steps)
            while True:
                try:
                    reply = await self._call(step.cmd, step.kind, None, link=link)
                except ServerError as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(reply)
        except StopIteration as stop:
            return cast(R, stop.value)
        finally:
            steps.close()

    async def _refresh_quietly(self, link: _Link) -> None:
        try:
            res = await self._call(c.Refresh(), RefreshReply, None, link=link)
        except (ServerError, ConnectionLost, RequestTimeout) as exc:
            log.info("token refresh failed: %s", exc)
            return
        self._rec.refreshed(res)

    async def _relogin(self, link: _Link) -> None:
        """After session.expired the connection left its rooms: log in again, re-join,
        and sync what was missed meanwhile, like a reconnect on the same socket."""
        self._rec.token_expired()
        self._ready.clear()
        try:
            if not await self._resume(link, 0, notice=False):
                link.fail("re-login failed")
        except Refused as refused:
            link.fail("session refused")
            await self._end_session(refused)
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
        name = c.command_name(type(cmd))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not link.alive:
            raise ConnectionLost("not connected")
        rid, frame = link.codec.request(cmd, kind, fut)
        return cast(T, await self._roundtrip(link, rid, frame, fut, name, timeout))

    async def _roundtrip(
        self,
        link: _Link,
        rid: int,
        frame: bytes,
        fut: asyncio.Future[Any],
        name: str,
        timeout: float | None,
    ) -> Any:
        """Write a request and wait for the codec to settle its future. ``timeout``: None
        is ``Options.request_timeout``; ``math.inf`` waits as long as the caller does."""
        limit = timeout or self.options.request_timeout
        try:
            async with asyncio.timeout(None if math.isinf(limit) else limit):
                try:
                    link.writer.write(frame)
                    await link.writer.drain()
                except (OSError, RuntimeError) as exc:
                    link.fail(f"connection lost: {exc}")
                return await fut
        except TimeoutError:
            raise RequestTimeout(f"no reply to {name} in time") from None
        finally:
            link.codec.forget(rid)

    # --- commands (wire contract, "Commands") -------------------------------------------

    async def request(
        self, cmd: str, fields: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Escape hatch for a command this library has no method for (e.g. newer than it):
        the reply's ``data`` as plain JSON values. Raises like every other method."""
        link = self._current()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        rid, frame = link.codec.request_raw(cmd, fields or {}, fut)
        return await self._roundtrip(link, rid, frame, fut, cmd, timeout)

    async def ping(self, *, timeout: float | None = None) -> bool:
        return (await self._call(c.Ping(), PingReply, timeout)).pong

    async def help(self, *, timeout: float | None = None) -> list[CommandHelp]:
        return (await self._call(c.Help(), HelpReply, timeout)).commands

    async def register(self, user: str, password: str, *, timeout: float | None = None) -> str:
        """Create an account; returns the name. Does not log in."""
        cmd = c.Register(user=user, password=password)
        return (await self._call(cmd, RegisterReply, timeout)).user

    async def login(
        self,
        user: str,
        password: str | None = None,
        *,
        grants: list[str] | None = None,
        ttl: int | None = None,
        timeout: float | None = None,
    ) -> LoginReply:
        """Log in (a guest login without password); remembered for reconnects."""
        cmd = c.Login(user=user, password=password, grants=grants, ttl=ttl)
        res = await self._call(cmd, LoginReply, timeout)
        self._rec.logged_in(res, password)
        return res

    async def auth(self, token: str, *, timeout: float | None = None) -> AuthReply:
        """Bind the connection to a token; remembered for reconnects."""
        res = await self._call(c.Auth(token=token), AuthReply, timeout)
        self._rec.authed_with(token, res)
        return res

    async def refresh(self, *, timeout: float | None = None) -> RefreshReply:
        res = await self._call(c.Refresh(), RefreshReply, timeout)
        self._rec.refreshed(res)
        return res

    async def passwd(
        self, password: str, new_password: str, *, timeout: float | None = None
    ) -> PasswdReply:
        """Change the password; the connection is bound to the new token it returns (every
        other token of the account stops working). Remembered for reconnects."""
        cmd = c.Passwd(password=password, new_password=new_password)
        res = await self._call(cmd, PasswdReply, timeout)
        self._rec.password_changed(new_password, res)
        return res

    async def logout(self, *, all: bool = False, timeout: float | None = None) -> None:
        """Revoke the token; the client forgets its credentials and rooms."""
        await self._call(c.Logout(all=all), Empty, timeout)
        self._rec.logged_out()

    async def whoami(self, *, timeout: float | None = None) -> WhoAmIReply:
        return await self._call(c.WhoAmI(), WhoAmIReply, timeout)

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
        info = (await self._call(cmd, RoomReply, timeout)).room
        self._rec.joined(info.name)
        return info

    async def room_edit(
        self,
        room: str,
        *,
        topic: str | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> RoomInfo:
        cmd = c.RoomEdit(room=room, topic=topic, name=name)
        info = (await self._call(cmd, RoomReply, timeout)).room
        self._rec.renamed(room, info.name)
        return info

    async def room_delete(self, room: str, *, timeout: float | None = None) -> None:
        await self._call(c.RoomDelete(room=room), Empty, timeout)
        self._rec.left(room)

    async def room_list(self, *, timeout: float | None = None) -> list[RoomInfo]:
        """Every room, following the server's pages (`after` = the reply's `next`)."""
        page = await self._call(c.RoomList(), RoomListReply, timeout)
        rooms = list(page.rooms)
        while page.more and page.next is not None:
            page = await self._call(c.RoomList(after=page.next), RoomListReply, timeout)
            rooms += page.rooms
        return rooms

    async def join(self, room: str, *, timeout: float | None = None) -> RoomJoinReply:
        """Join (idempotent); the room is re-joined after a reconnect."""
        res = await self._call(c.RoomJoin(room=room), RoomJoinReply, timeout)
        self._rec.joined(res.room.name)
        return res

    async def leave(self, room: str, *, timeout: float | None = None) -> None:
        await self._call(c.RoomLeave(room=room), Empty, timeout)
        self._rec.left(room)

    async def members(self, room: str, *, timeout: float | None = None) -> list[str]:
        return (await self._call(c.RoomMembers(room=room), RoomMembersReply, timeout)).members

    async def history(
        self,
        room: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> HistoryReply:
        cmd = c.RoomHistory(room=room, before=before, after=after, limit=limit)
        return await self._call(cmd, HistoryReply, timeout)

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

        Every send carries a nonce (a fresh one unless given) and waits in the outbox
        until confirmed. A send made while disconnected goes out when the connection is
        back, and one whose reply was lost to a drop is sent again on the next connection
        (both by the recovery, before anything sent later): the server answers a repeated
        nonce with the original message, so a message is never posted twice.

        ``timeout`` bounds the whole wait, outage included (default
        ``Options.send_timeout``, 30 s; ``math.inf`` waits until ``close()``). Raises
        ``RequestTimeout`` after it, ``ClientClosed`` (``SessionEnded``) if the client
        closes first.
        """
        if self._closed:
            raise self._closed_error()
        cmd = c.MsgSend(text=text, room=room, to=to, nonce=nonce or uuid.uuid4().hex)
        limit = self.options.send_timeout if timeout is None else timeout
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        entry = self._rec.outbox.add(cmd, waiter)
        try:
            async with asyncio.timeout(None if limit is None or math.isinf(limit) else limit):
                if self.connected:
                    await self._transmit(entry)
                return await waiter
        except TimeoutError:
            raise RequestTimeout("message not confirmed in time") from None
        finally:
            self._rec.outbox.discard(entry)

    async def _transmit(self, entry: Queued) -> None:
        """Send a queued message on the current link. A drop leaves it queued for the
        recovery to send again (or fails it when the client does not reconnect)."""
        outbox = self._rec.outbox
        try:
            link = self._current()
            outbox.written(entry, link.conn)
            res = await self._call(entry.cmd, MessageReply, math.inf, link=link)
        except ServerError as exc:
            outbox.fail(entry, exc)
        except ClientClosed as exc:
            outbox.fail(entry, exc)
        except ConnectionLost as exc:
            if not self.options.reconnect:
                outbox.fail(entry, exc)
        else:
            outbox.confirm(entry, res.message)

    async def edit(self, message_id: int, text: str, *, timeout: float | None = None) -> Message:
        cmd = c.MsgEdit(message_id=message_id, text=text)
        return (await self._call(cmd, MessageReply, timeout)).message

    async def delete(self, message_id: int, *, timeout: float | None = None) -> None:
        await self._call(c.MsgDelete(message_id=message_id), Empty, timeout)

    async def dm_history(
        self,
        with_: str | None = None,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> HistoryReply:
        cmd = c.DmHistory(with_=with_, before=before, after=after, limit=limit)
        return await self._call(cmd, HistoryReply, timeout)

    async def sync(
        self, since: int, *, limit: int | None = None, timeout: float | None = None
    ) -> SyncReply:
        """One raw sync page (the client runs its own sync after reconnecting)."""
        return await self._call(c.Sync(since=since, limit=limit), SyncReply, timeout)

    async def channels(self, *, timeout: float | None = None) -> list[Channel]:
        """Every room and known user, following the server's pages."""
        page = await self._call(c.Channels(), ChannelsReply, timeout)
        out = list(page.channels)
        while page.more and page.next is not None:
            page = await self._call(c.Channels(after=page.next), ChannelsReply, timeout)
            out += page.channels
        return out

    async def user_delete(self, user: str, *, timeout: float | None = None) -> None:
        await self._call(c.UserDelete(user=user), Empty, timeout)

    async def user_list(self, *, timeout: float | None = None) -> list[UserEntry]:
        """Every registered account, sorted by name (grant ``admin``)."""
        return (await self._call(c.UserList(), UserListReply, timeout)).users

    async def stats(self, *, timeout: float | None = None) -> StatsReply:
        """The server's figures (grant ``admin``); fields newer than this library are
        ignored (``request("stats")`` returns them all)."""
        return await self._call(c.Stats(), StatsReply, timeout)


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
    "encode_command",
]
