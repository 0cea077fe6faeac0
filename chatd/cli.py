"""The command line (wire contract, "Running"): serve, user add|list|delete, token, backup,
stats."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence

from chatd import logs
from chatd.app import VERSION
from chatd.auth import PasswordHasher, TokenService, check_secret, new_jti, normalize_grants
from chatd.clock import SystemClock
from chatd.config import ALL_GRANTS, Config, redis_address
from chatd.gcpolicy import MIN_EVERY as GC_MIN_EVERY
from chatd.gcpolicy import Collector
from chatd.store.base import (
    AdminStore,
    NameHeld,
    Store,
    StoreMissing,
    StoreOpenError,
    UserRecord,
)
from chatd.store.sqlite import SQLiteAdmin, SQLiteStore, backup, check_file
from chatd.tls import TLSSetupError, client_context, server_context

log = logging.getLogger("chatd")
_DEFAULTS = Config()


class CliError(Exception):
    """A clear message for the operator, exit status 2."""


def secret_path(db: str) -> str:
    return db + ".secret"


def resolve_secret(flag: str | None, db: str, *, create: bool = True) -> str:
    """--secret, else CHATD_SECRET (empty counts as unset), else the file beside the
    database (made once, mode 0600); with :memory: a fresh one per process."""
    secret = flag or os.environ.get("CHATD_SECRET") or None
    if secret is None and db == ":memory:":
        secret = secrets.token_urlsafe(48)
    if secret is None:
        path = secret_path(db)
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
        except FileNotFoundError:
            if not create:
                raise CliError(f"no secret: pass --secret, set CHATD_SECRET or create {path}") from None
            secret = secrets.token_urlsafe(48)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret + "\n")
    try:
        check_secret(secret)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return secret


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the empty ones (off switches, unset values,
    whose help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, tuple | list):  # grant lists, as they are typed
            shown = ",".join(map(str, action.default)).replace("%", "%%")
            return f"{action.help or ''} (default: {shown})"
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=_DEFAULTS.db, help="database file, or :memory:")
    p.add_argument("--secret", default=None,
                   help="token signing secret (>= 32 bytes); default: $CHATD_SECRET, "
                   "else the file DB.secret beside the database")


def _add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=os.environ.get("CHATD_REDIS") or None, metavar="URL",
                   help="the Redis of `chatd serve --redis` nodes (redis://HOST:PORT/DB, "
                   "rediss:// for TLS) instead of --db; default $CHATD_REDIS; needs "
                   "chatd[redis]")


def _grants(value: str) -> tuple[str, ...]:
    names = [g for g in value.replace(",", " ").split() if g]
    try:
        return normalize_grants(names)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _guest_grants(value: str) -> tuple[str, ...]:
    grants = _grants(value)
    if "admin" in grants:
        # Contract: admin is never allowed for guests (anyone can log in as one).
        raise argparse.ArgumentTypeError("admin cannot be given to guests (anyone can be one)")
    return grants


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not n >= 0 or n == float("inf"):
        raise argparse.ArgumentTypeError("must be 0 (released at once) or more seconds")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd", description="chat server over TCP, JSON lines", formatter_class=_Help
    )
    parser.add_argument("--version", action="version", version=f"chatd {VERSION}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the server (the default)", formatter_class=_Help)
    _add_common(serve)
    d = _DEFAULTS
    serve.add_argument("--redis", default=os.environ.get("CHATD_REDIS") or None, metavar="URL",
                       help="keep everything in Redis (redis://HOST:PORT/DB, rediss:// for "
                       "TLS) instead of --db; default $CHATD_REDIS; needs chatd[redis] and "
                       "--secret or $CHATD_SECRET")
    serve.add_argument("--node-ttl", type=_node_ttl, default=d.node_ttl, metavar="SECONDS",
                       help="with --redis: a node silent this long is taken for dead and its "
                       "users leave every room (0.5 to 10)")
    serve.add_argument("--host", default=d.host, help="address to listen on")
    serve.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    serve.add_argument("--token-ttl", type=int, default=d.token_ttl, help="max token life, s")
    serve.add_argument("--max-frame", type=int, default=d.max_frame, help="bytes per line")
    serve.add_argument("--rate-limit", type=float, default=d.rate_limit,
                       help="msg.send/msg.edit per user per second, burst 3x; 0 = off")
    serve.add_argument("--no-guests", action="store_true", help="refuse guest logins")
    serve.add_argument("--login-grants", type=_grants, default=d.login_grants,
                       help="grants a login gets by default (comma separated)")
    serve.add_argument("--guest-grants", type=_guest_grants, default=d.guest_grants,
                       help="grants a guest login gets (comma separated; never admin)")
    serve.add_argument("--guest-grace", type=_seconds, default=d.guest_grace,
                       help="seconds a guest keeps its name after its last connection "
                       "(and after a restart); 0 = released at once")
    serve.add_argument("--outbox-soft", type=int, default=d.outbox_soft,
                       help="bytes queued for a client before its input is paused")
    serve.add_argument("--outbox-hard", type=int, default=d.outbox_hard,
                       help="bytes queued before a client is dropped as a slow consumer")
    serve.add_argument("--write-deadline", type=float, default=d.write_deadline,
                       help="seconds without write progress before a client is dropped")
    serve.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                       help="seconds a connection may stay unauthenticated")
    serve.add_argument("--max-connections", type=int, default=d.max_connections,
                       help="connections at once (also capped by the descriptor limit - 64)")
    serve.add_argument("--per-ip-connections", type=int, default=d.per_ip_connections,
                       help="connections at once per address (loopback exempt); 0 = off")
    serve.add_argument("--command-rate", type=float, default=d.command_rate,
                       help="other commands per connection per second (burst 2x); 0 = off")
    serve.add_argument("--register-per-ip", type=_non_negative(int), default=d.register_per_ip,
                       help="registrations per address per hour; 0 = off")
    serve.add_argument("--register-per-connection", type=_non_negative(int),
                       default=d.register_per_connection,
                       help="registrations per connection per hour; 0 = off")
    serve.add_argument("--login-failures-per-ip", type=_non_negative(int),
                       default=d.login_failures_per_ip,
                       help="failed logins per address per minute; 0 = off")
    serve.add_argument("--guest-logins-per-ip", type=_non_negative(int),
                       default=d.guest_logins_per_ip,
                       help="guest logins per address per minute (loopback exempt); 0 = off")
    serve.add_argument("--guest-logins-per-connection", type=_non_negative(int),
                       default=d.guest_logins_per_connection,
                       help="guest logins per connection per minute; 0 = off")
    serve.add_argument("--max-rooms-per-user", type=_non_negative(int),
                       default=d.max_rooms_per_user,
                       help="rooms one user may own at once (admins exempt); 0 = no cap")
    serve.add_argument("--commit-batch", type=int, default=d.commit_batch,
                       help="writes per transaction (group commit); 1 = commit each")
    serve.add_argument("--history-days", type=_non_negative(int), default=d.history_days,
                       help="delete messages older than N days; 0 = keep forever")
    serve.add_argument("--history-max", type=_non_negative(int), default=d.history_max,
                       help="keep at most the newest N messages per room and DM pair; 0 = all")
    serve.add_argument("--gc-freeze-interval", type=_gc_interval,
                       default=d.gc_freeze_interval, metavar="SECONDS",
                       help="collect young objects and freeze the survivors this often, so "
                            "full GC passes never rescan long-lived ones; 0 = Python's default GC")
    serve.add_argument("--gc-full-interval", type=_interval,
                       default=d.gc_full_interval, metavar="SECONDS",
                       help="with --gc-freeze-interval: one full GC pass this often, when quiet "
                            "(at the latest after twice this)")
    serve.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="serve TLS (1.2+) with this PEM certificate (chain); needs --tls-key")
    serve.add_argument("--tls-key", metavar="FILE", default=None,
                       help="the PEM private key of --tls-cert")
    serve.add_argument("--tls-handshake-timeout", type=_positive, default=d.tls_handshake_timeout,
                       help="seconds a TLS handshake may take")
    serve.add_argument("--metrics-port", type=_non_negative(int), default=None,
                       help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics "
                       "(0 picks a free port); off when not given")
    serve.add_argument("--metrics-host", default=d.metrics_host,
                       help="address of the metrics endpoint")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=logs.LEVELS,
                       help="least severe level logged (stderr)")
    serve.add_argument("--log-format", default="text", choices=logs.FORMATS,
                       help="text lines, or one JSON object per line for log shippers")

    user = sub.add_parser("user", help="manage accounts", formatter_class=_Help)
    usub = user.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="create an account", formatter_class=_Help)
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="an admin account (grant admin)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin (default: prompt twice)")
    _add_common(add)
    _add_redis(add)
    lst = usub.add_parser("list", help="one name a line", formatter_class=_Help)
    _add_common(lst)
    _add_redis(lst)
    rm = usub.add_parser("delete", help="delete an account (closes its connections)",
                         formatter_class=_Help)
    rm.add_argument("name")
    _add_common(rm)
    _add_redis(rm)

    tok = sub.add_parser("token", help="print a token for a bot", formatter_class=_Help)
    tok.add_argument("name")
    tok.add_argument("--grants", type=_grants, default=None,
                     help="comma separated (default: every grant the account's login gets)")
    tok.add_argument("--ttl", type=int, default=None,
                     help=f"seconds (default: {_DEFAULTS.token_ttl}; at most 7 days)")
    _add_common(tok)
    _add_redis(tok)

    st = sub.add_parser(
        "stats", formatter_class=_Help,
        help="figures of a running server (the admin `stats` command)",
        description="Connect to a running chatd and print its `stats`. The admin token is "
        "minted here from --db and --secret (as `chatd token` does), for --user or the first "
        "admin account, with a 60 s lifetime; or pass --token.",
    )  # fmt: skip
    st.add_argument("--host", default=_DEFAULTS.host, help="the server's address")
    st.add_argument("--port", type=int, default=_DEFAULTS.port, help="the server's port")
    st.add_argument("--user", default=None,
                    help="admin account to mint the token for (default: the first admin)")
    st.add_argument("--token", default=None,
                    help="use this admin token instead of minting one (default: $CHATD_TOKEN)")
    st.add_argument("--tls", action="store_true", help="connect with TLS")
    st.add_argument("--tls-ca", metavar="FILE", default=None,
                    help="trust the certificates in FILE (implies --tls; default: system CAs)")
    st.add_argument("--json", action="store_true", help="print the reply's data as JSON")
    st.add_argument("--timeout", type=_positive, default=5.0, help="seconds to wait")
    _add_common(st)
    _add_redis(st)

    bak = sub.add_parser(
        "backup", formatter_class=_Help,
        help="online consistent copy of the database (safe while a server runs)",
        description="Copy the database to PATH with SQLite's backup API, while a server may "
        "be running on it. To restore: stop the server, copy the backup over the database "
        "file, delete DB-wal and DB-shm, start the server. With --redis, PATH becomes an "
        "SQLite file holding the Redis data, read while no message, room or account "
        "changes (retried a few times, else refused: see README, Backups); restore it with "
        "`chatd copy --from PATH --to redis://...` into an empty database.",
    )
    bak.add_argument("path", help="where to write the copy (replaced whole if it exists)")
    bak.add_argument("--db", default=_DEFAULTS.db, help="database file")
    _add_redis(bak)

    cp = sub.add_parser(
        "copy", formatter_class=_Help,
        help="move all data to an empty store (SQLite file or redis:// URL)",
        description="Copy every account, room, message, DM, revision, guest hold and "
        "revocation, and the epoch, from SRC to the empty DST (each an SQLite file or a "
        "redis:// URL), keeping ids and revisions. Stop SRC's servers first. The secret "
        "file beside an SQLite database is not copied: serve DST with the same secret and "
        "tokens minted before the copy still work.",
    )
    cp.add_argument("--from", dest="source", required=True, metavar="SRC")
    cp.add_argument("--to", dest="target", required=True, metavar="DST")
    return parser


def _non_negative(kind: type[int]) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError("must be 0 (off) or more")
        return n

    return parse


def _interval(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= n < float("inf"):
        raise argparse.ArgumentTypeError("must be 0 (off) or more seconds")
    return n


def _gc_interval(value: str) -> float:
    n = _interval(value)
    if 0 < n < GC_MIN_EVERY:
        raise argparse.ArgumentTypeError(
            f"must be 0 (Python's default GC) or at least {GC_MIN_EVERY:g} seconds"
        )
    return n


def _positive(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not n > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")  # `chatd` alone is `chatd serve` (contract)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "user":
            return user_command(args)
        if args.command == "token":
            return token_command(args)
        if args.command == "backup":
            return backup_command(args)
        if args.command == "stats":
            return stats_command(args)
        if args.command == "copy":
            return copy_command(args)
    except CliError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    return 2


def _node_ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.5 <= value <= 10.0:
        raise argparse.ArgumentTypeError("must be 0.5 to 10 seconds")
    return value


def config_from(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        port=args.port,
        db=args.db,
        redis=args.redis,
        node_ttl=args.node_ttl,
        token_ttl=args.token_ttl,
        max_frame=args.max_frame,
        rate_limit=args.rate_limit,
        guests=not args.no_guests,
        login_grants=tuple(args.login_grants),
        guest_grants=tuple(args.guest_grants),
        guest_grace=args.guest_grace,
        outbox_soft=args.outbox_soft,
        outbox_low=min(_DEFAULTS.outbox_low, args.outbox_soft // 4),
        outbox_hard=args.outbox_hard,
        write_deadline=args.write_deadline,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        per_ip_connections=args.per_ip_connections,
        command_rate=args.command_rate,
        command_burst=int(args.command_rate * 2),
        commit_batch=max(1, args.commit_batch),
        register_per_ip=args.register_per_ip,
        register_per_connection=args.register_per_connection,
        login_failures_per_ip=args.login_failures_per_ip,
        guest_logins_per_ip=args.guest_logins_per_ip,
        guest_logins_per_connection=args.guest_logins_per_connection,
        max_rooms_per_user=args.max_rooms_per_user,
        history_days=args.history_days,
        history_max=args.history_max,
        gc_freeze_interval=args.gc_freeze_interval,
        gc_full_interval=args.gc_full_interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_handshake_timeout=args.tls_handshake_timeout,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def serve(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    config = config_from(args)
    if (config.tls_cert is None) != (config.tls_key is None):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    if config.tls_cert is not None and config.tls_key is not None:
        try:
            server_context(config.tls_cert, config.tls_key)  # refused before anything starts
        except TLSSetupError as exc:
            raise CliError(str(exc)) from None
    if config.redis is not None:
        # No file to keep a secret beside, and every node must share one.
        if not (args.secret or os.environ.get("CHATD_SECRET")):
            raise CliError("with --redis, pass --secret or set CHATD_SECRET (the same on every node)")
        secret = resolve_secret(args.secret, ":memory:")
    else:
        if config.db != ":memory:":
            _refuse_foreign(config.db)  # before the secret file is made beside it
        secret = resolve_secret(args.secret, config.db)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    from chatd.metrics import MetricsListenError

    redis_error: type[Exception] = StoreOpenError
    if config.redis is not None:
        try:
            from chatd.store.redis import RedisStoreError
        except ImportError as exc:
            raise CliError(f"--redis needs the redis extra (pip install 'chatd[redis]'): {exc}") from None
        redis_error = RedisStoreError
    try:
        return runner(_serve(config, secret))
    except StoreOpenError as exc:
        raise CliError(f"cannot open {config.db}: {exc}") from None
    except redis_error as exc:
        raise CliError(f"cannot use Redis: {exc}") from None
    except (TLSSetupError, MetricsListenError) as exc:
        raise CliError(str(exc)) from None


async def _serve(config: Config, secret: str) -> int:
    from chatd.server import ChatServer

    store: Store
    if config.redis is not None:
        from chatd.store.redis import RedisStore

        store = RedisStore(config.redis)
    else:
        store = SQLiteStore(config.db, max_batch=config.commit_batch)
    server = ChatServer(config, store, secret)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # handlers only set a flag (STYLE)
    on_disk = store if isinstance(store, SQLiteStore) and not store.memory else None
    try:
        await server.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    if on_disk is not None:
        # A fault in a mapped file (the -shm cut short) arrives as SIGBUS in the thread
        # inside SQLite, which keeps faulting; this loop, on another thread, gets to stop.
        # Only once started: until then the store works in a thread this loop awaits, so
        # a caught fault would leave start() waiting forever (uncaught, the process dies).
        loop.add_signal_handler(
            signal.SIGBUS, _on_sigbus, on_disk, stop, backstop(on_disk, 2 * config.shutdown_grace + 10)
        )
    watch = loop.create_task(_watch_storage(on_disk, stop)) if on_disk is not None else None
    collector: Collector | None = None
    if config.gc_freeze_interval > 0:
        collector = Collector(
            config.gc_freeze_interval, config.gc_full_interval,
            quiet=lambda: not server.chores and not server.app.departures_waiting(),
        )  # fmt: skip
        collector.start()
        collector.start_ticking()
    await stop.wait()
    if collector is not None:
        collector.stop()
    fault = on_disk.fault() if on_disk is not None else None
    if fault is None:
        if watch is not None:
            watch.cancel()
        await server.stop()
        # A SIGBUS during the stop: the store left its connections open (see close).
        fault = on_disk.failed if on_disk is not None else None
        if fault is None:
            return 0
    log.critical(
        "stopping: %s; every acknowledged change is in the database and its WAL, and SQLite "
        "rebuilds the -shm when chatd starts again", fault,
        extra={"event": "storage_failed", "error": fault},
    )  # fmt: skip
    await server.stop("storage failure")
    # Not a return: at exit the SQLite connections would close, and closing checkpoints
    # through the damaged file (a SIGBUS, or a thread still stuck in one).
    logging.shutdown()
    os._exit(STORAGE_FAILED)


# `chatd serve`'s exit status when it stopped because the database became unsafe to use
# while it ran (README, "When the -shm file is damaged"); 2 is for refusals at start.
STORAGE_FAILED = 3


def backstop(
    store: SQLiteStore, after: float, exit: Callable[[int], object] | None = None
) -> threading.Timer:
    """What exits with status 3 if a stop after a SIGBUS never finishes (a stop already
    under way waits for the faulted thread); started by the first SIGBUS."""
    timer = threading.Timer(after, _exit_stuck, (store, exit or _exit_now))
    timer.daemon = True
    return timer


def _on_sigbus(store: SQLiteStore, stop: asyncio.Event, backstop: threading.Timer) -> None:
    store.abandon(
        "the process got SIGBUS, most likely because a memory-mapped file was cut short "
        "(the database's -shm, truncated outside chatd)"
    )
    stop.set()
    if backstop.ident is None:  # a faulting thread faults again and again: start it once
        backstop.start()


def _exit_stuck(store: SQLiteStore, exit: Callable[[int], object]) -> None:
    log.critical("stopping: %s; the stop did not finish, exiting", store.fault(),
                 extra={"event": "storage_failed", "error": store.fault()})  # fmt: skip
    exit(STORAGE_FAILED)


def _exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


async def _watch_storage(store: SQLiteStore, stop: asyncio.Event) -> None:
    """Notice a damaged -shm while nothing reads or writes (reads and writes look first)."""
    while store.fault() is None:
        await asyncio.sleep(0.5)
    stop.set()


# --- offline commands (work while a server runs on the same database) ----------------


def _refuse_foreign(path: str) -> None:
    """Refuse, before anything is created beside it, a file that is not a chatd database
    (read-only: nothing in someone else's file changes)."""
    try:
        check_file(path)
    except StoreOpenError as exc:
        raise CliError(f"cannot open {path}: {exc}") from None


def _open_admin(args: argparse.Namespace, *, create: bool = False) -> AdminStore:
    """The accounts, for an offline command (no server lock: a server may be running).
    Only a command that adds something creates a missing database (mode 0600); the others
    refuse it, so a typo never leaves an empty database behind."""
    if args.redis is not None:
        return _open_redis_admin(args.redis, create=create)
    path = args.db
    if path == ":memory:":
        raise CliError("--db :memory: keeps nothing; name a database file")
    try:
        return SQLiteAdmin(path, create=create)
    except StoreMissing:
        raise CliError(f"no database at {path} (start the server once, or check --db)") from None
    except StoreOpenError as exc:
        raise CliError(f"cannot open {path}: {exc}") from None


def _open_redis_admin(url: str, *, create: bool) -> AdminStore:
    try:
        from chatd.store.redis.admin import RedisAdmin
    except ImportError as exc:
        raise CliError(f"--redis needs the redis extra (pip install 'chatd[redis]'): {exc}") from None
    try:
        return RedisAdmin(url, create=create)
    except StoreMissing as exc:
        raise CliError(f"{exc} (start a node once, or check --redis)") from None
    except StoreOpenError as exc:
        raise CliError(f"cannot use Redis: {exc}") from None


def _cli_secret(args: argparse.Namespace, *, create: bool = True) -> str:
    """The signing secret of an offline command: as `serve` finds it."""
    if args.redis is not None:
        if not (args.secret or os.environ.get("CHATD_SECRET")):
            raise CliError("with --redis, pass --secret or set CHATD_SECRET (the nodes' secret)")
        return resolve_secret(args.secret, ":memory:")
    return resolve_secret(args.secret, args.db, create=create)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise CliError("the passwords differ")
    return first


def user_command(args: argparse.Namespace) -> int:
    if args.user_command == "add" and not args.password_stdin and not sys.stdin.isatty():
        raise CliError(
            "no terminal to ask for the password: pipe it in with --password-stdin"
        )
    admin = _open_admin(args, create=args.user_command == "add")
    try:
        if args.user_command == "list":
            for user in admin.list_users():
                print(user.name)
            return 0
        if args.user_command == "add":
            _user_add(admin, args)
            print(args.name)
            return 0
        if args.user_command == "delete":
            if not admin.delete_user(args.name):
                raise CliError(f"no user {args.name!r}")
            return 0
    finally:
        admin.close()
    return 2


def _user_add(admin: AdminStore, args: argparse.Namespace) -> None:
    password = _read_password(args.password_stdin)
    from chatd.errors import BadRequest, Conflict
    from chatd.handlers.accounts import check_password
    from chatd.protocol.commands import NAME_HELP, is_valid_name

    try:
        check_password(password, _DEFAULTS)  # the same rule as `register`
    except BadRequest as exc:
        raise CliError(exc.message) from None
    if not is_valid_name(args.name):
        raise CliError(f"invalid name: {NAME_HELP}")
    hasher = PasswordHasher(workers=1)
    pw_hash = hasher.hash_sync(password)
    hasher.close()
    try:
        admin.create_user(args.name, pw_hash, args.admin, time.time())
    except NameHeld as exc:
        # Contract: registering a name a guest holds is a conflict, here too.
        if exc.held_until is None:
            raise CliError(
                f"the name {args.name!r} is held by a guest while it is connected; try later"
            ) from None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exc.held_until))
        raise CliError(
            f"the name {args.name!r} is held by a guest until {when}; try again then"
        ) from None
    except Conflict:
        raise CliError(f"user {args.name!r} already exists") from None


