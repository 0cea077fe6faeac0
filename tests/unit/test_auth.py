"""TokenService on a FakeClock (wire contract, "Identity and tokens"; limits.md, JWT leeway)."""

from __future__ import annotations

import jwt
import pytest

from chatd.auth import Claims, TokenService, check_secret, new_jti, normalize_grants, parse_jti
from chatd.clock import FakeClock
from chatd.errors import BadRequest, TokenExpired, Unauthorized

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
OTHER = "another-secret-that-is-also-long-enough-for-hs256"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.25)


@pytest.fixture
def tokens(clock: FakeClock) -> TokenService:
    return TokenService(SECRET, clock)


def payload(clock: FakeClock, **changes: object) -> dict[str, object]:
    now = int(clock.now())
    base: dict[str, object] = {
        "sub": "ann", "iat": now, "exp": now + 60, "jti": "1.0.x", "iss": "chatd",
        "scope": "msg:edit",
    }  # fmt: skip
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_mint_and_verify(tokens: TokenService, clock: FakeClock) -> None:
    token, claims = tokens.mint("Ann", "1.0.abc", ("room:create", "msg:edit"), 60)
    assert claims.iat == 1_700_000_000
    assert claims.exp == 1_700_000_061  # rounded up: lives at least its ttl
    assert claims.grants == ("room:create", "msg:edit")
    assert tokens.verify(token) == claims
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"


def test_expiry_is_exactly_at_exp(tokens: TokenService, clock: FakeClock) -> None:
    token, claims = tokens.mint("ann", "1.0.a", (), 60)
    clock.t = claims.exp - 0.001
    tokens.verify(token)
    clock.t = claims.exp
    with pytest.raises(TokenExpired):
        tokens.verify(token)


def test_the_cache_does_not_bypass_expiry(tokens: TokenService, clock: FakeClock) -> None:
    token, _claims = tokens.mint("ann", "1.0.a", (), 10)
    for _ in range(3):
        tokens.verify(token)  # cached after the first
    clock.advance(11)
    with pytest.raises(TokenExpired):
        tokens.verify(token)
    with pytest.raises(TokenExpired):
        tokens.verify(token)


def test_iat_may_be_up_to_thirty_seconds_ahead(clock: FakeClock) -> None:
    now = int(clock.now())
    ahead = TokenService(SECRET, FakeClock(now + 30))
    token, _ = ahead.mint("ann", "1.0.a", (), 600)
    service = TokenService(SECRET, FakeClock(now))
    service.verify(token)  # exactly 30 s ahead: accepted
    token31, _ = TokenService(SECRET, FakeClock(now + 31)).mint("ann", "1.0.a", (), 600)
    with pytest.raises(Unauthorized):
        service.verify(token31)


def test_a_cached_future_token_becomes_valid_later(clock: FakeClock) -> None:
    now = int(clock.now())
    token, _ = TokenService(SECRET, FakeClock(now + 40)).mint("ann", "1.0.a", (), 600)
    c = FakeClock(now)
    service = TokenService(SECRET, c)
    with pytest.raises(Unauthorized):
        service.verify(token)
    c.advance(10)
    service.verify(token)


def test_tampered_and_foreign_tokens_are_unauthorized(tokens: TokenService) -> None:
    token, _ = tokens.mint("ann", "1.0.a", (), 60)
    head, body, sig = token.split(".")
    for bad in [
        "",
        "x",
        "a.b.c",
        f"{head}.{body}.{sig[:-2]}AA",
        f"{head}.{body}.",
        jwt.encode(payload(tokens._clock), OTHER, algorithm="HS256"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(Unauthorized):
            tokens.verify(bad)


def test_alg_none_and_other_algorithms_are_refused(tokens: TokenService, clock: FakeClock) -> None:
    unsigned = jwt.encode(payload(clock), None, algorithm="none")
    with pytest.raises(Unauthorized):
        tokens.verify(unsigned)
    hs512 = jwt.encode(payload(clock), SECRET + "x" * 40, algorithm="HS512")
    with pytest.raises(Unauthorized):
        tokens.verify(hs512)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": "9999999999"},  # PyJWT accepts numeric strings
        {"iat": 1.5},
        {"exp": None},
        {"iat": None},
        {"jti": None},
        {"sub": None},
        {"scope": None},
        {"scope": ["msg:edit"]},  # PyJWT accepts scope as a list
        {"scope": "msg:edit superuser"},
        {"iss": "someone-else"},
        {"iss": None},
        {"sub": 5},
    ],
)
def test_claims_are_checked_strictly(
    tokens: TokenService, clock: FakeClock, changes: dict[str, object]
) -> None:
    token = jwt.encode(payload(clock, **changes), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        tokens.verify(token)


def test_a_hand_signed_token_with_good_claims_verifies(tokens: TokenService, clock: FakeClock) -> None:
    token = jwt.encode(payload(clock), SECRET, algorithm="HS256")
    assert isinstance(tokens.verify(token), Claims)


def test_an_overlong_token_is_refused_before_decoding(clock: FakeClock) -> None:
    service = TokenService(SECRET, clock, max_bytes=4096)
    token = jwt.encode(payload(clock, pad="x" * 5000), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="too long"):
        service.verify(token)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        check_secret("x" * 31)
    assert check_secret("é" * 16) == "é".encode() * 16  # bytes, not characters
    with pytest.raises(ValueError):
        TokenService("short", FakeClock())


def test_grants_are_normalized_in_contract_order() -> None:
    assert normalize_grants(["admin", "msg:edit", "admin"]) == ("msg:edit", "admin")
    assert normalize_grants([]) == ()
    with pytest.raises(BadRequest, match="nope"):
        normalize_grants(["msg:edit", "nope"])


def test_jti_names_account_and_generation() -> None:
    jti = new_jti(12, 3)
    assert parse_jti(jti) == (12, 3)
    assert new_jti(12, 3) != jti
    assert parse_jti("garbage") is None
    assert parse_jti("a.b.c") is None
