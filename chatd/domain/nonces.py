"""Nonces already answered: (identity, nonce) -> message id, so a retry is recognised
before the membership and rate checks without a store read per send. Ids only, and at
most ``size`` of them (oldest forgotten first), so memory stays small; the store still
has every nonce for a retry this cache forgot."""

from __future__ import annotations

import collections


class Nonces:
    __slots__ = ("_seen", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def get(self, identity: str, nonce: str) -> int | None:
        """The message id a nonce of this sender was answered with, if remembered."""
        return self._seen.get((identity, nonce))

    def remember(self, identity: str, nonce: str, message_id: int) -> None:
        self._seen[(identity, nonce)] = message_id
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
