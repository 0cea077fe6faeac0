"""The Store conformance suite (issue 10): one set of tests every Store implementation must
pass, written against the `chatd.store.base` protocols (`Store`, `AdminStore`) only. A second
backend is added to BACKENDS and proved by the same tests; nothing here may reach into one
implementation.

Each backend is a function of the test's tmp_path giving a `Backend`: how to make a Store over
this test's data (called again for a reopen), whether that data outlives a reopen, and how to
open an AdminStore beside a running Store on the same data (None for a backend that shares
nothing, SQLite `:memory:`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatd.errors import Conflict, NotFound
from chatd.store.base import (
    AdminStore,
    GuestHold,
    MessageRecord,
    NameHeld,
    NewMessage,
    RoomRecord,
    Snapshot,
    Store,
    StoreMissing,
)
from chatd.store.redis import RedisStore
from chatd.store.redis.admin import RedisAdmin
from chatd.store.sqlite import SQLiteAdmin, SQLiteStore
from tests.redisutil import fresh_redis_url


@dataclass
class Backend:
    store: Callable[[], Store]
    durable: bool  # the data outlives a reopen
    # An AdminStore on the same data (create: make it if missing), None if nothing is shared.
    admin: Callable[[bool], AdminStore] | None = None
    # An AdminStore opened without `create` where there is no data yet (StoreMissing).
    missing_admin: Callable[[], AdminStore] | None = None


def _sqlite_file(tmp: Path) -> Backend:
    path = str(tmp / "conformance.db")
    return Backend(
        store=lambda: SQLiteStore(path),
        durable=True,
        admin=lambda create: SQLiteAdmin(path, create=create),
        missing_admin=lambda: SQLiteAdmin(str(tmp / "missing.db")),
    )


def _sqlite_memory(tmp: Path) -> Backend:
    return Backend(store=lambda: SQLiteStore(":memory:"), durable=False)


def _redis(tmp: Path) -> Backend:
    url = fresh_redis_url()  # a real redis-server (tests/redisutil.py); reopen: same db
    return Backend(
        store=lambda: RedisStore(url),
        durable=True,
        admin=lambda create: RedisAdmin(url, create=create),
        missing_admin=lambda: RedisAdmin(url),  # before anything opened it: empty
    )


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite-file": _sqlite_file,
    "sqlite-memory": _sqlite_memory,
    "redis": _redis,
}
DURABLE = ["sqlite-file", "redis"]  # the backends whose data outlives a reopen
SHARED = ["sqlite-file", "redis"]  # the backends an AdminStore can open beside a running Store


class Opened:
    """One backend under test: the open store, its snapshot, and a way to reopen."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.durable = backend.durable
        self.store = backend.store()
        self.snap = self.store.open()

    async def reopen(self) -> Snapshot:
        await self.store.close()
        self.store = self.backend.store()
        self.snap = self.store.open()
        return self.snap

    def admin(self) -> AdminStore:
        assert self.backend.admin is not None
        return self.backend.admin(False)


async def _opened(name: str, tmp_path: Path) -> AsyncIterator[Opened]:
    opened = Opened(BACKENDS[name](tmp_path))
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


@pytest.fixture(params=SHARED)
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
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



async def test_a_deleted_rooms_message_is_not_edited_nor_deleted(backend: Opened) -> None:
    """Its messages are still stored until purged, but a change to one is refused (the
    room went: not_found), taking no revision."""
    s = backend.store
    gone = await room(s, "gone")
    adds = await asyncio.gather(*(s.add_message(new(gone.id, f"{i}")) for i in range(5000)))
    sent = [m for m, _ in adds]  # more than one purge step
    await s.delete_room(gone.id)
    edits = [s.edit_message(m.id, "y", 1.0, "ann") for m in sent[::2]]
    deletes = [s.delete_message(m.id) for m in sent[1::2]]
    assert await asyncio.gather(*edits, *deletes) == [None] * len(sent)

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


