"""Tokens (PyJWT, algorithm pinned) and password hashing (argon2id, off the event loop).

Wire contract, "Identity and tokens". PyJWT checks the signature and that every claim is
present; a strict msgspec Struct then checks the claims' types (PyJWT accepts `exp` as a
numeric string and `scope` as a list), and expiry is judged against the injected clock.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt
import msgspec
from argon2 import PasswordHasher as _Argon2
from argon2.exceptions import InvalidHashError, VerificationError
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS

from chatd.clock import Clock
from chatd.config import ALL_GRANTS
from chatd.domain.identity import TokenId, account_jti
from chatd.errors import BadRequest, RateLimited, TokenExpired, Unauthorized

ISSUER = "chatd"
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
_LOGIN = "login"  # PasswordHasher work classes
_REGISTER = "register"


class Claims(msgspec.Struct, frozen=True):
    sub: str
    iat: int
    exp: int
    jti: str
    iss: str
    scope: str

    @property
    def grants(self) -> tuple[str, ...]:
        return tuple(self.scope.split())


def check_secret(secret: str) -> bytes:
    key = secret.encode("utf-8")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the secret must be at least {MIN_SECRET_BYTES} bytes (got {len(key)}); "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    return key


def normalize_grants(grants: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Grants in the contract's order, without repeats. Raises BadRequest on an unknown one."""
    unknown = [g for g in grants if g not in ALL_GRANTS]
    if unknown:
        raise BadRequest(f"unknown grant {unknown[0]!r}; grants are: {' '.join(ALL_GRANTS)}")
    wanted = set(grants)
    return tuple(g for g in ALL_GRANTS if g in wanted)


_claims_decoder = msgspec.json.Decoder(Claims)


