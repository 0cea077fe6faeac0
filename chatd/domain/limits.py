"""Rate budgets that are not per command: msg.send/msg.edit per user and per connection
(protocol.md Limits), failed logins (the gate counts checks in flight), registrations and new
guest names per connection and per address (issue 13). The only writer of these buckets;
per-connection ones are made on first use and forgotten when the connection closes or
once refilled (``purge``), so a connection that never sends or registers pays nothing and
one that logged in a while ago pays nothing more."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

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

    # --- registrations and guest names ---------------------------------------------------

    def spend_register(self, s: Session) -> None:
        """Registrations per connection and per address (issue 13, item 4): each costs a
        KDF run and an account forever. Checked in full before either is spent."""
        cfg = self._config
        self._spend_pair(
            "registrations", "an hour", _HOUR, s,
            self._conn_registers, cfg.register_per_connection,
            self._register_ips, cfg.register_per_ip, s.ip,
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
        if ip is not None:
            ip_buckets.take(ip, now)

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