async def test_count_messages_counts_tombstones_until_retention_removes_them(
    backend: Opened,
) -> None:
    s = backend.store
    assert await s.count_messages() == 0
    r = await room(s)
    sent = await send_all(s, [new(r.id, f"m{i}", ts=float(i)) for i in range(5)])
    await send_all(s, [new(None, "dm", to="bob")])
    await s.delete_message(sent[0].id)
    assert await s.count_messages() == 6  # a tombstone is still a stored message
    assert await s.prune(now=100.0, max_age=0, keep=2) == 2  # m1, m2 (m0 was deleted)
    assert await s.count_messages() == 3


# --- the sync watermark (Store.rev) -----------------------------------------------------


async def test_an_acknowledged_change_is_in_changes_since_the_rev_before_it(
    backend: Opened,
) -> None:
    s = backend.store
    r = await room(s)
    reader = "cat#3"

    async def since(before: int) -> list[tuple[int, int, str, bool]]:
        changes, more = await s.changes_since(before, [r.id], reader, 50)
        assert not more
        return [(c.id, c.rev, c.text, c.deleted) for c in changes]

    before = s.rev
    m, _ = await s.add_message(new(r.id, "a"))
    assert before < m.rev <= s.rev
    assert await since(before) == [(m.id, m.rev, "a", False)]
    before = s.rev
    edited = await s.edit_message(m.id, "b", 2.0, "ann")
    assert edited is not None and before < edited.rev <= s.rev
    assert await since(before) == [(m.id, edited.rev, "b", False)]
    before = s.rev
    gone = await s.delete_message(m.id)
    assert gone is not None and before < gone.rev <= s.rev
    assert await since(before) == [(m.id, gone.rev, "", True)]
    # A write that changed nothing takes no revision and moves no watermark.
    before = s.rev
    assert await s.edit_message(m.id, "c", 3.0, "ann") is None
    assert s.rev == before and await since(before) == []


async def test_the_watermark_never_runs_ahead_of_what_reads_return(backend: Opened) -> None:
    """While sends are in flight, every revision up to a `rev` just read is already
    visible to a read started after it (contract, Revisions: `sync` returns `rev`)."""
    s = backend.store
    r = await room(s)
    total, wave = 600, 60

    async def write() -> None:
        for start in range(0, total, wave):
            await asyncio.gather(
                *(s.add_message(new(r.id, f"m{i}")) for i in range(start, start + wave))
            )

    writing = asyncio.create_task(write())
    seen_rev = 0
    checks = 0
    async with asyncio.timeout(60):
        while checks == 0 or not writing.done():
            mark = s.rev
            assert mark >= seen_rev  # never goes back
            seen_rev = mark
            changes, _ = await s.changes_since(0, [r.id], "ann#1", total + 1)
            assert {c.rev for c in changes} >= set(range(1, mark + 1)), mark
            checks += 1
        await writing
    assert s.rev == total


# --- guest holds (contract: Guest names come back) --------------------------------------


async def test_a_hold_changes_only_over_an_older_version_of_the_same_hold(
    backend: Opened,
) -> None:
    s = backend.store
    await s.hold_guest(GuestHold("Gus", "9", None, 1))
    assert await s.update_hold(GuestHold("Gus", "9", 500, 3))
    if backend.durable:  # the newest change is what a restart finds
        assert (await backend.reopen()).guests == [GuestHold("Gus", "9", 500, 3)]
        s = backend.store
    assert not await s.update_hold(GuestHold("Gus", "9", None, 2))  # decided earlier
    assert not await s.update_hold(GuestHold("Gus", "9", None, 3))  # not newer either
    assert not await s.release_guest(GuestHold("Gus", "9", None, 3))
    assert not await s.update_hold(GuestHold("gus", "1", None, 99))  # another hold of the name
    assert not await s.release_guest(GuestHold("gus", "1", None, 99))
    assert await s.release_guest(GuestHold("GUS", "9", 500, 4))  # names in any case
    # An extension decided before the release, written after it, brings nothing back.
    assert not await s.update_hold(GuestHold("Gus", "9", 9999, 3))
    assert not await s.release_guest(GuestHold("Gus", "9", None, 5))  # gone
    if backend.durable:
        assert (await backend.reopen()).guests == []


