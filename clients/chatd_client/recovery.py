"""What the client remembers to survive a disconnect, and how it resumes (wire contract,
"Revisions"; STYLE 11). Sans-I/O: no sockets, no asyncio; unit tests drive it by hand.

:class:`Recovery` is the one owner of the session's state: credentials, the rooms to
re-join, the epoch and the highest revision seen (the ``sync`` cursor and the dedupe
bound), and the :class:`Outbox` of sends not yet confirmed. Everything that changes it goes
through a method named for what happened (``logged_in``, ``joined``, ``accept`` …).

Resuming is a conversation: :meth:`Recovery.resume` returns a :class:`Resume` whose
:meth:`~Resume.steps` generator yields the commands to send, one :class:`Step` at a time,
and takes each reply back (``gen.send(reply)``, or ``gen.throw(server_error)``). In order:
re-authenticate (token; a refused token is replaced only by a login with the password,
never by a guest login: :class:`Refused` ends the client), re-join every room, ``sync``
from the highest revision seen (or from ``hello.rev`` when the epoch changed), then resend
the queued sends with their nonces. Live message events that arrive meanwhile are
:meth:`~Resume.hold`-ed; :meth:`~Resume.commit` then merges them with the sync pages by
revision, drops what was seen before, applies the changes to the state in one go and
returns the events for the application.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import msgspec

from chatd.protocol import commands as c
from chatd.protocol.models import Message
from chatd.protocol.replies import (
    AuthReply,
    LoginReply,
    MessageReply,
    RefreshReply,
    RoomJoinReply,
    SyncReply,
)
from chatd_client.codec import Waiter
from chatd_client.errors import (
    ClientError,
    ServerError,
    SessionEnded,
    TokenExpired,
    Unauthorized,
)
from chatd_client.types import EPOCH_CHANGED, RECONNECTED, REJOIN_FAILED, Event, Hello

__all__ = [
    "END",
    "REFRESH",
    "RELOGIN",
    "Outbox",
    "Queued",
    "Recovery",
    "Refused",
    "Resume",
    "Step",
]

# What a live event asks the client to do (Recovery.observe).
REFRESH = "refresh"  # session.expiring: get a fresh token quietly
RELOGIN = "relogin"  # session.expired with a password at hand: log in again on this socket
END = "end"  # expired beyond refresh or revoked: nothing proves this identity again


class Step(NamedTuple):
    """A command to send and the reply Struct to decode its ``ok`` data with."""

    cmd: c.Command
    kind: type[Any]


class Refused(Exception):
    """The server refused the session (``unauthorized``/``token_expired`` on re-auth): not
    a transient fault. The client ends (``SessionEnded``) instead of trying as a guest."""

    def __init__(self, error: ServerError, user: str | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.user = user

    def session_ended(self) -> SessionEnded:
        """What the client's calls raise from now on (issue 12: it says why, and that the
        client will not log in as anyone else)."""
        e = self.error
        return SessionEnded(
            f"the server refused the session of {self.user!r} ({e.code}: {e.message}); "
            "not logging in as anyone else",
            code=e.code,
        )


class Queued:
    """A ``msg.send`` not yet confirmed, and who waits for its Message."""

    __slots__ = ("cmd", "conn", "waiter")

    def __init__(self, cmd: c.MsgSend, waiter: Waiter) -> None:
        self.cmd = cmd
        self.waiter = waiter
        self.conn: int | None = None  # the connection it was last written on


class Outbox:
    """Sends waiting for their reply, across reconnects. Each carries a nonce, so sending
    one again after a drop never posts it twice (contract, "Revisions")."""

    def __init__(self) -> None:
        self._items: list[Queued] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, cmd: c.MsgSend, waiter: Waiter) -> Queued:
        entry = Queued(cmd, waiter)
        self._items.append(entry)
        return entry

    def discard(self, entry: Queued) -> None:
        """The sender stopped waiting (confirmed, failed, timed out)."""
        if entry in self._items:
            self._items.remove(entry)

    def written(self, entry: Queued, conn: int) -> None:
        """``entry`` went out on connection ``conn``: its reply, or a drop, comes next."""
        entry.conn = conn

    def next_unsent(self, conn: int) -> Queued | None:
        """The oldest send not yet written on connection ``conn``."""
        for entry in self._items:
            if entry.conn != conn and not entry.waiter.done():
                return entry
        return None

    def confirm(self, entry: Queued, message: Message) -> None:
        self.discard(entry)
        if not entry.waiter.done():
            entry.waiter.set_result(message)

    def fail(self, entry: Queued, error: BaseException) -> None:
        self.discard(entry)
        if not entry.waiter.done():
            entry.waiter.set_exception(error)

    def fail_all(self, error: Callable[[], ClientError]) -> None:
        items, self._items = self._items, []
        for entry in items:
            if not entry.waiter.done():
                entry.waiter.set_exception(error())


class Recovery:
    """The session state a reconnect restores (see the module docstring)."""

    def __init__(
        self, *, user: str | None = None, password: str | None = None, token: str | None = None
    ) -> None:
        self.user = user
        self.password = password
        self.token = token
        self.authed = False  # whether the session should be restored after a reconnect
        self.guest = False  # logged in as a guest by this client: close() logs it out
        self.grants: list[str] = []
        self.expires_at: int | None = None
        self.rooms: dict[str, str] = {}  # lower -> display name, to re-join
        self.epoch: str | None = None
        self.rev = 0  # highest revision seen: the sync cursor and the dedupe bound
        self.max_id = 0  # highest message id seen: tells an edit from a new message in sync
        self.outbox = Outbox()

    # --- credentials -------------------------------------------------------------------

    def bound(self, user: str, grants: list[str], expires_at: int) -> None:
        self.user, self.grants, self.expires_at, self.authed = user, grants, expires_at, True

    def logged_in(self, res: LoginReply, password: str | None) -> None:
        """A ``login`` the application made: remembered for reconnects."""
        self.password = password
        self.token = res.token
        self.guest = password is None
        self.bound(res.user, res.grants, res.expires_at)

    def authed_with(self, token: str, res: AuthReply) -> None:
        self.token = token
        self.guest = False  # not known from a token: close() keeps it unless asked
        self.bound(res.user, res.grants, res.expires_at)

    def refreshed(self, res: RefreshReply) -> None:
        self.token, self.expires_at = res.token, res.expires_at

    def password_changed(self, new_password: str, res: RefreshReply) -> None:
        """``passwd``: the new token is bound; a re-login uses the new password."""
        self.password = new_password
        self.refreshed(res)

    def logged_out(self) -> None:
        """The client forgets its credentials and rooms."""
        self.token = self.password = None
        self.authed = self.guest = False
        self.rooms.clear()

    def token_expired(self) -> None:
        """``session.expired`` with the password at hand: the next authenticate logs in."""
        self.token = None

    def ended(self) -> None:
        """The server refused the session: nothing to restore any more."""
        self.authed = False

    def authenticate(self) -> Generator[Step, Any, None]:
        """Token first (``auth``). A refused token is replaced only by a login with the
        password, which proves the same account; never by a guest login of the same name
        (issue 12: a deleted account must not come back as a guest). A guest login happens
        only when there was no token yet. Raises the refusal's ServerError."""
        if self.token is not None:
            try:
                r = yield Step(c.Auth(token=self.token), AuthReply)
            except (Unauthorized, TokenExpired):
                if self.user is None or self.password is None:
                    raise
            else:
                self.bound(r.user, r.grants, r.expires_at)
                return
        assert self.user is not None
        res = yield Step(c.Login(user=self.user, password=self.password), LoginReply)
        self.token = res.token
        self.guest = self.password is None
        self.bound(res.user, res.grants, res.expires_at)

    # --- rooms -------------------------------------------------------------------------

    def joined(self, name: str) -> None:
        self.rooms[name.lower()] = name

    def left(self, name: str) -> None:
        self.rooms.pop(name.lower(), None)

    def renamed(self, old: str, new: str) -> None:
        if old.lower() in self.rooms:
            del self.rooms[old.lower()]
            self.rooms[new.lower()] = new

    # --- events ------------------------------------------------------------------------

    def started(self, hello: Hello) -> None:
        """The first connection: its store and revision are the starting point."""
        self.epoch, self.rev = hello.epoch, hello.rev

    def accept(self, ev: Event) -> bool:
        """Whether a message change is new. One connection sees changes in revision order
        (contract), and sync pages are merged by revision: a change is (id, rev) and
        revisions are unique, so anything at or below the highest revision seen is a
        repeat."""
        msg = ev.message
        assert msg is not None
        if msg.rev <= self.rev:
            return False
        self.rev = msg.rev
        self.max_id = max(self.max_id, msg.id)
        return True

    def observe(self, ev: Event, *, current: bool) -> str | None:
        """A live event other than a message change: keep the rooms in step, and say what
        the client should do (REFRESH, RELOGIN, END) if it came on the current connection."""
        if ev.name == "room.updated":
            prev = ev.data.get("previous_name")
            if isinstance(prev, str) and ev.room is not None:
                self.renamed(prev, ev.room)
        elif ev.name == "room.closed" and ev.room is not None:
            self.left(ev.room)
        elif ev.name == "session.expiring" and current:
            return REFRESH
        elif ev.name == "session.expired" and current:
            self.expires_at = None
            revoked = ev.data.get("reason") == "logout"
            if self.password is not None and not revoked:
                return RELOGIN
            if self.authed:
                return END
        return None

    # --- resuming ----------------------------------------------------------------------

    def resume(self, hello: Hello, *, conn: int, attempts: int = 0, notice: bool = True) -> Resume:
        """One resume on connection ``conn`` (whose ``hello`` this is)."""
        return Resume(self, hello, conn=conn, attempts=attempts, notice=notice)


