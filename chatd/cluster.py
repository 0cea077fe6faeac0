"""Several nodes on one Redis as one server (issue 11): the Redis bus, cluster presence,
node liveness and the outage rule. Used whenever the store is Redis.

One stream, one order. Every change and event that crosses nodes is an entry of the
store's change stream (`P changes`), and each node reads it with one XREAD loop, applying
entries in stream order:
- message changes (send, edit, delete) are appended by the store's Lua scripts in the
  same atomic step that allocates their revision, so stream order is revision order. The
  bus delivers them on EVERY node from the stream (handlers emit none: `carries_revisions`),
  so each connection gets them in revision order whichever node wrote them. A node's own
  change is delivered only once every store pipeline sent before the entry was read has
  been answered: the caller's reply is then queued before the event.
- room and account changes (create, rename, delete; register, delete, passwd, logout,
  revocations, guest holds) are appended by their scripts too (kind room.*, user, hold,
  revoked): the other nodes adopt them, as a `chatd user …` is adopted.
- membership (kind `in`/`out`: a user entered or left a room on a node) is decided by
  the scripts ROOM_ENTER / ROOM_LEAVE (chatd/store/redis/scripts.py), which count per
  room and user the nodes it is in: the entry of a user's first node in (`ann`) is its
  member.joined, of its last node out (`left`) its member.left, and an ephemeral room
  emptied is deleted in the same step. A departure Redis did not take is owed: the
  node retries it with backoff until Redis does (Cluster._leave). Every node, the writer's too, announces them as
  it reads them, so they come in stream order on every node; the other nodes' entries
  also keep this node's member lists whole (LiveRoom.remote).
- other events (room.updated, …) are delivered here at once and appended for the other
  nodes (kind `ev`, with their audience: a room id or a user), through the store's
  writer, in order with its writes.

Liveness: each node refreshes `P node:<id>` (TTL `--node-ttl`) every third of it; a node
whose key is gone is reaped once, by whichever node takes `P reap:<id>` first (SET NX):
its users leave every room as if disconnected (scripts.REAP), then a `gone` entry.

Outage: when the reader loses Redis, once Redis answers again the node ends every client
connection with `server.shutdown`: clients reconnect and `sync` (protocol.md). So it does
when it fell so far behind that the stream was trimmed past its position (a gap). Either
way it then starts afresh from Redis (_resync): its own memberships go (as a reap), and
rooms, the other nodes' members, guest holds, revocations and accounts are read again,
with the stream position that view stands for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from chatd import changes
from chatd.bus import Audience, Effects, LocalBus, ToRoom, ToSessions, ToUser, deliver
from chatd.domain.identity import is_guest_jti
from chatd.errors import ChatError, NotFound, Unauthorized
from chatd.protocol.events import (
    Batch,
    Event,
    Frame,
    MemberJoined,
    MemberLeft,
    RoomClosed,
    decode_event,
)
from chatd.store.base import GuestHold, RoomRecord
from chatd.store.redis.store import message_from, messages_from

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.protocol.models import RoomInfo
    from chatd.rooms import LiveRoom
    from chatd.session import Session
    from chatd.stats import Stats
    from chatd.store.redis.store import ClusterView, RedisStore

log = logging.getLogger("chatd")
_HOLD = msgspec.json.Decoder(GuestHold)
# A join's answer as of its entry: the room and its member list (JSON) then.
Admitted = tuple["RoomInfo", msgspec.Raw]
# Stream entries per read, applied in one go: an entry of sends holds up to 500 messages,
# so a node that fell behind delivers at most ~50,000 events before it reads (and lets other
# work run) again.
_READ_COUNT = 100
# The change stream's last entry id ("0-0" none), without the entry: XINFO STREAM would
# send the first and last entries whole, and an entry of sends holds hundreds of messages.
_TAIL = """
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if e[1] then return e[1][1] end
return '0-0'
"""
# What the reader's gap check needs of the change stream, without its entries (XINFO
# STREAM sends the first and last entries whole, up to hundreds of messages each):
# {entries-added, length, the first entry's id}, or false (no stream; Redis before 7).
# Loaded by hand (EVALSHA; on NOSCRIPT, SCRIPT LOAD and again), not a redis-py Script: it
# goes in the reader's pipeline with the XREAD, and a Script in a pipeline costs a SCRIPT
# EXISTS round trip before every execute (redis-py's Pipeline.load_scripts), one more
# round trip for every read of the stream.
_HEAD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local added, length, first = nil, nil, nil
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'entries-added' then added = info[i + 1]
  elseif k == 'length' then length = info[i + 1]
  elseif k == 'first-entry' and type(info[i + 1]) == 'table' then first = info[i + 1][1] end
end
if not added then return false end
if first then return {added, length, first} end
return {added, length}
"""
_BLOCK_MS = 1_000
_MAX_BACKOFF = 2.0
# RedisBus.own's bound: far above the writes one node has in flight (4 batches of 400).
_OWN_EVENTS = 65_536


