"""RedisStore: the Store protocol (chatd/store/base.py) on one Redis database (issue 11).

Semantics are the SQLite store's (the conformance suite checks both); how they are kept:
- Every write is one Lua script (scripts.py), so an id and revision are allocated, the
  change stored, indexed and appended to the change stream (`P changes`) atomically: ids and
  revisions are strictly increasing across every node sharing the database, and the
  stream's order is revision order.
- Writes go through one writer task per store, in the order they were called (as the SQLite
  writer's FIFO), on its own connection: whatever is queued meanwhile becomes the next
  batch, sent as ONE write of script calls, consecutive sends folded into one script call
  each (group commit), at most 400 writes per batch and up to four batches in flight (one
  connection: Redis runs them in order; small batches keep the node and Redis both busy). A write's future resolves only after Redis replied, so with `appendfsync always`
  an acknowledged write is on disk (Redis fsyncs its AOF before it replies).
- Reads are single script calls too (one consistent view, one round trip each).
- `open()` is synchronous (the server runs it in an executor): it uses a synchronous client
  to create the epoch, drop ephemeral rooms and load the Snapshot; the asyncio client is
  made on first use in the running loop.
- Redis unreachable, a timeout, or an error reply: the caller gets `Internal` with a clear
  message at once (connect and socket timeouts bound the wait; no retries, a write is
  never sent twice). After a connection error a write's outcome is unknown; the message
  says so.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar, cast

import msgspec
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.retry import Retry as SyncRetry

from chatd.config import redis_address
from chatd.errors import ChatError, Conflict, Internal, NotFound, StoreStopped, Unauthorized
from chatd.store.base import (
    GuestHold,
    MessageRecord,
    NameHeld,
    NewMessage,
    RoomRecord,
    Snapshot,
    UserRecord,
)
from chatd.store.deferred import Deferred
from chatd.store.dump import Dump, MessageRow, UserRow
from chatd.store.redis.scripts import SCRIPTS, STREAM_KEEP_MS, STREAM_MAXLEN

T = TypeVar("T")
log = logging.getLogger("chatd")

# The key layout's version (scripts.py); a database of another one is refused (layout_error).
# 2: a message is one packed value (was a hash of fields) and sends share stream entries.
LAYOUT = 2
NONCE_KEEP = 24 * 3600.0  # contract: a nonce is kept at least 24 h (as the SQLite store)
_SEND_CHUNK = 500  # sends per script call: a long script blocks every other Redis client
# Writes per pipeline, and batches in flight: 400 x 4 beat 5,000 x 2 by 25 % (bench
# redis_persist): with few, large batches the node and Redis took turns waiting for each other.
_MAX_BATCH = 400
_PURGE_BATCH = 2_000
_IN_FLIGHT = 4  # write batches sent and not answered yet, at most (see _write_loop, _MAX_BATCH)
_ENC = msgspec.json.Encoder()
_PACK = msgspec.msgpack.Encoder()
_GUEST = msgspec.json.Decoder(GuestHold)
_MESSAGE = msgspec.msgpack.Decoder(MessageRecord)
_MESSAGES = msgspec.msgpack.Decoder(list[MessageRecord])
_FIELDS = msgspec.msgpack.Decoder(list[Any])
# Scripts whose replies carry stored messages (msgpack bytes): read undecoded.
_BINARY = frozenset({"send", "change", "page", "changes"})


class ClusterView(msgspec.Struct, frozen=True):
    """Redis as a node that may have missed changes adopts it (chatd/cluster), as of
    stream entry `last_id` (`entries_added` entries ever added up to it)."""

    last_id: str
    entries_added: int
    rev: int
    rooms: list[RoomRecord]
    # room id -> user key -> (display name, the nodes it is in the room on: live ones,
    # and dead ones not reaped yet, whose reap's entries take them out)
    remote: dict[int, dict[str, tuple[str, set[str]]]]
    nodes: list[str]  # the live nodes, this one too
    guests: dict[str, str]  # name key -> GuestHold as JSON
    revoked: dict[str, int]  # jti -> expires_at


class RedisStoreError(Exception):
    """Redis cannot be used at open: unreachable, refused, or holding another layout."""


def dm_pair(a: str, b: str) -> str:
    """A DM pair's key (as the SQLite store's dm_key): both identities, lowercased, sorted."""
    x, y = sorted((a.lower(), b.lower()))
    return f"{x}\n{y}"


def _f(x: float) -> str:
    return repr(float(x))  # exact: float(repr(x)) == x


def message_from(value: bytes) -> MessageRecord:
    """A stored message (scripts.py, MESSAGE: `P m:<id>`, a stream entry's `m`)."""
    return _MESSAGE.decode(value)


def messages_from(value: bytes) -> list[MessageRecord]:
    """The messages of a stream entry of sends (scripts.py: kind `messages`)."""
    return _MESSAGES.decode(value)


def _packed_fields(
    room_id: int | None, sender: str, recipient: str | None, text: str, ts: float,
    edited_ts: float | None, edited_by: str | None, deleted: bool, sender_key: str,
    recipient_key: str | None, nonce: str | None,
) -> list[Any]:  # fmt: skip
    """MESSAGE's elements 3.. (scripts.py), trailing nils left out."""
    f: list[Any] = [room_id, sender, recipient, text, ts, edited_ts, edited_by, deleted,
                    sender_key, recipient_key, nonce]  # fmt: skip
    if room_id is None:  # a DM: what its indexes are named by
        to, to_key = recipient or "", recipient_key or ""
        f += [sender.lower(), to.lower(), dm_pair(sender_key, to_key)]
    while f[-1] is None:
        f.pop()
    return f


def created_user(reply: list[Any], name: str, pw_hash: str, admin: bool) -> UserRecord:
    """The account CREATE_USER made (scripts.py), for the nodes and `chatd user add`
    alike; Conflict when an account has the name, NameHeld when a guest's hold that has
    not lapsed has it ({-1}: while connected; {-2, held_until})."""
    code = int(reply[0])
    if code == 0:
        raise Conflict(f"user {name!r} already exists")
    if code < 0:
        raise NameHeld(name, int(reply[1]) if code == -2 else None)
    return UserRecord(code, name, pw_hash, admin, 0)


def layout_error(meta: dict[str, str], where: str) -> str | None:
    """Why a database with this `P meta` cannot be used by this chatd, or None."""
    found = int(meta.get("layout", LAYOUT))
    if found > LAYOUT:
        return (f"the Redis database at {where} has chatd layout {found}, newer than this"
                f" chatd understands ({LAYOUT}); run a newer chatd")  # fmt: skip
    if found < LAYOUT:
        return (f"the Redis database at {where} has chatd layout {found}, an older chatd's,"
                f" which this chatd does not read (it needs {LAYOUT}); with that chatd, stop"
                " the nodes and `chatd copy --from REDIS-URL --to FILE.db`, then with this"
                " one `chatd copy --from FILE.db --to` an empty Redis database")  # fmt: skip
    return None


def _user(flat: list[Any]) -> UserRecord:
    h = dict(zip(flat[::2], flat[1::2], strict=True))
    return UserRecord(int(h["i"]), h["n"], h["h"], h["a"] == "1", int(h["tv"]))


def _room(room_id: int, h: dict[str, str]) -> RoomRecord:
    return RoomRecord(
        room_id, h["n"], h["t"], h["o"], float(h["c"]), h["e"] == "1", h["op"] == "1"
    )


def describe_persistence(config: dict[str, str], info: dict[str, Any]) -> str:
    """One line saying what an acknowledged write means with these Redis settings."""
    aof = config.get("appendonly")
    if aof is None and "aof_enabled" in info:
        aof = "yes" if str(info["aof_enabled"]) == "1" else "no"
    fsync = config.get("appendfsync")
    if aof == "yes" and fsync == "always":
        return "appendfsync always: an acknowledged write is on disk (like SQLite synchronous=FULL)"
    if aof == "yes" and fsync == "everysec":
        return "appendfsync everysec: up to ~1 s of acknowledged writes is lost on a power cut or OS crash"
    if aof == "yes" and fsync == "no":
        return "appendfsync no: the OS decides when writes reach disk; acknowledged writes may be lost on a power cut"
    if aof == "no":
        return "no AOF: acknowledged writes since the last RDB snapshot are lost when Redis restarts"
    return "persistence settings unreadable (CONFIG and INFO refused): what an acknowledgement means is unknown"


class _Send:
    """One queued send: its index fields and its packed message but id and revision
    (scripts.SEND's batch)."""

    __slots__ = ("fields", "fut", "msg", "recipient_key", "sender_key", "tail")

    def __init__(self, msg: NewMessage, fut: Deferred[Any]) -> None:
        self.msg = msg
        self.fut = fut
        sk = self.sender_key = msg.sender_key or msg.sender.lower()
        rk = msg.recipient_key or msg.recipient.lower() if msg.recipient is not None else None
        self.recipient_key = rk
        nonce = msg.nonce
        nk = "" if nonce is None else f"{sk}\n{nonce}"
        if msg.room_id is not None and rk is None:
            # _packed_fields of a room's message, inlined (every send to a room): the
            # trailing nils end at the sender's key, or at the nonce.
            tail = _PACK.encode(
                (msg.room_id, msg.sender, None, msg.text, msg.ts, None, None, False, sk)
                if nonce is None else
                (msg.room_id, msg.sender, None, msg.text, msg.ts, None, None, False, sk, None, nonce)
            )  # fmt: skip
        else:
            tail = _PACK.encode(_packed_fields(
                msg.room_id, msg.sender, msg.recipient, msg.text, msg.ts, None, None, False, sk,
                rk, nonce,
            ))  # fmt: skip
        self.tail = tail
        self.fields: tuple[Any, ...]
        if msg.room_id is not None:
            self.fields = (msg.room_id, nk, len(tail))
        else:
            assert msg.recipient is not None and rk is not None, "a DM names its recipient"
            self.fields = ("", nk, len(tail), sk, rk, msg.sender.lower(),
                           msg.recipient.lower(), dm_pair(sk, rk))  # fmt: skip


class _Call:
    """One queued script call: its reply goes through `decode` into the future."""

    __slots__ = ("args", "decode", "fut", "script")

    def __init__(
        self, script: str, args: tuple[Any, ...], decode: Callable[[Any], Any], fut: Deferred[Any]
    ) -> None:
        self.script = script
        self.args = args
        self.decode = decode
        self.fut = fut


def _same(x: Any) -> Any:
    return x


# A script call of a batch: (script, args, the items it answers); "raw": a plain command.
_Command = tuple[str, tuple[Any, ...], list[Any]]
# A batch Redis answered: its calls and their replies (an exception for an error reply).
_Answered = tuple[list[_Command], list[Any]]
# A batch sent and not answered yet: its writes, its calls, when it was sent.
_Flight = tuple[list[Any], list[_Command], float]


class RedisStore:
    """Store on Redis at ``url`` (redis://, rediss://; password in the URL). ``prefix``
    namespaces every key. ``drop_ephemeral``: ephemeral rooms are deleted at open, as the
    contract says for one server (nobody is connected then); several nodes will need it off.
    ``timeout`` bounds connecting and every reply, in seconds."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatd:",
        timeout: float = 5.0,
        drop_ephemeral: bool = True,
        max_batch: int = _MAX_BATCH,
        stream_keep_ms: int = STREAM_KEEP_MS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.drop_ephemeral = drop_ephemeral
        self.max_batch = max_batch
        # The change stream's cap, for the scripts that take it as an argument; the
        # notices' scripts have it built in (scripts.STREAM_MAXLEN: one value for both).
        self.stream_maxlen = str(STREAM_MAXLEN)
        self.stream_keep_ms = stream_keep_ms
        self.rev = 0
        self.epoch = ""
        self.durability = ""  # the persistence line logged at open
        self.commit_times: list[float] = []  # for `stats` (round trip of each batch)
        self.write_errors = 0
        self._shas: dict[str, str] = {}
        self._client: aioredis.Redis | None = None
        self._queue: list[_Send | _Call] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._purges: list[int] = []
        # Purge calls wait here, and each batch takes one: a purge removes up to
        # _PURGE_BATCH messages in one script, and many rooms closing at once must not
        # hold every other node's writes behind all of theirs.
        self._purging: collections.deque[_Call] = collections.deque()
        self._stopping = False
        self._failing = False
        # The bus (chatd/cluster) names this node in what it writes to the change stream.
        self.node = ""
        # Pipelines sent and settled (replied or failed), and who waits for those sent so
        # far to settle (the bus, before delivering this node's own changes: reply first).
        self._sent = 0
        self._settled = 0
        self._settle_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        # The highest revision of this node's own writes handed out (writes_settled).
        self._handed_rev = 0
        self._conn: Any = None  # the writer's connection (_connection)
        self._proven = False  # it has answered a batch
        self._rerunning = False  # calls answered NOSCRIPT run again: hold the next batch

    # --- lifecycle -------------------------------------------------------------------

    def sync_client(self) -> redis.Redis:
        """A synchronous client for open() and the offline commands (chatd copy)."""
        return redis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout, retry=SyncRetry(NoBackoff(), 0),
        )  # fmt: skip

    def open(self) -> Snapshot:
        """Connect, create the epoch if this database is new, drop ephemeral rooms, log what
        an acknowledgement means, and load the Snapshot. RedisStoreError if Redis cannot be
        used."""
        r = self.sync_client()
        try:
            return self._load(r)
        except RedisError as exc:
            raise RedisStoreError(f"Redis at {self._where()}: {exc}") from None
        finally:
            r.close()

    def _where(self) -> str:
        return redis_address(self.url)

    def _load(self, r: redis.Redis) -> Snapshot:
        P = self.prefix
        for name, src in SCRIPTS.items():
            self._shas[name] = r.script_load(src)
        meta = P + "meta"
        r.hsetnx(meta, "epoch", uuid.uuid4().hex)
        r.hsetnx(meta, "layout", str(LAYOUT))
        m = cast(dict[str, str], r.hgetall(meta))
        if (why := layout_error(m, self._where())) is not None:
            raise RedisStoreError(why)
        self.durability = describe_persistence(*self._persistence(r))
        log.info("redis store at %s: %s", self._where(), self.durability,
                 extra={"event": "store_durability", "durability": self.durability})  # fmt: skip
        rooms = self._rooms(r)
        if self.drop_ephemeral:
            for room in [x for x in rooms if x.ephemeral]:
                self._sync_call(r, "delete_room", room.id)
            rooms = [x for x in rooms if not x.ephemeral]
        # Deleted rooms whose messages were not all purged yet (a crash, or just now):
        # the writer purges them in batches once running.
        gone = cast(set[str], r.smembers(P + "rooms:gone"))
        self._purges = [int(g) for g in gone if r.exists(f"{P}r:{g}:revs")]
        self.epoch = m["epoch"]
        self.rev = int(m.get("rev", 0))
        version, users = self._sync_call(r, "all_users")
        guests = cast(dict[str, str], r.hgetall(P + "guests"))
        revoked = cast(list[tuple[str, float]], r.zrange(P + "revoked", 0, -1, withscores=True))
        return Snapshot(
            epoch=self.epoch,
            rev=self.rev,
            # In id order and name order, whatever order Redis's hashes hold them in.
            users=sorted((_user(u) for u in users), key=lambda u: u.id),
            guests=sorted((_GUEST.decode(g) for g in guests.values()), key=lambda g: g.name),
            revoked={jti: int(exp) for jti, exp in revoked},
            rooms=rooms,
            users_version=int(version),
        )

    def _persistence(self, r: redis.Redis) -> tuple[dict[str, str], dict[str, Any]]:
        config: dict[str, str] = {}
        info: dict[str, Any] = {}
        try:
            config = cast(dict[str, str], r.config_get("append*"))
        except ResponseError:  # CONFIG is often disabled on managed Redis
            try:
                info = r.info("persistence")
            except ResponseError:
                pass
        return config, info

    def _rooms(self, r: redis.Redis) -> list[RoomRecord]:
        ids = sorted(int(x) for x in cast(set[str], r.smembers(self.prefix + "rooms")))
        pipe = r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(f"{self.prefix}room:{i}")
        return [_room(i, h) for i, h in zip(ids, pipe.execute(), strict=True) if h]

    def _sync_call(self, r: redis.Redis, name: str, *args: Any) -> Any:
        return r.evalsha(self._shas[name], 0, self.prefix, *args)

    async def close(self) -> None:
        """Send what is queued, then close the connections."""
        self._stopping = True
        if self._writer is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.timeout * 2)
            except TimeoutError:
                self._writer.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def shared_budgets(self) -> Any:
        """Rate budgets shared with every node on this database (the server hands it to
        Limits.share): a chatd.store.redis.limits.RedisBudgets."""
        from chatd.store.redis.limits import RedisBudgets

        return RedisBudgets(self.url, prefix=self.prefix)

    def _aclient(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url, decode_responses=True, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout, retry=aioredis.retry.Retry(NoBackoff(), 0),
            )  # fmt: skip
        return self._client

    # --- the writer ------------------------------------------------------------------

    def _enqueue(self, item: _Send | _Call, *, purge: bool = False) -> None:
        if self._stopping:
            item.fut.set_exception(StoreStopped("the server is shutting down"))
            return
        if purge:
            assert isinstance(item, _Call)
            self._purging.append(item)
        else:
            self._queue.append(item)
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
            for room_id in self._purges:
                self._purge_later(room_id)
            self._purges = []
        assert self._wake is not None
        self._wake.set()

    def _call(
        self, script: str, *args: Any, decode: Callable[[Any], T] = _same, purge: bool = False
    ) -> Deferred[T]:
        fut: Deferred[T] = Deferred(asyncio.get_running_loop())
        self._enqueue(_Call(script, (self.prefix, *args), decode, fut), purge=purge)
        return fut

    async def _write_loop(self) -> None:
        """Writes go to Redis in the order they were queued, on one connection, at most
        _IN_FLIGHT batches sent and not yet answered: what is queued while the replies of
        a batch are awaited goes out at once, so Redis has the next batch while the node
        reads the replies of one and hands it out (its futures resolved, so its commands'
        replies and follow-ups run), instead of waiting for the node."""
        assert self._wake is not None
        flight: collections.deque[_Flight] = collections.deque()
        answered: _Answered | None = None
        reading: asyncio.Task[_Answered | None] | None = None
        try:
            while True:
                # Nothing goes out while NOSCRIPT calls run again (_receive_batch).
                limit = 0 if self._rerunning else _IN_FLIGHT if self._proven else 1
                if (self._queue or self._purging) and len(flight) < limit:
                    batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                    if self._purging:
                        batch.append(self._purging.popleft())  # one purge per round trip
                    if not await self._send_batch(batch, flight, answered) and reading:
                        # The connection broke: every batch still in flight on it failed.
                        # One the reading task took off `flight` while the send waited
                        # was answered by Redis: it is handed out, not dropped (and one
                        # whose NOSCRIPT calls run again, on a pool connection, finishes).
                        if not self._rerunning:
                            reading.cancel()
                        await asyncio.wait([reading])
                        if not reading.cancelled() and reading.exception() is None:
                            late = reading.result()
                            if late is not None:
                                self._hand_out(late)
                        reading = None
                    answered = None
                elif answered is not None:
                    self._hand_out(answered)  # may queue more writes: look again
                    answered = None
                elif flight or reading is not None:
                    # `reading` may run with `flight` empty: it took its batch off and runs
                    # NOSCRIPT calls again (_receive_batch); it is awaited all the same.
                    if reading is None:
                        reading = asyncio.get_running_loop().create_task(
                            self._receive_batch(flight)
                        )
                    waits: set[asyncio.Future[Any]] = {reading}
                    if not self._queue and not self._purging and len(flight) < limit:
                        self._wake.clear()  # a write queued meanwhile is sent at once
                        waits.add(asyncio.ensure_future(self._wake.wait()))
                    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for w in pending - {reading}:
                        w.cancel()
                    if reading in done:
                        answered, reading = reading.result(), None
                elif self._stopping:
                    return
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            if reading is not None:
                reading.cancel()
            await self._drop_connection()

    def _commands(self, batch: list[_Send | _Call]) -> Iterator[_Command]:
        """The batch as script calls: (script, args, the items they answer), in order."""
        i, n = 0, len(batch)
        while i < n:
            item = batch[i]
            if isinstance(item, _Call):
                yield item.script, item.args, [item]
                i += 1
                continue
            sends: list[Any] = []
            while i < n and len(sends) < _SEND_CHUNK:
                s = batch[i]
                if not isinstance(s, _Send):
                    break
                sends.append(s)
                i += 1
            fields: list[Any] = []
            for s in sends:
                fields += s.fields
            yield "send", (
                self.prefix, self.stream_maxlen, _PACK.encode(fields), self.node,
                b"".join([s.tail for s in sends]), self.stream_keep_ms,
            ), sends  # fmt: skip

    def writes_settled(self, rev: int = 0) -> Awaitable[None]:
        """Resolves once this node's write of revision ``rev`` has been handed out (its
        future resolved, so the command that waited on it has answered), or once every
        batch sent so far has been (``rev`` 0: that alone)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._settled >= self._sent or (rev and self._handed_rev >= rev):
            fut.set_result(None)
        else:
            self._settle_waiters.append((self._sent, rev, fut))
        return fut

    def _settle(self) -> None:
        self._settled += 1
        if self._settle_waiters:
            left = []
            for target, rev, fut in self._settle_waiters:
                if target <= self._settled or (rev and self._handed_rev >= rev):
                    if not fut.done():
                        fut.set_result(None)
                else:
                    left.append((target, rev, fut))
            self._settle_waiters = left

    async def _send_batch(
        self, batch: list[_Send | _Call], flight: collections.deque[_Flight],
        answered: _Answered | None,
    ) -> bool:  # fmt: skip
        """Send ``batch``, then hand out ``answered`` while Redis works on it. False: the
        connection broke (every batch sent on it failed, this one too)."""
        calls = list(self._commands(batch))
        self._sent += 1
        try:
            conn = await self._connection(idle=not flight)
            await conn.send_packed_command(
                conn.pack_commands([self._command(script, args) for script, args, _ in calls])
            )
        except (RedisError, OSError) as exc:
            if answered is not None:
                self._hand_out(answered)
            failed = [*flight, (batch, calls, 0.0)]
            flight.clear()  # before any await: the reading task must not fail them again
            await self._broken(exc, failed)
            return False
        except BaseException:
            if answered is not None:
                self._hand_out(answered)
            raise
        flight.append((batch, calls, time.perf_counter()))
        if answered is not None:
            self._hand_out(answered)
        return True

    async def _receive_batch(self, flight: collections.deque[_Flight]) -> _Answered | None:
        """The replies of the oldest batch in flight (an error reply stands in its place),
        or None when the connection broke (then every batch in flight failed)."""
        first = flight[0]
        _, calls, began = first
        conn = self._conn
        assert conn is not None
        replies: list[Any] = []
        try:
            for script, _, _ in calls:
                try:
                    replies.append(await conn.read_response(disable_decoding=script in _BINARY))
                except ResponseError as exc:  # the reply was read whole: still in step
                    replies.append(exc)
        except (RedisError, OSError) as exc:
            if flight and flight[0] is first:  # not failed already by a broken send
                failed = list(flight)
                flight.clear()  # before any await: a batch sent meanwhile is not among them
                await self._broken(exc, failed)
            return None
        if not flight or flight[0] is not first:
            return None  # a send broke the connection meanwhile: this batch failed
        flight.popleft()
        self._proven = True
        if any(isinstance(x, NoScriptError) for x in replies):
            # Redis lost its script cache (a restart, SCRIPT FLUSH): a NOSCRIPT call did not
            # run. Run just those again, in their order (see _pipeline), unless a later
            # batch is already in Redis (running them now would put them after it): then
            # they fail ("not saved"). A new connection carries one batch until its first is answered, so
            # the writes right after a Redis restart are run again.
            self._rerunning = True
            try:
                if flight:
                    await self._load_scripts()
                else:
                    replies = await self._pipeline(calls, replies)
            except (RedisError, OSError) as exc:
                log.error("reloading the Redis scripts failed: %s", exc,
                          extra={"event": "store_error", "error": str(exc)})  # fmt: skip
            finally:
                self._rerunning = False
        self.commit_times.append(time.perf_counter() - began)
        del self.commit_times[:-1024]
        if self._failing:
            self._failing = False
            log.warning("redis is reachable again", extra={"event": "store_recovered"})
        return calls, replies

    async def _connection(self, idle: bool) -> Any:
        """The writer's own connection (a new one is "unproven": see _receive_batch). One
        kept while nothing was in flight is looked at first: Redis may have restarted
        meanwhile, and a batch written into that dead socket would fail for nothing."""
        if self._conn is not None and idle:
            try:
                stale = await self._conn.can_read()  # data or EOF with nothing asked: dead
            except (RedisError, OSError):
                stale = True
            if stale:
                await self._drop_connection()
        if self._conn is None:
            pool: Any = self._aclient().connection_pool
            self._conn = await pool.get_connection()
            self._proven = False
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)  # replies may be left unread: never reused
            await self._aclient().connection_pool.release(conn)

    async def _broken(self, exc: BaseException, batches: list[_Flight]) -> None:
        """The connection failed: every batch sent on it has an unknown outcome."""
        await self._drop_connection()
        for batch, _, _ in batches:
            self._fail_all(batch, exc)
            self._settle()

    async def _load_scripts(self) -> None:
        for name, src in SCRIPTS.items():
            self._shas[name] = await self._aclient().script_load(src)

    def _hand_out(self, answered: _Answered) -> None:
        """Resolve the futures of an answered batch (their commands go on at once)."""
        calls, replies = answered
        try:
            for (script, _, items), reply in zip(calls, replies, strict=True):
                if isinstance(reply, Exception):
                    err = self._error(reply)
                    for item in items:
                        item.fut.set_exception(err)
                elif script == "send":
                    self._deliver_sends(items, reply)
                else:
                    call = items[0]
                    try:
                        value = call.decode(reply)
                    except ChatError as exc:
                        call.fut.set_exception(exc)
                    else:
                        call.fut.set_result(value)
        finally:
            self._settle()

    async def _pipeline(self, calls: list[_Command], replies: list[Any]) -> list[Any]:
        """Load the scripts again and run the calls ``replies`` says got NOSCRIPT, in their
        order, on a connection of the pool (the writer's has nothing in flight then) -- only
        if every call from the first NOSCRIPT one on got NOSCRIPT: else a later call ran
        (another client loaded the scripts meanwhile) and running them now would put them
        after it; they did not run, so they fail as "not saved". A failed SCRIPT LOAD
        raises (nothing ran); a re-run whose pipeline fails may have run: its calls answer
        "may not have been saved"."""
        again = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
        await self._load_scripts()
        if again != list(range(again[0], len(replies))):
            log.error("a batch got NOSCRIPT for some calls but not later ones: those failed",
                      extra={"event": "store_error", "error": "NOSCRIPT"})  # fmt: skip
            return replies
        pipe = self._aclient().pipeline(transaction=False)
        for i in again:
            script, args, _ = calls[i]
            raw = {"NEVER_DECODE": True} if script in _BINARY else {}
            pipe.execute_command(*self._command(script, args), **raw)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            log.error("running NOSCRIPT calls again failed: %s", exc,
                      extra={"event": "store_error", "error": str(exc)})  # fmt: skip
            unknown = Internal("storage (Redis) unreachable; the change may not have been saved")
            results = [unknown] * len(again)
        out = list(replies)
        for i, reply in zip(again, results, strict=True):
            out[i] = reply
        return out

    def _command(self, script: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if script == "raw":
            return args
        return ("EVALSHA", self._shas[script], 0, *args)

    def _deliver_sends(self, sends: list[_Send], reply: list[Any]) -> None:
        # Two per send (scripts.SEND): id, rev; -1, the original; -2, 0 (room deleted).
        last = 0
        for s, a, b in zip(sends, reply[::2], reply[1::2], strict=True):
            if a > 0:
                m = s.msg
                rec = MessageRecord(
                    a, b, m.room_id, m.sender, m.recipient, m.text, m.ts,
                    None, None, False, s.sender_key, s.recipient_key,
                )  # fmt: skip
                last = b
                s.fut.set_result((rec, True))
            elif a == -1:
                s.fut.set_result((message_from(b), False))
            else:
                s.fut.set_exception(NotFound("the room was deleted"))
        if last > self.rev:
            self.rev = last
        if last > self._handed_rev:
            self._handed_rev = last

    def _error(self, exc: BaseException) -> ChatError:
        self.write_errors += 1
        if isinstance(exc, ChatError):
            return exc
        log.error("a Redis script failed: %s", exc, extra={"event": "store_error", "error": str(exc)})
        return Internal("storage error; the change was not saved")

    def _fail_all(self, batch: list[_Send | _Call], exc: BaseException) -> None:
        self.write_errors += 1
        if not self._failing:
            self._failing = True
            log.error("writing to redis failed: %s (%d writes; clients got errors)", exc,
                      len(batch), extra={"event": "store_error", "error": str(exc)})  # fmt: skip
        # The client gets no detail (addresses, errors): those are in the log line above.
        err = Internal("storage (Redis) unreachable; the change may not have been saved")
        for item in batch:
            item.fut.set_exception(err)

    # --- reads -----------------------------------------------------------------------

    async def _read(self, script: str, *args: Any) -> Any:
        return await _in_task(self._read_now(script, *args))

    async def _read_now(self, script: str, *args: Any) -> Any:
        try:
            # redis-py reads a reply undecoded when NEVER_DECODE is present at all.
            raw: dict[str, Any] = {"NEVER_DECODE": True} if script in _BINARY else {}
            client: Any = self._aclient()
            return await client.execute_command(
                "EVALSHA", self._shas[script], 0, self.prefix, *args, **raw
            )
        except NoScriptError:
            for name, src in SCRIPTS.items():
                self._shas[name] = await self._aclient().script_load(src)
            return await self._read_now(script, *args)
        except (RedisError, OSError) as exc:
            raise self._read_error(exc) from None

    async def _cmd(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        async def run() -> T:
            try:
                return await fn(self._aclient())
            except (RedisError, OSError) as exc:
                raise self._read_error(exc) from None

        return await _in_task(run())

    def _read_error(self, exc: BaseException) -> Internal:
        log.error("reading from redis failed: %s", exc,
                  extra={"event": "store_error", "error": str(exc)})  # fmt: skip
        return Internal("storage (Redis) unreachable; try again later")

    @staticmethod
    def _page(reply: list[Any]) -> tuple[list[MessageRecord], bool]:
        return [_MESSAGE.decode(x) for x in reply[1:]], reply[0] == 1

    # --- accounts --------------------------------------------------------------------

    async def create_user(self, name: str, pw_hash: str, admin: bool) -> UserRecord:
        def decode(reply: list[Any]) -> UserRecord:
            return created_user(reply, name, pw_hash, admin)

        return await self._call(
            "create_user", name, name.lower(), pw_hash, int(admin), _f(time.time()), self.node,
            "", decode=decode,
        )  # fmt: skip

    async def delete_user(self, name: str) -> bool:
        return await self._call("delete_user", name.lower(), self.node, "", decode=bool)

    async def bump_token_version(self, name: str) -> int:
        return await self._call("bump_token_version", name.lower(), self.node, decode=int)

    async def revoke(self, jti: str, expires_at: int) -> None:
        # Through the writer (ordered with every other write), as a tiny script.
        await self._call("revoke", jti, expires_at, self.node)

    def _call_cmd(self, *command: Any) -> Deferred[Any]:
        """A plain Redis command through the writer, ordered with the scripts."""
        fut: Deferred[Any] = Deferred(asyncio.get_running_loop())
        self._enqueue(_Call("raw", command, _same, fut))
        return fut

    async def get_user(self, name: str) -> UserRecord | None:
        flat = await self._read("get_user", name.lower())
        return None if not flat else _user(flat)

    async def set_password(self, user_id: int, pw_hash: str) -> int | None:
        return await self._call(
            "set_password", user_id, pw_hash, self.node,
            decode=lambda v: None if v is None else int(v),
        )

    async def hold_guest(self, hold: GuestHold) -> None:
        """Decided in Redis (one script), so a name is one guest's across nodes:
        Unauthorized when an account has it (as a node that has read that account answers
        a guest login), NameHeld (until when) when another guest's hold has not lapsed."""

        def decode(ok: int) -> None:
            if ok == 0:
                raise Unauthorized("that name is registered: log in with its password")
            if isinstance(ok, list):  # {2[, held_until]}: another guest's hold has it
                raise NameHeld(hold.name, int(ok[1]) if len(ok) > 1 else None)

        await self._call(
            "hold_new", hold.name.lower(), _ENC.encode(hold), _f(time.time()), self.node,
            decode=decode,
        )

    def update_hold(self, hold: GuestHold) -> Awaitable[bool]:
        # Queued at the call, not at the first await: writes go in the order decided.
        return self._call(
            "hold_cas", hold.name.lower(), hold.jti, hold.version, _ENC.encode(hold), self.node,
            decode=bool,
        )

    def release_guest(self, hold: GuestHold) -> Awaitable[bool]:
        return self._call(
            "hold_cas", hold.name.lower(), hold.jti, hold.version, "", self.node, decode=bool
        )

    async def purge_expired(self, now: int) -> None:
        await self._call_cmd("ZREMRANGEBYSCORE", self.prefix + "revoked", "-inf", now)

    async def reload_users(self) -> tuple[int, list[UserRecord]]:
        version, users = await self._read("all_users")
        return int(version), sorted((_user(u) for u in users), key=lambda u: u.id)

    async def users_version(self) -> int:
        v = await self._cmd(lambda c: c.hget(self.prefix + "meta", "users_version"))
        return int(v or 0)

    # --- rooms -----------------------------------------------------------------------

    async def create_room(self, room: RoomRecord) -> RoomRecord:
        def decode(room_id: int) -> RoomRecord:
            if room_id == 0:
                raise Conflict(f"room {room.name!r} already exists")
            room.id = room_id
            return room

        return await self._call(
            "create_room", room.name, room.name.lower(), room.topic, room.owner,
            _f(room.created_at), int(room.ephemeral), int(room.open), self.node, decode=decode,
        )  # fmt: skip

    async def update_room(self, room_id: int, name: str, topic: str) -> None:
        def decode(ok: int) -> None:
            if ok == 0:
                raise Conflict(f"room {name!r} already exists")

        await self._call(
            "update_room", room_id, name, name.lower(), topic, self.node, decode=decode
        )

    def delete_room(self, room_id: int, by: str = "") -> Awaitable[None]:
        """Queued at the call (see SQLiteStore.delete_room); its messages are purged in
        batches after it."""

        def decode(_: Any) -> None:
            self._purge_later(room_id)

        return self._call("delete_room", room_id, self.node, by, decode=decode)

    def _purge_later(self, room_id: int) -> None:
        def decode(n: int) -> None:
            if n >= _PURGE_BATCH:
                self._purge_later(room_id)  # more left: again, after what queued meanwhile

        def failed(fut: Any) -> None:
            if fut.exception() is not None:
                self._purges.append(room_id)  # tried again at the next open

        fut = self._call("purge", room_id, _PURGE_BATCH, decode=decode, purge=True)
        fut.add_done_callback(failed)

    # --- messages --------------------------------------------------------------------

    def add_message(self, msg: NewMessage) -> Deferred[tuple[MessageRecord, bool]]:
        """Store a message; (record, True). A nonce the sender already used returns the
        original: (original, False), checked inside the script, so racing retries from any
        node post once."""
        fut: Deferred[tuple[MessageRecord, bool]] = Deferred(asyncio.get_running_loop())
        self._enqueue(_Send(msg, fut))
        return fut

    def _changed(self, reply: Any) -> MessageRecord | None:
        if not reply:
            return None
        rec = message_from(reply)
        self.rev = max(self.rev, rec.rev)
        self._handed_rev = max(self._handed_rev, rec.rev)
        return rec

    async def edit_message(
        self, message_id: int, text: str, ts: float, by: str
    ) -> MessageRecord | None:
        return await self._call(
            "change", self.stream_maxlen, message_id, "edited", text, _f(ts), by, self.node,
            decode=self._changed,
        )  # fmt: skip

    async def delete_message(self, message_id: int, by: str = "") -> MessageRecord | None:
        return await self._call(
            "change", self.stream_maxlen, message_id, "deleted", "", "", by, self.node,
            decode=self._changed,
        )

    async def get_message(self, message_id: int) -> MessageRecord | None:
        key = f"{self.prefix}m:{message_id}"
        value = await self._cmd(lambda c: cast(Any, c).execute_command("GET", key, NEVER_DECODE=True))
        return None if value is None else message_from(value)

    async def count_messages(self) -> int:
        return int(await self._cmd(lambda c: c.zcard(self.prefix + "all")))

    async def find_nonce(self, sender_key: str, nonce: str) -> MessageRecord | None:
        mid = await self._cmd(lambda c: c.hget(self.prefix + "nonce", f"{sender_key}\n{nonce}"))
        return None if mid is None else await self.get_message(int(mid))

    async def room_history(
        self, room_id: int, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        return self._ordered(
            await self._read("page", f"r:{room_id}:ids", _opt(before), _opt(after), limit), after
        )

    async def dm_history(
        self, me: str, other: str | None, before: int | None, after: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        index = f"d:{{{me}}}:ids" if other is None else f"d:{{{me}}}:w:{other.lower()}"
        return self._ordered(
            await self._read("page", index, _opt(before), _opt(after), limit), after
        )

    def _ordered(self, reply: list[Any], after: int | None) -> tuple[list[MessageRecord], bool]:
        page, more = self._page(reply)
        if after is None:
            page.reverse()  # read newest first; always returned oldest first
        return page, more

    async def changes_since(
        self, rev: int, room_ids: list[int], me: str, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        """Every message with rev > `rev` in those rooms and in `me`'s DMs, oldest revision
        first, read from each source's revision index in one script (one consistent view:
        no change can be half-seen while other nodes write)."""
        keys = [f"d:{{{me}}}:revs", *(f"r:{r}:revs" for r in room_ids)]
        return self._page(await self._read("changes", rev, limit, *keys))

    async def has_dms_between(self, me: str, other: str) -> bool:
        return bool(
            await self._cmd(lambda c: c.sismember(f"{self.prefix}d:{{{me}}}:with", other.lower()))
        )

    # --- the bus (chatd/cluster): writes ordered with every other write ---------------

    def enter_room(self, room_id: int, key: str, name: str) -> Deferred[tuple[int, str]]:
        """This node's user enters a room (scripts.ROOM_ENTER): (on how many nodes the
        user is in it now (1: announced as new), the stream entry saying so), also when
        Redis had it in here already (a departure still owed); (-1, "") the room is gone."""

        def decode(reply: Any) -> tuple[int, str]:
            return int(reply[0]), str(reply[1]) if len(reply) > 1 else ""

        return self._call("room_enter", self.node, room_id, key, name, decode=decode)

    def leave_room(self, room_id: int, key: str, reason: str) -> Deferred[int]:
        """This node's user leaves a room (scripts.ROOM_LEAVE): 0 it was not in, 1 out,
        2 out and the (ephemeral) room closed, its messages purged after."""
        decode = self._purged_if_closed(room_id)
        return self._call("room_leave", self.node, room_id, key, reason, decode=decode)

    def close_room_if_empty(self, room_id: int) -> Deferred[int]:
        """An ephemeral room nobody is in on any node goes (scripts.ROOM_CLOSE_IF_EMPTY):
        2 it did, its messages purged after; 0 it stays (or was gone)."""
        decode = self._purged_if_closed(room_id)
        return self._call("room_close_if_empty", room_id, decode=decode)

    def _purged_if_closed(self, room_id: int) -> Callable[[Any], int]:
        """A membership script's reply as a number; 2 (the room closed): its messages are
        purged after."""

        def decode(n: Any) -> int:
            if int(n) == 2:
                self._purge_later(room_id)
            return int(n)

        return decode

    def reap(self, node: str, gone: bool = True) -> Deferred[int]:
        """Every membership `node` has in Redis goes (scripts.REAP); with `gone` the node
        leaves the service too (a dead one), else it stays (this node, after an outage).
        How many memberships it had."""

        def decode(reply: Any) -> int:
            for room_id in reply[1]:
                self._purge_later(int(room_id))
            return int(reply[0])

        return self._call("reap", node, "1" if gone else "", decode=decode)

    async def cluster_view(self) -> ClusterView:
        """What this node adopts when it may have missed changes (scripts.CLUSTER_VIEW):
        one consistent view, with the stream position it stands for."""
        last, added, rev, rooms, members, guests, revoked = await self._read(
            "cluster_view", self.node
        )
        remote: dict[int, dict[str, tuple[str, set[str]]]] = {}
        nodes = []
        for node, flat, live in members:
            if live:
                nodes.append(node)
            for field, name in zip(flat[::2], flat[1::2], strict=True):
                room_id, _, key = field.partition("\n")
                entry = remote.setdefault(int(room_id), {}).setdefault(key, (name, set()))
                entry[1].add(node)
        return ClusterView(
            last_id=last,
            entries_added=int(added),
            rev=int(rev),
            rooms=[_room(int(i), dict(zip(h[::2], h[1::2], strict=True))) for i, h in rooms],
            remote=remote,
            nodes=sorted(nodes),
            guests=dict(zip(guests[::2], guests[1::2], strict=True)),
            revoked={jti: int(float(exp)) for jti, exp in zip(revoked[::2], revoked[1::2], strict=True)},
        )

    def publish(self, fields: tuple[Any, ...]) -> Deferred[Any]:
        """Append an event for the other nodes to the change stream (field, value, ...)."""
        return self._call_cmd(
            "XADD", self.prefix + "changes", "MAXLEN", "~", self.stream_maxlen, "*",
            "node", self.node, *fields,
        )  # fmt: skip

    # --- retention -------------------------------------------------------------------

    async def prune(self, now: float, max_age: float, keep: int, batch: int = 500) -> int:
        """Retention with the SQLite store's rules (messages older than ``max_age``; all but
        the newest ``keep`` per room and DM pair, tombstones below that cut too; a nonce
        younger than 24 h blanks instead of deleting)."""
        total = 0
        cut = _f(now - NONCE_KEEP)
        if max_age > 0:
            total += await self._prune_range("all", "", _f(now - max_age), cut, batch)
        if keep > 0:
            for index in await self._over_keep(keep):
                key = self.prefix + index

                async def cutoff(c: aioredis.Redis, key: str = key) -> list[str]:
                    # The oldest of the newest `keep`.
                    return cast(list[str], await c.zrevrange(key, keep - 1, keep - 1))

                below = await self._cmd(cutoff)
                if below:
                    # The live messages below the cut, then the tombstones there.
                    total += await self._prune_range(index, below[0], "", cut, batch)
                    dead = index.removesuffix(":ids") + ":dead"
                    total += await self._prune_range(dead, below[0], "", cut, batch)
        return total

    async def _over_keep(self, keep: int) -> list[str]:
        """The live indexes of rooms and DM pairs holding more than ``keep`` messages."""
        P = self.prefix
        rooms = cast(set[str], await self._cmd(lambda c: c.smembers(P + "rooms")))
        pairs = cast(set[str], await self._cmd(lambda c: c.smembers(P + "pairs")))
        indexes = [f"r:{r}:ids" for r in sorted(rooms, key=int)] + [f"p:{p}:ids" for p in pairs]
        out: list[str] = []
        for i in range(0, len(indexes), 500):
            chunk = indexes[i : i + 500]

            async def sizes(c: aioredis.Redis, chunk: list[str] = chunk) -> list[Any]:
                pipe = c.pipeline(transaction=False)
                for x in chunk:
                    pipe.zcard(P + x)
                return await pipe.execute()

            out += [x for x, n in zip(chunk, await self._cmd(sizes), strict=True) if n > keep]
        return out

    async def _prune_range(self, index: str, below: str, older: str, cut: str, batch: int) -> int:
        total, after, more = 0, 0, True
        while more:
            reply: list[int] = await self._call("prune", index, after, below, older, cut, batch)
            removed, last, flag = reply
            total += int(removed)
            after, more = int(last), flag == 1
        return total

    # --- chatd copy (synchronous: an offline command; see chatd/store/copy.py) -------

    def _connect_sync(self) -> redis.Redis:
        r = self.sync_client()
        try:
            for name, src in SCRIPTS.items():
                self._shas[name] = r.script_load(src)
        except RedisError as exc:
            r.close()
            raise RedisStoreError(f"Redis at {self._where()}: {exc}") from None
        return r

    def is_empty(self) -> bool:
        """No account, room, message, guest hold or revocation, and revision 0 (a server
        may have opened it: an epoch alone does not count)."""
        P = self.prefix
        r = self._connect_sync()
        try:
            keys = ("users", "rooms", "rooms:gone", "all", "guests", "revoked", "nonce")
            if any(r.exists(P + k) for k in keys):
                return False
            return int(r.hget(P + "meta", "rev") or 0) == 0
        finally:
            r.close()

    def export_dump(self) -> Dump:
        """Everything but the messages (export_messages). Stop the servers first: Redis
        gives no snapshot across many reads."""
        P = self.prefix
        r = self._connect_sync()
        try:
            m = cast(dict[str, str], r.hgetall(P + "meta"))
            if not m.get("epoch"):
                raise RedisStoreError(f"no chatd data in Redis at {self._where()}")
            if (why := layout_error(m, self._where())) is not None:
                raise RedisStoreError(why)
            _, users = self._sync_call(r, "all_users")
            rows = []
            for flat in users:
                h = dict(zip(flat[::2], flat[1::2], strict=True))
                rows.append(UserRow(int(h["i"]), h["n"], h["h"], h["a"] == "1", int(h["tv"]),
                                    float(h.get("c", 0))))  # fmt: skip
            guests = cast(dict[str, str], r.hgetall(P + "guests"))
            revoked = cast(list[tuple[str, float]], r.zrange(P + "revoked", 0, -1, withscores=True))
            return Dump(
                epoch=m["epoch"], rev=int(m.get("rev", 0)),
                users_version=int(m.get("users_version", 0)),
                last_user_id=int(m.get("user_id", 0)), last_room_id=int(m.get("room_id", 0)),
                last_message_id=int(m.get("msg_id", 0)),
                users=sorted(rows, key=lambda u: u.id),
                guests=sorted((_GUEST.decode(g) for g in guests.values()), key=lambda g: g.name),
                revoked={jti: int(exp) for jti, exp in revoked},
                rooms=self._rooms(r),
            )  # fmt: skip
        finally:
            r.close()

    def export_messages(self, batch: int = 2_000) -> Iterator[list[MessageRow]]:
        """Every stored message (tombstones too) in id order, ``batch`` at a time; those of
        a deleted room not purged yet are left out."""
        P = self.prefix
        r = self._connect_sync()
        try:
            rooms = {int(x) for x in cast(set[str], r.smembers(P + "rooms"))}
            after = "-inf"
            while True:
                ids = cast(list[str], r.zrangebyscore(P + "all", after, "+inf", 0, batch))
                if not ids:
                    return
                keys = [f"{P}m:{i}" for i in ids]
                values = cast(Any, r).execute_command("MGET", *keys, NEVER_DECODE=True)
                out = []
                for value in values:
                    if value is None:
                        continue
                    row = _row(value)
                    if row.room_id is not None and row.room_id not in rooms:
                        continue
                    out.append(row)
                yield out
                after = f"({ids[-1]}"
        finally:
            r.close()

    def import_dump(self, dump: Dump, messages: Iterator[list[MessageRow]]) -> int:
        """Load a dump into this (empty: see is_empty) database: accounts, holds,
        revocations, rooms, then the messages, and last the counters and the epoch, so an
        interrupted copy is never mistaken for a whole one by the next. Returns how many
        messages were loaded."""
        P = self.prefix
        r = self._connect_sync()
        try:
            pipe = r.pipeline(transaction=False)
            for u in dump.users:
                pipe.hset(f"{P}u:{u.id}", mapping={
                    "i": u.id, "n": u.name, "h": u.pw_hash, "a": int(u.admin),
                    "tv": u.token_version, "c": _f(u.created_at)})  # fmt: skip
                pipe.hset(P + "users", u.name.lower(), u.id)
            for g in dump.guests:
                pipe.hset(P + "guests", g.name.lower(), _ENC.encode(g))
            for jti, exp in dump.revoked.items():
                pipe.zadd(P + "revoked", {jti: exp})
            for room in dump.rooms:
                pipe.hset(f"{P}room:{room.id}", mapping={
                    "n": room.name, "k": room.name.lower(), "t": room.topic, "o": room.owner,
                    "c": _f(room.created_at), "e": int(room.ephemeral), "op": int(room.open)})  # fmt: skip
                pipe.hset(P + "room_names", room.name.lower(), room.id)
                pipe.sadd(P + "rooms", room.id)
            pipe.execute()
            count = 0
            for rows in messages:
                for i in range(0, len(rows), _SEND_CHUNK):
                    if chunk := rows[i : i + _SEND_CHUNK]:
                        self._sync_call(r, "import", *(_packed(m) for m in chunk))
                count += len(rows)
            r.hset(P + "meta", mapping={
                "epoch": dump.epoch, "layout": LAYOUT, "rev": dump.rev,
                "users_version": dump.users_version, "user_id": dump.last_user_id,
                "room_id": dump.last_room_id, "msg_id": dump.last_message_id})  # fmt: skip
            return count
        except RedisError as exc:
            raise RedisStoreError(f"Redis at {self._where()}: {exc}") from None
        finally:
            r.close()


def _row(value: bytes) -> MessageRow:
    """A stored message (scripts.py, MESSAGE) as `chatd copy` moves it."""
    f = _FIELDS.decode(value)
    f += [None] * (13 - len(f))
    return MessageRow(
        f[0], f[1], f[2], f[3], f[10], f[4], f[11], f[5], float(f[6]),
        None if f[7] is None else float(f[7]), f[8], f[9], f[12],
    )  # fmt: skip


def _packed(m: MessageRow) -> bytes:
    """A copied message as the store keeps it (scripts.py, MESSAGE)."""
    return _PACK.encode([m.id, m.rev, *_packed_fields(
        m.room_id, m.sender, m.recipient, m.text, m.ts, m.edited_ts, m.edited_by, m.deleted,
        m.sender_key, m.recipient_key, m.nonce,
    )])  # fmt: skip


async def _in_task(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a Task of its own: redis-py's timeouts (asyncio.timeout) need the
    Task they run in to be theirs. The server's command driver steps handler coroutines
    outside any Task, or inside whichever Task delivered a write (this store's writer), so
    the Task current at the call is no guide."""
    return await asyncio.get_running_loop().create_task(coro)


def _opt(x: int | None) -> str:
    return "" if x is None else str(x)
