"""Rate budgets and failed logins shared by every node on one Redis (`SharedBudgets`,
chatd/domain/limits.py).

Budgets (msg.send per user, registrations and guest logins per address): each node keeps
spending from its local buckets without a Redis round trip per `msg.send`, counts what it
spent, and every `limits_sync` seconds (0.1 s by default) settles: ONE script call adds
every bucket's spends to the shared bucket (refilled on Redis's clock, so the nodes' clocks
do not matter) and returns what is left, which the node takes as its local state. So the
sustained rate of a user is the limit whatever number of nodes it uses; what a user can
exceed it by is the burst each extra node still believed available at its last settle
(protocol.md Limits, "Several nodes").

Failed logins are exact instead (a login costs a password hash anyway, so two round trips
are cheap): before a password check ONE script (`_ADMIT`) checks, for each of its keys
(the account, the connection, the address), failures in the window plus checks in flight
on every node against the key's limit, and either refuses (the failures alone reach a
limit), answers "wait" (checks in flight fill it), or reserves a place in flight under
every key at once. After the check ONE script (`_FINISH`) turns the reservation into a
failure or releases it. A reservation lives while its node does: the node keeps
`P lim:node:<node>` alive (every settle while it has checks in flight; TTL `lease`), and a
reservation whose node key has lapsed no longer counts (a node that died mid-check).
An admit whose reply was lost (it may have reserved a place, or may still run) is released
(`release`, the same script): its place goes, and a tombstone makes a late-running admit of
that id reserve nothing, so an unanswered admit never holds a place past that release.

Keys (P the store's prefix):
  P lim:<bucket>   hash: t (tokens; negative is debt, repaid before the next send), s;
                   expires once it would be full again. <bucket> is s:<user>, r:<addr>
                   (registrations), g:<addr> (guest logins).
  P fail:<key>     zset of failed logins, score = Redis time, member = the check's id;
                   expires after the window. <key> is a:<account>, i:<addr> or
                   c:<node>:<connection>.
  P flight:<key>   zset of checks in flight, member = the check's id <node>:<n>, score =
                   Redis time; expires an hour after its last reservation (a check is
                   never that long: the hash queue and the store's timeouts bound it).
  P lim:node:<node> this node's reservations are alive (PX lease).
  P lim:gone:<id>  an admit released unanswered: it must not reserve if it runs later
                   (EX 3600, the flight keys' life).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

# ARGV: P, number of buckets, then per bucket (name, rate, burst, spent).
# Reply: the tokens of each bucket, as strings.
_SETTLE = r"""
local P, nb = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local left = {}
local i = 3
for _ = 1, nb do
  local key = P..'lim:'..ARGV[i]
  local rate, burst, spent = tonumber(ARGV[i+1]), tonumber(ARGV[i+2]), tonumber(ARGV[i+3])
  local h = redis.call('HMGET', key, 't', 's')
  local tokens, stamp = tonumber(h[1]), tonumber(h[2])
  if not tokens then tokens, stamp = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  tokens = math.max(-10 * burst, tokens - spent)
  redis.call('HSET', key, 't', string.format('%.17g', tokens), 's', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  left[#left+1] = string.format('%.17g', tokens)
  i = i + 4
end
return left
"""

# ARGV: P, node, check id, window, lease (s), then per key (name, limit > 0).
# Reply: {0} admitted (a place reserved under every key), {1} wait (checks in flight fill
# a key), {2, retry_after} refused (a key's failures alone reach its limit), {3} this id
# was released already (its caller gave up on it). As chatd.ratelimit.FailureGate.admit,
# which it mirrors: a refusal by any key comes first.
_ADMIT = r"""
local P, node, id = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', P..'lim:gone:'..id) == 1 then return {3} end
local window, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local alive = {[node] = true}
local blocked = false
for i = 6, #ARGV, 2 do
  local name, limit = ARGV[i], tonumber(ARGV[i+1])
  local fail = P..'fail:'..name
  redis.call('ZREMRANGEBYSCORE', fail, '-inf', now - window)
  local failures = redis.call('ZCARD', fail)
  if failures >= limit then
    local oldest = redis.call('ZRANGE', fail, failures - limit, failures - limit, 'WITHSCORES')
    return {2, string.format('%.17g', window - (now - tonumber(oldest[2])))}
  end
  if not blocked then
    local flight = P..'flight:'..name
    local flying = 0
    for _, m in ipairs(redis.call('ZRANGE', flight, 0, -1)) do
      local owner = string.match(m, '^[^:]*')
      local live = alive[owner]
      if live == nil then
        live = redis.call('EXISTS', P..'lim:node:'..owner) == 1
        alive[owner] = live
      end
      if live then flying = flying + 1 else redis.call('ZREM', flight, m) end
    end
    blocked = failures + flying >= limit
  end
end
if blocked then return {1} end
for i = 6, #ARGV, 2 do
  local flight = P..'flight:'..ARGV[i]
  redis.call('ZADD', flight, now, id)
  redis.call('EXPIRE', flight, 3600)
end
redis.call('SET', P..'lim:node:'..node, '1', 'PX', math.ceil(lease * 1000))
return {0}
"""

# ARGV: P, check id, window, outcome (1 failed, 0 released, 2 released unanswered: leave a
# tombstone), then the key names the check was admitted under. Idempotent: sent again when
# its reply is lost, it counts a failure once (the member is the check's id).
# Reply: each key's failures in the window after this one (none for outcome 2).
_FINISH = r"""
local P, id, window, failed = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[4] == '2' then
  redis.call('SET', P..'lim:gone:'..id, '1', 'EX', 3600)
  for i = 5, #ARGV do redis.call('ZREM', P..'flight:'..ARGV[i], id) end
  return {}
end
local counts = {}
for i = 5, #ARGV do
  redis.call('ZREM', P..'flight:'..ARGV[i], id)
  local fail = P..'fail:'..ARGV[i]
  if failed then
    redis.call('ZADD', fail, now, id)
    redis.call('PEXPIRE', fail, math.ceil(window * 1000))
  end
  redis.call('ZREMRANGEBYSCORE', fail, '-inf', now - window)
  counts[#counts+1] = redis.call('ZCARD', fail)
end
return counts
"""


class RedisBudgets:
    """`SharedBudgets` on the Redis database at ``url``: one connection of its own (a
    settle or a login check never waits behind the store's writes), short timeouts (a call
    that cannot reach Redis fails at once with ConnectionError). ``lease``: how long this
    node's reservations outlive its last renewal (a node that died mid-check)."""

    def __init__(
        self, url: str, *, prefix: str = "chatd:", timeout: float = 1.0, lease: float = 5.0
    ) -> None:
        self.prefix = prefix
        self.node = uuid.uuid4().hex[:12]
        self.lease = lease
        self._alive = f"{prefix}lim:node:{self.node}"
        self._client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=aioredis.retry.Retry(NoBackoff(), 0),
        )  # fmt: skip
        self._settle = self._client.register_script(_SETTLE)
        self._admit = self._client.register_script(_ADMIT)
        self._finish = self._client.register_script(_FINISH)

    async def settle(self, spent: list[tuple[str, float, float, int]]) -> list[float]:
        args: list[Any] = [self.prefix, len(spent)]
        for name, rate, burst, n in spent:
            args += (name, repr(rate), repr(burst), n)
        left = await self._call(lambda: self._settle(args=args))
        return [float(x) for x in left]

    async def admit(
        self, check: str, keys: list[tuple[str, int]], window: float
    ) -> bool | float | None:
        assert check.startswith(self.node + ":")  # the script reads its node from the id
        args: list[Any] = [self.prefix, self.node, check, repr(window), repr(self.lease)]
        for name, limit in keys:
            args += (name, limit)
        reply = await self._call(lambda: self._admit(args=args))
        if reply[0] == 2:
            return float(reply[1])
        return True if reply[0] == 0 else False if reply[0] == 3 else None

    async def finish(self, check: str, names: list[str], failed: bool, window: float) -> list[int]:
        args: list[Any] = [self.prefix, check, repr(window), 1 if failed else 0, *names]
        return [int(n) for n in await self._call(lambda: self._finish(args=args))]

    async def release(self, check: str, names: list[str]) -> None:
        args: list[Any] = [self.prefix, check, "0", 2, *names]  # no window: counts nothing
        await self._call(lambda: self._finish(args=args))

    async def renew(self) -> None:
        px = int(self.lease * 1000)
        await self._call(lambda: self._client.set(self._alive, "1", px=px))

    async def _call(self, request: Callable[[], Awaitable[Any]]) -> Any:
        async def run() -> Any:
            try:
                return await request()
            except (RedisError, OSError) as exc:
                raise ConnectionError(f"Redis: {exc}") from None

        # In a Task of its own: redis-py's timeouts need one (see store._in_task), and a
        # login's check runs in the server's command driver, outside any Task.
        return await asyncio.get_running_loop().create_task(run())

    async def close(self) -> None:
        """Stop; this node's reservations (none should be left) lapse at once."""
        try:
            await self._call(lambda: self._client.delete(self._alive))
        except ConnectionError:
            pass
        await self._client.aclose()
