"""register, login, auth, refresh, logout, whoami, user.delete (wire contract,
"Identity and tokens")."""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from chatd.app import GUEST_ID
from chatd.auth import Claims, new_jti, normalize_grants
from chatd.config import Config
from chatd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
)
from chatd.protocol import commands as c
from chatd.store.base import GuestHold

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request
    from chatd.session import Session

log = logging.getLogger("chatd")
_FAILURE_WINDOW = 60.0
# Account names with recent failures kept before the stale ones are swept out.
_FAILURE_KEYS = 10_000


def check_password(password: str, config: Config) -> None:
    """At least password_min characters (contract: "≥ 8 chars") and 8 … 1,024 bytes of UTF-8
    (limits.md), checked before hashing so a huge password never costs a KDF run."""
    if len(password) < config.password_min or (
        len(password) * 4 > config.password_max  # cheap: most passwords end here
        and len(password.encode("utf-8")) > config.password_max
    ):
        raise BadRequest(
            f"password must be at least {config.password_min} characters "
            f"and at most {config.password_max} bytes (UTF-8)"
        )


def check_register(cmd: c.Register, config: Config) -> None:
    check_password(cmd.password, config)


def check_login(cmd: c.Login, config: Config) -> None:
    if cmd.ttl is not None and cmd.ttl <= 0:
        raise BadRequest("ttl must be a positive number of seconds")
    if cmd.grants is not None:
        normalize_grants(cmd.grants)
    if cmd.password is not None:
        check_password(cmd.password, config)


def check_auth(cmd: c.Auth, config: Config) -> None:
    if cmd.token is None:
        raise BadRequest("Object missing required field `token`")


async def register(app: App, req: Request, cmd: c.Register) -> Any:
    key = cmd.user.lower()
    if key in app.users or key in app.registering or app.guest_hold(key) is not None:
        raise Conflict(f"the name {cmd.user!r} is taken")
    app.registering.add(key)  # reserved until written: a racing guest login gets conflict
    try:
        pw_hash = await app.hasher.hash(cmd.password)
        user = await app.store.create_user(cmd.user, pw_hash, admin=False)
    finally:
        app.registering.discard(key)
    app.users[key] = user
    return {"user": user.name}


def _recent_failures(failures: list[float], now: float) -> list[float]:
    failures[:] = [t for t in failures if now - t < _FAILURE_WINDOW]
    return failures


def _check_failures(app: App, session: Session, key: str) -> None:
    now = app.clock.now()
    limit = app.config.login_failures_per_minute
    for failures in (session.login_failures, app.account_failures.get(key, [])):
        recent = _recent_failures(failures, now)
        # Once an account is failing, attempts still hashing count too, so guesses sent
        # in parallel cannot all slip past the limit while they wait.
        hashing = app.logins_hashing.get(key, 0) if recent else 0
        if recent and len(recent) + hashing >= limit:
            raise RateLimited(
                "too many failed logins; wait before trying again",
                _FAILURE_WINDOW - (now - recent[0]),
            )


def _fail(app: App, session: Session, key: str) -> Unauthorized:
    now = app.clock.now()
    session.login_failures.append(now)
    failures = app.account_failures
    if len(failures) >= _FAILURE_KEYS and key not in failures:
        # Guessing at random names must not grow memory: forget the names whose
        # failures are older than the window.
        for name in [k for k, v in failures.items() if not _recent_failures(v, now)]:
            del failures[name]
    failures.setdefault(key, []).append(now)
    _log_burst(app, session, key, now)
    return Unauthorized("wrong user name or password")