class RedisBus:
    """The Bus for several nodes: delivers here at once (as ``LocalBus``) and appends the
    event's bytes, with its audience, to the change stream for the other nodes
    (``ToSessions`` names connections of this node: local only). Message events it
    delivers itself from the stream."""

    __slots__ = (
        "_directory", "_local", "_store", "applied_rev", "caught_up", "entered", "own",
        "published",
    )  # fmt: skip
    carries_revisions = True

    def __init__(
        self,
        directory: Any,
        stats: Stats,
        store: RedisStore,
        caught_up: Callable[[], Awaitable[None]],
        published: Callable[[], Awaitable[None] | None],
        entered: Callable[[LiveRoom, Session], Awaitable[Any] | None],
    ) -> None:
        self._directory = directory
        self._local = LocalBus(directory, stats)
        self._store = store
        # Read your writes across nodes (see Bus.caught_up): the stream's tail now, then
        # wait for the reader to have applied it.
        self.caught_up = caught_up
        # A leave's reply waits for its presence write (see Bus.published), a join's for
        # its membership's (Bus.entered), so a command on another node after it sees it.
        self.published = published
        self.entered = entered
        # Revision -> the event a handler here made of this node's own message change
        # (Bus.posted), until the reader applies the change's entry (Cluster._messages):
        # in revision order, as the writer hands its replies out. At most _OWN_EVENTS
        # (past that the reader builds them, as for another node's changes).
        self.own: dict[int, Event] = {}
        # The highest message revision the reader has applied: an event posted for one
        # at or below it came too late to be used (the reader's wait for it timed out).
        self.applied_rev = 0

    def publish(self, audience: Audience, frame: Frame, caller: Session | None = None) -> bool:
        mine = self._local.publish(audience, frame, caller)
        where = _address(audience)
        if where is not None:
            data = frame.json_frame()  # the bytes the local fan-out used (cached)
            _logged(self._store.publish(("kind", "ev", "a", where, "f", data)))
        return mine

    def posted(self, rev: int, event: Event) -> None:
        if rev > self.applied_rev and len(self.own) < _OWN_EVENTS:
            self.own[rev] = event

    def local(self, audience: Audience, frame: Frame, caller: Session | None = None) -> bool:
        """Deliver to this node's connections only (an event read from the stream)."""
        return self._local.publish(audience, frame, caller)

    def close(self, audience: Audience, caller: Session | None = None) -> bool:
        mine = self.close_local(audience, caller)
        where = _address(audience)
        if where is not None:
            _logged(self._store.publish(("kind", "close", "a", where)))
        return mine

    def close_local(self, audience: Audience, caller: Session | None = None) -> bool:
        return self._local.close(audience, caller)


def _address(audience: Audience) -> str | None:
    if isinstance(audience, ToRoom):
        return f"r:{audience.room.id}"
    if isinstance(audience, ToUser):
        return f"u:{audience.key}\n{audience.identity or ''}"
    return None


def _frame_of(data: bytes) -> Frame:
    """An event (or a Batch of them: several lines) another node published, as the value
    it was there; its bytes are kept as its encoding (not encoded again here)."""
    lines = data.splitlines(keepends=True)
    if len(lines) == 1:
        return decode_event(data)
    return Batch([decode_event(line) for line in lines])  # joins the kept lines once


