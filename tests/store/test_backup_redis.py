"""`chatd backup --redis` (chatd/store/copy.py backup_redis) when the data keeps changing:
the copy is taken again, then refused with a message pointing to Redis's own snapshot; the
target is never left half-written. (The whole path, with a node running, is in
tests/wire/test_cli_redis.py.)"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from chatd.store import copy as copy_module
from chatd.store.copy import CopyError, backup_redis
from chatd.store.redis import RedisStore


def test_a_copy_that_keeps_changing_is_refused_and_leaves_no_file(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RedisStore(redis_url).open()  # a chatd database (an epoch), no data yet
    ticks = itertools.count()
    taken: list[int] = []

    def moving(store: Any) -> tuple[int]:
        n = next(ticks)
        taken.append(n)
        return (n,)  # another value at every look: as if nodes wrote all the time

    monkeypatch.setattr(copy_module, "_change_marks", moving)
    dest = tmp_path / "b.db"
    with pytest.raises(CopyError) as refused:
        backup_redis(redis_url, str(dest), attempts=3)
    assert "changed during each of 3 tries" in str(refused.value)
    assert "redis-cli --rdb" in str(refused.value)
    assert len(taken) == 6  # before and after each of the three tries
    assert os.listdir(tmp_path) == []  # no backup, no temporary file left


def test_a_copy_taken_while_nothing_changes_is_kept(redis_url: str, tmp_path: Path) -> None:
    RedisStore(redis_url).open()
    dest = tmp_path / "b.db"
    assert backup_redis(redis_url, str(dest)) == 0
    assert os.listdir(tmp_path) == ["b.db"]
