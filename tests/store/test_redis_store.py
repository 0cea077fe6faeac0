"""What the Redis store adds beyond the conformance suite (issue 11): several stores on one
Redis (as several nodes) keep one id and revision order, the change stream is in revision
order, names are unique across them, an unreachable Redis is a clear `Internal` at once,
and the persistence line says what an acknowledgement means. Real redis-server
(tests/redisutil.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from chatd.errors import Conflict, Internal
from chatd.store.base import GuestHold, NewMessage, RoomRecord
from chatd.store.redis import RedisStore, RedisStoreError
from chatd.store.redis.store import _IN_FLIGHT, describe_persistence, message_from, messages_from
from tests.redisutil import RedisServer

TIMEOUT = 10.0


@pytest.fixture
async def two(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    a, b = RedisStore(redis_url), RedisStore(redis_url)
    a.open()
    b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def send(room_id: int | None, text: str, *, sender: str = "ann", to: str | None = None,
         nonce: str | None = None) -> NewMessage:  # fmt: skip
    return NewMessage(room_id, sender, to, text, 1.0, nonce, sender_key=f"{sender}#1",
                      recipient_key=None if to is None else f"{to}#2")  # fmt: skip


async def test_two_stores_writing_at_once_keep_one_order_and_sync_sees_each_change_once(
    two: tuple[RedisStore, RedisStore], redis_url: str
) -> None:
    a, b = two
    room = await a.create_room(RoomRecord(0, "lobby", "", "ann", 1.0, False, False))
    results = await asyncio.wait_for(
        asyncio.gather(
            *(s.add_message(send(room.id, f"{i}")) for i in range(200) for s in (a, b))
        ),
        TIMEOUT,
    )
    recs = [m for m, _ in results]
    assert len({m.id for m in recs}) == len({m.rev for m in recs}) == 400
    by_id = sorted(recs, key=lambda m: m.id)
    assert [m.rev for m in by_id] == sorted(m.rev for m in recs)  # ids and revs agree
    changes, more = await b.changes_since(0, [room.id], "x#1", 500)
    assert not more and [c.rev for c in changes] == list(range(1, 401))
    # The change stream carries every revision once, in revision order (after the
    # room's own notice, which has no revision: chatd/cluster.py adopts it): each send
    # script's batch is one entry (kind `messages`, its last revision, its messages packed).
    with redis.Redis.from_url(redis_url) as r:
        entries = r.xrange("chatd:changes")
    assert entries[0][1][b"kind"] == b"room.created" and b"rev" not in entries[0][1]
    entries = [(i, f) for i, f in entries if b"rev" in f]
    assert {f[b"kind"] for _, f in entries} == {b"messages"}
    streamed = [m for _, f in entries for m in messages_from(f[b"m"])]
    assert [m.rev for m in streamed] == list(range(1, 401))
    assert [int(f[b"rev"]) for _, f in entries] == [
        max(m.rev for m in messages_from(f[b"m"])) for _, f in entries
    ]
    assert sorted(streamed, key=lambda m: m.id) == by_id  # the messages as stored


async def test_edits_and_deletes_are_in_the_stream_with_their_revision(
    two: tuple[RedisStore, RedisStore], redis_url: str
) -> None:
    a, b = two
    room = await a.create_room(RoomRecord(0, "lobby", "", "ann", 1.0, False, False))
    m, _ = await a.add_message(send(room.id, "hi"))
    edited = await b.edit_message(m.id, "hi!", 2.5, "ann")
    gone = await a.delete_message(m.id)
    assert edited is not None and gone is not None and (edited.rev, gone.rev) == (2, 3)
    with redis.Redis.from_url(redis_url) as r:
        entries = [f for _, f in r.xrange("chatd:changes") if b"rev" in f]
    assert [(e[b"rev"], e[b"kind"]) for e in entries] == [
        (b"1", b"messages"), (b"2", b"message.edited"), (b"3", b"message.deleted"),
    ]  # fmt: skip
    assert messages_from(entries[0][b"m"]) == [m]
    assert message_from(entries[1][b"m"]) == edited
    assert message_from(entries[2][b"m"]) == gone
    assert (edited.text, edited.edited_ts, edited.edited_by) == ("hi!", 2.5, "ann")
    assert gone.deleted and gone.text == "" and gone.edited_ts == 2.5
    assert entries[1][b"by"] == b"ann"  # the editor (a deleter for deletes: message.deleted's by)


async def test_a_nonce_retry_on_another_store_answers_the_same_message(
    two: tuple[RedisStore, RedisStore],
) -> None:
    a, b = two
    room = await a.create_room(RoomRecord(0, "lobby", "", "ann", 1.0, False, False))
    results = await asyncio.gather(
        *(s.add_message(send(room.id, "x", nonce="n")) for _ in range(10) for s in (a, b))
    )
    assert sum(created for _, created in results) == 1
    assert len({m.id for m, _ in results}) == 1


async def test_names_are_unique_across_stores(two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    await a.create_room(RoomRecord(0, "Lobby", "", "ann", 1.0, False, False))
    with pytest.raises(Conflict):
        await b.create_room(RoomRecord(0, "LOBBY", "", "bob", 1.0, False, False))
    other = await b.create_room(RoomRecord(0, "other", "", "bob", 1.0, False, False))
    with pytest.raises(Conflict):
        await a.update_room(other.id, "lobby", "")
    await a.update_room(other.id, "OTHER", "t")  # its own name in another case is fine
    await a.create_user("ann", "h", False)
    with pytest.raises(Conflict):
        await b.create_user("Ann", "h", False)


async def test_a_deleted_room_takes_its_messages_and_refuses_new_ones(redis_url: str) -> None:
    s = RedisStore(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        keep = await s.create_room(RoomRecord(0, "k", "", "ann", 1.0, False, False))
        await asyncio.gather(*(s.add_message(send(room.id, f"{i}")) for i in range(50)))
        await s.add_message(send(keep.id, "stays"))
        await s.delete_room(room.id)
        from chatd.errors import NotFound

        with pytest.raises(NotFound):
            await s.add_message(send(room.id, "late"))
        # The purge is queued behind the delete; a write after it is answered after it.
        await s.add_message(send(keep.id, "after"))
        assert await s.count_messages() == 2
    finally:
        await s.close()


async def test_ephemeral_rooms_are_dropped_at_open(redis_url: str) -> None:
    s = RedisStore(redis_url)
    s.open()
    eph = await s.create_room(RoomRecord(0, "tmp", "", "ann", 1.0, True, False))
    await s.add_message(send(eph.id, "x"))
    await s.create_room(RoomRecord(0, "kept", "", "ann", 1.0, False, True))
    await s.close()
    s = RedisStore(redis_url)
    snap = s.open()
    try:
        assert [(r.name, r.open) for r in snap.rooms] == [("kept", True)]
        await s.create_room(RoomRecord(0, "tmp", "", "bob", 1.0, False, False))  # free again
        assert await s.count_messages() == 0  # purged once the writer ran
    finally:
        await s.close()


async def test_prune_by_age_blanks_a_young_nonce_and_drops_the_rest(redis_url: str) -> None:
    s = RedisStore(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        now = 100_000.0
        old, _ = await s.add_message(NewMessage(room.id, "ann", None, "old", 10.0, None, "ann#1"))
        old_nonce, _ = await s.add_message(
            NewMessage(room.id, "ann", None, "n", now - 3600, "n1", "ann#1")
        )
        young, _ = await s.add_message(NewMessage(room.id, "ann", None, "y", now, None, "ann#1"))
        assert await s.prune(now, max_age=1800, keep=0) == 2
        page, _ = await s.room_history(room.id, None, None, 50)
        assert [m.id for m in page] == [young.id]
        assert await s.get_message(old.id) is None
        kept = await s.find_nonce("ann#1", "n1")  # a retry still finds its message
        assert kept is not None and kept.id == old_nonce.id and kept.deleted
    finally:
        await s.close()


async def test_unreachable_redis_is_a_clear_error_at_once(tmp_path: object) -> None:
    server = RedisServer(appendfsync="always").start()
    try:
        s = RedisStore(server.url, timeout=2.0)
        s.open()
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        server.stop(kill=True)
        began = time.monotonic()
        with pytest.raises(Internal, match="Redis"):
            await asyncio.wait_for(s.add_message(send(room.id, "x")), TIMEOUT)
        with pytest.raises(Internal, match="Redis"):
            await asyncio.wait_for(s.room_history(room.id, None, None, 10), TIMEOUT)
        assert time.monotonic() - began < 2 * 2.0 + 1  # the timeouts bound it; no hang
        # Redis comes back (same port, same AOF): the store goes on with what it kept.
        server.start()
        m, _ = await asyncio.wait_for(s.add_message(send(room.id, "back")), TIMEOUT)
        assert m.rev == 1 and m.id == 1  # the lost write never took an id
        await s.close()
        server.stop()
        with pytest.raises(RedisStoreError, match=re.escape("Redis at redis://127.0.0.1")):
            RedisStore(server.url, timeout=2.0).open()
    finally:
        server.close()


async def test_the_first_write_after_a_redis_restart_while_idle_is_stored() -> None:
    """A store that wrote nothing while Redis restarted still holds its writer's socket to
    the old process: its next write must go out on a new one, not fail for nothing."""
    server = RedisServer(appendfsync="always").start()
    try:
        s = RedisStore(server.url, timeout=2.0)
        s.open()
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        server.stop(kill=True)
        server.start()
        # Idle meanwhile: one loop turn, in which the loop polls the old socket and finds
        # it closed (the store learns of a closed socket only that way; a client's frame
        # always comes in a later turn than the close).
        await asyncio.sleep(0)
        m, _ = await asyncio.wait_for(s.add_message(send(room.id, "after")), TIMEOUT)
        assert (m.id, m.text) == (1, "after")
        await s.close()
    finally:
        server.close()


async def test_open_logs_what_an_acknowledgement_means(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = RedisStore(redis_url)
    with caplog.at_level(logging.INFO, logger="chatd"):
        s.open()
    await s.close()
    assert "appendfsync always: an acknowledged write is on disk" in caplog.text
    assert "everysec: up to ~1 s" in describe_persistence(
        {"appendonly": "yes", "appendfsync": "everysec"}, {}
    )
    assert "lost when Redis restarts" in describe_persistence({"appendonly": "no"}, {})
    assert "lost when Redis restarts" in describe_persistence({}, {"aof_enabled": 0})
    assert "unknown" in describe_persistence({}, {})


def test_a_missing_redis_server_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from tests.redisutil import redis_server_path

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server there
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Redis tests"):
        redis_server_path()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="redis-server is not on PATH"):
        redis_server_path()


def test_a_database_of_another_layout_is_refused_saying_why(redis_url: str) -> None:
    """Layout 2 keeps a message as one packed value: a database an older chatd wrote
    (layout 1: hashes) is refused by the server, the account commands and `chatd copy`,
    with the way to move it; a newer one asks for a newer chatd. Nothing is written."""
    from chatd.store.base import StoreOpenError
    from chatd.store.redis.admin import RedisAdmin

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        r.hset("chatd:meta", mapping={"epoch": "e", "layout": "1", "rev": "7"})
        with pytest.raises(RedisStoreError, match=r"layout 1, an older chatd's.*chatd copy --from"):
            RedisStore(redis_url).open()
        with pytest.raises(StoreOpenError, match="layout 1, an older chatd's"):
            RedisAdmin(redis_url)
        with pytest.raises(RedisStoreError, match="layout 1, an older chatd's"):
            RedisStore(redis_url).export_dump()
        assert r.hgetall("chatd:meta") == {"epoch": "e", "layout": "1", "rev": "7"}
        r.hset("chatd:meta", "layout", "3")
        with pytest.raises(RedisStoreError, match="layout 3, newer than this chatd"):
            RedisStore(redis_url).open()


async def test_the_next_batch_is_sent_before_the_answered_one_is_handed_out(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the commands of an answered batch go on (replies, events), Redis already
    works on the next one: it is sent first. Seen from inside the first send's hand-out:
    the second message, queued while the first was in flight, is already in Redis."""
    from chatd.store.redis.store import RedisStore as Store

    s = Store(redis_url)
    s.open()
    room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
    seen: list[bool] = []
    later: list[asyncio.Future[Any]] = []
    real = Store._send_batch

    def look(_: Any) -> None:  # runs inside the hand-out (a callback without a context)
        with redis.Redis.from_url(redis_url) as r:
            deadline = time.monotonic() + 2.0
            while not r.exists("chatd:m:2") and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(bool(r.exists("chatd:m:2")))

    async def first_in_flight(self: Store, batch: Any, *rest: Any) -> Any:
        if not later and any(hasattr(item, "tail") for item in batch):  # the first send
            batch[0].fut.add_done_callback(look)
            later.append(asyncio.ensure_future(self.add_message(send(room.id, "second"))))
        return await real(self, batch, *rest)

    monkeypatch.setattr(Store, "_send_batch", first_in_flight)
    try:
        first, _ = await asyncio.wait_for(s.add_message(send(room.id, "first")), TIMEOUT)
        second, _ = await asyncio.wait_for(later[0], TIMEOUT)
        assert (first.id, second.id) == (1, 2)
        assert seen == [True]
    finally:
        await s.close()


