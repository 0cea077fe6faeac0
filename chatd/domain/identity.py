"""The one place the token-id (jti) and identity string formats are written and read.

A jti is ``<account id>.<generation>.<random>``; a guest's is ``0.<hold>.<random>`` (the
hold's id in the generation's place). An identity says who a token speaks for beyond the
name: ``name#<account id>``, or ``name#g<hold>`` for a guest. A name registered again, or
taken by the next guest, is a different identity and sees none of the former holder's
direct messages.
"""

from __future__ import annotations

import functools
import secrets
from typing import NamedTuple

GUEST_ID = 0  # the account id in a guest token's jti


class TokenId(NamedTuple):
    """A parsed jti: the account (GUEST_ID for a guest) and the generation, for a guest
    the hold's id (as text, as the hold stores it)."""

    user_id: int
    generation: int

    @property
    def is_guest(self) -> bool:
        return self.user_id == GUEST_ID

    @staticmethod
    @functools.lru_cache(maxsize=16_384)
    def parse(jti: str) -> TokenId | None:
        """None for a jti in no format of ours (a token signed by something else).
        Memoized: the same bound token's jti is checked on every command it runs."""
        parts = jti.split(".")
        if len(parts) != 3:
            return None
        try:
            return TokenId(int(parts[0]), int(parts[1]))
        except ValueError:
            return None

    def identity(self, name_key: str) -> str:
        return f"{name_key}#g{self.generation}" if self.is_guest else f"{name_key}#{self.user_id}"


def account_jti(user_id: int, generation: int) -> str:
    """A fresh token id for an account: a deleted account's tokens fail even if the name is
    registered again (new id); `logout all` bumps the generation."""
    return f"{user_id}.{generation}.{secrets.token_urlsafe(12)}"


def guest_jti(hold: str) -> str:
    """A fresh token id for the guest under hold `hold` (GuestHold.jti)."""
    return f"{GUEST_ID}.{hold}.{secrets.token_urlsafe(12)}"


def is_guest_jti(jti: str) -> bool:
    parsed = TokenId.parse(jti)
    return parsed is not None and parsed.is_guest


def is_hold_jti(jti: str, hold: str) -> bool:
    """True when `jti` is a guest token under hold `hold`."""
    parsed = TokenId.parse(jti)
    return parsed is not None and parsed.is_guest and str(parsed.generation) == hold


def account_identity(name_key: str, user_id: int) -> str:
    return f"{name_key}#{user_id}"


def guest_identity(name_key: str, hold: str) -> str:
    return f"{name_key}#g{hold}"


def identity_of(sub: str, jti: str) -> str:
    """The identity a token (subject, jti) speaks for; the bare name for a foreign jti."""
    key = sub.lower()
    parsed = TokenId.parse(jti)
    return key if parsed is None else parsed.identity(key)
