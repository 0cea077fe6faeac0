"""The server's counters, in one owner object, and the figures made from them.

The hot paths (reading, writing, fan-out, dispatch) only add to plain int attributes of
the one ``Stats`` object: no dicts, locks or clocks per frame. Everything else — rates,
gauges, commit latency percentiles, memory — is worked out when someone asks (the admin
``stats`` command, ``chatd stats``, a Prometheus scrape), so it costs nothing otherwise.

Rates are taken over a sliding window: once a second the server's sweep calls
``sample()``, which keeps the counters' values of the last ``RATE_WINDOW`` seconds; a
reading compares the counters now with the oldest sample in the window.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatd.app import App

RATE_WINDOW = 10  # seconds the per-second rates are averaged over
# Why a connection was refused at accept (the server's admission check).
REFUSALS = ("shutting_down", "full", "per_ip", "per_ip_rate")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Stats:
    """Counters since start. Written by the server and the core with ``+= 1``; read with
    ``report()``. Single-threaded: only the event loop touches it."""

    __slots__ = (
        "bad_frames",
        "bytes_in",
        "bytes_out",
        "commands",
        "deliveries",
        "handshaking",
        "idle_closed",
        "login_bursts",
        "messages",
        "rate_limited",
        "refused",
        "samples",
        "slow_consumers",
        "started",
        "started_wall",
        "stuck_writers",
        "throttled",
        "tls",
        "tls_failures",
    )

    def __init__(self, now: float | None = None) -> None:
        self.started = time.monotonic() if now is None else now
        self.started_wall = time.time()
        self.commands = 0  # commands run (errors in their fields included)
        self.messages = 0  # messages posted (msg.send that created one)
        self.deliveries = 0  # event frames a command caused, one per recipient connection
        self.bytes_in = 0
        self.bytes_out = 0
        self.slow_consumers = 0  # dropped past the outbox hard limit
        self.stuck_writers = 0  # dropped past the write deadline
        self.idle_closed = 0  # closed for not logging in within the idle timeout
        self.rate_limited = 0  # `rate_limited` error frames sent for commands
        self.throttled = 0  # commands held back by the per-connection command rate
        self.bad_frames = 0  # frames that could not be decoded or named no valid command
        self.login_bursts = 0  # failed-login bursts that reached the limit
        self.tls_failures = 0  # TLS handshakes that failed or timed out
        self.handshaking = 0  # TLS handshakes under way now
        self.tls = False
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        # (monotonic time, commands, messages, deliveries, bytes in, bytes out)
        self.samples: collections.deque[tuple[float, int, int, int, int, int]] = (
            collections.deque(maxlen=RATE_WINDOW + 1)
        )

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _counters(self, now: float) -> tuple[float, int, int, int, int, int]:
        return (now, self.commands, self.messages, self.deliveries, self.bytes_in, self.bytes_out)

    def sample(self, now: float | None = None) -> None:
        """Remember the counters now (the server calls this once a second)."""
        self.samples.append(self._counters(time.monotonic() if now is None else now))

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Per-second rates over the window (since start while younger than it)."""
        cur = self._counters(time.monotonic() if now is None else now)
        full = len(self.samples) == self.samples.maxlen
        base = self.samples[0] if full else (self.started, 0, 0, 0, 0, 0)
        dt = cur[0] - base[0]
        if dt <= 0:
            return dict.fromkeys(_RATE_NAMES, 0.0)
        return {
            name: round((cur[i] - base[i]) / dt, 1) for i, name in enumerate(_RATE_NAMES, 1)
        }

    def report(self, app: App, messages_stored: int, now: float | None = None) -> dict[str, Any]:
        """Every figure, as the `stats` command returns it (protocol.md, "stats"). The
        first seven names are fixed by the wire contract."""
        mono = time.monotonic() if now is None else now
        from chatd.domain.identity import is_guest_jti
        from chatd.version import VERSION

        logged_in = guests = 0
        for s in app.presence.sessions():
            if s.claims is not None:
                logged_in += 1
                if is_guest_jti(s.claims.jti):
                    guests += 1
        p50, p99 = percentiles(getattr(app.store, "commit_times", ()))

        return {
            "version": VERSION,
            "uptime": round(mono - self.started, 3),
            "connections": app.presence.count() + self.handshaking,
            "users_online": app.presence.users_online(),
            "rooms": len(app.rooms.by_id),
            "messages": messages_stored,
            "rev": app.store.rev,
            "connections_logged_in": logged_in,
            "connections_guests": guests,
            "connections_handshaking": self.handshaking,
            "tls": self.tls,
            "rate_window": RATE_WINDOW,
            **self.rates(mono),
            "commands_total": self.commands,
            "messages_total": self.messages,
            "deliveries_total": self.deliveries,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "slow_consumers": self.slow_consumers,
            "stuck_writers": self.stuck_writers,
            "idle_closed": self.idle_closed,
            "rate_limited": self.rate_limited,
            "throttled": self.throttled,
            "bad_frames": self.bad_frames,
            "login_bursts": self.login_bursts,
            "tls_handshake_failures": self.tls_failures,
            "refused": dict(self.refused),
            "store_commit_p50_ms": p50,
            "store_commit_p99_ms": p99,
            "store_errors": getattr(app.store, "write_errors", 0),
            "rss_bytes": rss_bytes(),
        }


_RATE_NAMES = (
    "commands_per_s",
    "messages_per_s",
    "deliveries_per_s",
    "bytes_in_per_s",
    "bytes_out_per_s",
)


def percentiles(seconds: Iterable[float]) -> tuple[float | None, float | None]:
    """p50 and p99 in milliseconds (None when nothing was measured)."""
    xs = sorted(seconds)
    if not xs:
        return None, None
    n = len(xs)
    p50 = xs[min(n - 1, (n * 50) // 100)]
    p99 = xs[min(n - 1, (n * 99) // 100)]
    return round(p50 * 1000, 3), round(p99 * 1000, 3)


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