class Resume:
    """One run of re-auth, re-join, sync and resend on a fresh connection."""

    def __init__(
        self, rec: Recovery, hello: Hello, *, conn: int, attempts: int, notice: bool
    ) -> None:
        self._rec = rec
        self._hello = hello
        self._conn = conn
        self._attempts = attempts
        self._notice = notice
        self.epoch_changed = hello.epoch != rec.epoch
        # A new store: the old cursor means nothing there (contract, "Revisions").
        self.since = hello.rev if self.epoch_changed else rec.rev
        self._changes: list[Event] = []
        self._held: list[Event] = []
        self._failed: list[tuple[str, str, ServerError]] = []  # (key, name, why)
        self._rejoined: list[tuple[str, str]] = []  # (key, name as the server has it)

    def hold(self, ev: Event) -> None:
        """A live message change that arrived while resuming: merged at commit."""
        self._held.append(ev)

    def steps(self) -> Generator[Step, Any, None]:
        """The commands to send, in order; send each reply back, throw each ServerError
        in. Raises :class:`Refused` when the server refuses the session, and a ServerError
        it cannot recover from here (the next attempt starts over)."""
        rec = self._rec
        if rec.authed:
            try:
                yield from rec.authenticate()
            except (Unauthorized, TokenExpired) as exc:
                raise Refused(exc, rec.user) from exc
            yield from self._rejoin()
            yield from self._sync()
        yield from self._resend()

    def _rejoin(self) -> Generator[Step, Any, None]:
        for key, name in list(self._rec.rooms.items()):
            try:
                joined: RoomJoinReply = yield Step(c.RoomJoin(room=name), RoomJoinReply)
            except ServerError as exc:
                self._failed.append((key, name, exc))
            else:
                self._rejoined.append((key, joined.room.name))

    def _sync(self) -> Generator[Step, Any, None]:
        since = self.since
        max_id = self._rec.max_id
        while True:
            page: SyncReply = yield Step(c.Sync(since=since), SyncReply)
            for m in page.changes:
                if m.deleted:
                    data = {"id": m.id, "rev": m.rev, "room": m.room, "to": m.to, "by": None}
                    name = "message.deleted"
                elif m.edited_ts is not None and m.id <= max_id:
                    name, data = "message.edited", msgspec.to_builtins(m)
                else:
                    name, data = "message", msgspec.to_builtins(m)
                self._changes.append(Event(name, data, m.room, m, recovered=True))
            since = page.rev
            if not page.more:
                return

    def _resend(self) -> Generator[Step, Any, None]:
        """Sends queued while disconnected, or whose reply a drop lost, go again with
        their nonce; the server answers a repeated nonce with the original message. Looked
        up after each reply, so a send queued meanwhile goes too."""
        outbox = self._rec.outbox
        while (entry := outbox.next_unsent(self._conn)) is not None:
            outbox.written(entry, self._conn)
            try:
                res: MessageReply = yield Step(entry.cmd, MessageReply)
            except ServerError as exc:
                outbox.fail(entry, exc)
            else:
                outbox.confirm(entry, res.message)

    def commit(self) -> list[Event]:
        """Apply the resume to the state at once; the events for the application, in
        order: rejoin failures, ``epoch.changed``, ``reconnected``, then every change
        missed or held, each once, in revision order."""
        rec = self._rec
        out: list[Event] = []
        for key, name, exc in self._failed:
            rec.rooms.pop(key, None)
            failed = {"room": name, "code": exc.code, "message": exc.message}
            out.append(Event(REJOIN_FAILED, failed, name))
        for key, name in self._rejoined:
            if key in rec.rooms:  # not closed meanwhile
                del rec.rooms[key]
                rec.rooms[name.lower()] = name
        hello = self._hello
        if self.epoch_changed:
            out.append(Event(EPOCH_CHANGED, {"old": rec.epoch, "new": hello.epoch}))
            rec.epoch, rec.rev, rec.max_id = hello.epoch, self.since, 0
        if self._notice:
            notice = {"attempts": self._attempts, "epoch_changed": self.epoch_changed}
            out.append(Event(RECONNECTED, notice))
        merged = sorted(self._changes + self._held, key=_rev)
        self._held = []
        out += [ev for ev in merged if rec.accept(ev)]
        rec.rev = max(rec.rev, self.since)
        return out


def _rev(ev: Event) -> int:
    return ev.message.rev if ev.message is not None else 0
