"""Rate budgets that are not per command: msg.send/msg.edit per user and per connection
(protocol.md Limits), failed logins (checks in flight count as failures), registrations and new
guest names per connection and per address (issue 13). The only writer of these buckets;
per-connection ones are made on first use and forgotten when the connection closes or
once refilled (``purge``), so a connection that never sends or registers pays nothing and
one that logged in a while ago pays nothing more."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

from chatd.clock import Clock
from chatd.config import Config
from chatd.errors import Internal, RateLimited, Unauthorized
from chatd.ratelimit import FailureGate, KeyedBuckets, TokenBucket

if TYPE_CHECKING:
    from chatd.session import Session

_HOUR = 3_600.0
_MINUTE = 60.0
_LOOPBACK = ("127.0.0.1", "::1")  # as chatd.server: exempt from per-address guest limits
# Several nodes: a login check waiting for checks in flight on other nodes looks again
# after this long, doubling up to the max (a finish on its own node wakes it at once).
_RECHECK_FIRST = 0.01
_RECHECK_MAX = 0.2
# A check that waited Config.login_wait for a place is told to come back this much later.
_BUSY_RETRY_AFTER = 1.0
# Admits that got no answer, waiting to be released: past this many, Redis is evidently not
# answering and password checks answer `internal` without asking it (so a flood of logins
# during an outage cannot grow the list without bound).
_MAX_UNANSWERED = 1024

FailureKeys = Sequence[tuple[Hashable, int]]
log = logging.getLogger("chatd")


class SharedBudgets(Protocol):
    """The budgets and failed logins every node of one service shares
    (chatd/store/redis/limits.py). Every call raises ConnectionError when the shared store
    cannot be reached.

    ``settle`` adds this node's spends since the last call to the shared buckets, in one
    round trip, and returns each bucket's tokens after that (in order).

    ``admit`` is the admission of password check ``check`` (an id ``<node>:<unique>``)
    under ``keys`` (shared key name, limit > 0), atomically across every node: failures in
    the last ``window`` seconds plus checks in flight anywhere must stay under each key's
    limit. Returns True (a place is now reserved under every key), or the seconds until a
    key's failures alone fall below its limit (refused), or None (checks in flight fill a
    key: ask again later), or False (``check`` was released: never reserved again).
    ``finish`` ends an admitted check: its reservation goes, and with ``failed`` it counts
    as a failure under each name; returns each name's failures in the window after it.
    ``release`` ends a check whose admit got no answer (it may have reserved, or may still
    run): its place goes if taken, and a later admit of that id reserves nothing. Both are
    idempotent (safe to send again). A reservation lives while its node renews
    (``renew``) at least every ``lease`` seconds, so one made by a node that died lapses."""

    node: str
    lease: float

    async def settle(self, spent: list[tuple[str, float, float, int]]) -> list[float]: ...

    async def admit(
        self, check: str, keys: list[tuple[str, int]], window: float
    ) -> bool | float | None: ...

    async def finish(
        self, check: str, names: list[str], failed: bool, window: float
    ) -> list[int]: ...

    async def release(self, check: str, names: list[str]) -> None: ...

    async def renew(self) -> None: ...

    async def close(self) -> None: ...


class LoginCheck:
    """One admitted password check (``Limits.admit_login``); ``Limits.finish_login`` ends
    it, once. ``shared``: its keys' names on the shared store (several nodes), else None."""

    __slots__ = ("id", "keys", "shared")

    def __init__(
        self, keys: FailureKeys, shared: list[str] | None = None, check_id: str = ""
    ) -> None:
        self.keys = keys
        self.shared = shared
        self.id = check_id


