"""The command table and the one place where frames become replies.

Each command declares its handler, whether it needs a token, the grant it needs and a
one-line usage; `help` is generated from the table. Auth and grant checks and the mapping
of errors to frames happen here and nowhere else (STYLE 3). Order of checks (contract,
"Client frames"): JSON, command and fields, then token and grants.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import types
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from chatd.app import App
from chatd.bus import Audience, Effects, Events
from chatd.config import Config
from chatd.domain.accounts import UnknownAccount
from chatd.errors import ChatError, Forbidden, Internal, RateLimited
from chatd.protocol.commands import Command, command_name
from chatd.protocol.decode import FrameError, decode_command
from chatd.protocol.frames import RequestId, error_frame, ok_frame
from chatd.protocol.replies import CommandHelp, HelpReply
from chatd.session import Session
from chatd.store.deferred import Deferred

log = logging.getLogger("chatd")

# Plain functions for commands that never wait; async functions for the others.
Handler = Callable[[App, "Request", Any], Any]


class Request(Effects):
    """One command in flight: who sent it, with which token, and the events and closes it
    causes (Effects: addressed to audiences, delivered through chatd.bus; the caller's own
    copies after its reply — contract). Made as ``Request(app, session)``; a Struct, as
    Effects is, for the same reason."""

    app: App
    session: Session
    claims: Any = None
    _user: str | None = None
    _user_key: str | None = None
    _identity: str | None = None

    def authenticated(self, claims: Any) -> None:
        """Remember who the command runs as: the session may be unbound (closed, expired,
        logged out elsewhere) while the command waits for the store."""
        self.claims = claims
        self._user = self.session.user
        self._user_key = self.session.user_key
        self._identity = self.session.identity

    @property
    def user(self) -> str:
        user = self._user or self.session.user
        assert user is not None
        return user

    @property
    def identity(self) -> str:
        """The account the command runs as (chatd.app.identity)."""
        ident = self._identity or self.session.identity
        assert ident is not None
        return ident

    @property
    def user_key(self) -> str:
        key = self._user_key or self.session.user_key
        assert key is not None
        return key

    def has(self, grant: str) -> bool:
        return self.claims is not None and grant in self.claims.grants

    def outcome(self, reply: bytes) -> Outcome:
        """The command's reply with the events and closes it caused (a failed command
        keeps those it caused before failing: a logout that expired other sessions)."""
        return Outcome(reply, self.events or None, self.closes)


@dataclass(frozen=True)
class Spec:
    command: type[Command]
    handler: Handler
    usage: str
    auth: bool = True
    grant: str | None = None
    # May start while earlier commands of the same connection still wait for the store:
    # message writes pipeline into one group commit, their replies still in order.
    overlap: bool = False
    # Counted against the per-connection command rate (backpressure, protocol.md Limits).
    metered: bool = True
    # Field rules msgspec cannot express; run before the token is looked at (contract).
    check: Callable[[Any, Config], None] | None = None
    # The grant `help` shows when the dispatcher does not check it itself (msg.edit and
    # msg.delete judge it after the message lookup: own message, or the `:any` grant).
    shown_grant: str | None = None

    @functools.cached_property
    def name(self) -> str:
        return command_name(self.command)


class Outcome(msgspec.Struct):
    """What running a command gives: its reply, then the events it causes and the
    connections it closes, addressed to audiences (chatd.bus). The edge queues the
    reply, then delivers the events to everyone (``bus.deliver``); a reply that waits
    behind earlier ones has its events sent to everyone else at once
    (``bus.others_now``) and the caller's own share after it.

    A msgspec Struct (never encoded) rather than a class with ``__init__``: every command
    makes one, and a Struct is built in C, with no Python frame (≈0.05 µs of a ping)."""

    reply: bytes
    events: Events | None = None
    closes: list[Audience] | None = None


class Throttle:
    """Not executed: the connection's command bucket is empty; retry after ``delay``."""

    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        self.delay = delay


Result = Union[Outcome, Throttle, "Pending"]


