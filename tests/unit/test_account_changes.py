"""App.account_change: while this node writes a change of an
account that its handler then makes in memory (passwd, logout all, user.delete), no read
of that account (a login's, an `auth`'s, another node's change read from the stream)
adopts the store's new state first: App.refresh_user waits for the change."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from chatd.store.base import UserRecord
from tests.unit.fakes import core


async def test_a_read_of_an_account_waits_for_this_node_s_changes_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with core() as k:
        ann = k.add_user("ann", 1)

        async def stored(key: str) -> UserRecord | None:
            return ann if key == "ann" else None

        monkeypatch.setattr(k.app.store, "get_user", stored)
        first, second = contextlib.ExitStack(), contextlib.ExitStack()
        first.enter_context(k.app.account_change("ann"))
        second.enter_context(k.app.account_change("ann"))  # two at once (two connections' passwd)
        read = asyncio.ensure_future(k.app.refresh_user("ann"))
        other = asyncio.ensure_future(k.app.refresh_user("bob"))
        await asyncio.wait_for(other, 5)  # another account's read does not wait
        for _ in range(10):
            await asyncio.sleep(0)
        assert not read.done()
        first.close()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not read.done()  # one change is still being written
        second.close()
        await asyncio.wait_for(read, 5)
        with k.app.account_change("ann"):  # a later change waits anew
            again = asyncio.ensure_future(k.app.refresh_user("ann"))
            await asyncio.sleep(0)
            assert not again.done()
        await asyncio.wait_for(again, 5)
