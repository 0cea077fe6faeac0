"""Every setting of chatd in one frozen Config; the defaults' comments say why.

The field limits the wire contract fixes (name, topic, nonce and request-id lengths, the
integer range) are not settings: they live once, in chatd.protocol.commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import urlsplit

ALL_GRANTS: tuple[str, ...] = (
    "room:create",
    "room:edit",
    "room:delete",
    "msg:edit",
    "msg:delete",
    "msg:edit:any",
    "msg:delete:any",
    "admin",
)
# A login gets every grant but admin unless the operator says otherwise (contract).
DEFAULT_LOGIN_GRANTS: tuple[str, ...] = tuple(g for g in ALL_GRANTS if g != "admin")
# An anonymous guest may make rooms and change its own messages, nothing of anyone else's
# (contract, "Guest grants"): no rewriting others' messages, no deleting rooms.
DEFAULT_GUEST_GRANTS: tuple[str, ...] = ("room:create", "msg:edit", "msg:delete")


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7777
    db: str = "chatd.db"
    # --redis / CHATD_REDIS (issue 11): the Redis store instead of SQLite; db is then unused.
    redis: str | None = None
    # Several nodes on one Redis (chatd/cluster.py): a node that stops refreshing its
    # heartbeat for this long is taken for dead; its users leave every room.
    node_ttl: float = 10.0
    secret: str | None = None
    # Contract: a 4,000-char message fully escaped plus a token fits in 64 KiB.
    max_frame: int = 65_536
    max_text: int = 4_000
    history_limit: int = 500
    history_default: int = 50
    # A legal history/sync reply must never trip the outbox hard limit.
    history_page_bytes: int = 512 * 1024
    max_token_bytes: int = 4_096
    token_ttl: int = 3_600
    max_token_ttl: int = 7 * 24 * 3_600
    iat_leeway: int = 30
    session_expiring_notice: int = 60
    guests: bool = True
    login_grants: tuple[str, ...] = DEFAULT_LOGIN_GRANTS
    guest_grants: tuple[str, ...] = DEFAULT_GUEST_GRANTS
    # A guest keeps its name this long after its last connection goes (and after a restart),
    # so a client that reconnects keeps it; 0 = released at once (contract).
    guest_grace: float = 120.0
    # asyncio water marks / InspIRCd soft sendq: stop reading a client that does not read.
    outbox_soft: int = 64 * 1024
    outbox_low: int = 16 * 1024
    # InspIRCd hard sendq; NATS and Redis pub/sub drop such consumers the same way.
    outbox_hard: int = 1024 * 1024
    write_deadline: float = 10.0
    frames_per_batch: int = 64
    keepalive_idle: int = 60
    keepalive_interval: int = 15
    keepalive_count: int = 4
    idle_timeout: float = 300.0
    max_connections: int = 20_000
    per_ip_connections: int = 64
    per_ip_new_per_minute: int = 60
    # msg.send/msg.edit per user per second; burst is three times that; 0 turns it off.
    rate_limit: float = 10.0
    # Other commands per connection (InspIRCd fakelag): past the burst, reading pauses.
    command_rate: float = 200.0
    command_burst: int = 400
    # ergo: failed logins per minute per connection and per account name; per address a
    # few accounts' worth, so one guesser cannot lock a shared address out of every account
    # while a user behind it mistyping stays well within (0 turns the per-address one off).
    login_failures_per_minute: int = 5
    login_failures_per_ip: int = 20
    # Registrations (a KDF run each, and an account forever), per hour: a household or an
    # office registers a few a day; a flood from one address stops at the burst.
    register_per_ip: int = 20
    register_per_connection: int = 10
    # Guest logins that take a new name (a store write each), per minute: enough for people
    # trying names, not for rotating names to dodge per-user limits. The per-address limit
    # exempts loopback like --per-ip-connections (local bots, benchmarks).
    guest_logins_per_ip: int = 60
    guest_logins_per_connection: int = 30
    # Rooms a user may own at once (persistent and ephemeral alike); admins are exempt.
    max_rooms_per_user: int = 100
    # room.list / channels entries per reply (default and most): a small server's list
    # fits in one reply; a page also stays under history_page_bytes, like history.
    list_limit: int = 1_000
    password_min: int = 8
    password_max: int = 1_024
    # OWASP argon2id: m=19 MiB, t=2, p=1.
    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    hash_queue: int = 256
    # Registrations waiting for a hash; a separate bound, so a flood never refuses logins.
    register_hash_queue: int = 64
    nonce_cache: int = 65_536
    shutdown_grace: float = 2.0
    # Writes per SQLite transaction (group commit); 1 = one commit per write, for comparison.
    commit_batch: int = 2_000
    # How often the server looks for changes made by `chatd user …` on the same database.
    db_poll_interval: float = 0.5
    # Several nodes (Redis): how often a node settles its rate budgets with the others
    # (chatd/store/redis/limits.py).
    limits_sync: float = 0.1
    # Several nodes: how long a password check may wait for checks in flight elsewhere to
    # free a place before it is answered rate_limited (they take a hash and a store read
    # each, bounded by the 5 s store timeouts; an unanswered one is released at a settle).
    login_wait: float = 10.0
    # Retention, off by default (0): drop messages older than this many days, and keep at
    # most this many of the newest per room and per DM pair. Pruning runs at start and then
    # every prune_interval seconds, through the writer, prune_batch rows per write.
    history_days: float = 0
    history_max: int = 0
    prune_interval: float = 60.0
    prune_batch: int = 500
    # TLS (stdlib ssl, 1.2+) instead of plain TCP on the same port when both are set. A
    # handshake must finish within tls_handshake_timeout (and within idle_timeout).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_handshake_timeout: float = 10.0
    # Prometheus text format on http://metrics_host:metrics_port/metrics; None = off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Garbage collection (chatd.gcpolicy): freeze the survivors every gc_freeze_interval
    # seconds (0 = CPython's own collector, untouched), a full pass every gc_full_interval.
    gc_freeze_interval: float = 1.0
    gc_full_interval: float = 600.0

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def rate_burst(self) -> float:
        return self.rate_limit * 3


def redis_address(url: str) -> str:
    """A Redis URL fit for a log line or an error message: without its password."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"