def _logged(write: Any) -> None:
    def done(fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            log.debug("an event for the other nodes was not written: %s", exc)

    write.add_done_callback(done)


class Cluster:
    """This node's part in a service of several nodes on one Redis (see the module)."""

    def __init__(
        self,
        app: App,
        store: RedisStore,
        end_connections: Callable[[str], None],
        node_ttl: float,
    ) -> None:
        self.app = app
        self.store = store
        self.node = uuid.uuid4().hex[:12]
        self.node_ttl = node_ttl
        self.end_connections = end_connections
        self.bus = RedisBus(
            app.presence, app.stats, store, self.caught_up, self.published, self.entered
        )
        self.last_id = "0-0"
        self._applied = (0, 0)  # last_id as numbers
        self._ordinal = 0  # entries added to the stream up to last_id (gaps: _read_batch)
        self._catching_up: list[tuple[tuple[int, int], asyncio.Future[None]]] = []
        self._next_catch_up: asyncio.Future[None] | None = None  # see caught_up
        # Account changes being read from Redis (_adopt_user): part of being caught up.
        self._adopting: set[asyncio.Future[None]] = set()
        # Those of them that may end sessions here (the account has connections on this
        # node): the reader applies no later entry until they are done (_read_loop).
        self._ending: set[asyncio.Future[None]] = set()
        self._tail: AsyncScript | None = None  # _TAIL (a Script: it loads it again on NOSCRIPT)
        self._head_sha = ""
        self._last_presence: asyncio.Future[None] | None = None
        # (room id, user key) -> the next try of a departure Redis has not taken yet
        self._owed: dict[tuple[int, str], asyncio.TimerHandle] = {}
        # (room id, user key) -> the outcome of this node's ROOM_ENTER for it until its
        # entry is read: the room and its members as of that entry (see Bus.entered)
        self._entering: dict[tuple[int, str], asyncio.Future[Admitted | None]] = {}
        self._resync_reason = ""  # set while applying: start afresh after this batch
        self.down = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        P = store.prefix
        self._stream = P + "changes"
        self._key = f"{P}node:{self.node}"

    # --- start and stop --------------------------------------------------------------

    def client(self, blocking: bool = False) -> aioredis.Redis:
        timeout = self.store.timeout + (_BLOCK_MS / 1000 if blocking else 0)
        return aioredis.Redis.from_url(
            self.store.url, decode_responses=False, socket_timeout=timeout,
            socket_connect_timeout=self.store.timeout, retry=aioredis.retry.Retry(NoBackoff(), 0),
        )  # fmt: skip

    async def start(self) -> None:
        """Join the service: heartbeat, other nodes' members, the stream from now."""
        app, store = self.app, self.store
        store.node = self.node
        app.bus = self.bus
        app.rooms.on_presence = self._presence
        self._client = self.client()
        self._reader = self.client(blocking=True)
        await self._beat()
        app.deliver_departures = self.bus.local  # announced from the stream (module doc)
        app.close_if_unused = self._close_if_unused
        self._tail = self._client.register_script(_TAIL)
        self._head_sha = await self._load_head_script()
        await self._reap()  # dead nodes' members would count as in their rooms
        # One consistent view and the stream position it stands for, adopted as after an
        # outage (_resync): rooms, the other nodes' members, guest holds, revocations.
        view = await self.store.cluster_view()
        self._adopt(view)
        others = [node for node in view.nodes if node != self.node]
        if not others:
            # Nobody else is serving: ephemeral rooms left by stopped nodes go (contract).
            for room in [r for r in app.rooms.rooms.values() if r.ephemeral]:
                app.forget_emptied(room)
                await store.delete_room(room.id)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._beat_loop())]
        log.info("cluster node %s joined (%d other nodes live)", self.node, len(others),
                 extra={"event": "node_joined", "node": self.node, "nodes": len(others) + 1})  # fmt: skip

    async def stop(self) -> None:
        """Leave the service at once: the other nodes drop this node's users now."""
        # A cancellation can be lost on its way into a loop (Python 3.11's wait_for returns
        # the result when its inner future completes as the cancellation arrives, and
        # redis-py may turn one into a connection error), so the loops also end on this
        # flag, and the wait for them is bounded.
        self._stopping = True
        for handle in self._owed.values():
            handle.cancel()  # the reap below takes them all out
        self._owed.clear()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.store.timeout + _BLOCK_MS / 1000 + 1)
        for t in self._tasks:
            if not t.done():
                log.warning("a cluster loop did not end on stop; left behind")
            elif not t.cancelled() and t.exception() is not None:
                log.warning("a cluster loop failed: %s", t.exception())
        if self._client is not None:
            try:
                await self._client.delete(self._key)
                await asyncio.wait_for(_future(self.store.reap(self.node)), self.store.timeout)
            except (RedisError, OSError, ChatError, TimeoutError) as exc:
                log.warning("could not leave the cluster cleanly: %s", exc)
            await self._client.aclose()
        if self._reader is not None:
            await self._reader.aclose()

    # --- liveness --------------------------------------------------------------------

    async def _beat(self) -> None:
        assert self._client is not None
        P = self.store.prefix
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key, b"1", px=int(self.node_ttl * 1000))
        pipe.sadd(P + "nodes", self.node)
        await pipe.execute()

    async def _beat_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.node_ttl / 3)
            try:
                await self._beat()
                await self._reap()
            except (RedisError, OSError) as exc:
                if self._stopping:
                    return
                log.debug("heartbeat failed: %s", exc)

    async def _reap(self) -> None:
        """Clean up after nodes whose heartbeat expired: once each, under a lock."""
        assert self._client is not None
        P = self.store.prefix
        nodes: Any = await self._client.smembers(P + "nodes")
        for raw in nodes:
            node = raw.decode()
            if node == self.node or await self._client.exists(f"{P}node:{node}"):
                continue
            # Held for one TTL: the reaped node, if alive, beats again after this, so it
            # cannot lapse again before the lock is gone (reaped again within the TTL).
            span = int(self.node_ttl * 1000)
            lock = await self._client.set(f"{P}reap:{node}", self.node, nx=True, px=span)
            if lock:
                n = await self.store.reap(node)
                log.warning("node %s stopped answering: its %s room memberships removed", node, n,
                            extra={"event": "node_reaped", "node": node})  # fmt: skip

    # --- presence --------------------------------------------------------------------

    def _presence(self, room: LiveRoom, key: str, name: str, entered: bool, reason: str) -> None:
        """RoomManager.on_presence: this node's first connection of a user into a room,
        or its last out, goes to Redis, which decides and announces (module doc)."""
        loop = asyncio.get_running_loop()
        write: Any
        if entered:
            write = self.store.enter_room(room.id, key, name)
            outcome: asyncio.Future[Admitted | None] = loop.create_future()
            outcome.add_done_callback(_retrieved)
            self._entering[(room.id, key)] = outcome
            deadline = loop.time() + self.store.timeout
            write.add_done_callback(
                lambda w: self._entered(room, key, name, w, outcome, deadline)
            )
        else:
            write = self._leave(room, key, reason or "left")
        # Writes complete in order (one pipeline), so the last one stands for all.
        written: asyncio.Future[None] = loop.create_future()

        def settle(_: Any) -> None:
            if not written.done():
                written.set_result(None)

        write.add_done_callback(settle)
        self._last_presence = written

    def _entered(
        self,
        room: LiveRoom,
        key: str,
        name: str,
        write: Any,
        outcome: asyncio.Future[Admitted | None],
        deadline: float,
    ) -> None:
        exc = write.exception()
        if exc is None and write.result()[0] >= 0:
            if key not in room.users and not room.deleted:
                # Taken out here meanwhile (an outage reset): Redis must not keep it.
                self._leave(room, key, "disconnected")
            if not write.result()[1]:  # no entry to wait for: it is in, as Redis has it
                self._admit(room, key)
                _settle(outcome)
            elif not outcome.done():
                # Its entry is read soon (_membership: admitted); bounded: one store
                # timeout from the join's write, then it is admitted anyway.
                loop = asyncio.get_running_loop()
                late = max(0.0, deadline - loop.time())
                loop.call_later(late, self._admit_late, room, key, name, outcome)
            return
        if outcome.done():
            return  # its entry was read before this (lost) reply: it is stored, and in
        if self._entering.get((room.id, key)) is outcome:
            del self._entering[(room.id, key)]
        # Refused (the room closed first) or unknown (Redis away): the connections that
        # joined for it are out again, and their joins answer so.
        self.app.rooms.withdraw(room, key)
        if exc is None:
            exc = NotFound(f"no room {room.name!r}: it was closed")
        elif not isinstance(exc, ChatError):
            log.warning("a room membership was not recorded: %s", exc)
        outcome.set_exception(exc)

    def _close_if_unused(self, room: LiveRoom) -> None:
        """App.drop_if_unused: nobody is in the room as this node knows it; Redis knows."""
        if not room.users and not room.entering:
            write = self.store.close_room_if_empty(room.id)
            write.add_done_callback(lambda w: self._left(room, w))

    def _leave(self, room: LiveRoom, key: str, reason: str) -> asyncio.Future[None]:
        """This node's user out of the room in Redis. A failed write is owed: tried again
        at once, then with backoff until Redis takes it (ROOM_LEAVE is idempotent), while
        the user stays out here; writer-only failures (a timeout, OOM at maxmemory) end
        no reset, so without this the user would stay a member on every node. Done once
        stored or failed twice (a leave's reply waits that long, then the rest is owed)."""
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owe_leave(room, key, reason, 0, answered)
        return answered

    def _owe_leave(
        self, room: LiveRoom, key: str, reason: str, failures: int, answered: asyncio.Future[None]
    ) -> None:
        self._owed.pop((room.id, key), None)
        if failures and key in room.users:
            # Back in here meanwhile: that entry's ROOM_ENTER, queued after the failed
            # leave, found it still in and kept it (scripts.ROOM_ENTER); nothing is owed.
            _settle(answered)
            return
        write = self.store.leave_room(room.id, key, reason)

        def done(w: Any) -> None:
            if w.exception() is None:
                _settle(answered)
                self._left(room, w)
                return
            if failures >= 1:
                _settle(answered)
            if self._stopping:
                return  # stop takes every membership of this node out (REAP)
            if failures == 1:
                log.warning("a room departure was not recorded (%s); retrying until it is",
                            w.exception(), extra={"event": "leave_owed"})  # fmt: skip
            delay = 0.0 if failures == 0 else min(0.05 * 2 ** (failures - 1), _MAX_BACKOFF)
            loop = asyncio.get_running_loop()
            self._owed[(room.id, key)] = loop.call_later(
                delay, self._owe_leave, room, key, reason, failures + 1, answered
            )

        write.add_done_callback(done)

    def _left(self, room: LiveRoom, write: Any) -> None:
        exc = write.exception()
        if exc is not None:
            log.debug("an emptied room was not closed: %s", exc)  # reset after the outage
        elif write.result() == 2 and not room.deleted:
            self.app.forget_emptied(room)  # closed in Redis: gone here at once

    def published(self) -> Awaitable[None] | None:
        last = self._last_presence
        return None if last is None or last.done() else last

    def entered(self, room: LiveRoom, session: Session) -> Awaitable[Admitted | None] | None:
        key = session.user_key
        if key is None:
            return None
        outcome = self._entering.get((room.id, key))
        return None if outcome is None or outcome.done() else outcome

    # --- the reader ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = 0.05
        while not self._stopping:
            assert self._reader is not None
            try:
                entries, gap = await self._read_batch()
            except (RedisError, OSError) as exc:
                if self._stopping:
                    return
                if not self.down:
                    self.down = True
                    log.error("lost redis (%s): reconnecting; client connections end when it is back",
                              exc, extra={"event": "cluster_down", "error": str(exc)})  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = 0.05
            if self.down:
                self.down = False
                log.warning("redis is back: ending client connections so they resync",
                            extra={"event": "cluster_recovered"})  # fmt: skip
                await self._resync("lost contact with the other nodes; reconnect and sync")
                continue  # a gap then is covered too: the view read replaces the entries
            if gap:
                log.warning("this node fell behind the change stream's cap and missed changes: "
                            "ending client connections so they resync",
                            extra={"event": "cluster_gap"})  # fmt: skip
                await self._resync("missed changes from the other nodes; reconnect and sync")
                continue
            if not entries:
                continue
            me = self.node.encode()
            own = [f[b"rev"] for _, f in entries if f.get(b"node") == me and b"rev" in f]
            if own:
                # Our own change: its command's reply goes first (bounded wait).
                settled = self.store.writes_settled(max(int(r) for r in own))
                try:
                    await asyncio.wait_for(_future(settled), self.store.timeout * 2)
                except TimeoutError:
                    pass
            for entry_id, fields in entries:
                self.last_id = entry_id.decode()
                try:
                    self._apply(fields)
                except Exception:
                    log.exception("could not apply a change from the stream")
                if self._ending:
                    # An account change ends sessions here once its account is read
                    # (logout all, passwd, delete): the entries after it wait for that
                    # (each read bounded from its start: _adopt_user), so those sessions
                    # get nothing written after it.
                    await asyncio.wait(list(self._ending))
            self._applied = _id(self.last_id)
            self._wake_caught_up()
            if self._resync_reason:
                await self._resync(self._resync_reason)

    async def _read_batch(self) -> tuple[list[Any], bool]:
        """The entries after `last_id` (waiting up to _BLOCK_MS for some), and whether an
        entry after `last_id` was trimmed away unread (the node fell behind the stream's
        cap). Same round trip: the stream's head (_HEAD) right after the XREAD. Trimming deletes from
        the head, and `entries-added` (Redis 7) gives the stream's first entry its ordinal
        (`entries-added - length + 1`), so the entries between this node's ordinal and the
        first entry must all be in the batch; one that is not was lost."""
        assert self._reader is not None
        since = _id(self.last_id)
        pipe = self._reader.pipeline(transaction=False)
        pipe.xread({self._stream: self.last_id}, count=_READ_COUNT, block=_BLOCK_MS)
        pipe.evalsha(self._head_sha, 1, self._stream)
        read, head = await pipe.execute(raise_on_error=False)
        if isinstance(read, BaseException):
            raise read
        if isinstance(head, NoScriptError):  # Redis restarted or its scripts were flushed
            self._head_sha = await self._load_head_script()
            head = await self._reader.evalsha(self._head_sha, 1, self._stream)
        elif isinstance(head, BaseException):
            head = None  # as with no stream: cannot tell
        entries: list[Any] = read[0][1] if read else []
        n = len(entries)
        if not head:
            self._ordinal += n  # no stream (yet), or Redis before 7: cannot tell
            return entries, False
        first = head[2] if len(head) > 2 else None
        if first and _id(_str(first)) <= since:  # nothing after last_id was trimmed
            self._ordinal += n
            return entries, False
        first_ordinal = int(head[0]) - int(head[1]) + 1
        ids = [e[0] for e in entries]
        j = ids.index(first) if first and first in ids else n
        gap = first_ordinal - 1 - self._ordinal > j
        self._ordinal = first_ordinal + n - 1 - j
        return entries, gap

    def caught_up(self) -> Awaitable[None]:
        """Done once the reader has applied the stream up to its tail as of this call.
        Calls made before the tail query is sent share it (one Task, one round trip for a
        burst of joins, lists or closes); a later call waits for the next query."""
        shared = self._next_catch_up
        if shared is None:
            shared = self._next_catch_up = asyncio.get_running_loop().create_future()
            self.app.scheduler.spawn(self._catch_up(shared))
        return asyncio.shield(shared)  # one waiter cancelled never cancels the others

    async def _catch_up(self, done: asyncio.Future[None]) -> None:
        """Ask Redis for the stream's tail, then wait until the reader has applied it
        (bounded: Redis unreachable, or slow, and this answers from what the node has)."""
        self._next_catch_up = None  # calls from now on may come after the query is sent
        try:
            # One bound for the whole wait (the tail query, the reader, account reads), so
            # every caller waits at most the store's timeout (protocol.md, "Timing").
            await asyncio.wait_for(self._wait_for_tail(), self.store.timeout)
        except TimeoutError:
            pass
        finally:
            if not done.done():
                done.set_result(None)

    async def _wait_for_tail(self) -> None:
        try:
            assert self._tail is not None
            target = _id(_str(await self._tail(keys=[self._stream])))
        except (RedisError, OSError):
            return
        if target > self._applied:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._catching_up.append((target, fut))
            try:
                await asyncio.wait_for(fut, self.store.timeout)
            except TimeoutError:
                pass
        if self._adopting:  # an account change applied is adopted once it has been read
            await asyncio.wait(list(self._adopting), timeout=self.store.timeout)

    def _adopt_user(self, key: str) -> None:
        """Adopt an account change another node made (read from Redis in a task of its
        own); caught_up waits for it, and so does the reader when the account has
        connections here (a register elsewhere holds up nothing). Waiting on it ends at
        the store's timeout from the read's start, whatever the read does."""
        loop = asyncio.get_running_loop()
        read = self.app.refresh_user(key)
        done: asyncio.Future[None] = loop.create_future()
        self._adopting.add(done)
        done.add_done_callback(self._adopting.discard)
        if self.app.sessions_of(key):
            self._ending.add(done)
            done.add_done_callback(self._ending.discard)
        deadline = loop.call_later(self.store.timeout, _settle, done)

        async def adopt() -> None:
            try:
                await _quiet(read)
            finally:
                deadline.cancel()
                _settle(done)

        self.app.scheduler.spawn(adopt())

    async def _load_head_script(self) -> str:
        assert self._client is not None
        return _str(await self._client.script_load(_HEAD))

    def _wake_caught_up(self) -> None:
        if not self._catching_up:
            return
        left = []
        for target, fut in self._catching_up:
            if target <= self._applied:
                if not fut.done():
                    fut.set_result(None)
            else:
                left.append((target, fut))
        self._catching_up = left

    async def _resync(self, reason: str) -> None:
        """This node may have missed changes (Redis was away, or the stream was trimmed
        past its position, or it was reaped), and the others its own: every client
        reconnects and syncs (protocol.md), and the node starts afresh from Redis. Its
        memberships go (its connections are ending), then it adopts one consistent view
        of rooms, the other nodes' members, guest holds and revocations, and reads on
        from the stream position of that view; accounts are read again too."""
        self._resync_reason = ""
        self.bus.own.clear()  # their entries are read (or not) anew
        self.end_connections(reason)
        self.app.rooms.withdraw_all()  # the ending connections, out of their rooms now
        # Queued now, before any join of a client that reconnects (writer order).
        reset = self.store.reap(self.node, gone=False)
        try:
            try:
                await self._beat()
            finally:
                await reset  # its outcome is known (and awaited) whatever the beat did
            view = await self.store.cluster_view()
            version, users = await self.store.reload_users()
        except (RedisError, OSError, ChatError) as exc:
            log.warning("could not read the service's state again: %s; retrying", exc)
            self.down = True  # again at the next successful read
            return
        self._adopt(view)
        for (room_id, key), outcome in list(self._entering.items()):
            room = self.app.rooms.by_id.get(room_id)
            if room is None or key not in room.users:  # withdrawn by the reset
                del self._entering[(room_id, key)]
                _settle(outcome)
        self.app.apply_users(version, users)

    def _adopt(self, view: ClusterView) -> None:
        app = self.app
        rooms = app.rooms
        fresh = {rec.id: rec for rec in view.rooms}
        for gone in list(rooms.by_id.values()):
            if gone.id not in fresh:
                app.forget_emptied(gone)  # its connections were taken out (_resync)
        for rec in fresh.values():
            known = rooms.by_id.get(rec.id)
            if known is None:
                held = rooms.rooms.get(rec.name.lower())
                if held is not None:  # renamed away meanwhile: out of the name's way
                    rooms.rename(held, f"{held.name}\n{held.id}")
                room = rooms.add(rec)
            else:
                room = known
                room.topic = rec.topic
                if rec.name != room.name:
                    held = rooms.rooms.get(rec.name.lower())
                    if held is not None and held is not room:
                        rooms.rename(held, f"{held.name}\n{held.id}")
                    rooms.rename(room, rec.name)
            members = view.remote.get(rec.id, {})
            rooms.replace_remote(room, members)
            # Joins since the reset whose entries the view covers (they are not read).
            for key in {s.user_key for s in room.entering}:
                if key is not None and self.node in members.get(key, ("", set()))[1]:
                    self._admit(room, key)
        for key in {n.lower() for n in app.accounts.guest_names()} - set(view.guests):
            self._hold(key, "")
        for key, data in view.guests.items():
            self._hold(key, data)
        revoked = [jti for jti, exp in view.revoked.items() if not app.accounts.is_revoked(jti)]
        for jti in revoked:
            app.accounts.revoke(jti, view.revoked[jti])
        if revoked:
            self._expire_revoked(set(revoked))
        if view.rev > self.store.rev:
            self.store.rev = view.rev
        self.last_id = view.last_id
        self._applied = _id(view.last_id)
        self._ordinal = view.entries_added
        self._wake_caught_up()

    def _apply(self, raw: dict[bytes, bytes]) -> None:
        kind = raw[b"kind"].decode()
        if kind == "ev" or kind == "close":
            if raw.get(b"node") != self.node.encode():
                self._deliver_remote(kind, raw)
            return
        if kind.startswith("message"):
            self._messages(kind, raw)
            return
        f = {k.decode(): v.decode() for k, v in raw.items()}
        own = f.get("node") == self.node
        if kind == "in" or kind == "out":
            self._membership(kind, f)
        elif kind == "gone":
            self._gone(f["node"])  # this node's own too: it was reaped alive
        elif own:
            return  # this node applied its own change already
        elif kind.startswith("room."):
            self._room(kind, f)
        elif kind == "user":
            self._adopt_user(f["key"])
        elif kind == "revoked":
            self._revoked(f["jti"], int(f["exp"]))
        elif kind == "hold":
            self._hold(f["key"], f.get("h", ""))

    def _deliver_remote(self, kind: str, raw: dict[bytes, bytes]) -> None:
        where = raw[b"a"].decode()
        audience: Audience
        if where.startswith("r:"):
            room = self.app.rooms.by_id.get(int(where[2:]))
            if room is None:
                return
            self.app.settle(room)  # this node's departures happened first
            audience = ToRoom(room)
        else:
            key, _, identity = where[2:].partition("\n")
            audience = ToUser(key, identity or None)
        if kind == "ev":
            self.bus.local(audience, _frame_of(raw[b"f"]))
        else:
            self.bus.close_local(audience)

    def _messages(self, kind: str, raw: dict[bytes, bytes]) -> None:
        """Message changes (scripts.py): a send script's batch (kind `messages`, its
        messages packed in `m`), or one edit or delete (kind `message.edited|deleted`)."""
        app = self.app
        by = None
        if kind == "messages":
            recs, kind = messages_from(raw[b"m"]), "message"
        else:
            recs, by = [message_from(raw[b"m"])], raw.get(b"by", b"").decode() or None
        rev = int(raw[b"rev"])
        if rev > self.store.rev:
            self.store.rev = rev
        rooms = app.rooms
        # This node's own change: its handler made the events already (Bus.posted; the
        # reader applies it after its replies went out, _read_loop), reply and event
        # sharing one encoding of the message.
        own = self.bus.own if raw.get(b"node") == self.node.encode() else None
        for rec in recs:
            event: Event | None = own.pop(rec.rev, None) if own else None
            if event is None or not changes.names_room_as_now(rooms, rec, event):
                event = changes.message_event(rooms, kind, rec, by)
            for audience in changes.audiences(rooms, rec):  # one encoding for all of them
                if isinstance(audience, ToRoom):
                    app.settle(audience.room)  # departures before this message go first
                self.bus.local(audience, event)
        if rev > self.bus.applied_rev:
            self.bus.applied_rev = rev
        if self.bus.own:
            # One whose entry came before its handler ran (the reader's wait for the
            # replies timed out) is not wanted any more.
            stale = list(itertools.takewhile(lambda r: r <= rev, self.bus.own))
            for r in stale:
                del self.bus.own[r]

    def _membership(self, kind: str, f: dict[str, str]) -> None:
        """A user entered or left a room on a node (this one too): the member list, and
        the announcement Redis decided on (module doc)."""
        app = self.app
        room = app.rooms.by_id.get(int(f["room"]))
        if room is None:
            return
        key, name = f["key"], f["name"]
        if kind == "in":
            app.rooms.remote_in(room, f["node"], key, name)
            if f.get("ann"):
                app.settle(room)
                self.bus.local(_others(room, key), MemberJoined(room=room.name, user=name))
            if f["node"] == self.node:
                if key not in room.users:
                    # Nobody here wants it (its join failed on a lost reply, or left
                    # already): Redis must not keep it (a repeated leave changes nothing).
                    self._leave(room, key, "disconnected")
                self._admit(room, key)
            return
        app.rooms.remote_out(room, f["node"], key)
        reason = f.get("left")
        if not reason:
            return
        event = MemberLeft(room=room.name, user=name, reason=reason)
        if key in room.users:
            # Back in here already (its join raced this entry): it is not told of itself.
            app.settle(room)
            self.bus.local(_others(room, key), event)
        else:
            app.depart(room, event)  # batched with the room's other departures (app.py)

    def _admit(self, room: LiveRoom, key: str) -> None:
        """This node's entry for the user is read: its entering connections are members
        from here on, and their joins answer with the room as of this entry."""
        self.app.settle(room)  # departures before it are not theirs to hear
        self.app.rooms.admit(room, key)
        outcome = self._entering.pop((room.id, key), None)
        if outcome is not None and not outcome.done():
            outcome.set_result((room.info(), room.members_json()))

    def _admit_late(
        self, room: LiveRoom, key: str, name: str, outcome: asyncio.Future[Admitted | None]
    ) -> None:
        """A stored join whose entry this node's reader has not read within the store's
        timeout (it lags): its connections are members now, so an acknowledged join gets
        the room's events from its reply on (some written just before it may come too),
        and its member list shows it; the entry, read later, changes nothing more."""
        if outcome.done() or self._entering.get((room.id, key)) is not outcome:
            return
        if room.deleted or key not in room.users:
            # Out again meanwhile (its leave, a reset): the entry's reading handles it.
            del self._entering[(room.id, key)]
            _settle(outcome)
            return
        log.warning("the change stream reader lags: a join answered before its entry was read",
                    extra={"event": "join_admitted_late"})  # fmt: skip
        self.app.rooms.remote_in(room, self.node, key, name)
        self._admit(room, key)

    def _room(self, kind: str, f: dict[str, str]) -> None:
        app = self.app
        room_id = int(f["id"])
        room = app.rooms.by_id.get(room_id)
        if kind == "room.created":
            if room is None and f["n"].lower() not in app.rooms.rooms:
                app.rooms.add(RoomRecord(
                    room_id, f["n"], f["t"], f["o"], float(f["c"]), f["e"] == "1", f["op"] == "1"
                ))  # fmt: skip
        elif room is None or room.deleted:
            return
        elif kind == "room.updated":
            app.settle(room)
            room.topic = f["t"]
            if f["n"] != room.name:
                app.rooms.rename(room, f["n"])
        elif kind == "room.deleted" and not f.get("by"):
            app.forget_emptied(room)  # closed because nobody was in it: nobody to tell
        elif kind == "room.deleted":
            app.settle(room)
            members = app.rooms.remove(room)
            if members:
                event = RoomClosed(room=room.name, by=f.get("by") or None)
                self.bus.local(ToSessions.of(members), event)

    def _revoked(self, jti: str, exp: int) -> None:
        self.app.accounts.revoke(jti, exp)
        self._expire_revoked({jti})

    def _expire_revoked(self, jtis: set[str]) -> None:
        app = self.app
        fx = Effects()
        for s in list(app.presence.sessions()):
            if s.claims is not None and s.claims.jti in jtis:
                app.expire(s, "logout", fx)
        deliver(self.bus, fx)

    def _hold(self, key: str, data: str) -> None:
        app = self.app
        hold = _HOLD.decode(data) if data else None
        app.accounts.adopt_hold(key, hold)
        fx = Effects()
        for s in app.sessions_of(key):
            if s.claims is None or not is_guest_jti(s.claims.jti):
                continue
            try:
                app.accounts.check_claims(s.claims)
            except Unauthorized:
                app.expire(s, "logout", fx)
        deliver(self.bus, fx)
        if hold is not None and hold.held_until is not None and app.presence.is_online(key):
            app.accounts.settle_hold(key)  # still connected here: held while connected

    def _gone(self, node: str) -> None:
        if node == self.node:
            # Reaped while alive (Redis was away longer than the TTL): the others dropped
            # this node's users; clients reconnect and rejoin.
            self._resync_reason = "lost contact with the other nodes; reconnect and sync"
            return
        # Its users left with the reap's own entries (announced there); anything left of
        # it here is stale.
        rooms = self.app.rooms
        for room in list(rooms.rooms.values()):
            for key in [k for k, nodes in room.remote.items() if node in nodes]:
                rooms.remote_out(room, node, key)


def _others(room: LiveRoom, key: str) -> Audience:
    """The room's connections here but the user's own (one server never tells a user of
    its own arrival or departure: it has no connection in the room then)."""
    if key in room.users:
        return ToSessions.of([s for s in room.sessions if s.user_key != key])
    return ToRoom(room)


def _settle(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a refused join's outcome nobody awaited is not an error to log


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _future(x: Awaitable[Any]) -> None:
    await x


async def _quiet(x: Awaitable[Any]) -> None:
    try:
        await x
    except Exception as exc:
        log.warning("could not adopt a change from another node: %s", exc)