async def test_sends_trim_stream_entries_older_than_the_age_cap(redis_url: str) -> None:
    """An entry of sends may hold hundreds of messages, so the change stream's entry cap
    alone could keep millions of them: each send also trims entries older than the age cap
    (approximately: whole stream nodes of old entries)."""
    s, young = RedisStore(redis_url), RedisStore(redis_url, stream_keep_ms=200)
    s.open()
    young.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        for i in range(300):  # one batch each: one entry each
            await asyncio.wait_for(s.add_message(send(room.id, f"{i}")), TIMEOUT)
        with redis.Redis.from_url(redis_url) as r:
            assert r.xlen("chatd:changes") == 301  # the room's notice and 300 sends
            await asyncio.sleep(0.5)
            await asyncio.wait_for(young.add_message(send(room.id, "late")), TIMEOUT)
            assert r.xlen("chatd:changes") <= 101  # whole nodes of old entries are gone
            assert [int(f[b"rev"]) for _, f in r.xrevrange("chatd:changes", count=1)] == [301]
        assert await s.count_messages() == 301  # the messages themselves stay
    finally:
        await s.close()
        await young.close()


async def test_writes_and_reads_go_on_after_redis_lost_its_scripts(redis_url: str) -> None:
    """A restarted Redis, or SCRIPT FLUSH, forgets the scripts: the calls answered NOSCRIPT
    did not run, so the store loads the scripts again and runs just those, in order."""
    s = RedisStore(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        first, _ = await s.add_message(send(room.id, "one"))
        with redis.Redis.from_url(redis_url) as r:
            r.script_flush()

        async def send_later(text: str) -> Any:
            # add_message queues at the call, edit_message at its task's first step: both
            # at the latter, so the three go in one batch, in this order.
            return await s.add_message(send(room.id, text))

        results = await asyncio.wait_for(asyncio.gather(
            send_later("two"), s.edit_message(first.id, "one!", 2.0, "ann"), send_later("three"),
        ), TIMEOUT)  # fmt: skip
        assert [m.rev for m, _ in (results[0], results[2])] == [2, 4] and results[1].rev == 3
        with redis.Redis.from_url(redis_url) as r:
            r.script_flush()
        page, more = await s.room_history(room.id, None, None, 10)
        assert [(m.text, m.rev) for m in page] == [("one!", 3), ("two", 2), ("three", 4)]
        assert not more
    finally:
        await s.close()


async def test_rooms_purged_at_once_do_not_hold_other_writes_behind_them(redis_url: str) -> None:
    """Each deleted room's messages go in purge scripts of up to 2,000 messages; a batch
    of writes carries at most one of them, so a send queued while many rooms are being
    purged is answered after one or two purges, not after all of them."""
    s = RedisStore(redis_url)
    s.open()
    try:
        rooms = [await s.create_room(RoomRecord(0, f"r{i}", "", "ann", 1.0, False, False))
                 for i in range(20)]  # fmt: skip
        keep = await s.create_room(RoomRecord(0, "keep", "", "ann", 1.0, False, False))
        await asyncio.wait_for(asyncio.gather(*(
            s.add_message(send(r.id, f"{i}")) for r in rooms for i in range(500)
        )), TIMEOUT)  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*(s.delete_room(r.id) for r in rooms)), TIMEOUT)
        await asyncio.wait_for(s.add_message(send(keep.id, "now")), TIMEOUT)
        with redis.Redis.from_url(redis_url) as r:
            left = r.zcard("chatd:all") - 1
        # Most rooms' messages still there when it was answered: the purges of the batches in
        # flight before it (one each) and of a few more, not all twenty.
        assert left >= 10_000 - (_IN_FLIGHT + 3) * 500
        for _ in range(200):  # and the purges go on until every one is done
            if await s.count_messages() == 1:
                break
            await asyncio.sleep(0.05)
        assert await s.count_messages() == 1
    finally:
        await s.close()