def _shared_failure_key(key: Hashable, node: str) -> str:
    """A failure key's name on the shared store: per account and per address shared by
    every node; a connection's is its node's (named with the node, as it lives in Redis)."""
    assert isinstance(key, tuple) and len(key) == 2
    kind, value = key
    return f"c:{node}:{value}" if kind == "conn" else f"{kind[0]}:{value}"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Limits:
    def __init__(self, config: Config, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._user_sends: dict[str, TokenBucket] = {}
        # Per connection, by Session.id, made on first use.
        self._conn_sends: dict[int, TokenBucket] = {}
        self._conn_registers: dict[int, TokenBucket] = {}
        self._conn_guests: dict[int, TokenBucket] = {}
        # Failed logins per account, connection and address, checks in flight counted as
        # failures (protocol.md Limits, login failures; issue 13 item 6).
        self.login_gate = FailureGate(60.0, clock)
        # Several nodes: the gate is on the shared store instead. Checks of this node
        # admitted and not finished (its reservations are renewed while there are any),
        # finishes that could not reach the store and admits that got no answer (sent at
        # the next settle: failed True/False, or None = release), and checks waiting for a
        # place, by shared key name (a finish here wakes them).
        self._shared_checks = 0
        self._check_ids = itertools.count(1)
        self._unfinished: list[tuple[str, list[str], bool | None]] = []
        self._login_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Per address: registrations per hour, new guest names per minute (issue 13).
        self._register_ips = KeyedBuckets(config.register_per_ip, _HOUR)
        self._guest_ips = KeyedBuckets(config.guest_logins_per_ip, _MINUTE)
        # Several nodes: the per-user and per-address budgets are shared (settle); the
        # spends of each bucket not yet told to the others, by bucket name.
        self.shared: SharedBudgets | None = None
        self._unshared: dict[str, int] = {}

    def share(self, shared: SharedBudgets) -> None:
        """From now on per-user send budgets, per-address registration and guest-login
        budgets, and failed logins count across every node (protocol.md Limits, "Several
        nodes"); the server calls `settle` every `limits_sync` seconds."""
        self.shared = shared

    # --- msg.send / msg.edit -----------------------------------------------------------

    def spend_send(self, user_key: str, s: Session) -> None:
        """One msg.send/msg.edit of `user_key` on `s`: the user's budget (protocol.md Limits) and
        the connection's, at the same rate and burst (issue 13, item 10: a connection that
        logs in as a fresh guest after every burst must not get a fresh budget with the
        name). Both are checked before either is spent. Raises RateLimited."""
        c = self._config
        if c.rate_limit <= 0:
            return
        now = self._clock.now()
        user = self._user_sends.get(user_key)
        if user is None:
            user = self._user_sends[user_key] = TokenBucket(c.rate_limit, c.rate_burst, now)
        conn = self._conn_sends.get(s.id)
        if conn is None:
            conn = self._conn_sends[s.id] = TokenBucket(c.rate_limit, c.rate_burst, now)
        wait = max(user.wait(now), conn.wait(now))
        if wait:
            raise RateLimited("sending too fast; slow down", wait)
        user.take(now)
        conn.take(now)
        if self.shared is not None:
            name = "s:" + user_key
            self._unshared[name] = self._unshared.get(name, 0) + 1

    # --- registrations and guest names ---------------------------------------------------

    def spend_register(self, s: Session) -> None:
        """Registrations per connection and per address (issue 13, item 4): each costs a
        KDF run and an account forever. Checked in full before either is spent."""
        cfg = self._config
        self._spend_pair(
            "registrations", "an hour", _HOUR, s,
            self._conn_registers, cfg.register_per_connection,
            self._register_ips, cfg.register_per_ip, s.ip, "r:",
        )  # fmt: skip

    def spend_guest_login(self, s: Session) -> None:
        """New guest names per connection and per address (issue 13, item 10): rotating
        names must not be a way round per-user limits, nor fill the store with holds.
        Loopback is exempt from the per-address one, as from --per-ip-connections."""
        cfg = self._config
        self._spend_pair(
            "guest logins", "a minute", _MINUTE, s,
            self._conn_guests, cfg.guest_logins_per_connection,
            self._guest_ips, cfg.guest_logins_per_ip, s.ip if s.ip not in _LOOPBACK else None,
            "g:",
        )  # fmt: skip

    def _spend_pair(
        self,
        what: str,
        per: str,
        period: float,
        s: Session,
        conn_buckets: dict[int, TokenBucket],
        conn_limit: int,
        ip_buckets: KeyedBuckets,
        ip_limit: int,
        ip: str | None,
        shared_prefix: str,
    ) -> None:
        """One `what` on connection `s` from `ip` (None: exempt): both budgets are checked
        before either is spent, so a refusal costs nothing."""
        now = self._clock.now()
        conn = _conn_bucket(conn_buckets, s.id, conn_limit, period, now)
        wait = conn.wait(now) if conn is not None else 0.0
        if wait:
            raise RateLimited(
                f"too many {what} on this connection (at most {conn_limit} {per}); "
                "try again later",
                wait,
            )
        wait = ip_buckets.wait(ip, now) if ip is not None else 0.0
        if wait:
            raise RateLimited(
                f"too many {what} from your address (at most {ip_limit} {per}); "
                "try again later",
                wait,
            )
        if conn is not None:
            conn.take(now)
        if ip is not None and ip_limit > 0:
            ip_buckets.take(ip, now)
            if self.shared is not None:
                name = shared_prefix + ip
                self._unshared[name] = self._unshared.get(name, 0) + 1

    # --- failed logins -----------------------------------------------------------------

    def failure_keys(self, s: Session, account: str) -> list[tuple[Hashable, int]]:
        """Whose failed logins a password check counts against, with each one's limit
        (protocol.md Limits: per connection and per account; issue 13: per address too)."""
        cfg = self._config
        per = cfg.login_failures_per_minute
        return [
            (("account", account), per),
            (("conn", s.id), per),
            (("ip", s.ip), cfg.login_failures_per_ip),
        ]

    async def admit_login(self, s: Session, account: str) -> LoginCheck:
        """Wait for a place for one password check of `account` on `s`: checks still
        running count as failures until proven otherwise (chatd.ratelimit.FailureGate), on
        every node when shared. Raises RateLimited once the failures of a key reach its
        limit; with a shared store that cannot be reached, Internal (the account could not
        be read either). Shared, a wait is bounded: after Config.login_wait, RateLimited
        (checks elsewhere hold every place), and once `s` closes, Unauthorized (nobody to
        answer). The caller must `finish_login` the check."""
        keys = self.failure_keys(s, account)
        shared = self.shared
        if shared is None:
            await self.login_gate.admit(keys)
            return LoginCheck(keys)
        window = self.login_gate.window
        asked = [(_shared_failure_key(key, shared.node), n) for key, n in keys if n > 0]
        names = [name for name, _ in asked]
        # Made here, before asking, so that an admit whose answer is lost can be released.
        check_id = f"{shared.node}:{next(self._check_ids)}"
        deadline = self._clock.now() + self._config.login_wait
        pause = _RECHECK_FIRST
        while True:
            if s.closed:
                raise Unauthorized("the connection closed")  # nobody to answer
            if sum(1 for *_, failed in self._unfinished if failed is None) >= _MAX_UNANSWERED:
                raise Internal("storage (Redis) unreachable; try again later")
            try:
                verdict = await shared.admit(check_id, asked, window)
            except BaseException as exc:
                # The script may have run and reserved a place all the same (only its
                # reply was lost), or may still run: the next settle releases it.
                self._unfinished.append((check_id, names, None))
                if not isinstance(exc, ConnectionError):
                    raise
                log.warning("could not count a login check with the other nodes: %s", exc,
                            extra={"event": "limits_unshared", "error": str(exc)})  # fmt: skip
                raise Internal("storage (Redis) unreachable; try again later") from None
            if verdict is True:
                self._shared_checks += 1
                return LoginCheck(keys, names, check_id)
            if isinstance(verdict, float):
                raise RateLimited("too many failed logins; wait before trying again", verdict)
            left = deadline - self._clock.now()
            if verdict is False or left <= 0:  # (False: released meanwhile; not expected)
                raise RateLimited(
                    "too many password checks for this account or address are running; "
                    "try again shortly",
                    _BUSY_RETRY_AFTER,
                )
            # Checks in flight fill a key: a finish on this node wakes us at once, one on
            # another node is seen at the next look (sooner the first few times); so does
            # this connection closing.
            await self._wait_for_a_finish(names, min(pause, left))
            pause = min(2 * pause, _RECHECK_MAX)

    async def _wait_for_a_finish(self, names: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter)
        for name in names:
            self._login_waiters.setdefault(name, []).append(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            for name in names:
                queue = self._login_waiters.get(name)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._login_waiters[name]

    async def finish_login(self, check: LoginCheck, *, failed: bool) -> list[int]:
        """End an admitted check; `failed`: it counts as a failed login under each key.
        Returns each key's failures in the window now, in `failure_keys` order (empty if
        the shared store could not be told: it is told at the next settle)."""
        names = check.shared
        if names is None:
            self.login_gate.finish(check.keys, failed=failed)
            now = self._clock.now()
            return [self.login_gate.failures(key, now) for key, _ in check.keys]
        assert self.shared is not None
        self._shared_checks -= 1
        try:
            counts = await self.shared.finish(check.id, names, failed, self.login_gate.window)
        except ConnectionError as exc:
            self._unfinished.append((check.id, names, failed))
            log.warning("could not count a login check with the other nodes: %s", exc,
                        extra={"event": "limits_unshared", "error": str(exc)})  # fmt: skip
            return []
        finally:
            for name in names:
                for waiter in self._login_waiters.pop(name, ()):
                    _wake(waiter)
        told = iter(counts)
        return [next(told) if limit > 0 else 0 for _, limit in check.keys]

    # --- several nodes ------------------------------------------------------------------

    def _bucket(self, name: str) -> tuple[TokenBucket | None, float, float]:
        """A shared bucket's local copy (None if it was purged meantime), rate and burst."""
        kind, key = name[:2], name[2:]
        c = self._config
        if kind == "s:":
            return self._user_sends.get(key), c.rate_limit, float(c.rate_burst)
        ips = self._register_ips if kind == "r:" else self._guest_ips
        return ips.get(key), ips.rate, float(ips.count)

    async def settle(self) -> None:
        """Tell the other nodes (through `shared`) what was spent here since the last call,
        and take the shared state back: each local bucket is set to the shared one less
        what was spent here during the round trip. Also keep this node's login checks in
        flight reserved (renew) and send the finishes that could not be sent. If the shared
        store cannot be reached, the spends and finishes are kept for the next call and the
        local budgets go on alone."""
        shared = self.shared
        if shared is None:
            return
        try:
            if self._shared_checks > 0:
                await shared.renew()
            while self._unfinished:
                check_id, names, failed = self._unfinished[0]
                if failed is None:
                    await shared.release(check_id, names)
                else:
                    await shared.finish(check_id, names, failed, self.login_gate.window)
                del self._unfinished[0]
        except ConnectionError as exc:
            log.warning("could not share login checks with the other nodes: %s", exc,
                        extra={"event": "limits_unshared", "error": str(exc)})  # fmt: skip
        spent, self._unshared = self._unshared, {}
        if not spent:
            return
        items = [(name, *self._bucket(name)[1:], n) for name, n in spent.items()]
        try:
            tokens = await shared.settle(items)
        except ConnectionError as exc:
            for name, n in spent.items():  # counted at the next settle instead
                self._unshared[name] = self._unshared.get(name, 0) + n
            log.warning("could not share rate budgets with the other nodes: %s", exc,
                        extra={"event": "limits_unshared", "error": str(exc)})  # fmt: skip
            return
        now = self._clock.now()
        for (name, _, _, _), left in zip(items, tokens, strict=True):
            bucket = self._bucket(name)[0]
            if bucket is not None:
                bucket.tokens = min(bucket.burst, left - self._unshared.get(name, 0))
                bucket.stamp = now

    # --- housekeeping ------------------------------------------------------------------

    def forget_connection(self, s: Session) -> None:
        """The connection closed: its budgets and failures go with it."""
        self._conn_sends.pop(s.id, None)
        self._conn_registers.pop(s.id, None)
        self._conn_guests.pop(s.id, None)
        self.login_gate.forget(("conn", s.id))
        if self.shared is not None:  # its logins waiting for a place stop waiting
            name = _shared_failure_key(("conn", s.id), self.shared.node)
            for waiter in self._login_waiters.pop(name, ()):
                _wake(waiter)

    def purge(self, now: float) -> None:
        """Buckets that have refilled hold no state worth keeping: one made afresh on next
        use is the same. Per connection too, so a connection that logged in (a guest-login
        bucket) or sent once holds none of them for the rest of its life."""
        self._user_sends = {k: b for k, b in self._user_sends.items() if not b.full(now)}
        for buckets in (self._conn_sends, self._conn_registers, self._conn_guests):
            for sid in [sid for sid, b in buckets.items() if b.full(now)]:
                del buckets[sid]

    def user_buckets(self) -> int:
        return len(self._user_sends)

    def connection_buckets(self) -> int:
        return len(self._conn_sends) + len(self._conn_registers) + len(self._conn_guests)


def _conn_bucket(
    buckets: dict[int, TokenBucket], sid: int, count: int, period: float, now: float
) -> TokenBucket | None:
    if count <= 0:
        return None
    bucket = buckets.get(sid)
    if bucket is None:
        bucket = buckets[sid] = TokenBucket(count / period, count, now)
    return bucket
