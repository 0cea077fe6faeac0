"""Rate budgets shared by every node on one Redis (`SharedBudgets`, chatd/domain/limits.py).

How a limit holds across nodes without a Redis round trip per `msg.send`: each node keeps
spending from its local buckets (the single-node code, unchanged), counts what it spent,
and every `limits_sync` seconds (0.1 s by default) settles: ONE script call adds every
bucket's spends to the shared bucket (refilled on Redis's clock, so the nodes' clocks do
not matter) and returns what is left, which the node takes as its local state. So the
sustained rate of a user is the limit whatever number of nodes it uses; what a user can
exceed it by is the burst each extra node still believed available at its last settle
(protocol.md Limits, "Several nodes"). Failed logins go the same way: each node adds its
new failures to a shared list per account and per address, and reads back those of the
other nodes for the keys it is checking.

Keys (P the store's prefix):
  P lim:<bucket>   hash: t (tokens; negative is debt, repaid before the next send), s;
                   expires once it would be full again. <bucket> is s:<user>, r:<addr>
                   (registrations), g:<addr> (guest logins).
  P fail:<key>     zset of failed logins, score = Redis time; members <node>:<seq>:<n>;
                   expires after the window. <key> is a:<account> or i:<addr>.
  P lim:seq        counter making failure members unique.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

# ARGV: P, node, window, number of buckets, number of failure keys, then per bucket
# (name, rate, burst, spent), per failure key (name, count), then the watched failure keys.
# Reply: {tokens of each bucket as strings, {watched key, {ages of the others' failures}}...}
_SETTLE = r"""
local P, node = ARGV[1], ARGV[2]
local window, nb, nf = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local left = {}
local i = 6
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
if nf > 0 then
  local seq = redis.call('INCR', P..'lim:seq')
  for _ = 1, nf do
    local key = P..'fail:'..ARGV[i]
    for n = 1, tonumber(ARGV[i+1]) do
      redis.call('ZADD', key, now, node..':'..seq..':'..n)
    end
    redis.call('PEXPIRE', key, math.ceil(window * 1000))
    i = i + 2
  end
end
local mine = node..':'
local seen = {}
while i <= #ARGV do
  local key = P..'fail:'..ARGV[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local list = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local ages = {}
  for j = 1, #list, 2 do
    if string.sub(list[j], 1, #mine) ~= mine then
      ages[#ages+1] = string.format('%.17g', now - tonumber(list[j+1]))
    end
  end
  seen[#seen+1] = ARGV[i]
  seen[#seen+1] = ages
  i = i + 1
end
return {left, seen}
"""


class RedisBudgets:
    """`SharedBudgets` on the Redis database at ``url``: one connection of its own (a
    settle never waits behind the store's writes), short timeouts (a settle that cannot
    reach Redis fails at once; Limits keeps the spends for the next one)."""

    def __init__(self, url: str, *, prefix: str = "chatd:", timeout: float = 1.0) -> None:
        self.prefix = prefix
        self.node = uuid.uuid4().hex[:12]
        self._client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=aioredis.retry.Retry(NoBackoff(), 0),
        )  # fmt: skip
        self._script = self._client.register_script(_SETTLE)

    async def settle(
        self,
        spent: list[tuple[str, float, float, int]],
        failed: dict[str, int],
        watched: list[str],
        window: float,
    ) -> tuple[list[float], dict[str, list[float]]]:
        args: list[Any] = [self.prefix, self.node, repr(window), len(spent), len(failed)]
        for name, rate, burst, n in spent:
            args += (name, repr(rate), repr(burst), n)
        for name, n in failed.items():
            args += (name, n)
        args += watched
        # In a Task of its own: redis-py's timeouts need one (see store._in_task), and a
        # login's check runs in the server's command driver, outside any Task.
        left, seen = await asyncio.get_running_loop().create_task(self._call(args))
        remote = {seen[j]: [float(a) for a in seen[j + 1]] for j in range(0, len(seen), 2)}
        return [float(x) for x in left], remote

    async def _call(self, args: list[Any]) -> Any:
        try:
            return await self._script(args=args)
        except (RedisError, OSError) as exc:
            raise ConnectionError(f"Redis: {exc}") from None

    async def close(self) -> None:
        await self._client.aclose()