_BUSY = """
local t0 = redis.call('TIME')
repeat
  local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1
"""


async def test_a_second_batch_goes_out_while_the_first_is_unanswered(redis_url: str) -> None:
    """Redis gets the next batch of writes while the node waits for the replies of one
    (two in flight on the writer's connection, in order), so it never idles while the
    node hands a batch out. Seen while another client's script keeps Redis busy: both
    batches are sent, neither answered; then both are, in order."""
    import threading

    s = RedisStore(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        await s.add_message(send(room.id, "the connection has answered once"))

        def busy() -> None:
            with redis.Redis.from_url(redis_url) as r:
                r.eval(_BUSY, 0, 600_000)  # 0.6 s

        blocker = threading.Thread(target=busy)
        blocker.start()
        await asyncio.sleep(0.15)  # Redis is inside the script now
        one = asyncio.ensure_future(s.add_message(send(room.id, "one")))
        await asyncio.sleep(0.05)
        two = asyncio.ensure_future(s.add_message(send(room.id, "two")))
        await asyncio.sleep(0.05)
        assert s._sent - s._settled == 2  # both batches sent, neither answered
        (a, _), (b, _) = await asyncio.wait_for(asyncio.gather(one, two), TIMEOUT)
        assert (a.id, b.id) == (2, 3) and (a.rev, b.rev) == (2, 3)
        await asyncio.to_thread(blocker.join, TIMEOUT)
    finally:
        await s.close()


async def test_a_batch_answered_while_the_next_send_breaks_is_handed_out(redis_url: str) -> None:
    """Batch A in flight; B's send waits and then fails; meanwhile A's replies were read.
    A is stored: its command gets its reply (not a hang) and the writer counts it
    settled; B fails as "may not have been saved"."""
    import threading

    from redis.exceptions import ConnectionError as RedisConnectionError

    s = RedisStore(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        await s.add_message(send(room.id, "the connection has answered once"))
        conn = s._conn
        real = conn.send_packed_command
        sends = [0]

        async def breaks_second(cmd: Any, *args: Any, **kw: Any) -> Any:
            sends[0] += 1
            if sends[0] == 2:  # B: A's replies are read while this waits, then it breaks
                await asyncio.sleep(1.0)
                raise RedisConnectionError("a break while sending B")
            return await real(cmd, *args, **kw)

        conn.send_packed_command = breaks_second

        def busy() -> None:
            with redis.Redis.from_url(redis_url) as r:
                r.eval(_BUSY, 0, 400_000)

        blocker = threading.Thread(target=busy)
        blocker.start()
        await asyncio.sleep(0.1)
        a = asyncio.ensure_future(s.add_message(send(room.id, "A")))
        await asyncio.sleep(0.1)  # A sent, its reply held up by the busy script
        b = asyncio.ensure_future(s.add_message(send(room.id, "B")))
        await asyncio.wait([a, b], timeout=TIMEOUT)
        assert a.done() and a.result()[0].id == 2
        assert b.done() and isinstance(b.exception(), Internal)
        assert "may not have been saved" in str(b.exception())
        assert s._settled == s._sent
        await asyncio.wait_for(s.writes_settled(), 1.0)
        await asyncio.to_thread(blocker.join, TIMEOUT)
    finally:
        await asyncio.wait_for(s.close(), TIMEOUT)  # a stuck writer fails, not hangs


async def test_a_write_queued_while_noscript_calls_run_again_is_sent(redis_url: str) -> None:
    """After SCRIPT FLUSH the calls answered NOSCRIPT run again; a write queued meanwhile
    goes out once that is done, without waiting for yet another write."""
    from chatd.store.redis.store import RedisStore as Store

    s = Store(redis_url)
    s.open()
    try:
        room = await s.create_room(RoomRecord(0, "r", "", "ann", 1.0, False, False))
        await s.add_message(send(room.id, "the connection has answered once"))
        real = Store._pipeline
        later: list[asyncio.Future[Any]] = []

        async def slow(self: Store, calls: Any, replies: Any) -> Any:
            later.append(asyncio.ensure_future(self.add_message(send(room.id, "B"))))
            await asyncio.sleep(0.3)
            return await real(self, calls, replies)

        s._pipeline = slow.__get__(s)  # type: ignore[method-assign]
        with redis.Redis.from_url(redis_url) as r:
            r.script_flush()
        a, _ = await asyncio.wait_for(s.add_message(send(room.id, "A")), TIMEOUT)
        b, _ = await asyncio.wait_for(later[0], TIMEOUT)
        assert (a.id, b.id) == (2, 3)
    finally:
        await asyncio.wait_for(s.close(), TIMEOUT)  # a stuck writer fails, not hangs


async def test_noscript_calls_run_again_only_when_no_later_call_ran(redis_url: str) -> None:
    """A call that got NOSCRIPT is run again only when every later call of its batch got
    NOSCRIPT too; a later call that ran (another client loaded the scripts meanwhile)
    would come before it, so it is not run (the caller hears "not saved")."""
    from redis.exceptions import NoScriptError

    s = RedisStore(redis_url)
    s.open()
    try:
        calls: Any = [("raw", ("INCR", "n"), []), ("raw", ("INCR", "n"), [])]
        refused = NoScriptError("NOSCRIPT")
        out = await s._pipeline(calls, [refused, 1])
        assert out[0] is refused and out[1] == 1
        with redis.Redis.from_url(redis_url) as r:
            assert r.get("n") is None
        out = await s._pipeline(calls, [1, refused])
        assert out == [1, 1]
    finally:
        await s.close()


async def test_a_noscript_rerun_that_breaks_off_may_have_been_saved(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-run's pipeline was sent and then failed: its calls may have run, so they
    answer "may not have been saved", not "not saved"."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError

    async def breaks(self: Any, *args: Any, **kw: Any) -> Any:
        raise RedisConnectionError("a break after sending")

    s = RedisStore(redis_url)
    s.open()
    try:
        monkeypatch.setattr(Pipeline, "execute", breaks)
        out = await s._pipeline([("raw", ("INCR", "n"), [])], [NoScriptError("NOSCRIPT")])
        assert isinstance(out[0], Internal) and "may not have been saved" in str(out[0])
        assert "may not have been saved" in str(s._error(out[0]))
    finally:
        await s.close()


def test_the_readers_stream_head_is_three_numbers_not_entries(redis_url: str) -> None:
    """The reader's gap check asks for the stream's head with every read: entries-added,
    length and the first entry's id only (XINFO STREAM would send the first and last
    entries whole); nothing for a missing stream."""
    from chatd.cluster import _HEAD

    with redis.Redis.from_url(redis_url) as r:
        ids = [r.xadd("s", {"m": b"x" * 60_000}) for _ in range(3)]
        r.xtrim("s", maxlen=2)
        assert r.eval(_HEAD, 1, "s") == [3, 2, ids[1]]
        assert r.eval(_HEAD, 1, "missing") is None


@pytest.mark.parametrize("room, nonce, sender_key", [
    (7, None, None), (7, "n1", None), (7, None, "Ann#g1"), (7, "n1", "Ann#g1"),
    (None, None, None), (None, "n1", "Ann#g1"),
])  # fmt: skip
def test_a_send_is_packed_as_packed_fields_has_it(
    room: int | None, nonce: str | None, sender_key: str | None
) -> None:
    """_Send packs a room's message inline (every send to a room): byte for byte what
    _packed_fields gives, which the scripts and message_from read."""
    from chatd.store.redis.store import _PACK, _packed_fields, _Send

    recipient = None if room is not None else "Bob"
    s = _Send(NewMessage(room, "Ann", recipient, "hi \u00e9", 1.5, nonce, sender_key, None), None)  # type: ignore[arg-type]
    assert s.tail == _PACK.encode(_packed_fields(
        room, "Ann", recipient, "hi \u00e9", 1.5, None, None, False, s.sender_key,
        s.recipient_key, nonce,
    ))  # fmt: skip


async def test_an_account_or_a_guest_on_a_held_name_is_told_until_when(redis_url: str) -> None:
    """A node that has not yet read another node's hold learns of it from the script:
    NameHeld with the hold's end (None: while the guest is connected), which `register`
    turns into the contract's conflict message."""
    from chatd.store.base import NameHeld

    s = RedisStore(redis_url)
    s.open()
    try:
        await s.hold_guest(GuestHold("Gus", "1", None, 1))
        with pytest.raises(NameHeld) as held:
            await s.create_user("gus", "hash", admin=False)
        assert held.value.held_until is None
        till = int(time.time()) + 300
        await s.hold_guest(GuestHold("Ida", "2", till, 1))
        with pytest.raises(NameHeld) as held:
            await s.create_user("IDA", "hash", admin=False)
        assert held.value.held_until == till
        # A guest login racing on a node that had not read the hold: the same answer.
        for name, until in (("gus", None), ("ida", till)):
            with pytest.raises(NameHeld) as held:
                await s.hold_guest(GuestHold(name, "9", None, 1))
            assert held.value.held_until == until
    finally:
        await s.close()
