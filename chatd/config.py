"""Every limit of chatd in one frozen Config; defaults from ../shared/limits.md say why."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7777
    db: str = "chatd.db"
    secret: str | None = None
    # Contract: a 4,000-char message fully escaped plus a token fits in 64 KiB.
    max_frame: int = 65_536
    max_text: int = 4_000
    max_topic: int = 256
    history_limit: int = 500
    history_default: int = 50
    # A legal history/sync reply must never trip the outbox hard limit.
    history_page_bytes: int = 512 * 1024
    max_token_bytes: int = 4_096
    max_id_chars: int = 128
    max_nonce_chars: int = 64
    token_ttl: int = 3_600
    max_token_ttl: int = 7 * 24 * 3_600
    iat_leeway: int = 30
    session_expiring_notice: int = 60
    guests: bool = True
    login_grants: tuple[str, ...] = DEFAULT_LOGIN_GRANTS
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
    login_failures_per_minute: int = 5
    password_min: int = 8
    password_max: int = 1_024
    # OWASP argon2id: m=19 MiB, t=2, p=1.
    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    hash_queue: int = 256
    nonce_cache: int = 65_536
    shutdown_grace: float = 2.0
    # Writes per SQLite transaction (group commit); 1 = one commit per write, for comparison.
    commit_batch: int = 2_000
    # How often the server looks for changes made by `chatd user …` on the same database.
    db_poll_interval: float = 0.5
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

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def rate_burst(self) -> float:
        return self.rate_limit * 3