def _log_burst(app: App, session: Session, key: str, now: float) -> None:
    """One log line per burst of failed logins: when the failures of the connection or of
    the account reach the limit (further attempts are refused before they can fail)."""
    limit = app.config.login_failures_per_minute
    by_conn = len(_recent_failures(session.login_failures, now))
    by_account = len(_recent_failures(app.account_failures[key], now))
    if by_conn != limit and by_account != limit:
        return
    app.stats.login_bursts += 1
    log.warning(
        "failed logins: %d for account %r and %d from connection %s (%s) in the last "
        "%.0f s; further attempts get rate_limited", by_account, key, by_conn,
        session.ip, session.user or "not logged in", _FAILURE_WINDOW,
        extra={"event": "login_failures", "account": key, "ip": session.ip,
               "account_failures": by_account, "connection_failures": by_conn},
    )  # fmt: skip


def _ttl(app: App, asked: int | None) -> int:
    # Larger than --token-ttl is clamped (contract).
    return min(asked or app.config.token_ttl, app.config.token_ttl)


def _token_reply(token: str, claims: Claims, user: str) -> dict[str, Any]:
    return {"token": token, "user": user, "grants": list(claims.grants), "expires_at": claims.exp}


def _check_not_bound_elsewhere(session: Session, key: str) -> None:
    if session.user_key is not None and session.user_key != key:
        raise Forbidden(f"this connection is logged in as {session.user}; log out first")


async def login(app: App, req: Request, cmd: c.Login) -> Any:
    s = req.session
    key = cmd.user.lower()
    _check_not_bound_elsewhere(s, key)
    wanted = normalize_grants(cmd.grants) if cmd.grants is not None else None
    if cmd.password is None:
        return await _guest_login(app, req, cmd, wanted)
    _check_failures(app, s, key)
    user = app.users.get(key)
    hashing = app.logins_hashing
    hashing[key] = hashing.get(key, 0) + 1
    try:
        ok = await app.hasher.verify(user.pw_hash if user else None, cmd.password)
    finally:
        if hashing[key] <= 1:
            del hashing[key]
        else:
            hashing[key] -= 1
    user = app.users.get(key) if ok else None  # the account may have gone meanwhile
    if user is None:
        raise _fail(app, s, key)
    _check_not_bound_elsewhere(s, key)
    base = app.config.login_grants + (("admin",) if user.admin else ())
    grants = normalize_grants([g for g in base if wanted is None or g in wanted])
    token, claims = app.tokens.mint(
        user.name, new_jti(user.id, user.token_version), grants, _ttl(app, cmd.ttl)
    )
    app.bind(s, token, claims)
    return _token_reply(token, claims, user.name)


async def _guest_login(
    app: App, req: Request, cmd: c.Login, wanted: tuple[str, ...] | None
) -> Any:
    key = cmd.user.lower()
    if not app.config.guests:
        raise Forbidden("guest logins are turned off on this server")
    if key in app.users:
        raise Unauthorized("that name is registered: log in with its password")
    own = _own_hold(app, req.session, key)
    if own is None and app.guest_hold(key) is not None:
        raise Conflict(f"the guest name {cmd.user!r} is in use")
    if key in app.registering:
        raise Conflict(f"the name {cmd.user!r} is being registered")
    grants = normalize_grants([g for g in app.config.login_grants if wanted is None or g in wanted])
    if own is not None:
        # The holder itself, on its bound connection, is not "another guest": a new token
        # under the same hold, which lives as long as the longest of its tokens.
        token, claims = app.tokens.mint(
            own.name, f"{GUEST_ID}.{own.jti}.{secrets.token_urlsafe(12)}", grants,
            _ttl(app, cmd.ttl),
        )
        if claims.exp > own.expires_at:
            longer = GuestHold(own.name, own.jti, claims.exp)
            await app.store.hold_guest(longer)
            if app.guests.get(key) is own:
                app.guests[key] = longer
        app.bind(req.session, token, claims)
        return _token_reply(token, claims, own.name)
    hold_id = str(secrets.randbits(62))
    token, claims = app.tokens.mint(
        cmd.user, f"{GUEST_ID}.{hold_id}.{secrets.token_urlsafe(12)}", grants, _ttl(app, cmd.ttl)
    )
    hold = GuestHold(cmd.user, hold_id, claims.exp)
    app.guests[key] = hold  # reserved now, so a racing guest login gets conflict
    try:
        await app.store.hold_guest(hold)
    except BaseException:
        app.guests.pop(key, None)
        raise
    app.bind(req.session, token, claims)
    return _token_reply(token, claims, cmd.user)