def _find_user(args: argparse.Namespace, name: str) -> UserRecord | None:
    admin = _open_admin(args)
    try:
        return admin.find_user(name)
    finally:
        admin.close()


def token_command(args: argparse.Namespace) -> int:
    user = _find_user(args, args.name)
    if user is None:
        raise CliError(f"no user {args.name!r}; add it first with: chatd user add {args.name}")
    secret = _cli_secret(args)
    base = _DEFAULTS.login_grants + (("admin",) if user.admin else ())
    grants = tuple(g for g in ALL_GRANTS if g in base and (args.grants is None or g in args.grants))
    ttl = args.ttl if args.ttl is not None else _DEFAULTS.token_ttl
    if ttl <= 0:
        raise CliError("--ttl must be a positive number of seconds")
    ttl = min(ttl, _DEFAULTS.max_token_ttl)
    tokens = TokenService(secret, SystemClock())
    token, _ = tokens.mint(user.name, new_jti(user.id, user.token_version), grants, ttl)
    print(token)
    return 0


def backup_command(args: argparse.Namespace) -> int:
    """`chatd backup PATH [--db FILE | --redis URL]`: see SQLiteStore's backup(); takes
    no lock. With --redis, chatd.store.copy.backup_redis."""
    if args.redis is not None:
        return _backup_redis(args.redis, args.path)
    if args.db == ":memory:":
        raise CliError("--db :memory: keeps nothing; name a database file")
    try:
        count = backup(args.db, args.path)
    except StoreOpenError as exc:
        raise CliError(f"cannot back up {args.db}: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot write {args.path}: {exc.strerror or exc}") from None
    print(f"chatd: backed up {args.db} to {args.path} ({count} messages)", file=sys.stderr)
    return 0


