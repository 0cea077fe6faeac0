"""Accounts as this server knows them: registered users, guest holds (with their grace
timers), revoked token ids, names being registered, token generations. The only writer
of that state; the store is where it is made durable.

Guest holds follow the contract, "Guest names come back": this object alone decides a
hold's fate, at once and in memory (no await between looking at a hold and changing it);
each change takes the next version and is then written as a compare-and-set that applies
only over an older version, so the database ends where memory did whatever order writes
land in.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol

import msgspec

from chatd.auth import Claims
from chatd.clock import Clock
from chatd.config import Config
from chatd.domain.identity import GUEST_ID, TokenId, account_identity, guest_identity
from chatd.errors import ChatError, Conflict, Unauthorized
from chatd.protocol.models import rfc3339
from chatd.store.base import GuestHold, Snapshot, Store, UserRecord

log = logging.getLogger("chatd")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    def call_later(self, delay: float, fn: Callable[[], None]) -> Cancellable: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class UnknownAccount(Unauthorized):
    """A token of an account this server has not seen (yet): perhaps one `chatd user add`
    made a moment ago. The dispatcher reads it from the store and tries once more."""

    def __init__(self, key: str) -> None:
        super().__init__("the token's account no longer exists or the token was revoked")
        self.key = key


class Accounts:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        store: Store,
        scheduler: Scheduler,
        is_online: Callable[[str], bool],
    ) -> None:
        self._config = config
        self._clock = clock
        self._store = store
        self._scheduler = scheduler
        self._is_online = is_online  # presence: is any connection bound to this name
        self._users: dict[str, UserRecord] = {}
        self._guests: dict[str, GuestHold] = {}
        self._hold_timers: dict[str, Cancellable] = {}
        self._revoked: dict[str, int] = {}
        # Names being registered right now (the hash and the write take a while): a guest
        # login or a second register of one of them is a conflict, not a double owner.
        self._registering: set[str] = set()
        self._users_version = 0  # the store's users_version this memory matches

    # --- start -----------------------------------------------------------------------

    def load(self, snap: Snapshot) -> None:
        self._users = {u.name.lower(): u for u in snap.users}
        now = self._clock.now()
        self._revoked = {j: e for j, e in snap.revoked.items() if e > now}
        self._users_version = snap.users_version
        # Contract: a restart gives every held name a fresh grace (nobody is connected yet),
        # so clients that reconnect keep their names.
        self._guests = {}
        for hold in snap.guests:
            key = hold.name.lower()
            self._guests[key] = hold
            if key in self._users:
                self.drop_hold(hold)
            else:
                self._start_grace(key, hold)

    # --- reading -----------------------------------------------------------------------

    @property
    def users_version(self) -> int:
        """The store's users_version this memory matches (the poll compares it)."""
        return self._users_version

    def synced(self, version: int) -> None:
        """Memory now matches the store's accounts at `version` (App.apply_users)."""
        self._users_version = version

    def user(self, key: str) -> UserRecord | None:
        return self._users.get(key)

    def is_registered(self, key: str) -> bool:
        return key in self._users

    def users(self) -> Iterator[UserRecord]:
        return iter(list(self._users.values()))

    def guest_names(self) -> list[str]:
        """Names held by guests now (lapsed holds are let go on the way)."""
        return [h.name for k in list(self._guests) if (h := self.guest_hold(k)) is not None]

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def check_claims(self, claims: Claims) -> UserRecord | GuestHold:
        """Revocation and the account behind a verified token. Raises Unauthorized, or
        UnknownAccount for a token of an account newer than this memory."""
        if claims.jti in self._revoked:
            raise Unauthorized("the token was revoked")
        parsed = TokenId.parse(claims.jti)
        key = claims.sub.lower()
        if parsed is not None:
            if parsed.user_id == GUEST_ID:  # parsed.is_guest, without the property's call
                hold = self.guest_hold(key)
                if hold is not None and hold.jti == str(parsed.generation):
                    return hold
                raise Unauthorized("guest session ended")
            user = self._users.get(key)
            if user is not None and user.id == parsed.user_id and user.token_version == parsed.generation:
                return user
            if user is None or parsed.user_id > user.id:  # ids only grow: a newer account
                raise UnknownAccount(key)
        raise Unauthorized("the token's account no longer exists or the token was revoked")

    def display_name(self, name: str) -> str:
        key = name.lower()
        user = self._users.get(key)
        if user is not None:
            return user.name
        hold = self._guests.get(key)
        return hold.name if hold is not None else name

    def known_user(self, name: str) -> bool:
        """Registered, or an online guest (one that holds its name)."""
        key = name.lower()
        return key in self._users or self.guest_hold(key) is not None

    def current_identity(self, name: str) -> str | None:
        """The identity that holds `name` now: its account, or its online guest."""
        key = name.lower()
        user = self._users.get(key)
        if user is not None:
            return account_identity(key, user.id)
        hold = self.guest_hold(key)
        return guest_identity(key, hold.jti) if hold is not None else None

    # --- registration --------------------------------------------------------------------

    def begin_register(self, name: str) -> str:
        """Reserve `name` for a registration about to hash and write (a racing guest login
        or register gets conflict). Raises Conflict. Returns the key for end_register."""
        key = name.lower()
        if key in self._users or key in self._registering:
            raise Conflict(f"the name {name!r} is taken")
        self._registering.add(key)
        return key

    def is_registering(self, key: str) -> bool:
        return key in self._registering

    def end_register(self, key: str, user: UserRecord | None) -> None:
        """The registration of `key` is over: `user` written (None: it failed)."""
        self._registering.discard(key)
        if user is not None:
            self._users[key] = user

    # --- tokens --------------------------------------------------------------------------

    def revoke(self, jti: str, exp: int) -> None:
        """A token that stops working now (its write is the caller's, made first)."""
        self._revoked[jti] = exp

    def new_generation(self, key: str, generation: int) -> None:
        """`logout all` stored a new token generation: every older token stops working."""
        user = self._users.get(key)
        if user is not None:
            self._users[key] = msgspec.structs.replace(user, token_version=generation)

    def password_changed(self, key: str, user_id: int, pw_hash: str, generation: int) -> bool:
        """`passwd` stored a new hash and generation; False if the account went meanwhile."""
        now = self._users.get(key)
        if now is None or now.id != user_id:
            return False
        self._users[key] = msgspec.structs.replace(now, pw_hash=pw_hash, token_version=generation)
        return True

    def forget_user(self, key: str) -> UserRecord | None:
        """The account is deleted: its tokens stop working now."""
        return self._users.pop(key, None)

    def adopt(self, key: str, new: UserRecord | None) -> tuple[UserRecord | None, bool]:
        """Take one account as the database has it (None: it is gone). Returns the
        record held before and whether a guest's hold on the name was dropped (the account
        won the name)."""
        old = self._users.get(key)
        if new is None:
            self._users.pop(key, None)
            return old, False
        self._users[key] = new
        hold = self._guests.get(key)
        if hold is not None:
            self.drop_hold(hold)
            return old, True
        return old, False

    def purge(self, now: float) -> None:
        """Revocations whose tokens have expired anyway, and lapsed holds."""
        self._revoked = {j: e for j, e in self._revoked.items() if e > now}
        self.sweep_holds()

    # --- guest holds -----------------------------------------------------------------

    def guest_hold(self, key: str) -> GuestHold | None:
        """The hold on a (case-folded) name, while it lasts."""
        hold = self._guests.get(key)
        if hold is not None and hold.held_until is not None and hold.held_until <= self._clock.now():
            self.drop_hold(hold)  # its timer is late: ends now
            return None
        return hold

    def adopt_hold(self, key: str, hold: GuestHold | None) -> None:
        """Another node changed the hold on `key` (already stored): take it as it is
        (None: released)."""
        self._cancel_hold_timer(key)
        if hold is None:
            self._guests.pop(key, None)
        else:
            self._guests[key] = hold

    def is_current_hold(self, hold: GuestHold) -> bool:
        """True while `hold` is still the state of its name's hold (compare-and-set)."""
        return self._guests.get(hold.name.lower()) is hold

    def new_hold(self, name: str) -> GuestHold:
        """A fresh hold on `name` for a guest about to be bound (held "while connected")."""
        hold = GuestHold(name, str(secrets.randbits(62)), None, 1)
        key = name.lower()
        self._cancel_hold_timer(key)
        self._guests[key] = hold
        return hold

    def settle_hold(self, key: str) -> None:
        """Bring the hold in line with who is bound to it: held while any connection is;
        when the last goes, the grace starts (released at once with no grace)."""
        hold = self._guests.get(key)
        if hold is None:
            return
        if self._is_online(key):
            if hold.held_until is not None:
                self._cancel_hold_timer(key)
                self._change_hold(key, msgspec.structs.replace(
                    hold, held_until=None, version=hold.version + 1))  # fmt: skip
        elif hold.held_until is None:
            self._start_grace(key, hold)

    def _start_grace(self, key: str, hold: GuestHold) -> None:
        grace = self._config.guest_grace
        if grace <= 0:
            self.drop_hold(hold)
            return
        until = math.ceil(self._clock.now() + grace)
        new = msgspec.structs.replace(hold, held_until=until, version=hold.version + 1)
        self._change_hold(key, new)
        self._cancel_hold_timer(key)

        def lapse() -> None:
            self._hold_timers.pop(key, None)
            if self._guests.get(key) is new:  # compare-and-set: nothing changed it since
                self.drop_hold(new)

        self._hold_timers[key] = self._scheduler.call_later(
            max(0.0, until - self._clock.now()), lapse
        )

    def _change_hold(self, key: str, new: GuestHold) -> None:
        self._guests[key] = new
        self._write_hold(self._store.update_hold(new))

    def release_hold(self, hold: GuestHold) -> Awaitable[bool] | None:
        """Give the name back if `hold` is still the current state of its hold (else None:
        someone decided otherwise first). Its tokens stop working at once; the returned
        write is the release made durable."""
        key = hold.name.lower()
        if self._guests.get(key) is not hold:
            return None
        del self._guests[key]
        self._cancel_hold_timer(key)
        return self._store.release_guest(
            msgspec.structs.replace(hold, version=hold.version + 1)
        )

    def drop_hold(self, hold: GuestHold) -> None:
        """release_hold, its write in the background (logged if it fails)."""
        self._write_hold(self.release_hold(hold))

    def _cancel_hold_timer(self, key: str) -> None:
        timer = self._hold_timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _write_hold(self, write: Awaitable[Any] | None) -> None:
        if write is not None:
            self._scheduler.spawn(self._hold_written(write))

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
        for key, hold in list(self._guests.items()):
            if hold.held_until is None:
                self._start_grace(key, hold)

    def sweep_holds(self) -> None:
        """Release holds whose grace has ended (their timers normally do it first)."""
        for key in list(self._guests):
            self.guest_hold(key)

    def held_note(self, held_until: float | None) -> str:
        """Until when a name is held, for a `conflict` message (contract): a hold ending
        at ``held_until`` (None: while its guest is connected)."""
        if held_until is None:
            return "while connected"
        left = max(0, math.ceil(held_until - self._clock.now()))
        return f"until {rfc3339(held_until)} (in {left} s)"
