"""The composition root of the sans-I/O core: accounts in memory, rooms, sessions, and the
rules that span them (binding, expiry, cleanup). The server supplies a Scheduler for
timers and background tasks; tests supply a fake one."""

from __future__ import annotations

import collections
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

import msgspec

from chatd.auth import Claims, PasswordHasher, TokenService, parse_jti
from chatd.clock import Clock
from chatd.config import Config
from chatd.errors import ChatError, Forbidden, Unauthorized
from chatd.protocol.frames import event_frame
from chatd.protocol.models import rfc3339
from chatd.ratelimit import FailureGate, KeyedBuckets, TokenBucket
from chatd.rooms import LiveRoom, RoomManager
from chatd.session import Cancellable, Peer, Session
from chatd.stats import Stats
from chatd.store.base import GuestHold, Snapshot, Store, UserRecord
from chatd.version import VERSION

log = logging.getLogger("chatd")
__all__ = ["VERSION", "App"]  # VERSION: re-exported for older imports
GUEST_ID = 0  # the user id in a guest token's jti
# How long a room's `member.left` events may wait while the room keeps losing members on
# every loop turn (a mass disconnect): the bound on their delay, not the usual one.
LEFT_MAX_WAIT = 1.0


class _Departures:
    """`member.left` frames of one room not yet sent, oldest first."""

    __slots__ = ("frames", "fresh", "since")

    def __init__(self, since: float) -> None:
        self.frames: list[bytes] = []
        self.fresh = True  # one came in since the flush timer last looked
        self.since = since


class UnknownAccount(Unauthorized):
    """A token of an account this server has not seen (yet): perhaps one `chatd user add`
    made a moment ago. The dispatcher reads it from the store and tries once more."""

    def __init__(self, key: str) -> None:
        super().__init__("the token's account no longer exists or the token was revoked")
        self.key = key