class Pending(msgspec.Struct, eq=False):
    """A command that waits for the store or a hash: its handler coroutine, stopped at
    its first await (``first``), to be driven by the `Driver`. ``finish`` turns the
    handler's value into the Outcome, ``fail`` its exception. Made as
    ``Pending(handler, first, rid, req, name, overlap)``; a Struct as Outcome is (one per
    waiting command), compared and hashed by identity (``eq=False``: the Driver's key)."""

    handler: Coroutine[Any, Any, Any]
    first: Any
    rid: RequestId
    req: Request
    name: str
    overlap: bool

    def finish(self, value: Any) -> Outcome:
        req = self.req  # Request.outcome, inlined: every waiting command ends here
        return Outcome(ok_frame(self.rid, value), req.events or None, req.closes)

    def fail(self, exc: BaseException) -> Outcome:
        if isinstance(exc, ChatError):
            if isinstance(exc, RateLimited):
                self.req.app.stats.rate_limited += 1
            return self.req.outcome(error_frame(self.rid, exc))
        log.error("internal error in %s", self.name, exc_info=exc)
        return self.req.outcome(error_frame(self.rid, Internal("internal error")))


class Driver:
    """The one way a command runs. `Dispatcher.execute` starts a handler with
    ``send(None)``; most finish there, at once, with no Task and no future. One that
    awaits comes back as `Pending`, and `start` goes on driving it from the done-callbacks
    of what it awaits, until it returns; then ``done(tag, outcome)`` is called (the
    connection, which puts the reply in order). No Task per command: a group commit
    resolves thousands of sends in one callback, and a Task each costs more than the send
    itself (figures in ARCHITECTURE.md).

    The contract for handlers (tests/unit/test_driver.py holds it):
    - they may await store `Deferred`s (chatd.store.deferred), asyncio futures (an
      executor's, ``loop.create_future()``) and ``asyncio.sleep(0)`` (a bare yield: goes on
      next turn), and coroutines that await only those;
    - they must not use what needs a Task of their own: ``asyncio.current_task()`` (it is
      None, or an unrelated Task), ``asyncio.timeout`` (raises: not inside a task);
      awaiting anything that is not a future answers ``internal``;
    - an exception from the handler is its reply (`Pending.fail`); a ``CancelledError``
      (or any BaseException) is answered ``internal`` and then propagates to whoever
      resolved the future, as asyncio would.

    ``running`` holds every command being driven, so shutdown can wait for them, with
    its ``(done, tag)`` (kept there, not set on the Pending: a store into a Struct costs
    more than a dict entry's value).
    """

    __slots__ = ("call_soon", "running")

    def __init__(self, call_soon: Callable[..., Any]) -> None:
        self.call_soon = call_soon  # loop.call_soon
        self.running: dict[Pending, tuple[Callable[[Any, Outcome], None], Any]] = {}

    def start(self, pending: Pending, done: Callable[[Any, Outcome], None], tag: Any) -> None:
        self.running[pending] = (done, tag)
        self._wait(pending, pending.first)

    def _wait(self, p: Pending, yielded: Any) -> None:
        if type(yielded) is Deferred and not yielded._done:
            # A store write (every send's): Deferred.add_done_callback inlined. Its
            # _asyncio_future_blocking stays True: only an asyncio Task reads it, and
            # Deferred.__await__ sets it True again before one can.
            yielded._callbacks.append((functools.partial(self._step, p), None))
            return
        if yielded is None:  # a bare yield (asyncio.sleep(0)): go on next turn
            self.call_soon(self._step, p, None)
            return
        if getattr(yielded, "_asyncio_future_blocking", None) is None:
            p.handler.close()
            self._end(p, p.fail(RuntimeError(f"handler awaited {yielded!r}")))
            return
        yielded._asyncio_future_blocking = False
        yielded.add_done_callback(functools.partial(self._step, p))

    def _step(self, p: Pending, fut: Any) -> None:
        handler = p.handler
        try:
            if type(fut) is Deferred:
                # A store write's (every send's): its outcome read in place, not through
                # three method calls (a Deferred is never cancelled).
                exc = fut._exc
                yielded = handler.throw(exc) if exc is not None else handler.send(fut._value)
            elif fut is None:
                yielded = handler.send(None)
            elif fut.cancelled():
                yielded = handler.throw(asyncio.CancelledError())
            else:
                exc = fut.exception()
                yielded = handler.throw(exc) if exc is not None else handler.send(fut.result())
        except StopIteration as stop:
            self._end(p, p.finish(stop.value))
            return
        except Exception as exc:
            self._end(p, p.fail(exc))
            return
        except BaseException as exc:  # CancelledError and friends: answer, then let go
            self._end(p, p.fail(exc))
            raise
        self._wait(p, yielded)

    def _end(self, p: Pending, outcome: Outcome) -> None:
        done, tag = self.running.pop(p)
        done(tag, outcome)