def _own_hold(app: App, session: Session, key: str) -> GuestHold | None:
    """The hold of guest `key` when this connection is bound to that very guest."""
    hold = app.guests.get(key)
    claims = session.claims
    if hold is None or claims is None or session.user_key != key:
        return None
    try:
        app.check_claims(claims)
    except Unauthorized:
        return None
    return hold if claims.jti.startswith(f"{GUEST_ID}.{hold.jti}.") else None


async def auth(app: App, req: Request, cmd: c.Auth) -> Any:
    assert cmd.token is not None
    claims = app.tokens.verify(cmd.token)
    app.check_claims(claims)
    app.bind(req.session, cmd.token, claims)
    return {"user": req.user, "grants": list(claims.grants), "expires_at": claims.exp}


async def whoami(app: App, req: Request, cmd: c.WhoAmI) -> Any:
    claims = req.claims
    return {"user": req.user, "grants": list(claims.grants), "expires_at": claims.exp}


async def refresh(app: App, req: Request, cmd: c.Refresh) -> Any:
    old: Claims = req.claims
    key = req.user_key
    hold = app.guests.get(key)
    max_ttl = app.config.token_ttl
    if old.jti.startswith(f"{GUEST_ID}.") and hold is not None:
        token, claims = app.tokens.renew(
            old, f"{GUEST_ID}.{hold.jti}.{secrets.token_urlsafe(12)}", max_ttl
        )
        longer = GuestHold(hold.name, hold.jti, max(hold.expires_at, claims.exp))
        await app.store.hold_guest(longer)
        if app.guests.get(key) is hold:  # not released by a logout meanwhile
            app.guests[key] = longer
    else:
        user = app.users[key]
        token, claims = app.tokens.renew(old, new_jti(user.id, user.token_version), max_ttl)
    if req.session.user_key == key:
        app.bind(req.session, token, claims)
    return {"token": token, "expires_at": claims.exp}


async def logout(app: App, req: Request, cmd: c.Logout) -> Any:
    claims: Claims = req.claims
    key = req.user_key
    s = req.session
    hold = app.guests.get(key)
    guest = claims.jti.startswith(f"{GUEST_ID}.")
    await app.store.revoke(claims.jti, claims.exp)
    app.revoked[claims.jti] = claims.exp
    if guest and hold is not None:
        # A guest that logs out gives its name back; its other tokens die with the hold.
        await app.store.release_guest(hold.name, hold.jti)
        if app.guests.get(key) is hold:
            del app.guests[key]
    elif cmd.all:
        version = await app.store.bump_token_version(key)
        user = app.users.get(key)
        if user is not None:
            user.token_version = version
    app.unbind(s, "logout")
    for other in app.sessions_of(key):
        if other.claims is None:
            continue
        try:
            app.check_claims(other.claims)
        except Unauthorized:
            app.expire(other, "logout")
    return {}


async def user_delete(app: App, req: Request, cmd: c.UserDelete) -> Any:
    key = cmd.user.lower()
    if key not in app.users:
        raise NotFound(f"no user {cmd.user!r}")
    if not await app.store.delete_user(cmd.user):
        raise NotFound(f"no user {cmd.user!r}")
    # Its tokens stop working now; the member.left events and closes follow on the next
    # turn of the loop, so the caller's reply comes before the events it causes.
    user = app.users.pop(key, None)
    if user is not None:
        app.scheduler.call_later(0, lambda: app.drop_user(key, "deleted", forget=False))
    return {}
