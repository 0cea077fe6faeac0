"""Rate budgets that are not per command: msg.send/msg.edit per user and per connection
(protocol.md Limits), failed logins (the gate counts checks in flight), registrations and new
guest names per connection and per address (issue 13). The only writer of these buckets;
per-connection ones are made on first use and forgotten when the connection closes or
once refilled (``purge``), so a connection that never sends or registers pays nothing and
one that logged in a while ago pays nothing more."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

from chatd.clock import Clock
from chatd.config import Config
from chatd.errors import RateLimited
from chatd.ratelimit import FailureGate, KeyedBuckets, TokenBucket

if TYPE_CHECKING:
    from chatd.session import Session

_HOUR = 3_600.0
_MINUTE = 60.0
_LOOPBACK = ("127.0.0.1", "::1")  # as chatd.server: exempt from per-address guest limits

FailureKeys = Sequence[tuple[Hashable, int]]
log = logging.getLogger("chatd")


class SharedBudgets(Protocol):
    """The budgets every node of one service shares (chatd/store/redis/limits.py).

    ``settle`` adds this node's spends since the last call to the shared buckets and its
    new failed logins to the shared failure lists, in one round trip, and returns each
    bucket's tokens after that (in order) and, for every failure key asked about, how
    many seconds ago each failure seen by the OTHER nodes happened (within ``window``)."""

    async def settle(
        self,
        spent: list[tuple[str, float, float, int]],  # (bucket, rate, burst, spends)
        failed: dict[str, int],
        watched: list[str],
        window: float,
    ) -> tuple[list[float], dict[str, list[float]]]: ...

    async def close(self) -> None: ...


def _shared_failure_key(key: Hashable) -> str | None:
    """The name of a failure key all nodes share (per account and per address), else None
    (a connection's failures are its node's alone)."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] in ("account", "ip"):
        return f"{key[0][0]}:{key[1]}"
    return None


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
        # Per address: registrations per hour, new guest names per minute (issue 13).
        self._register_ips = KeyedBuckets(config.register_per_ip, _HOUR)
        self._guest_ips = KeyedBuckets(config.guest_logins_per_ip, _MINUTE)
        # Several nodes: the per-user and per-address budgets are shared (settle); the
        # spends of each bucket not yet told to the others, by bucket name.
        self.shared: SharedBudgets | None = None
        self._unshared: dict[str, int] = {}

    def share(self, shared: SharedBudgets) -> None:
        """From now on per-user send budgets, per-address registration and guest-login
        budgets, and failed logins per account and per address count across every node
        (protocol.md Limits, "Several nodes"); the server calls `settle` periodically."""
        self.shared = shared
        self.login_gate.unshared = {}

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

    # --- several nodes ------------------------------------------------------------------

    async def refresh_failures(self, keys: FailureKeys) -> None:
        """Before a password check: learn the failures the other nodes saw for these keys
        (one round trip; a login costs a KDF run anyway), so guesses spread over several
        nodes meet one limit. Without `shared`, or if it cannot be reached, nothing."""
        shared = self.shared
        if shared is None:
            return
        watched = {k: key for key, _ in keys if (k := _shared_failure_key(key)) is not None}
        try:
            _, remote = await shared.settle([], {}, list(watched), self.login_gate.window)
        except Exception:
            return  # the local gate still holds; settle logs the outage
        now = self._clock.now()
        for shared_key, key in watched.items():
            self.login_gate.set_remote(key, [now - age for age in remote.get(shared_key, [])])

    def _bucket(self, name: str) -> tuple[TokenBucket | None, float, float]:
        """A shared bucket's local copy (None if it was purged meantime), rate and burst."""
        kind, key = name[:2], name[2:]
        c = self._config
        if kind == "s:":
            return self._user_sends.get(key), c.rate_limit, float(c.rate_burst)
        ips = self._register_ips if kind == "r:" else self._guest_ips
        return ips.get(key), ips.rate, float(ips.count)

    async def settle(self) -> None:
        """Tell the other nodes (through `shared`) what was spent and failed here since
        the last call, and take the shared state back: each local bucket is set to the
        shared one less what was spent here during the round trip. If the shared store cannot be reached, the
        spends are kept for the next call and the local budgets go on alone."""
        shared = self.shared
        gate = self.login_gate
        if shared is None or gate.unshared is None:
            return
        spent, self._unshared = self._unshared, {}
        failed_keys, gate.unshared = gate.unshared, {}
        items = [(name, *self._bucket(name)[1:], n) for name, n in spent.items()]
        failed: dict[str, int] = {}
        for key, n in failed_keys.items():
            if (shared_key := _shared_failure_key(key)) is not None:
                failed[shared_key] = n
        if not items and not failed:
            return
        try:
            # No failure keys are read back here: every password check reads its own first
            # (refresh_failures), so a settle costs only what this node changed.
            tokens, _ = await shared.settle(items, failed, [], gate.window)
        except Exception as exc:
            for name, n in spent.items():  # counted at the next settle instead
                self._unshared[name] = self._unshared.get(name, 0) + n
            for key, n in failed_keys.items():
                gate.unshared[key] = gate.unshared.get(key, 0) + n
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