class Scheduler(Protocol):
    def call_later(self, delay: float, fn: Callable[[], None]) -> Cancellable: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


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
    ) -> None:
        self.config = config
        self.stats = stats or Stats()  # counters for `stats` and /metrics (chatd.stats)
        self.clock = clock
        self.store = store
        self.tokens = tokens
        self.hasher = hasher
        self.scheduler = scheduler
        self.rooms = RoomManager()
        self.users: dict[str, UserRecord] = {}
        # Guest holds by name key; written only by the hold methods below (one owner).
        self.guests: dict[str, GuestHold] = {}
        self.hold_timers: dict[str, Cancellable] = {}
        self.revoked: dict[str, int] = {}
        self.users_version = 0
        self.sessions: dict[Session, None] = {}
        self.online: dict[str, dict[Session, None]] = {}
        self.send_buckets: dict[str, TokenBucket] = {}
        # Failed logins per account, connection and address, checks in flight counted as
        # failures (limits.md, login failures; issue 13 item 6).
        self.login_gate = FailureGate(60.0, clock)
        # Per address: registrations per hour, new guest names per minute (issue 13).
        self.register_ips = KeyedBuckets(config.register_per_ip, 3_600.0)
        self.guest_ips = KeyedBuckets(config.guest_logins_per_ip, 60.0)
        # Names being registered right now (the hash and the write take a while): a guest
        # login or a second register of one of them is a conflict, not a double owner.
        self.registering: set[str] = set()
        # (user key, nonce) -> message id: a retry is recognised before the membership and
        # rate checks without a store read per send; ids only, so memory stays small.
        self.nonces: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self.epoch = ""
        self.help_data: dict[str, Any] = {}
        # member.left frames waiting to go out, per room (see leave and settle).
        self.departures: dict[LiveRoom, _Departures] = {}
        self._departure_timer: Cancellable | None = None

    # --- start -----------------------------------------------------------------------

    def load(self, snap: Snapshot) -> None:
        self.epoch = snap.epoch
        self.users = {u.name.lower(): u for u in snap.users}
        now = self.clock.now()
        self.revoked = {j: e for j, e in snap.revoked.items() if e > now}
        self.users_version = snap.users_version
        self.rooms.load(snap.rooms)
        # Contract: a restart gives every held name a fresh grace (nobody is connected yet),
        # so clients that reconnect keep their names.
        self.guests = {}
        for hold in snap.guests:
            key = hold.name.lower()
            self.guests[key] = hold
            if key in self.users:
                self.drop_hold(hold)
            else:
                self._start_grace(key, hold)

    def hello_frame(self) -> bytes:
        c = self.config
        return event_frame(
            "hello",
            {
                "server": "chatd",
                "version": VERSION,
                "protocol": 1,
                "max_frame": c.max_frame,
                "max_text": c.max_text,
                "history_limit": c.history_limit,
                "epoch": self.epoch,
                "rev": self.store.rev,
            },
        )

    # --- sessions --------------------------------------------------------------------

    def open_session(self, peer: Peer, ip: str) -> Session:
        now = self.clock.now()
        c = self.config
        bucket = TokenBucket(c.command_rate, c.command_burst, now) if c.command_rate > 0 else None
        s = Session(peer, ip, now, bucket)
        self.sessions[s] = None
        return s

    def close_session(self, s: Session) -> None:
        """The connection is gone: leave every room (others see `disconnected`)."""
        if s.closed:
            return
        s.closed = True
        self.sessions.pop(s, None)
        self.login_gate.forget(("conn", s.id))
        self.unbind(s, "disconnected")

    # --- tokens ----------------------------------------------------------------------

    def check_claims(self, claims: Claims) -> UserRecord | GuestHold:
        """Revocation and the account behind a verified token. Raises Unauthorized."""
        if claims.jti in self.revoked:
            raise Unauthorized("the token was revoked")
        parsed = parse_jti(claims.jti)
        key = claims.sub.lower()
        if parsed is not None:
            uid, version = parsed
            if uid == GUEST_ID:
                hold = self.guest_hold(key)
                if hold is not None and hold.jti == str(version):
                    return hold
                raise Unauthorized("guest session ended")
            else:
                user = self.users.get(key)
                if user is not None and user.id == uid and user.token_version == version:
                    return user
                if user is None or uid > user.id:  # ids only grow: a newer account
                    raise UnknownAccount(key)
        raise Unauthorized("the token's account no longer exists or the token was revoked")

    def authenticate(self, s: Session, token: str | None) -> Claims:
        """The token of a command: the frame's, else the bound one (contract). Binds the
        connection to the first valid token. Raises Unauthorized, TokenExpired, Forbidden."""
        if token is None:
            if s.token is None:
                raise Unauthorized("this command needs a token: login, auth, or add a token field")
            token = s.token
        claims = self.tokens.verify(token)
        try:
            self.check_claims(claims)
        except Unauthorized:
            if token == s.token:
                self.expire(s)  # the bound token died without expiring: unbind, don't wedge
            raise
        if s.user_key is None:
            self.bind(s, token, claims)
        elif claims.sub.lower() != s.user_key:
            raise Forbidden(f"this connection is logged in as {s.user}; log out first")
        return claims

    def bind(self, s: Session, token: str, claims: Claims) -> None:
        if s.closed:
            return  # gone while its login waited: nothing to bind, no timers to leak
        key = claims.sub.lower()
        if s.user_key is not None and s.user_key != key:
            raise Forbidden(f"this connection is logged in as {s.user}; log out first")
        if s.claims is not None and s.claims.jti == claims.jti:
            return  # `auth` again with the bound token: its timers stand (notice once per token)
        s.cancel_timers()
        s.user = self.display_name(claims.sub)
        s.user_key = key
        s.identity = identity(claims)
        s.token = token
        s.claims = claims
        self.online.setdefault(key, {})[s] = None
        if is_guest(claims):
            self.settle_hold(key)
        now = self.clock.now()
        notice = claims.exp - self.config.session_expiring_notice - now
        exp = claims.exp

        def expired() -> None:
            if s.claims is claims:
                self.expire(s)

        def expiring() -> None:
            # One timer at a time per session (a connection storm pays for one, not two):
            # the notice, then the timer for the expiry itself.
            s.timers.clear()
            if s.claims is not claims:
                return
            s.send(event_frame("session.expiring", {"expires_at": exp}))
            s.timers.append(
                self.scheduler.call_later(max(0.0, exp - self.clock.now()), expired)
            )

        s.timers.append(self.scheduler.call_later(max(0.0, notice), expiring))

    def display_name(self, name: str) -> str:
        key = name.lower()
        user = self.users.get(key)
        if user is not None:
            return user.name
        hold = self.guests.get(key)
        return hold.name if hold is not None else name

    def expire(self, s: Session, reason: str | None = None) -> None:
        """The bound token expired or was revoked elsewhere: tell the client, leave rooms,
        unbind; the connection stays open (contract)."""
        s.send(event_frame("session.expired", {"reason": reason} if reason else {}))
        self.unbind(s, reason or "expired")

    def unbind(self, s: Session, reason: str) -> None:
        """Leave every room (others see `reason`), forget the token, stop its timers."""
        s.cancel_timers()
        self.leave_all(s, reason)
        key = s.user_key
        if key is not None:
            sessions = self.online.get(key)
            if sessions is not None:
                sessions.pop(s, None)
                if not sessions:
                    del self.online[key]
            if s.claims is not None and is_guest(s.claims):
                self.settle_hold(key)  # its last connection: the grace starts
        s.user = s.user_key = s.token = s.identity = None
        s.claims = None
        s.unbound_since = self.clock.now()

    # --- rooms -----------------------------------------------------------------------

    def leave_all(self, s: Session, reason: str) -> None:
        for room in list(s.rooms):
            self.leave(room, s, reason)

    def leave(self, room: LiveRoom, s: Session, reason: str) -> None:
        """Take the connection out of the room at once; its `member.left` (when it was the
        user's last connection) goes out batched with the room's other departures."""
        user = s.user
        if self.rooms.leave(room, s) and user is not None:
            self._depart(room, event_frame("member.left", {"room": room.name, "user": user, "reason": reason}))
        if room.ephemeral and not room.sessions and not room.deleted:
            self.departures.pop(room, None)  # nobody is left to tell
            self.rooms.remove(room)
            # Queued now, before anything that could reuse the name is (store order).
            self.scheduler.spawn(self._drop_room(room, self.store.delete_room(room.id)))

    # Issue 13, item 2: when K members of a room drop at once, sending each departure to
    # the room at once costs O(K²): every member still to be found closed gets all the
    # others' member.left. So departures are kept per room and sent when the room has
    # lost nobody for a whole loop turn (the mass disconnect is over, the closed
    # connections are out of the room), joined into one write per remaining connection;
    # after LEFT_MAX_WAIT at the latest. Anything else the room's connections are told or
    # asked (messages, joins, member lists, renames, closing) settles the room first, so
    # each connection still sees a room's events in the order they happened.

    def _depart(self, room: LiveRoom, frame: bytes) -> None:
        pending = self.departures.get(room)
        if pending is None:
            pending = self.departures[room] = _Departures(self.clock.now())
        pending.frames.append(frame)
        pending.fresh = True
        if self._departure_timer is None:
            self._departure_timer = self.scheduler.call_later(0, self._flush_departures)

    def _flush_departures(self) -> None:
        self._departure_timer = None
        now = self.clock.now()
        waiting = False
        for room, pending in list(self.departures.items()):
            if pending.fresh and now - pending.since < LEFT_MAX_WAIT:
                pending.fresh = False  # look again next turn
                waiting = True
            else:
                self.settle(room)
        if waiting:
            self._departure_timer = self.scheduler.call_later(0, self._flush_departures)

    def settle(self, room: LiveRoom) -> None:
        """Send the room's waiting `member.left` events to its connections now: call it
        before anything else goes to the room or is read from its member list."""
        pending = self.departures.pop(room, None)
        if pending is not None:
            frames = pending.frames
            fanout(room.sessions, frames[0] if len(frames) == 1 else b"".join(frames))

    async def _drop_room(self, room: LiveRoom, deleting: Awaitable[None]) -> None:
        try:
            await deleting
        except Exception:  # logged: the room is gone from memory and is dropped at start
            log.exception("could not delete ephemeral room %s", room.name)

    def sessions_of(self, user_key: str) -> Iterable[Session]:
        return list(self.online.get(user_key, ()))

    # --- guest holds -----------------------------------------------------------------
    # Contract, "Guest names come back". The App alone decides a hold's fate, at once and
    # in memory (no await between looking at a hold and changing it); each change takes
    # the next version and is then written as a compare-and-set that applies only over an
    # older version, so the database ends where memory did whatever order writes land in.

    def guest_hold(self, key: str) -> GuestHold | None:
        """The hold on a (case-folded) name, while it lasts."""
        hold = self.guests.get(key)
        if hold is not None and hold.held_until is not None and hold.held_until <= self.clock.now():
            self.drop_hold(hold)  # its timer is late: ends now
            return None
        return hold

    def new_hold(self, name: str) -> GuestHold:
        """A fresh hold on `name` for a guest about to be bound (held "while connected")."""
        hold = GuestHold(name, str(secrets.randbits(62)), None, 1)
        key = name.lower()
        self._cancel_hold_timer(key)
        self.guests[key] = hold
        return hold

    def settle_hold(self, key: str) -> None:
        """Bring the hold in line with who is bound to it: held while any connection is;
        when the last goes, the grace starts (released at once with no grace)."""
        hold = self.guests.get(key)
        if hold is None:
            return
        if self.online.get(key):
            if hold.held_until is not None:
                self._cancel_hold_timer(key)
                self._change_hold(key, msgspec.structs.replace(
                    hold, held_until=None, version=hold.version + 1))  # fmt: skip
        elif hold.held_until is None:
            self._start_grace(key, hold)

    def _start_grace(self, key: str, hold: GuestHold) -> None:
        grace = self.config.guest_grace
        if grace <= 0:
            self.drop_hold(hold)
            return
        until = math.ceil(self.clock.now() + grace)
        new = msgspec.structs.replace(hold, held_until=until, version=hold.version + 1)
        self._change_hold(key, new)
        self._cancel_hold_timer(key)

        def lapse() -> None:
            self.hold_timers.pop(key, None)
            if self.guests.get(key) is new:  # compare-and-set: nothing changed it since
                self.drop_hold(new)

        self.hold_timers[key] = self.scheduler.call_later(
            max(0.0, until - self.clock.now()), lapse
        )

    def _change_hold(self, key: str, new: GuestHold) -> None:
        self.guests[key] = new
        self._write_hold(self.store.update_hold(new))

    def release_hold(self, hold: GuestHold) -> Awaitable[bool] | None:
        """Give the name back if `hold` is still the current state of its hold (else None:
        someone decided otherwise first). Its tokens stop working at once; the returned
        write is the release made durable."""
        key = hold.name.lower()
        if self.guests.get(key) is not hold:
            return None
        del self.guests[key]
        self._cancel_hold_timer(key)
        return self.store.release_guest(
            msgspec.structs.replace(hold, version=hold.version + 1)
        )

    def drop_hold(self, hold: GuestHold) -> None:
        """release_hold, its write in the background (logged if it fails)."""
        self._write_hold(self.release_hold(hold))

    def _cancel_hold_timer(self, key: str) -> None:
        timer = self.hold_timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _write_hold(self, write: Awaitable[Any] | None) -> None:
        if write is not None:
            self.scheduler.spawn(self._hold_written(write))

    async def _hold_written(self, write: Awaitable[Any]) -> None:
        try:
            await write
        except ChatError as exc:
            # The store has logged the failed batch (or is shutting down). Memory decided;
            # a hold left behind gets a fresh grace at the next start and then goes.
            log.debug("could not write a guest hold: %s", exc.message)
        except Exception:
            log.exception("could not write a guest hold")

    def suspend_holds(self) -> None:
        """The server stops: every hold's grace starts now (written before the store
        closes), so with no server running the command line sees when each name is free;
        the next start gives them a fresh grace anyway."""
        for key, hold in list(self.guests.items()):
            if hold.held_until is None:
                self._start_grace(key, hold)

    def sweep_holds(self) -> None:
        """Release holds whose grace has ended (their timers normally do it first)."""
        for key in list(self.guests):
            self.guest_hold(key)

    def hold_note(self, hold: GuestHold) -> str:
        """Until when a name is held, for a `conflict` message (contract)."""
        if hold.held_until is None:
            return "while connected"
        left = max(0, math.ceil(hold.held_until - self.clock.now()))
        return f"until {rfc3339(hold.held_until)} (in {left} s)"

    def known_user(self, name: str) -> bool:
        """Registered, or an online guest (one that holds its name)."""
        key = name.lower()
        return key in self.users or self.guest_hold(key) is not None

    def current_identity(self, name: str) -> str | None:
        """The identity that holds `name` now: its account, or its online guest."""
        key = name.lower()
        user = self.users.get(key)
        if user is not None:
            return f"{key}#{user.id}"
        hold = self.guest_hold(key)
        return f"{key}#g{hold.jti}" if hold is not None else None

    def remember_nonce(self, user_key: str, nonce: str, message_id: int) -> None:
        self.nonces[(user_key, nonce)] = message_id
        if len(self.nonces) > self.config.nonce_cache:
            self.nonces.popitem(last=False)

    # --- accounts changed elsewhere --------------------------------------------------

    def drop_user(self, key: str, reason: str = "deleted", *, forget: bool = True) -> None:
        """The account is gone: its connections leave their rooms and are closed."""
        if forget:
            self.users.pop(key, None)
        for s in self.sessions_of(key):
            self.unbind(s, reason)
            # Closed on the next turn of the loop, so a reply already due still goes out.
            self.scheduler.call_later(0, s.peer.close)

    def apply_users(self, version: int, users: list[UserRecord]) -> None:
        """Adopt the accounts as the database has them now (after `chatd user …`)."""
        self.users_version = version
        fresh = {u.name.lower(): u for u in users}
        for key in list(self.users):
            if key not in fresh:
                self.adopt_user(key, None)
        for key, u in fresh.items():
            self.adopt_user(key, u)

    def adopt_user(self, key: str, new: UserRecord | None) -> None:
        """Take one account as the database has it now (None: it is gone)."""
        old = self.users.get(key)
        if old is not None and (new is None or new.id != old.id):
            self.drop_user(key)
        elif old is not None and new is not None and (
            new.token_version != old.token_version or new.pw_hash != old.pw_hash
        ):
            self.users[key] = new
            for s in self.sessions_of(key):
                if s.claims is not None:
                    try:
                        self.check_claims(s.claims)
                    except Unauthorized:
                        self.expire(s, "logout")
        if new is None:
            return
        self.users[key] = new
        hold = self.guests.get(key)
        if hold is not None:
            # The account won the name (registered through the command line while the
            # hold lapsed): the guest's session ends.
            self.drop_hold(hold)
            for s in self.sessions_of(key):
                if s.claims is not None and is_guest(s.claims):
                    self.expire(s)

    async def refresh_user(self, key: str) -> UserRecord | None:
        """Read one account from the store and adopt it: `chatd user add` (or delete) of a
        moment ago counts at once, not at the next poll (contract)."""
        before = self.users.get(key)
        rec = await self.store.get_user(key)
        if self.users.get(key) is before:
            # Compare-and-set: a read that began before a change made here meanwhile
            # (register, logout all, passwd replace the record) must not undo it.
            self.adopt_user(key, rec)
        return self.users.get(key)


def is_guest(claims: Claims) -> bool:
    return claims.jti.startswith(f"{GUEST_ID}.")


def identity(claims: Claims) -> str:
    """Who a token speaks for, beyond the name: "name#<account id>", or for a guest
    "name#g<hold>". A name registered again, or taken by the next guest, is a different
    identity, and sees none of the former holder's direct messages."""
    parsed = parse_jti(claims.jti)
    key = claims.sub.lower()
    if parsed is None:
        return key
    uid, version = parsed
    return f"{key}#g{version}" if uid == GUEST_ID else f"{key}#{uid}"


def fanout(sessions: Iterable[Session], frame: bytes) -> None:
    """Encode once, append the same bytes to every recipient; never waits (STYLE 6)."""
    for s in sessions:
        s.send(frame)