async def test_hold_writes_apply_in_the_order_they_were_called(backend: Opened) -> None:
    s = backend.store
    await s.hold_guest(GuestHold("Ola", "4", None, 1))
    # Called before either is awaited: the release (v3) lands first, the older
    # extension (v2) after it finds nothing.
    released = s.release_guest(GuestHold("Ola", "4", None, 3))
    extended = s.update_hold(GuestHold("Ola", "4", 700, 2))
    assert await released and not await extended
    await s.hold_guest(GuestHold("Pia", "5", None, 1))
    extended = s.update_hold(GuestHold("Pia", "5", 700, 2))
    released = s.release_guest(GuestHold("Pia", "5", 700, 3))
    assert await extended and await released


async def test_a_new_hold_replaces_a_released_or_lapsed_one(backend: Opened) -> None:
    s = backend.store
    await s.hold_guest(GuestHold("Quy", "6", None, 1))
    assert await s.update_hold(GuestHold("Quy", "6", 100, 2))  # lapsed, never released
    await s.hold_guest(GuestHold("quy", "7", None, 1))  # a new guest takes the name
    assert not await s.update_hold(GuestHold("Quy", "6", 200, 3))  # the old hold is gone
    assert await s.update_hold(GuestHold("quy", "7", 300, 2))
    if backend.durable:
        snap = await backend.reopen()
        assert snap.guests == [GuestHold("quy", "7", 300, 2)]


async def test_guest_holds_survive_a_reopen(durable: Opened) -> None:
    s = durable.store
    await s.hold_guest(GuestHold("Ann", "1", None, 1))  # connected when stopped
    await s.hold_guest(GuestHold("Bo", "2", None, 1))
    assert await s.update_hold(GuestHold("Bo", "2", 1_700_000_120, 2))  # in its grace
    await s.hold_guest(GuestHold("Cy", "3", None, 1))
    assert await s.release_guest(GuestHold("Cy", "3", None, 2))
    snap = await durable.reopen()
    assert sorted(snap.guests, key=lambda h: h.name) == [
        GuestHold("Ann", "1", None, 1),
        GuestHold("Bo", "2", 1_700_000_120, 2),
    ]
    # The versions came back too: compare-and-set goes on where it stopped.
    assert not await durable.store.update_hold(GuestHold("Bo", "2", None, 2))
    assert await durable.store.update_hold(GuestHold("Bo", "2", None, 3))


# --- accounts: users_version and reload ---------------------------------------------------


async def test_reload_users_reads_every_account_with_its_users_version(backend: Opened) -> None:
    s = backend.store
    version, users = await s.reload_users()
    assert users == [] and version == await s.users_version() == backend.snap.users_version
    await s.create_user("bob", "h1", False)
    ann = await s.create_user("Ann", "h2", True)
    assert await s.set_password(ann.id, "h3") == 1
    version, users = await s.reload_users()
    assert version == await s.users_version()
    assert sorted((u.name, u.pw_hash, u.admin, u.token_version) for u in users) == [
        ("Ann", "h3", True, 1),
        ("bob", "h1", False, 0),
    ]
    assert await s.set_password(ann.id + 100, "h4") is None
    got = await s.get_user("ANN")
    assert got is not None and got.id == ann.id and got.pw_hash == "h3"
    assert await s.get_user("nobody") is None


# --- rooms: update and delete ---------------------------------------------------------------


async def test_a_deleted_room_takes_no_more_messages(backend: Opened) -> None:
    s = backend.store
    gone, kept = await room(s, "gone"), await room(s, "kept")
    await send_all(s, [new(gone.id, "before")])
    rev = s.rev
    await s.delete_room(gone.id)
    with pytest.raises(NotFound):
        await s.add_message(new(gone.id, "after"))
    assert s.rev == rev  # the refused send took no revision
    (m,) = await send_all(s, [new(kept.id, "elsewhere")])
    assert m.rev == rev + 1
    if backend.durable:
        await backend.reopen()
        with pytest.raises(NotFound):
            await backend.store.add_message(new(gone.id, "after a restart"))


