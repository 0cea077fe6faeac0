"""The Store conformance suite (issue 10): one set of tests every Store implementation must
pass, written against the `chatd.store.base.Store` protocol only. A second backend is added
to BACKENDS and proved by the same tests; nothing here may reach into one implementation.

Each backend is a factory of (store, reopen): `reopen` gives a fresh store over the same
data, or None for a backend that keeps nothing (SQLite `:memory:`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chatd.errors import Conflict
from chatd.store.base import MessageRecord, NewMessage, RoomRecord, Snapshot, Store
from chatd.store.redis import RedisStore
from chatd.store.sqlite import SQLiteStore
from tests.redisutil import fresh_redis_url

Factory = Callable[[], Store]


def _sqlite_file(tmp: Path) -> tuple[Factory, bool]:
    return (lambda: SQLiteStore(str(tmp / "conformance.db"))), True


def _sqlite_memory(tmp: Path) -> tuple[Factory, bool]:
    return (lambda: SQLiteStore(":memory:")), False


def _redis(tmp: Path) -> tuple[Factory, bool]:
    url = fresh_redis_url()  # a real redis-server (tests/redisutil.py); reopen: same db
    return (lambda: RedisStore(url)), True


BACKENDS = {"sqlite-file": _sqlite_file, "sqlite-memory": _sqlite_memory, "redis": _redis}
DURABLE = ["sqlite-file", "redis"]  # the backends whose data outlives a reopen


class Opened:
    """One backend under test: the open store, its snapshot, and a way to reopen."""

    def __init__(self, factory: Factory, durable: bool) -> None:
        self.factory = factory
        self.durable = durable
        self.store = factory()
        self.snap = self.store.open()

    async def reopen(self) -> Snapshot:
        await self.store.close()
        self.store = self.factory()
        self.snap = self.store.open()
        return self.snap


async def _opened(name: str, tmp_path: Path) -> AsyncIterator[Opened]:
    factory, durable = BACKENDS[name](tmp_path)
    opened = Opened(factory, durable)
    try:
        yield opened
    finally:
        await opened.store.close()


@pytest.fixture(params=list(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
    async for opened in _opened(request.param, tmp_path):
        yield opened


@pytest.fixture(params=DURABLE)
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
    async for opened in _opened(request.param, tmp_path):
        yield opened


async def room(store: Store, name: str = "lobby") -> RoomRecord:
    return await store.create_room(RoomRecord(0, name, "", "ann", 1.0, False, False))


def new(room_id: int | None, text: str, *, sender: str = "ann", to: str | None = None,
        nonce: str | None = None, ts: float = 1.0) -> NewMessage:  # fmt: skip
    return NewMessage(
        room_id, sender, to, text, ts, nonce,
        sender_key=f"{sender}#1", recipient_key=None if to is None else f"{to}#2",
    )  # fmt: skip


async def send_all(store: Store, msgs: list[NewMessage]) -> list[MessageRecord]:
    return [(await store.add_message(m))[0] for m in msgs]


# --- start ------------------------------------------------------------------------------


async def test_a_new_store_is_empty_with_an_epoch_and_revision_zero(backend: Opened) -> None:
    snap = backend.snap
    assert snap.epoch and snap.rev == 0 and backend.store.rev == 0
    assert snap.users == [] and snap.guests == [] and snap.rooms == [] and snap.revoked == {}


async def test_epoch_and_revision_survive_a_reopen(durable: Opened) -> None:
    r = await room(durable.store)
    await send_all(durable.store, [new(r.id, "a"), new(r.id, "b")])
    epoch, rev = durable.snap.epoch, durable.store.rev
    snap = await durable.reopen()
    assert snap.epoch == epoch and snap.rev == rev == 2
    assert [x.name for x in snap.rooms] == ["lobby"]


# --- accounts ---------------------------------------------------------------------------


async def test_users_are_unique_case_insensitively(backend: Opened) -> None:
    s = backend.store
    ann = await s.create_user("Ann", "hash", False)
    assert ann.id > 0 and ann.name == "Ann" and ann.token_version == 0
    with pytest.raises(Conflict):
        await s.create_user("ANN", "other", True)
    bob = await s.create_user("bob", "h2", True)
    assert bob.id > ann.id
    _, users = await s.reload_users()
    assert sorted((u.name, u.admin) for u in users) == [("Ann", False), ("bob", True)]


async def test_token_version_bumps_and_delete_says_whether_it_found_one(backend: Opened) -> None:
    s = backend.store
    await s.create_user("ann", "h", False)
    assert await s.bump_token_version("ANN") == 1
    assert await s.bump_token_version("ann") == 2
    assert await s.bump_token_version("nobody") == 0
    assert await s.delete_user("Ann") is True
    assert await s.delete_user("ann") is False
    _, users = await s.reload_users()
    assert users == []


async def test_accounts_and_revocations_survive_a_reopen(durable: Opened) -> None:
    s = durable.store
    await s.create_user("ann", "h", True)
    await s.bump_token_version("ann")
    await s.revoke("jti-1", 2_000_000_000)
    await s.revoke("jti-old", 10)
    await s.purge_expired(100)
    snap = await durable.reopen()
    assert [(u.name, u.admin, u.token_version) for u in snap.users] == [("ann", True, 1)]
    assert snap.revoked == {"jti-1": 2_000_000_000}


# --- rooms ------------------------------------------------------------------------------


async def test_room_ids_grow_and_a_rename_is_kept(backend: Opened) -> None:
    s = backend.store
    a = await room(s, "a")
    b = await room(s, "b")
    assert 0 < a.id < b.id
    await s.update_room(a.id, "Alpha", "new topic")
    await s.delete_room(b.id)
    c = await room(s, "b")  # a deleted room's name is free again, under a new id
    assert c.id > b.id
    if backend.durable:
        snap = await backend.reopen()
        assert sorted((r.id, r.name, r.topic) for r in snap.rooms) == [
            (a.id, "Alpha", "new topic"),
            (c.id, "b", ""),
        ]


# --- messages: ids, revisions, nonces ---------------------------------------------------


async def test_ids_and_revisions_grow_strictly_and_the_store_rev_follows(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    sent = await send_all(s, [new(r.id, f"m{i}") for i in range(5)])
    assert [m.id for m in sent] == sorted({m.id for m in sent})
    assert [m.rev for m in sent] == [1, 2, 3, 4, 5]
    assert s.rev == 5
    edited = await s.edit_message(sent[0].id, "changed", 2.0, "ann")
    assert edited is not None and edited.rev == 6 and edited.text == "changed"
    assert edited.edited_ts == 2.0 and edited.edited_by == "ann"
    gone = await s.delete_message(sent[1].id)
    assert gone is not None and gone.rev == 7 and gone.deleted and gone.text == ""
    assert s.rev == 7


async def test_concurrent_sends_get_distinct_ids_in_revision_order(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    results = await asyncio.gather(*(s.add_message(new(r.id, f"m{i}")) for i in range(300)))
    records = sorted((m for m, _ in results), key=lambda m: m.id)
    assert len({m.id for m in records}) == 300
    assert [m.rev for m in records] == sorted(m.rev for m in records)
    assert len({m.rev for m in records}) == 300 and s.rev == records[-1].rev


async def test_a_nonce_retry_returns_the_original_once(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    first, created = await s.add_message(new(r.id, "hello", nonce="n1"))
    assert created
    again, created = await s.add_message(new(r.id, "hello again", nonce="n1"))
    assert not created and again.id == first.id and again.text == "hello"
    other, created = await s.add_message(new(r.id, "hi", sender="bob", nonce="n1"))
    assert created and other.id != first.id  # nonces are per sender
    found = await s.find_nonce("ann#1", "n1")
    assert found is not None and found.id == first.id
    assert await s.find_nonce("ann#1", "unknown") is None
    assert s.rev == 2  # the retry took no revision


async def test_racing_retries_of_one_nonce_post_once(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    results = await asyncio.gather(
        *(s.add_message(new(r.id, "x", nonce="same")) for _ in range(20))
    )
    assert sum(created for _, created in results) == 1
    assert len({m.id for m, _ in results}) == 1


async def test_edit_and_delete_of_a_missing_or_deleted_message_is_none(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    (m,) = await send_all(s, [new(r.id, "x")])
    assert await s.edit_message(m.id + 100, "y", 1.0, "ann") is None
    assert await s.delete_message(m.id) is not None
    assert await s.delete_message(m.id) is None
    assert await s.edit_message(m.id, "y", 1.0, "ann") is None
    got = await s.get_message(m.id)
    assert got is not None and got.deleted and got.text == ""
    assert await s.get_message(m.id + 100) is None


async def test_the_newest_id_is_not_handed_out_again_after_its_deletion(durable: Opened) -> None:
    s = durable.store
    r = await room(s)
    sent = await send_all(s, [new(r.id, "a"), new(r.id, "b")])
    await s.delete_message(sent[-1].id)
    await durable.reopen()
    (after,) = await send_all(durable.store, [new(r.id, "c")])
    assert after.id > sent[-1].id and after.rev == 4


# --- history pages (contract: History pages) -----------------------------------------------


async def test_room_history_pages_by_the_contract(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    other = await room(s, "other")
    ids = [m.id for m in await send_all(s, [new(r.id, f"m{i}") for i in range(10)])]
    await send_all(s, [new(other.id, "elsewhere")])
    await s.delete_message(ids[9])  # tombstones never appear in history

    def page(result: tuple[list[MessageRecord], bool]) -> tuple[list[int], bool]:
        return [m.id for m in result[0]], result[1]

    assert page(await s.room_history(r.id, None, None, 3)) == (ids[6:9], True)
    assert page(await s.room_history(r.id, None, None, 50)) == (ids[:9], False)
    assert page(await s.room_history(r.id, ids[3], None, 2)) == (ids[1:3], True)
    assert page(await s.room_history(r.id, ids[2], None, 5)) == (ids[:2], False)
    assert page(await s.room_history(r.id, None, ids[5], 2)) == (ids[6:8], True)
    assert page(await s.room_history(r.id, None, ids[6], 5)) == (ids[7:9], False)
    assert page(await s.room_history(r.id, ids[6], ids[1], 2)) == (ids[2:4], True)
    assert page(await s.room_history(r.id, ids[4], ids[1], 10)) == (ids[2:4], False)


async def test_dms_belong_to_identities(backend: Opened) -> None:
    s = backend.store
    to_bob = await send_all(s, [new(None, "hi bob", to="bob"), new(None, "again", to="bob")])
    to_cat = await send_all(s, [new(None, "hi cat", to="cat")])
    page, more = await s.dm_history("ann#1", "BOB", None, None, 50)
    assert [m.id for m in page] == [m.id for m in to_bob] and not more
    page, _ = await s.dm_history("ann#1", None, None, None, 50)
    assert [m.id for m in page] == [m.id for m in to_bob + to_cat]
    page, _ = await s.dm_history("bob#2", None, None, None, 50)  # bob's side
    assert [m.id for m in page] == [m.id for m in to_bob]
    page, _ = await s.dm_history("ann#9", None, None, None, 50)  # a later holder of "ann"
    assert page == []
    assert await s.has_dms_between("ann#1", "Bob")
    assert not await s.has_dms_between("ann#9", "bob")


# --- sync (contract: Revisions) ---------------------------------------------------------


async def test_changes_since_returns_every_change_once_in_revision_order(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    elsewhere = await room(s, "elsewhere")
    a, b = await send_all(s, [new(r.id, "a"), new(r.id, "b")])
    await send_all(s, [new(elsewhere.id, "not mine")])
    dm = (await send_all(s, [new(None, "dm", sender="bob", to="ann")]))[0]
    await s.edit_message(a.id, "a2", 2.0, "ann")
    await s.delete_message(b.id)
    mine = "ann#2"  # the DM above was sent to ann#2

    changes, more = await s.changes_since(0, [r.id], mine, 500)
    assert not more
    assert [(c.id, c.rev) for c in changes] == [(dm.id, 4), (a.id, 5), (b.id, 6)]
    assert changes[1].text == "a2" and changes[2].deleted
    # Paging by the last rev returned skips nothing and repeats nothing.
    seen: list[int] = []
    cursor = 0
    while True:
        page, more = await s.changes_since(cursor, [r.id], mine, 1)
        seen += [c.rev for c in page]
        if not more:
            break
        cursor = page[-1].rev
    assert seen == [4, 5, 6]
    assert await s.changes_since(s.rev, [r.id], mine, 500) == ([], False)


async def test_sync_covers_many_rooms(backend: Opened) -> None:
    s = backend.store
    rooms = [await room(s, f"r{i}") for i in range(600)]  # more than one query's variables
    sent = await send_all(s, [new(x.id, x.name) for x in rooms[::50]])
    changes, more = await s.changes_since(0, [x.id for x in rooms], "ann#1", 500)
    assert [c.id for c in changes] == [m.id for m in sent] and not more


# --- retention --------------------------------------------------------------------------


async def test_prune_keeps_the_newest_per_room(backend: Opened) -> None:
    s = backend.store
    r = await room(s)
    ids = [m.id for m in await send_all(s, [new(r.id, f"m{i}", ts=float(i)) for i in range(10)])]
    removed = await s.prune(now=100.0, max_age=0, keep=3)
    assert removed == 7
    page, more = await s.room_history(r.id, None, None, 50)
    assert [m.id for m in page] == ids[7:] and not more