def _backup_redis(url: str, path: str) -> int:
    try:
        from chatd.store.copy import CopyError, backup_redis
    except ImportError as exc:
        raise CliError(f"--redis needs the redis extra (pip install 'chatd[redis]'): {exc}") from None
    try:
        count = backup_redis(url, path)
    except CopyError as exc:
        raise CliError(str(exc)) from None
    print(f"chatd: backed up {redis_address(url)} to {path} ({count} messages)", file=sys.stderr)
    return 0


def copy_command(args: argparse.Namespace) -> int:
    """`chatd copy --from SRC --to DST`: see chatd/store/copy.py (needs chatd[redis])."""
    try:
        from chatd.store.copy import CopyError, copy, shown
    except ImportError as exc:
        raise CliError(f"chatd copy needs the redis extra (pip install 'chatd[redis]'): {exc}") from None
    try:
        count = copy(args.source, args.target)
    except CopyError as exc:
        raise CliError(str(exc)) from None
    print(f"chatd: copied {shown(args.source)} to {shown(args.target)} ({count} messages)",
          file=sys.stderr)
    return 0


# --- chatd stats (a client of a running server) ----------------------------------------

_STATS_TTL = 60  # the minted admin token is good for a minute: enough for one question


def stats_command(args: argparse.Namespace) -> int:
    """`chatd stats`: send the admin `stats` command to a running server and print it."""
    token = args.token or os.environ.get("CHATD_TOKEN") or None
    if token is None:
        token = _admin_token(args)
    try:
        ctx = client_context(args.tls_ca) if (args.tls or args.tls_ca) else None
    except TLSSetupError as exc:
        raise CliError(str(exc)) from None
    where = f"{args.host}:{args.port}"
    try:
        data = asyncio.run(_ask_stats(args.host, args.port, token, ctx, args.timeout))
    except TimeoutError:
        raise CliError(f"no answer from chatd at {where} within {args.timeout:g} s") from None
    except ssl.SSLError as exc:
        raise CliError(f"TLS with {where} failed: {exc.reason or exc}") from None
    except (OSError, EOFError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        hint = "" if ctx is not None else " (a TLS server? add --tls)"
        raise CliError(f"cannot talk to chatd at {where}: {why}{hint}") from None
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{key}: {'-' if value is None else value}")
    return 0


def _admin_token(args: argparse.Namespace) -> str:
    """A short-lived token with only the admin grant, for --user or the first admin."""
    where = args.db if args.redis is None else redis_address(args.redis)
    if args.redis is None and args.db != ":memory:" and not os.path.exists(args.db):
        # A read must not leave an empty database behind (nor a secret beside it).
        raise CliError(f"no database {args.db}: pass the server's --db, or --token")
    if args.user is not None:
        user = _find_user(args, args.user)
        if user is None:
            raise CliError(f"no user {args.user!r} in {where}")
        if not user.admin:
            raise CliError(f"{user.name!r} is not an admin account (chatd user add NAME --admin)")
    else:
        admin = _open_admin(args)
        try:
            user = next((u for u in admin.list_users() if u.admin), None)
        finally:
            admin.close()
        if user is None:
            raise CliError(
                f"no admin account in {where}: create one with `chatd user add NAME --admin`,"
                " or pass --token"
            )
    tokens = TokenService(_cli_secret(args, create=False), SystemClock())
    token, _ = tokens.mint(user.name, new_jti(user.id, user.token_version), ("admin",), _STATS_TTL)
    return token


async def _ask_stats(
    host: str, port: int, token: str, ctx: ssl.SSLContext | None, timeout: float
) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, limit=1024 * 1024
        )
        try:
            # Sent at once, before hello: a TLS server that gets it as plain text fails
            # the handshake at once, instead of both sides waiting for the other.
            frame = {"cmd": "stats", "id": "stats", "token": token}
            writer.write(json.dumps(frame).encode() + b"\n")
            hello = json.loads(await reader.readline() or b"null")
            if not isinstance(hello, dict) or hello.get("event") != "hello":
                raise EOFError(f"not a chatd server (first line: {hello!r:.80})")
            while True:
                line = await reader.readline()
                if not line:
                    raise EOFError("the server closed the connection")
                reply = json.loads(line)
                if reply.get("id") != "stats":
                    continue  # an event
                if reply.get("type") == "ok":
                    data: dict[str, object] = reply["data"]
                    return data
                raise CliError(f"the server said {reply.get('code')}: {reply.get('message')}")
        finally:
            writer.close()
