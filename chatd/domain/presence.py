"""Who is connected and as whom: the open sessions, the sessions bound to each user, and
the expiry of bound tokens. The only writer of a Session's binding (user, token, claims,
identity) and of who is online; the rules that span objects (leaving rooms on unbind, a
guest's hold) are chatd.app's, which calls in here.

Expiry runs on one shared heap with one scheduler timer (the earliest due), not a timer
per connection: a bound connection costs a heap entry, not a timer handle and a list.
Each entry is checked when it comes due (the session must still be bound to the same
claims), so unbinding costs nothing; stale entries are compacted away when they
outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from chatd.config import Config
from chatd.domain.accounts import Cancellable, Scheduler
from chatd.domain.identity import identity_of
from chatd.ratelimit import TokenBucket
from chatd.session import Peer, Session

if TYPE_CHECKING:
    from chatd.auth import Claims
    from chatd.clock import Clock

_NOTICE, _EXPIRY = 0, 1
# (due, sequence, session, claims, what): the sequence keeps ties in push order and
# stops comparisons from reaching the session.
_Entry = tuple[float, int, Session, "Claims", int]


class Presence:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        scheduler: Scheduler,
        on_due: Callable[[Session, Claims, bool], None],
    ) -> None:
        """`on_due(session, claims, expired)` runs when a bound token's expiry notice
        (expired False) or expiry (True) comes due while the session is still bound to it."""
        self._config = config
        self._clock = clock
        self._scheduler = scheduler
        self._on_due = on_due
        self._sessions: dict[Session, None] = {}
        # Per user: its one connection, or a dict of them once it has several (most users
        # have one: a dict each would cost ~200 bytes per connection).
        self._online: dict[str, Session | dict[Session, None]] = {}
        self._due: list[_Entry] = []
        self._seq = 0
        self._bound = 0
        self._timer: Cancellable | None = None
        self._timer_at = 0.0
        self._firing = False  # in _fire: it arms the timer once, at the end

    # --- reading -----------------------------------------------------------------------

    def sessions(self) -> Iterable[Session]:
        return self._sessions

    def count(self) -> int:
        return len(self._sessions)

    def users_online(self) -> int:
        return len(self._online)

    def is_online(self, key: str) -> bool:
        return key in self._online

    def sessions_of(self, user_key: str) -> Collection[Session]:
        """The user's connections (a live view: copy it before unbinding any)."""
        held = self._online.get(user_key)
        if held is None:
            return ()
        return held if isinstance(held, dict) else (held,)

    # --- connections -------------------------------------------------------------------

    def open(self, peer: Peer, ip: str) -> Session:
        now = self._clock.now()
        c = self._config
        bucket = TokenBucket(c.command_rate, c.command_burst, now) if c.command_rate > 0 else None
        s = Session(peer, ip, now, bucket)
        self._sessions[s] = None
        return s

    def close(self, s: Session) -> bool:
        """The connection is gone; False if it already was. Unbinding is the caller's."""
        if s.closed:
            return False
        s.closed = True
        self._sessions.pop(s, None)
        return True

    # --- binding -----------------------------------------------------------------------

    def bind(self, s: Session, claims: Claims, display: str) -> None:
        """Bind `s` to a verified token of `display` (its expiry timers start)."""
        key = claims.sub.lower()
        if s.claims is None:
            self._bound += 1
        s.user = display
        s.user_key = key
        s.identity = identity_of(claims.sub, claims.jti)
        s.claims = claims
        held = self._online.get(key)
        if held is None:
            self._online[key] = s
        elif isinstance(held, dict):
            held[s] = None
        elif held is not s:
            self._online[key] = {held: None, s: None}
        self._push(claims.exp - self._config.session_expiring_notice, s, claims, _NOTICE)

    def unbind(self, s: Session) -> None:
        """Forget the token and who `s` is; it is no longer online as that user."""
        key = s.user_key
        if key is not None:
            held = self._online.get(key)
            if held is s:
                del self._online[key]
            elif isinstance(held, dict):
                held.pop(s, None)
                if len(held) == 1:
                    self._online[key] = next(iter(held))
        if s.claims is not None:
            self._bound -= 1
            if self._bound == 0:
                self._stop()
        s.user = s.user_key = s.identity = None
        s.claims = None
        s.unbound_since = self._clock.now()

    # --- expiry heap -------------------------------------------------------------------

    def _push(self, due: float, s: Session, claims: Claims, what: int) -> None:
        self._seq += 1
        heapq.heappush(self._due, (due, self._seq, s, claims, what))
        if len(self._due) > 2 * self._bound + 64:
            self._due = [e for e in self._due if e[2].claims is e[3]]
            heapq.heapify(self._due)
        if not self._firing:
            self._arm()

    def _arm(self) -> None:
        if not self._due:
            return
        due = self._due[0][0]
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._scheduler.call_later(max(0.0, due - self._clock.now()), self._fire)

    def _stop(self) -> None:
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.now()
        self._firing = True
        try:
            while self._due and self._due[0][0] <= now:
                _, _, s, claims, what = heapq.heappop(self._due)
                if s.claims is not claims:
                    continue  # unbound or bound anew since
                if what == _NOTICE:
                    self._push(claims.exp, s, claims, _EXPIRY)
                    self._on_due(s, claims, False)
                else:
                    self._on_due(s, claims, True)
        finally:
            self._firing = False
        self._arm()