class Dispatcher:
    def __init__(self, app: App, table: list[Spec]) -> None:
        self.app = app
        self.stats = app.stats
        self.specs = {spec.command: spec for spec in table}
        app.help_data = self.help()

    def help(self) -> HelpReply:
        """Every command as protocol.md's table has it; `summary` says it all in one line,
        first after `cmd`, for people reading the reply in a terminal."""
        out = []
        for s in self.specs.values():
            grant = s.grant or s.shown_grant
            out.append(CommandHelp(
                cmd=s.name,
                summary=help_summary(s.usage, s.auth, grant),
                usage=s.usage,
                auth=s.auth,
                grant=grant,
            ))  # fmt: skip
        return HelpReply(commands=out)

    def prepare(self, line: bytes, one_cmd: bool = False) -> tuple[Command, Spec] | Outcome:
        """Decode a frame and find its command, or the error frame to answer with.
        ``one_cmd``: as `decode_command`'s."""
        try:
            cmd = decode_command(line, one_cmd)
        except FrameError as exc:
            self.stats.bad_frames += 1
            return Outcome(error_frame(exc.request_id, exc.error))
        return cmd, self.specs[type(cmd)]

    def _not_another_users(self, session: Session, token: str) -> None:
        """Contract: a frame carrying another user's token on a bound connection is
        `forbidden`, even on commands that need no token (their token is not otherwise
        checked, so an invalid one is simply ignored)."""
        try:
            claims = self.app.tokens.verify(token)
        except ChatError:
            return
        if claims.sub.lower() != session.user_key:
            raise Forbidden(f"this connection is logged in as {session.user}; log out first")

    def _is_bound_token(self, session: Session, token: str) -> bool:
        """Whether `token` (just verified) is the one `session` is bound to."""
        return session.claims is not None and self.app.tokens.verify(token) == session.claims

    def handle(self, session: Session, line: bytes) -> Result:
        prepared = self.prepare(line)
        if isinstance(prepared, Outcome):
            return prepared
        return self.execute(session, *prepared)

    def _after_reading(
        self, key: str, session: Session, cmd: Command, spec: Spec, req: Request
    ) -> Result:
        """A frame token of an account not in memory: read the account from the store (a
        `chatd user add` of a moment ago counts at once), then authenticate and run the
        command as usual. Not overlapped: it runs in order with the connection's others."""

        async def run() -> Any:
            await self.app.refresh_user(key)
            req.authenticated(self.app.authenticate(session, cmd.token))
            _check_grant(spec, req)
            value = spec.handler(self.app, req, cmd)
            if type(value) is types.CoroutineType:
                value = await value
            return value

        coro = run()
        try:
            first = coro.send(None)
        except StopIteration as stop:
            return req.outcome(ok_frame(cmd.id, stop.value))
        return Pending(coro, first, cmd.id, req, spec.name, False)

    def execute(self, session: Session, cmd: Command, spec: Spec) -> Result:
        """Run one command. Most finish here, synchronously; those that wait for the store
        or a hash come back as Pending, to be awaited in order by the connection."""
        if spec.metered and session.commands is not None:
            delay = session.commands.take(self.app.clock.now())
            if delay:
                self.stats.throttled += 1
                return Throttle(delay)
        self.stats.commands += 1
        req = Request(self.app, session)
        rid = cmd.id
        try:
            if spec.check is not None:
                spec.check(cmd, self.app.config)
            if spec.auth:
                try:
                    req.authenticated(self.app.authenticate(session, cmd.token))
                except UnknownAccount as exc:
                    if cmd.token is None or self._is_bound_token(session, cmd.token):
                        raise
                    return self._after_reading(exc.key, session, cmd, spec, req)
                if spec.grant is not None:
                    _check_grant(spec, req)
            elif cmd.token is not None and session.user_key is not None:
                self._not_another_users(session, cmd.token)
            coro = spec.handler(self.app, req, cmd)
            if type(coro) is not types.CoroutineType:
                # A plain function (ping, help): its value is the reply, no coroutine.
                # (Request.outcome, inlined: this is every ping's path.)
                return Outcome(ok_frame(rid, coro), req.events or None, req.closes)
            try:
                first = coro.send(None)
            except StopIteration as stop:
                return Outcome(ok_frame(rid, stop.value), req.events or None, req.closes)
        except ChatError as exc:
            if isinstance(exc, RateLimited):
                self.stats.rate_limited += 1
            return req.outcome(error_frame(rid, exc))
        except Exception:
            log.exception("internal error in %s", spec.name)
            return req.outcome(error_frame(rid, Internal("internal error")))
        return Pending(coro, first, rid, req, spec.name, spec.overlap)


