"""The composition root of the sans-I/O core: it makes the domain objects (each the only
writer of its state) and holds the rules that span them — binding a connection, expiry,
leaving rooms, an account deleted elsewhere. Events leave only through the Bus
(chatd.bus), as part of a command's outcome (the caller's Effects) or a timer's. The
server supplies a Scheduler for timers and background tasks; tests supply a fake one.

Where state lives:
  accounts  (chatd.domain.accounts)  users, guest holds and their grace, revocations,
                                     registrations in flight, token generations
  presence  (chatd.domain.presence)  sessions, who is online, bindings, expiry heap
  limits    (chatd.domain.limits)    send budgets, login failures, register/guest budgets
  nonces    (chatd.domain.nonces)    nonces already answered
  rooms     (chatd.rooms)            live rooms and membership
  here                               member.left events waiting to be batched
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from chatd.bus import Bus, Effects, LocalBus, ToRoom, ToSessions, deliver
from chatd.clock import Clock
from chatd.config import Config
from chatd.domain.accounts import Accounts, Scheduler, UnknownAccount
from chatd.domain.identity import is_guest_jti
from chatd.domain.limits import Limits
from chatd.domain.nonces import Nonces
from chatd.domain.presence import Presence
from chatd.errors import Forbidden, StorageFailed, StoreStopped, Unauthorized
from chatd.protocol.events import (
    Batch,
    Frame,
    Hello,
    MemberLeft,
    SessionExpired,
    SessionExpiring,
)
from chatd.protocol.replies import HelpReply
from chatd.rooms import LiveRoom, RoomManager
from chatd.session import Peer, Session
from chatd.stats import Stats
from chatd.store.base import Snapshot, Store, UserRecord
from chatd.version import VERSION

if TYPE_CHECKING:
    from chatd.auth import Claims, PasswordHasher, TokenService

log = logging.getLogger("chatd")
__all__ = ["VERSION", "App", "Scheduler", "UnknownAccount"]  # VERSION: for older imports
# How long a room's `member.left` events may wait while the room keeps losing members on
# every loop turn (a mass disconnect): the bound on their delay, not the usual one.
LEFT_MAX_WAIT = 1.0


class _Departures:
    """`member.left` events of one room not yet sent, oldest first."""

    __slots__ = ("events", "fresh", "since")

    def __init__(self, since: float) -> None:
        self.events: list[MemberLeft] = []
        self.fresh = True  # one came in since the flush timer last looked
        self.since = since


class App:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        store: Store,
        tokens: TokenService,
        hasher: PasswordHasher,
        scheduler: Scheduler,
        stats: Stats | None = None,
        closing: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        # True while the host still has closed connections to clean up (their sessions
        # are still to leave their rooms): waiting departures wait for them (see depart).
        self._closing = closing or (lambda: False)
        self.stats = stats or Stats()  # counters for `stats` and /metrics (chatd.stats)
        self.clock = clock
        self.store = store
        self.tokens = tokens
        self.hasher = hasher
        self.scheduler = scheduler
        self.rooms = RoomManager()
        self.presence = Presence(config, clock, scheduler, self._token_due)
        self.accounts = Accounts(config, clock, store, scheduler, self.presence.is_online)
        self.limits = Limits(config, clock)
        self.nonces = Nonces(config.nonce_cache)
        self.bus: Bus = LocalBus(self.presence, self.stats)
        self.epoch = ""
        self.help_data = HelpReply(commands=[])  # the command table's, set by the Dispatcher
        # member.left events waiting to go out, per room (see leave and settle).
        self._departures: dict[LiveRoom, _Departures] = {}
        # Accounts whose change this node is writing (passwd, logout all, user.delete), and
        # how many such writes: refresh_user waits for them (account_change).
        self._account_changes: dict[str, tuple[int, asyncio.Event]] = {}
        self._departure_timer: Any = None
        # Several nodes (chatd/cluster): departures are announced from the change stream,
        # on every node, so they go to this node's connections only (not back to Redis).
        self.deliver_departures: Callable[[ToRoom, Frame], object] | None = None
        # Several nodes: whether an ephemeral room nobody is in here goes is Redis's call.
        self.close_if_unused: Callable[[LiveRoom], None] | None = None

    # --- start and stop --------------------------------------------------------------

    def load(self, snap: Snapshot) -> None:
        self.epoch = snap.epoch
        self.accounts.load(snap)
        self.rooms.load(snap.rooms)

    def hello(self) -> Hello:
        """The first event of every connection (it carries the store's revision now)."""
        c = self.config
        return Hello(
            server="chatd",
            version=VERSION,
            protocol=1,
            max_frame=c.max_frame,
            max_text=c.max_text,
            history_limit=c.history_limit,
            epoch=self.epoch,
            rev=self.store.rev,
        )

    @property
    def users_version(self) -> int:
        return self.accounts.users_version

    def purge(self, now: float) -> None:
        """Periodic housekeeping: expired revocations, lapsed holds, refilled buckets."""
        self.accounts.purge(now)
        self.limits.purge(now)

    def sweep_holds(self) -> None:
        self.accounts.sweep_holds()

    def suspend_holds(self) -> None:
        self.accounts.suspend_holds()

    # --- sessions --------------------------------------------------------------------

    def open_session(self, peer: Peer, ip: str) -> Session:
        return self.presence.open(peer, ip)

    def close_session(self, s: Session) -> None:
        """The connection is gone: leave every room (others see `disconnected`)."""
        if not self.presence.close(s):
            return
        self.limits.forget_connection(s)
        self.unbind(s, "disconnected")

    def sessions_of(self, user_key: str) -> list[Session]:
        return list(self.presence.sessions_of(user_key))

    # --- tokens ----------------------------------------------------------------------

    def authenticate(self, s: Session, token: str | None) -> Claims:
        """The token of a command: the frame's, else the bound one (contract). Binds the
        connection to the first valid token. Raises Unauthorized, TokenExpired, Forbidden."""
        if token is None:
            if s.claims is None:
                raise Unauthorized("this command needs a token: login, auth, or add a token field")
            # The bound token was verified when it was bound: its claims stand for it (the
            # token string itself is not kept); only its lifetime is checked again.
            claims = self.tokens.current(s.claims)
            bound = True
        else:
            claims = self.tokens.verify(token)
            bound = claims == s.claims  # the bound token, given in the frame
        try:
            self.accounts.check_claims(claims)
        except Unauthorized:
            if bound:
                # The bound token died without expiring (a guest's hold released, say):
                # unbind, don't wedge. It died before this command, so the notice is a
                # timer-like outcome of its own, delivered at once (ahead of the reply).
                fx = Effects()
                self.expire(s, None, fx)
                deliver(self.bus, fx)
            raise
        if s.user_key is None:
            self.bind(s, claims)
        elif claims.sub.lower() != s.user_key:
            raise Forbidden(f"this connection is logged in as {s.user}; log out first")
        return claims

    def bind(self, s: Session, claims: Claims) -> None:
        """Bind `s` to the verified claims of a token (the token string is not kept)."""
        if s.closed:
            return  # gone while its login waited: nothing to bind, no timers to leak
        key = claims.sub.lower()
        if s.user_key is not None and s.user_key != key:
            raise Forbidden(f"this connection is logged in as {s.user}; log out first")
        if s.claims is not None and s.claims.jti == claims.jti:
            return  # `auth` again with the bound token: its timers stand (notice once per token)
        self.presence.bind(s, claims, self.accounts.display_name(claims.sub))
        if is_guest_jti(claims.jti):
            self.accounts.settle_hold(key)

    def _token_due(self, s: Session, claims: Claims, expired: bool) -> None:
        """Presence's expiry heap: the notice, then the expiry of a bound token (a timer's
        outcome, delivered through the bus)."""
        if expired and (wait := self.bus.caught_up()) is not None:
            # Several nodes: what was written anywhere before the token expired reaches
            # the connection before its session.expired, as on one server (protocol.md).
            self.scheduler.spawn(self._expire_when_caught_up(s, claims, wait))
            return
        fx = Effects()
        if expired:
            self.expire(s, None, fx)
        else:
            fx.emit(ToSessions(s), SessionExpiring(expires_at=claims.exp))
        deliver(self.bus, fx)

    async def _expire_when_caught_up(self, s: Session, claims: Claims, wait: Awaitable[None]) -> None:
        await wait
        if s.claims is claims:  # not unbound, rebound or closed meanwhile
            fx = Effects()
            self.expire(s, None, fx)
            deliver(self.bus, fx)

    def expire(self, s: Session, reason: str | None, fx: Effects) -> None:
        """The bound token expired or was revoked elsewhere: tell the client, leave rooms,
        unbind; the connection stays open (contract)."""
        fx.emit(ToSessions(s), SessionExpired(reason=reason or None))
        self.unbind(s, reason or "expired")

    def unbind(self, s: Session, reason: str) -> None:
        """Leave every room (others see `reason`), forget the token, stop its timers."""
        self.leave_all(s, reason)
        key = s.user_key
        guest = s.claims is not None and is_guest_jti(s.claims.jti)
        self.presence.unbind(s)
        if key is not None and guest:
            self.accounts.settle_hold(key)  # its last connection: the grace starts

    def end_revoked_sessions(self, key: str, fx: Effects) -> None:
        """Connections of `key` whose token stopped working get `session.expired` (logout)."""
        for other in self.sessions_of(key):
            if other.claims is None:
                continue
            try:
                self.accounts.check_claims(other.claims)
            except Unauthorized:
                self.expire(other, "logout", fx)

    # --- rooms -----------------------------------------------------------------------

    def leave_all(self, s: Session, reason: str) -> None:
        for room in self.rooms.rooms_of(s):
            self.leave(room, s, reason)

    def leave(self, room: LiveRoom, s: Session, reason: str) -> None:
        """Take the connection out of the room at once; its `member.left` (when it was the
        user's last connection) goes out batched with the room's other departures."""
        user = s.user
        if self.rooms.leave(room, s, reason) and user is not None:
            self.depart(room, MemberLeft(room=room.name, user=user, reason=reason))
        self.drop_if_unused(room)

    def drop_if_unused(self, room: LiveRoom) -> None:
        """An ephemeral room with no member left goes (with several nodes Redis decides
        that, with the leave: chatd/cluster)."""
        if not (room.ephemeral and room.is_empty() and not room.deleted):
            return
        if self.close_if_unused is not None:
            self.close_if_unused(room)
        elif self.rooms.on_presence is None:
            self.forget_emptied(room)
            # Queued now, before anything that could reuse the name is (store order).
            self.scheduler.spawn(self._drop_room(room, self.store.delete_room(room.id)))

    def forget_emptied(self, room: LiveRoom) -> None:
        """An ephemeral room closed because nobody is in it: forget it, telling nobody."""
        self._departures.pop(room, None)  # nobody is left to tell
        self.rooms.remove(room)

    # Issue 13, item 2: when K members of a room drop at once, sending each departure to
    # the room at once costs O(K²): every member still to be found closed gets all the
    # others' member.left. So departures are kept per room and sent when the room has
    # lost nobody for a whole loop turn and the host has no closed connection left to
    # clean up (the mass disconnect is over, the closed connections are out of the room:
    # a batch sent earlier is written to thousands of sockets whose peers are gone and
    # whose EOF the server has not handled yet), joined into one write per remaining
    # connection; after LEFT_MAX_WAIT at the latest. Anything else the room's connections are told or
    # asked (messages, joins, member lists, renames, closing) settles the room first, so
    # each connection still sees a room's events in the order they happened.

    def depart(self, room: LiveRoom, event: MemberLeft) -> None:
        pending = self._departures.get(room)
        if pending is None:
            pending = self._departures[room] = _Departures(self.clock.now())
        pending.events.append(event)
        pending.fresh = True
        if self._departure_timer is None:
            self._departure_timer = self.scheduler.call_later(0, self._flush_departures)

    def _flush_departures(self) -> None:
        self._departure_timer = None
        now = self.clock.now()
        waiting = False
        closing = self._closing()
        for room, pending in list(self._departures.items()):
            if (pending.fresh or closing) and now - pending.since < LEFT_MAX_WAIT:
                pending.fresh = False  # look again next turn
                waiting = True
            else:
                self.settle(room)
        if waiting:
            self._departure_timer = self.scheduler.call_later(0, self._flush_departures)

    async def caught_up(self) -> None:
        """Several nodes: done once this node has applied every change made anywhere
        before now (a client that acted on another node sees its change); one node: at once."""
        wait = self.bus.caught_up()
        if wait is not None:
            await wait

    def settle(self, room: LiveRoom) -> None:
        """Send the room's waiting `member.left` events to its connections now (they
        happened before whatever comes next, so they are nobody's command's own events):
        call it before anything else goes to the room or is read from its member list."""
        pending = self._departures.pop(room, None)
        if pending is not None:
            events = pending.events
            send = self.deliver_departures or self.bus.publish
            send(ToRoom(room), events[0] if len(events) == 1 else Batch(events))

    def departures_waiting(self) -> int:
        """Rooms with `member.left` events not yet sent."""
        return len(self._departures)

    async def _drop_room(self, room: LiveRoom, deleting: Awaitable[None]) -> None:
        try:
            await deleting
        except (StorageFailed, StoreStopped):
            pass  # the server is stopping: the room is dropped at the next start
        except Exception:  # logged: the room is gone from memory and is dropped at start
            log.exception("could not delete ephemeral room %s", room.name)

    # --- accounts changed --------------------------------------------------------------

    def drop_user(self, key: str, reason: str, fx: Effects) -> None:
        """The account is gone (the caller made accounts forget it): its connections leave
        their rooms and are closed, after the reply of the command that caused it."""
        sessions = self.sessions_of(key)
        for s in sessions:
            self.unbind(s, reason)
        if sessions:
            fx.close(ToSessions.of(sessions))

    def apply_users(self, version: int, users: list[UserRecord]) -> None:
        """Adopt the accounts as the database has them now (after `chatd user …`)."""
        fx = Effects()
        fresh = {u.name.lower(): u for u in users}
        for user in self.accounts.users():
            key = user.name.lower()
            if key not in fresh:
                self.adopt_user(key, None, fx)
        for key, u in fresh.items():
            self.adopt_user(key, u, fx)
        self.accounts.synced(version)
        deliver(self.bus, fx)

    def adopt_user(self, key: str, new: UserRecord | None, fx: Effects) -> None:
        """Take one account as the database has it now (None: it is gone)."""
        old = self.accounts.user(key)
        if old is not None and (new is None or new.id != old.id):
            self.accounts.forget_user(key)
            self.drop_user(key, "deleted", fx)
        elif old is not None and new is not None and (
            new.token_version != old.token_version or new.pw_hash != old.pw_hash
        ):
            self.accounts.adopt(key, new)
            self.end_revoked_sessions(key, fx)
        if new is None:
            return
        _, dropped_hold = self.accounts.adopt(key, new)
        if dropped_hold:
            # The account won the name (registered through the command line while the
            # hold lapsed): the guest's session ends.
            for s in self.sessions_of(key):
                if s.claims is not None and is_guest_jti(s.claims.jti):
                    self.expire(s, None, fx)

    @contextlib.contextmanager
    def account_change(self, key: str) -> Iterator[None]:
        """This node is writing a change of account `key` that its handler then makes in
        memory, inside the `with`: until it ends, refresh_user waits, so no read (a login,
        an `auth`, another node's change read from the stream) adopts the store's new
        state first and ends the sessions the handler itself answers or ends."""
        n, done = self._account_changes.get(key, (0, None))
        self._account_changes[key] = (n + 1, done or asyncio.Event())
        try:
            yield
        finally:
            n, done = self._account_changes[key]
            if n > 1:
                self._account_changes[key] = (n - 1, done)
            else:
                del self._account_changes[key]
                done.set()

    async def refresh_user(self, key: str) -> UserRecord | None:
        """Read one account from the store and adopt it: `chatd user add` (or delete) of a
        moment ago counts at once, not at the next poll (contract). After any change of it
        this node is writing (account_change)."""
        changing = self._account_changes.get(key)
        if changing is not None:
            await changing[1].wait()  # bounded: a store write answers within its timeout
        before = self.accounts.user(key)
        rec = await self.store.get_user(key)
        if self.accounts.user(key) is before:
            # Compare-and-set: a read that began before a change made here meanwhile
            # (register, logout all, passwd replace the record) must not undo it.
            fx = Effects()
            self.adopt_user(key, rec, fx)
            deliver(self.bus, fx)
        return self.accounts.user(key)