class _PreparedKeyHMAC(HMACAlgorithm):
    """PyJWT's HS256, with the key's preparation (its asymmetric-key and JWK checks, a
    json.loads each time) done once for our one key instead of at every sign and verify."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: tuple[Any, bytes] | None = None

    def prepare_key(self, key: Any) -> bytes:
        cached = self._prepared
        if cached is not None and cached[0] == key:
            return cached[1]
        prepared = super().prepare_key(key)
        self._prepared = (key, prepared)
        return prepared


class TokenService:
    """Mints and verifies chatd tokens. Verified signatures are cached; claims are not trusted
    beyond that: expiry, revocation and the account are checked by the caller every time."""

    def __init__(self, secret: str, clock: Clock, *, max_bytes: int = 4096, iat_leeway: int = 30):
        self._key = check_secret(secret)
        self._clock = clock
        self._max_bytes = max_bytes
        self._iat_leeway = iat_leeway
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_size = 4096
        # One `scope` string per set of grants (a handful exist), shared by every token's
        # claims rather than one per token minted (claims live as long as the binding).
        self._scopes: dict[tuple[str, ...], str] = {}
        self._jws = PyJWS(algorithms=[ALGORITHM])
        self._jws.unregister_algorithm(ALGORITHM)
        self._jws.register_algorithm(ALGORITHM, _PreparedKeyHMAC())

    def mint(self, sub: str, jti: str, grants: tuple[str, ...], ttl: int) -> tuple[str, Claims]:
        now = self._clock.now()
        # iat is the whole second now falls in, never in the future (a client's own JWT
        # library may refuse that); exp is rounded up so the token lives at least its ttl.
        return self._sign(sub, jti, grants, math.floor(now), math.ceil(now + ttl))

    def renew(self, old: Claims, jti: str, max_ttl: int) -> tuple[str, Claims]:
        """A token like ``old`` with a fresh lifetime of the same length, ``exp - iat``, at
        most ``max_ttl`` (contract, `refresh`). Keeping ``exp - iat`` rather than minting
        with it as a ttl stops the lifetime growing by the rounding second at every refresh."""
        now = self._clock.now()
        iat = math.floor(now)
        exp = min(iat + max(1, old.exp - old.iat), math.ceil(now + max_ttl))
        return self._sign(old.sub, jti, old.grants, iat, exp)

    def _sign(
        self, sub: str, jti: str, grants: tuple[str, ...], iat: int, exp: int
    ) -> tuple[str, Claims]:
        claims = Claims(sub=sub, iat=iat, exp=exp, jti=jti, iss=ISSUER, scope=self._scope(grants))
        # PyJWT signs; msgspec writes the payload (PyJWT's json.dumps is the slow part).
        token = self._jws.encode(msgspec.json.encode(claims), self._key, algorithm=ALGORITHM)
        # Not cached: the connection that gets it is bound to these claims and uses them
        # (App.authenticate), so the token string is not kept anywhere after the reply.
        return token, claims

    def _scope(self, grants: tuple[str, ...]) -> str:
        scope = self._scopes.get(grants)
        if scope is None:
            scope = self._scopes[grants] = " ".join(grants)  # grants are normalized: few
        return scope

    def _remember(self, token: str, claims: Claims) -> None:
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def verify(self, token: str) -> Claims:
        """Signature, claims, `iat` and `exp`. Raises Unauthorized or TokenExpired."""
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            self._remember(token, claims)
        return self.current(claims)

    def current(self, claims: Claims) -> Claims:
        """`claims` (of a token verified before) while within their lifetime: `iat` and
        `exp` as `verify` checks them. Raises Unauthorized or TokenExpired."""
        now = self._clock.now()
        if claims.exp <= now:
            raise TokenExpired("the token has expired; log in again or refresh before expiry")
        if claims.iat > now + self._iat_leeway:
            raise Unauthorized("the token is not valid yet (iat is in the future)")
        return claims

    def _decode(self, token: str) -> Claims:
        # protocol.md Limits: at most max_bytes, checked before decoding. A JWT is ASCII, so a
        # character count is a byte count once the non-ASCII ones are turned away.
        if len(token) > self._max_bytes:
            raise Unauthorized(f"the token is too long (more than {self._max_bytes} bytes)")
        if not token.isascii():
            raise Unauthorized("the token is invalid")
        try:
            # PyJWT checks the header, the pinned algorithm and the signature; the claims are
            # then read by a strict Struct: every claim required, each of the right type
            # (PyJWT would take `exp` as a numeric string and `scope` as a list).
            signed = self._jws.decode_complete(token, self._key, algorithms=[ALGORITHM])
            claims = _claims_decoder.decode(signed["payload"])
        except (jwt.PyJWTError, msgspec.DecodeError, ValueError, TypeError):
            raise Unauthorized("the token is invalid") from None
        if claims.iss != ISSUER or any(g not in ALL_GRANTS for g in claims.grants):
            raise Unauthorized("the token is invalid")
        return claims


def new_jti(user_id: int, token_version: int) -> str:
    """A token id naming the account and its token generation (chatd.domain.identity)."""
    return account_jti(user_id, token_version)


def parse_jti(jti: str) -> tuple[int, int] | None:
    """(account id, generation), or None (chatd.domain.identity.TokenId.parse)."""
    return TokenId.parse(jti)


class _Job:
    __slots__ = ("args", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[str, ...], future: asyncio.Future[Any]):
        self.fn = fn
        self.args = args
        self.future = future


class PasswordHasher:
    """argon2id off the event loop, at most one hash per core at once, bounded queues.

    Two classes of work (issue 13, item 4): password checks of ``verify`` (logins) and new
    hashes of ``hash`` (registrations). A free thread always takes the oldest waiting
    login first, and registrations use at most ``workers - 1`` threads when there are
    several, so a login never queues behind registrations: at worst it waits for one
    hash already running. Each class has its own bound: past ``queue`` waiting logins or
    ``register_queue`` waiting registrations that class gets RateLimited, so a
    registration flood can neither delay nor refuse logins, and no storm grows memory.
    """

    def __init__(
        self,
        *,
        memory_kib: int = 19 * 1024,
        time_cost: int = 2,
        parallelism: int = 1,
        queue: int = 256,
        register_queue: int = 64,
        workers: int | None = None,
        argon: Any = None,
    ) -> None:
        # ``argon``: anything with argon2's hash/verify (tests pass a fake to order work).
        self._argon = argon or _Argon2(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        self._workers = workers or os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._workers, thread_name_prefix="chatd-hash"
        )
        self._bounds = {_LOGIN: queue, _REGISTER: register_queue}
        self._waiting: dict[str, collections.deque[_Job]] = {
            _LOGIN: collections.deque(),
            _REGISTER: collections.deque(),
        }
        self._running = {_LOGIN: 0, _REGISTER: 0}
        # Registrations leave one thread to logins when there is more than one.
        self._register_threads = max(1, self._workers - 1)
        self._dummy = self._argon.hash("chatd-dummy-password")

    def waiting(self, kind: str) -> int:
        """Jobs of `kind` ("login" or "register") queued and not yet running."""
        return len(self._waiting[kind])

    async def _run(self, kind: str, fn: Callable[..., Any], *args: str) -> Any:
        queue = self._waiting[kind]
        if len(queue) >= self._bounds[kind]:
            what = "logins" if kind == _LOGIN else "registrations"
            raise RateLimited(f"too many {what} at once; try again shortly", 1.0)
        job = _Job(fn, args, asyncio.get_running_loop().create_future())
        queue.append(job)
        self._start()
        try:
            return await job.future
        finally:
            if job in queue:  # cancelled while queued: give its place back
                queue.remove(job)

    def _next(self) -> tuple[str, _Job] | None:
        if self._running[_LOGIN] + self._running[_REGISTER] >= self._workers:
            return None
        if self._waiting[_LOGIN]:
            return _LOGIN, self._waiting[_LOGIN].popleft()
        if self._waiting[_REGISTER] and self._running[_REGISTER] < self._register_threads:
            return _REGISTER, self._waiting[_REGISTER].popleft()
        return None

    def _start(self) -> None:
        """Hand waiting jobs to free threads, logins first."""
        while (picked := self._next()) is not None:
            kind, job = picked
            if job.future.done():
                continue
            self._running[kind] += 1
            loop = job.future.get_loop()
            work = loop.run_in_executor(self._pool, job.fn, *job.args)
            work.add_done_callback(functools.partial(self._done, kind, job))

    def _done(self, kind: str, job: _Job, work: asyncio.Future[Any]) -> None:
        self._running[kind] -= 1
        if not job.future.done():
            if work.cancelled():
                job.future.cancel()
            elif (exc := work.exception()) is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(work.result())
        self._start()

    async def hash(self, password: str) -> str:
        """A new hash (a registration): yields to every waiting login."""
        return str(await self._run(_REGISTER, self._argon.hash, password))

    async def verify(self, pw_hash: str | None, password: str) -> bool:
        """True when the password matches. With no hash (unknown user) a dummy is checked, so
        both failures take about the same time."""
        return bool(
            await self._run(_LOGIN, self._check, pw_hash or self._dummy, password, pw_hash or "")
        )

    def _check(self, pw_hash: str, password: str, real: str) -> bool:
        try:
            self._argon.verify(pw_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return bool(real)

    def hash_sync(self, password: str) -> str:
        return str(self._argon.hash(password))

    def close(self) -> None:
        """Stop: jobs still queued are cancelled (their callers see CancelledError, as
        for the ones the pool had not started), so nobody waits for a hash forever."""
        for queue in self._waiting.values():
            while queue:
                job = queue.popleft()
                if not job.future.done():
                    job.future.cancel()  # close() runs on the loop, as every caller
        self._pool.shutdown(wait=False, cancel_futures=True)