def help_summary(usage: str, auth: bool, grant: str | None) -> str:
    """One line: "msg.edit message_id text — edit a message [token; grant msg:edit]"."""
    needs = "no token" if not auth else "token" + (f"; grant {grant}" if grant else "")
    return f"{usage} [{needs}]"


def _check_grant(spec: Spec, req: Request) -> None:
    if spec.grant is not None and spec.grant not in req.claims.grants:
        raise Forbidden(f"{spec.name} needs the {spec.grant} grant")


def command_table() -> list[Spec]:
    """Every command: the single source for dispatch, auth needs, grants and `help`."""
    from chatd.handlers import accounts, messages, rooms, system
    from chatd.protocol import commands as c

    return [
        Spec(c.Ping, system.ping, "ping — answers {pong:true}", auth=False, metered=False),
        Spec(c.Help, system.help_, "help [command] — this list, or one command's entry",
             auth=False),
        Spec(c.Register, accounts.register, "register user password — create an account",
             auth=False, check=accounts.check_register),
        Spec(c.Login, accounts.login,
             "login user [password] [grants] [ttl] — get a token (no password: guest)",
             auth=False, check=accounts.check_login),
        Spec(c.Auth, accounts.auth, "auth token — bind this connection to a token",
             auth=False, check=accounts.check_auth),
        Spec(c.Refresh, accounts.refresh, "refresh — a new token with a fresh lifetime"),
        Spec(c.Logout, accounts.logout, "logout [all] — revoke this token (all: every token)"),
        Spec(c.WhoAmI, accounts.whoami, "whoami — user, grants and expiry of the token"),
        Spec(c.Passwd, accounts.passwd,
             "passwd password new_password — change the password; a new token, all others end",
             check=accounts.check_passwd),
        Spec(c.UserDelete, accounts.user_delete, "user.delete user — delete an account",
             grant="admin"),
        Spec(c.UserList, accounts.user_list, "user.list — every registered account",
             grant="admin"),
        Spec(c.RoomCreate, rooms.create,
             "room.create room [topic] [ephemeral] [open] — create and join a room",
             grant="room:create"),
        Spec(c.RoomEdit, rooms.edit, "room.edit room [topic] [name] — change topic or rename",
             grant="room:edit", check=rooms.check_edit),
        Spec(c.RoomDelete, rooms.delete, "room.delete room — delete a room and its history",
             grant="room:delete"),
        Spec(c.RoomList, rooms.list_, "room.list [after] [limit] — rooms by name, a page at a time",
             check=rooms.check_list),
        Spec(c.RoomJoin, rooms.join, "room.join room — join a room"),
        Spec(c.RoomLeave, rooms.leave, "room.leave room — leave a room"),
        Spec(c.RoomMembers, rooms.members, "room.members room — who is in a room"),
        Spec(c.RoomHistory, messages.room_history,
             "room.history room [before] [after] [limit] — a page of messages, oldest first",
             check=messages.check_limit),
        Spec(c.MsgSend, messages.send, "msg.send room|to text [nonce] — post a message",
             overlap=True, metered=False, check=messages.check_send),
        # msg.edit/msg.delete look the message up before they write, so a send pipelined
        # behind one would take an earlier revision yet reach the room later: they do not
        # overlap (contract: each connection gets message events in revision order).
        Spec(c.MsgEdit, messages.edit,
             "msg.edit message_id text — edit a message (another's: msg:edit:any)",
             metered=False, check=messages.check_edit, shown_grant="msg:edit"),
        Spec(c.MsgDelete, messages.delete,
             "msg.delete message_id — delete a message (another's: msg:delete:any)",
             shown_grant="msg:delete"),
        Spec(c.DmHistory, messages.dm_history,
             "dm.history [with] [before] [after] [limit] — direct messages, oldest first",
             check=messages.check_limit),
        Spec(c.Sync, messages.sync, "sync since [limit] — every change after a revision",
             check=messages.check_limit),
        Spec(c.Channels, rooms.channels,
             "channels [after] [limit] — rooms and known users, a page at a time",
             check=rooms.check_list),
        Spec(c.Stats, system.stats, "stats — server figures: connections, rates, store",
             grant="admin"),
    ]
