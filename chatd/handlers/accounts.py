"""register, login, auth, refresh, logout, whoami, passwd, user.delete, user.list (wire
contract, "Identity and tokens" and "Decided for the next round")."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from chatd.auth import Claims, normalize_grants
from chatd.config import Config
from chatd.domain.identity import account_jti, guest_jti, is_guest_jti, is_hold_jti
from chatd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
)
from chatd.protocol import commands as c
from chatd.protocol.replies import (
    EMPTY,
    AuthReply,
    Empty,
    LoginReply,
    PasswdReply,
    RefreshReply,
    RegisterReply,
    UserEntry,
    UserListReply,
    WhoAmIReply,
)
from chatd.store.base import GuestHold, NameHeld, UserRecord

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request
    from chatd.session import Session

log = logging.getLogger("chatd")


def check_password(password: str, config: Config) -> None:
    """At least password_min characters (contract: "≥ 8 chars") and 8 … 1,024 bytes of UTF-8
    (protocol.md Limits), checked before hashing so a huge password never costs a KDF run."""
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


def check_passwd(cmd: c.Passwd, config: Config) -> None:
    # Contract: a wrong old `password` is `unauthorized` (a failed login), whatever its
    # length; only an oversized one is refused before it can cost a hash.
    if len(cmd.password.encode("utf-8")) > config.password_max:
        raise BadRequest(f"password must be at most {config.password_max} bytes (UTF-8)")
    check_password(cmd.new_password, config)


def _held(app: App, name: str, held_until: float | None) -> Conflict:
    """Contract: a conflict for a held name says until when it is held (None: while
    its guest is connected)."""
    return Conflict(f"the name {name!r} is held by a guest {app.accounts.held_note(held_until)}")


async def register(app: App, req: Request, cmd: c.Register) -> RegisterReply:
    await app.caught_up()  # several nodes: holds and accounts as every node has changed them
    accounts = app.accounts
    hold = accounts.guest_hold(cmd.user.lower())
    if hold is not None:
        raise _held(app, cmd.user, hold.held_until)
    if accounts.is_registered(cmd.user.lower()) or accounts.is_registering(cmd.user.lower()):
        raise Conflict(f"the name {cmd.user!r} is taken")
    # Counted only when a hash is about to run (a taken name or a bad password costs
    # nothing).
    app.limits.spend_register(req.session)
    key = accounts.begin_register(cmd.user)  # a racing guest login gets conflict
    try:
        pw_hash = await app.hasher.hash(cmd.password)
        user = await app.store.create_user(cmd.user, pw_hash, admin=False)
    except NameHeld as held:  # a hold the store knows and this node did not yet
        accounts.end_register(key, None)
        raise _held(app, cmd.user, held.held_until) from None
    except BaseException:
        accounts.end_register(key, None)
        raise
    accounts.end_register(key, user)
    return RegisterReply(user=user.name)


async def check_user_password(app: App, s: Session, key: str, password: str) -> UserRecord:
    """The account `key` if `password` is its password, else Unauthorized (a failed login).

    Every check goes through the login gate: checks still running count as failures
    until they are proven otherwise, so guesses sent in parallel, from one connection or
    many, on one node or several, cannot get more checks than the limit (issue 13, item
    6; issue 11). Raises RateLimited once the failures reach a limit."""
    check = await app.limits.admit_login(s, key)
    failed = False
    try:
        if s.closed:
            raise Unauthorized("the connection closed")  # nobody to answer: save the hash
        # The store's view, not only memory's: an account `chatd user add` made a moment
        # ago logs in at once (contract), one it deleted does not.
        user = await app.refresh_user(key)
        ok = await app.hasher.verify(user.pw_hash if user else None, password)
        now = app.accounts.user(key)
        # The account may have gone or changed its password meanwhile.
        if not ok or user is None or now is None or now.id != user.id or now.pw_hash != user.pw_hash:
            failed = True
            raise Unauthorized("wrong user name or password")
    finally:
        counts = await app.limits.finish_login(check, failed=failed)
        if failed:
            _log_burst(app, s, key, check.keys, counts)
    return now


def _log_burst(
    app: App, s: Session, key: str, keys: Sequence[tuple[Hashable, int]], counts: list[int]
) -> None:
    """One log line per burst of failed logins: when the failures of the account, the
    connection or the address reach their limit (later attempts are refused before they
    can fail, so the line is not repeated; on several nodes, only by the node whose
    failure reached it)."""
    if not any(limit > 0 and n == limit for n, (_, limit) in zip(counts, keys, strict=False)):
        return
    app.stats.login_bursts += 1
    log.warning(
        "failed logins: %d for account %r, %d from connection %s, %d from the address"
        " in the last minute; further attempts get rate_limited",
        counts[0], key, counts[1], s.ip, counts[2],
        extra={"event": "login_failures", "account": key, "ip": s.ip,
               "account_failures": counts[0], "connection_failures": counts[1]},
    )  # fmt: skip


def _ttl(app: App, asked: int | None) -> int:
    # Larger than --token-ttl is clamped (contract).
    return min(asked or app.config.token_ttl, app.config.token_ttl)


def _token_reply(token: str, claims: Claims, user: str) -> LoginReply:
    return LoginReply(token=token, user=user, grants=list(claims.grants), expires_at=claims.exp)


def _check_not_bound_elsewhere(session: Session, key: str) -> None:
    if session.user_key is not None and session.user_key != key:
        raise Forbidden(f"this connection is logged in as {session.user}; log out first")


async def login(app: App, req: Request, cmd: c.Login) -> LoginReply:
    s = req.session
    key = cmd.user.lower()
    _check_not_bound_elsewhere(s, key)
    wanted = normalize_grants(cmd.grants) if cmd.grants is not None else None
    if cmd.password is None:
        return await _guest_login(app, req, cmd, wanted)
    user = await check_user_password(app, s, key, cmd.password)
    _check_not_bound_elsewhere(s, key)
    base = app.config.login_grants + (("admin",) if user.admin else ())
    grants = normalize_grants([g for g in base if wanted is None or g in wanted])
    token, claims = app.tokens.mint(
        user.name, account_jti(user.id, user.token_version), grants, _ttl(app, cmd.ttl)
    )
    app.bind(s, claims)
    return _token_reply(token, claims, user.name)


async def _guest_login(
    app: App, req: Request, cmd: c.Login, wanted: tuple[str, ...] | None
) -> LoginReply:
    key = cmd.user.lower()
    if not app.config.guests:
        raise Forbidden("guest logins are turned off on this server")
    await app.caught_up()  # several nodes: holds and accounts as every node has changed them
    accounts = app.accounts
    if accounts.is_registered(key):
        raise Unauthorized("that name is registered: log in with its password")
    own = _own_hold(app, req.session, key)
    held = accounts.guest_hold(key)
    if own is None and held is not None:
        raise _held(app, cmd.user, held.held_until)
    if accounts.is_registering(key):
        raise Conflict(f"the name {cmd.user!r} is being registered")
    # Contract, "Guest grants": --guest-grants (never admin, whatever the Config says),
    # intersected with what the login asks for.
    grants = normalize_grants([
        g for g in app.config.guest_grants if g != "admin" and (wanted is None or g in wanted)
    ])  # fmt: skip
    if own is not None:
        # The holder itself, on its bound connection, is not "another guest": a new token
        # under the same hold (which lasts while it is connected, whatever the token's life).
        token, claims = app.tokens.mint(
            own.name, guest_jti(own.jti), grants, _ttl(app, cmd.ttl)
        )
        app.bind(req.session, claims)
        return _token_reply(token, claims, own.name)
    app.limits.spend_guest_login(req.session)
    hold = accounts.new_hold(cmd.user)  # reserved now, so a racing guest login gets conflict
    token, claims = app.tokens.mint(
        cmd.user, guest_jti(hold.jti), grants, _ttl(app, cmd.ttl)
    )
    try:
        await app.store.hold_guest(hold)
    except NameHeld as other:  # a hold taken on a node whose change this one had not read
        accounts.drop_hold(hold)
        raise _held(app, cmd.user, other.held_until) from None
    except BaseException:
        accounts.drop_hold(hold)
        raise
    if not accounts.is_current_hold(hold):
        raise Conflict(f"the name {cmd.user!r} was taken meanwhile")
    app.bind(req.session, claims)
    accounts.settle_hold(key)  # not bound after all (the connection went meanwhile): grace
    return _token_reply(token, claims, cmd.user)


def _own_hold(app: App, session: Session, key: str) -> GuestHold | None:
    """The hold of guest `key` when this connection is bound to that very guest."""
    hold = app.accounts.guest_hold(key)
    claims = session.claims
    if hold is None or claims is None or session.user_key != key:
        return None
    try:
        app.accounts.check_claims(claims)
    except Unauthorized:
        return None
    return hold if is_hold_jti(claims.jti, hold.jti) else None


async def auth(app: App, req: Request, cmd: c.Auth) -> AuthReply:
    assert cmd.token is not None
    await app.caught_up()  # several nodes: a logout or revocation made elsewhere counts
    claims = app.tokens.verify(cmd.token)
    try:
        app.accounts.check_claims(claims)
    except Unauthorized:
        if is_guest_jti(claims.jti) or app.accounts.is_revoked(claims.jti):
            raise
        # Perhaps an account `chatd user add` made (and `chatd token` signed for) a moment
        # ago, not yet seen by the poll: look in the store before saying no.
        await app.refresh_user(claims.sub.lower())
        app.accounts.check_claims(claims)
    app.bind(req.session, claims)
    return AuthReply(user=req.user, grants=list(claims.grants), expires_at=claims.exp)


async def whoami(app: App, req: Request, cmd: c.WhoAmI) -> WhoAmIReply:
    claims = req.claims
    return WhoAmIReply(user=req.user, grants=list(claims.grants), expires_at=claims.exp)


async def refresh(app: App, req: Request, cmd: c.Refresh) -> RefreshReply:
    old: Claims = req.claims
    key = req.user_key
    max_ttl = app.config.token_ttl
    if is_guest_jti(old.jti):
        # No await before the token exists: the hold checked a moment ago by the dispatcher
        # is the current one (a racing logout either came first, and this is unauthorized,
        # or comes after, and this token dies with the hold).
        hold = app.accounts.guest_hold(key)
        if hold is None:
            raise Unauthorized("guest session ended")
        token, claims = app.tokens.renew(old, guest_jti(hold.jti), max_ttl)
    else:
        user = app.accounts.user(key)
        assert user is not None  # the dispatcher checked the token against it just now
        token, claims = app.tokens.renew(old, account_jti(user.id, user.token_version), max_ttl)
    if req.session.user_key == key:
        app.bind(req.session, claims)
    return RefreshReply(token=token, expires_at=claims.exp)


async def _caught_up_and_still_valid(app: App, req: Request) -> None:
    """Several nodes: apply every change made anywhere before the command first (its
    effects then reach the connections the command ends before their end), then check
    the command's token again, as the dispatcher did on its arrival: a change applied
    meanwhile (a logout, a passwd or a delete on another node; the guest's name released
    and taken by another guest) makes it `unauthorized`, as on one server, where that
    change came first. One node: nothing to wait for, and the check stands."""
    if app.bus.carries_revisions:
        await app.caught_up()
        app.accounts.check_claims(req.claims)


async def logout(app: App, req: Request, cmd: c.Logout) -> Empty:
    """The connections it unbinds get what was written before it first, on any node: on
    one server those events went out as they were stored, before the logout ran. Several
    nodes: this node first applies the change stream up to the logout's arrival, then
    decides, as the guest case must (issue 13.7: nothing awaited between the decision and
    the unbind), and as the account case does so that memory and Redis never disagree
    while it waits (a refresh, a login or a command meanwhile sees the old state whole)."""
    claims: Claims = req.claims
    key = req.user_key
    s = req.session
    await _caught_up_and_still_valid(app, req)
    if is_guest_jti(claims.jti):
        # A guest that logs out gives its name back; its other tokens die with the hold.
        # Decided at once, with nothing awaited from here to the unbind (issue 13.7: a
        # refresh or login racing this logout finds the hold gone, and no later write
        # brings it back).
        hold = app.accounts.guest_hold(key)
        written = app.accounts.release_hold(hold) if hold is not None else None
        app.unbind(s, "logout")
        app.end_revoked_sessions(key, req)
        if written is not None:
            await written  # acknowledged only once the release is durable
        return EMPTY
    with app.account_change(key):
        await app.store.revoke(claims.jti, claims.exp)
        app.accounts.revoke(claims.jti, claims.exp)
        if cmd.all:
            app.accounts.new_generation(key, await app.store.bump_token_version(key))
    app.unbind(s, "logout")
    app.end_revoked_sessions(key, req)
    return EMPTY


async def passwd(app: App, req: Request, cmd: c.Passwd) -> PasswdReply:
    """Contract, "passwd": a new token like `refresh`'s; every other token of the account
    stops working (as `logout all`)."""
    old: Claims = req.claims
    key = req.user_key
    s = req.session
    if is_guest_jti(old.jti):
        raise Forbidden("a guest has no password; register an account first")
    user = await check_user_password(app, s, key, cmd.password)
    pw_hash = await app.hasher.hash(cmd.new_password)
    # The account's other connections here, unbound below, first get what was written
    # anywhere before the change (as `logout all`); no read adopts the new generation
    # before this handler does (App.account_change), so none ends this connection.
    await _caught_up_and_still_valid(app, req)
    with app.account_change(key):
        version = await app.store.set_password(user.id, pw_hash)
        changed = version is not None and app.accounts.password_changed(key, user.id, pw_hash, version)
    if version is None or not changed:
        raise Unauthorized("the token's account no longer exists")
    token, claims = app.tokens.renew(old, account_jti(user.id, version), app.config.token_ttl)
    if s.user_key == key:
        app.bind(s, claims)
    app.end_revoked_sessions(key, req)
    return PasswdReply(token=token, expires_at=claims.exp)


async def user_list(app: App, req: Request, cmd: c.UserList) -> UserListReply:
    # The store's list (the command line may have changed it a moment ago); names
    # compare case-insensitively, so they sort that way.
    _, users = await app.store.reload_users()
    users.sort(key=lambda u: u.name.lower())
    return UserListReply(users=[UserEntry(name=u.name, admin=u.admin) for u in users])


async def user_delete(app: App, req: Request, cmd: c.UserDelete) -> Empty:
    key = cmd.user.lower()
    # Its connections here, closed below, first get what was written anywhere before the
    # delete (several nodes; as `logout`): caught up before the write, so the account in
    # memory is the one deleted (not one registered again elsewhere meanwhile).
    await _caught_up_and_still_valid(app, req)
    if not app.accounts.is_registered(key):
        raise NotFound(f"no user {cmd.user!r}")
    with app.account_change(key):
        if not await app.store.delete_user(cmd.user):
            raise NotFound(f"no user {cmd.user!r}")
        forgotten = app.accounts.forget_user(key) is not None
    # Its tokens stop working now; its connections leave their rooms (member.left goes
    # out batched, as for any departure) and are closed as part of this outcome: after
    # the caller's reply when the caller is one of them (contract: reply first).
    if forgotten:
        app.drop_user(key, "deleted", req)
    return EMPTY