async def test_a_room_update_is_kept_and_ephemeral_rooms_end_at_a_restart(
    durable: Opened,
) -> None:
    s = durable.store
    kept = await room(s, "kept")
    await s.update_room(kept.id, "Kept", "a topic")
    brief = await s.create_room(RoomRecord(0, "brief", "t", "ann", 2.0, True, True))
    await send_all(s, [new(brief.id, "short-lived")])
    snap = await durable.reopen()
    assert [(r.id, r.name, r.topic, r.ephemeral) for r in snap.rooms] == [
        (kept.id, "Kept", "a topic", False)
    ]
    with pytest.raises(NotFound):
        await durable.store.add_message(new(brief.id, "too late"))
    again = await room(durable.store, "brief")  # the name is free; the id is new
    assert again.id > brief.id


# --- the offline admin API (AdminStore), beside a running Store --------------------------


async def test_admin_account_changes_are_seen_by_a_running_store_at_once(shared: Opened) -> None:
    s = shared.store
    v0 = await s.users_version()
    admin = shared.admin()
    try:
        dee = admin.create_user("Dee", "hash", True, now=1.0)
        assert (dee.name, dee.pw_hash, dee.admin, dee.token_version) == ("Dee", "hash", True, 0)
        v1 = await s.users_version()
        assert v1 != v0
        assert await s.get_user("dee") == dee
        version, users = await s.reload_users()
        assert version == v1 and users == [dee]
        with pytest.raises(Conflict):
            admin.create_user("DEE", "other", False, now=1.0)
        with pytest.raises(Conflict):
            await s.create_user("dee", "other", False)  # one namespace for both
        ann = await s.create_user("ann", "h", False)
        assert admin.list_users() == [ann, dee]  # sorted case-insensitively
        assert admin.find_user("ANN") == ann and admin.find_user("nobody") is None
        assert admin.delete_user("Ann") is True
        assert await s.get_user("ann") is None
        v2 = await s.users_version()
        assert v2 != v1
        assert admin.delete_user("ann") is False
        assert admin.list_users() == [dee]
    finally:
        admin.close()


async def test_admin_refuses_a_name_a_guest_holds_and_frees_a_lapsed_one(shared: Opened) -> None:
    s = shared.store
    await s.hold_guest(GuestHold("Gil", "1", None, 1))  # connected
    await s.hold_guest(GuestHold("Hal", "2", None, 1))
    assert await s.update_hold(GuestHold("Hal", "2", 2_000, 2))  # held until 2000
    await s.hold_guest(GuestHold("Ivy", "3", None, 1))
    assert await s.update_hold(GuestHold("Ivy", "3", 1_000, 2))  # lapsed at 1000
    admin = shared.admin()
    try:
        with pytest.raises(NameHeld) as held:
            admin.create_user("gil", "h", False, now=1_500.0)
        assert held.value.held_until is None and isinstance(held.value, Conflict)
        with pytest.raises(NameHeld) as held:
            admin.create_user("HAL", "h", False, now=1_500.0)
        assert held.value.held_until == 2_000
        ivy = admin.create_user("ivy", "h", False, now=1_500.0)
        assert admin.list_users() == [ivy]  # the refused ones changed nothing
    finally:
        admin.close()
    # The lapsed hold went with the account's creation; the others are untouched.
    assert not await s.update_hold(GuestHold("Ivy", "3", None, 3))
    assert await s.update_hold(GuestHold("Hal", "2", 3_000, 3))
    snap = await shared.reopen()
    assert sorted(h.name for h in snap.guests) == ["Gil", "Hal"]
    assert [u.name for u in snap.users] == ["ivy"]


@pytest.mark.parametrize("name", SHARED)
async def test_an_admin_opened_without_create_refuses_missing_data(
    tmp_path: Path, name: str
) -> None:
    backend = BACKENDS[name](tmp_path)
    assert backend.missing_admin is not None
    with pytest.raises(StoreMissing):
        backend.missing_admin()
    assert list(tmp_path.iterdir()) == []  # a read made nothing


@pytest.mark.parametrize("name", SHARED)
async def test_an_admin_can_make_the_data_a_store_then_opens(tmp_path: Path, name: str) -> None:
    backend = BACKENDS[name](tmp_path)
    assert backend.admin is not None
    admin = backend.admin(True)
    try:
        root = admin.create_user("root", "h", True, now=0.0)
    finally:
        admin.close()
    store = backend.store()
    snap = store.open()
    try:
        assert snap.users == [root] and snap.rev == 0 and snap.epoch
    finally:
        await store.close()
